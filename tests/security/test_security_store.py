"""A store is data: damaged, resealed or linked stores are store errors (exit 2, the file named), never
silent wrong answers, never blamed on the target, never a traceback."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tapml.carving import OP_COLUMNS, FixtureStore, StoreError, carve
from tapml.cli import main


def _reseal(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    text = json.dumps(body, separators=(",", ":"))
    return f'{text[:-1]},"digest":"{hashlib.sha256(text.encode()).hexdigest()}"}}'


@pytest.fixture
def store(tmp_path) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 4)).eval()
    x = torch.randn(8, 64)
    carve(model, lambda: model(x), tmp_path / "s")
    return tmp_path / "s"


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _shard(store: Path) -> Path:
    return next((store / "tensors").iterdir())


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tapml.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_a_flipped_byte_in_tensor_data_is_a_store_error_not_a_small_error(store):
    m = _manifest(store)
    key, meta = next((k, v) for k, v in m["tensors"].items() if "offset" not in v)  # a big weight, not packed
    shard = store / "tensors" / meta["shard"]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0x01  # one bit of tensor data
    shard.write_bytes(bytes(data))
    proc = run_cli("replay", store, "--platform", "torch-cpu", "--json")
    assert proc.returncode == 2 and "does not match its content key" in proc.stderr and shard.name in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["header", "missing"])
def test_store_faults_during_replay_are_store_errors_naming_the_file(store, damage):
    shard = _shard(store)
    if damage == "header":
        data = bytearray(shard.read_bytes())
        data[10:20] = b"\xff" * 10  # the safetensors JSON header
        shard.write_bytes(bytes(data))
        proc = run_cli("replay", store, "--platform", "torch-cpu")
        assert proc.returncode == 2 and shard.name in proc.stderr and "crashed" not in proc.stdout
    else:
        shard.unlink()
        proc = run_cli("replay", store, "--platform", "torch-cpu")
        assert proc.returncode == 2 and f"{shard.name} is missing" in proc.stderr


ARGS, KWARGS, OUTPUTS = (OP_COLUMNS.index(c) for c in ("args", "kwargs", "outputs"))  # schema 2: ops are rows


def _use(m: dict, value: dict) -> dict:
    """The tensor use an encoded value refers to (schema 2 lists each use once, in ``uses``)."""
    return m["uses"][value["tensor"]]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema="1"), "no integer schema"),
    (lambda m: m.update(ops=5), "expected a list"),
    (lambda m: _use(m, m["ops"][0][OUTPUTS]).update(shape=[999, 2]), "needs 1998 stored elements"),
    (lambda m: m["uses"].append({"dtype": "float32", "shape": [-1], "stride": [1]}), "non-negative"),
    (lambda m: m["tensors"][next(iter(m["tensors"]))].pop("nbytes"), "nbytes: missing"),
    (lambda m: m["strings"].__setitem__(m["ops"][0][1], "aten.from_file.default"), "side effects"),
    (lambda m: m["shards"].update({"../../etc": {"bytes": 1}}), "invalid shard"),
    # found by benchmarks/fuzz.py: each was an exit 3 (a traceback-worthy internal error) before
    (lambda m: m["ops"][0].__setitem__(ARGS, [_nested(200)]), "nested too deeply"),
    (lambda m: m["ops"][0].__setitem__(KWARGS, {"dict": {"m": {"memory_format": ["a"]}}}), "unknown memory format"),
    (lambda m: m["ops"][0].__setitem__(KWARGS, {"dict": {"m": {"layout": {}}}}), "unknown layout"),
    (lambda m: _use(m, m["ops"][0][ARGS][0]).update(stride=[10**30, 1]), "non-negative integers"),
    (lambda m: _use(m, m["ops"][0][ARGS][0]).update(stride=[1 << 30, 1]), "span"),
    (lambda m: m["tensors"][next(iter(m["tensors"]))].update(shard="x" * 300), "in unknown shard"),
    (lambda m: m["ops"][0][ARGS].append({"tensor": len(m["uses"])}), "is not an index into"),
    (lambda m: m["stats"].pop("bytes_referenced"), None),
])
def test_resealed_malformed_manifests_exit_2_with_one_line(store, edit, message):
    m = _manifest(store)
    edit(m)
    (store / "manifest.json").write_text(_reseal(m))
    for args in (["inspect", store], ["replay", store, "--platform", "torch-cpu"]):
        proc = run_cli(*args)
        if message is None:  # harmless: reads fine
            assert proc.returncode == 0, proc.stderr
            continue
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_truncated_shard_with_its_size_resealed(store):
    shard = _shard(store)
    shard.write_bytes(shard.read_bytes()[:-100])
    m = _manifest(store)
    m["shards"][shard.name]["bytes"] = shard.stat().st_size
    (store / "manifest.json").write_text(_reseal(m))
    proc = run_cli("inspect", store)
    assert proc.returncode == 2 and shard.name in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("what", ["shard", "tensors"])
def test_links_out_of_the_store_are_refused(store, tmp_path, what):
    outside = tmp_path / "outside"
    outside.mkdir()
    if what == "shard":
        shard = _shard(store)
        (outside / shard.name).write_bytes(shard.read_bytes())
        shard.unlink()
        shard.symlink_to(outside / shard.name)
    else:
        tensors = store / "tensors"
        for f in tensors.iterdir():
            f.rename(outside / f.name)
        tensors.rmdir()
        tensors.symlink_to(outside)
    with pytest.raises(StoreError, match="leads outside the store"):
        FixtureStore(store)
    assert run_cli("inspect", store).returncode == 2


def test_a_full_disk_while_writing_the_manifest_names_the_path(tmp_path, monkeypatch, capsys):
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    factory = tmp_path / "m.py"
    factory.write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2), (torch.randn(1, 2),)\n")
    code = main(["carve", f"{factory}:build", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "manifest.json" in err and "raised" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tapml-*"))


def test_a_full_disk_while_carving_blames_the_disk_not_the_model(tmp_path, monkeypatch, capsys):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    from tapml.carving import shards

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(shards.os, "writev", full)  # shards are written from tensor memory by writev
    factory = tmp_path / "m.py"
    factory.write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2), (torch.randn(1, 2),)\n")
    code = main(["carve", f"{factory}:build", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "shard-00000" in err and "raised while" not in err


def test_stale_temporary_directories_of_killed_runs_are_removed(tmp_path, store):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".again.tapml-tmp-{dead}-abc123"
    (stale / "tensors").mkdir(parents=True)
    (stale / "tensors" / "big").write_bytes(b"x" * 1000)
    mine = tmp_path / f".again.tapml-tmp-{os.getpid()}-zzz"  # a live process's: left alone
    mine.mkdir()
    assert main(["carve", "zoo:tiny-llama", "-o", str(tmp_path / "again")]) == 0
    assert not stale.exists() and mine.exists()


def test_nesting_deeper_than_the_json_parser_allows(store):
    m = _manifest(store)
    body = {k: v for k, v in m.items() if k != "digest"}
    text = json.dumps(body, separators=(",", ":")).replace('"ops":[', '"ops":[' + "[" * 5000 + "]" * 5000 + ",", 1)
    sealed = f'{text[:-1]},"digest":"{hashlib.sha256(text.encode()).hexdigest()}"}}'
    (store / "manifest.json").write_text(sealed)
    proc = run_cli("inspect", store)
    assert proc.returncode == 2 and "is corrupt" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
