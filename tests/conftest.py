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
def _compile_cache(tmp_path_factory):
    """TVM kernels compile into a per-session directory (inherited by spawned workers)."""
    old = os.environ.get("TAPML_CACHE_DIR")
    os.environ["TAPML_CACHE_DIR"] = str(tmp_path_factory.mktemp("tapml-cache"))
    yield
    if old is None:
        os.environ.pop("TAPML_CACHE_DIR", None)
    else:
        os.environ["TAPML_CACHE_DIR"] = old
