"""Shared fixtures: carved stores are built once per session."""

from __future__ import annotations

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
