"""Shared fixtures: carved stores are built once per session."""

from __future__ import annotations

import os

import pytest

from tapml.carving import FixtureStore, carve
from tapml.workloads import load_workload


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory) -> FixtureStore:
    workload = load_workload("zoo:minilm")
    path = tmp_path_factory.mktemp("stores") / "minilm"
    carve(workload.model, workload.run, path)
    return FixtureStore(path)


@pytest.fixture(scope="session")
def llama_generate_store(tmp_path_factory) -> FixtureStore:
    workload = load_workload("zoo:tiny-llama")
    path = tmp_path_factory.mktemp("stores") / "llama-gen"
    carve(workload.model, lambda: workload.run(generate=4), path)
    return FixtureStore(path)


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_in_the_session(tmp_path_factory):
    """What tapml puts in the temporary directory (an offload's store when no ``out`` is given, ``tapml-run-*``)
    goes under the session's own directory, which pytest prunes: left in /tmp, each suite run left ~80 stores
    behind (GBs). Spawned workers and CLI subprocesses inherit it through TMPDIR."""
    import tempfile

    where = str(tmp_path_factory.mktemp("tmp"))
    old_env, old_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = where, where
    yield
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env


@pytest.fixture(scope="session", autouse=True)
def _compile_cache(tmp_path_factory):
    """TVM kernels compile into a per-session directory (inherited by spawned workers)."""
    old = os.environ.get("TAPML_CACHE_DIR")
    os.environ["TAPML_CACHE_DIR"] = str(tmp_path_factory.mktemp("tapml-cache"))
    yield
    if old is None:
        os.environ.pop("TAPML_CACHE_DIR", None)
    else:
        os.environ["TAPML_CACHE_DIR"] = old


@pytest.fixture(scope="session", autouse=True)
def _every_run_json_matches_the_schema(tmp_path_factory):
    """Every run.json the suite writes is checked against schemas/run.schema.json at the end of the session."""
    yield
    import json
    from pathlib import Path

    import jsonschema

    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "run.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    from tapml.record import RUN_SCHEMA

    for path in tmp_path_factory.getbasetemp().rglob("run.json"):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            continue  # a bad-input test's deliberately broken file
        if not isinstance(record, dict) or record.get("schema") != RUN_SCHEMA or "ops" not in record:
            continue
        error = next(iter(validator.iter_errors(record)), None)
        if error is not None:
            problems.append(f"{path}: {error.message} at {'/'.join(map(str, error.path))}")
    assert not problems, "\n".join(problems)
