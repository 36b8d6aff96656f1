"""The fixture store: dedup, atomic writes, integrity checks naming the file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from tapml.carving import SCHEMA_VERSION, FixtureStore, ModelRaised, StoreError, carve, replay
from tapml.core import content_key


def small_store(path, model=None):
    model = model or nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16)).eval()
    x = torch.randn(4, 16)
    carve(model, lambda: [model(x) for _ in range(3)], path)
    return FixtureStore(path)


def test_weights_read_many_times_are_stored_once(tmp_path):
    store = small_store(tmp_path / "s")
    m = store.manifest
    assert m["stats"]["bytes_referenced"] > 3 * store.unique_tensor_bytes / 2
    assert store.stored_bytes / store.unique_tensor_bytes <= 1.02 or store.unique_tensor_bytes < 8192
    keys = [op["args"][0]["tensor"]["key"] for op in store.ops if op["op"] == "aten.t.default"]
    assert len(keys) == 6 and len(set(keys)) == 2  # two weights, each read three times


def test_minilm_dedup_ratio(minilm_store):
    assert minilm_store.stored_bytes / minilm_store.unique_tensor_bytes <= 1.02
    minilm_store.verify()


def test_existing_dir_is_refused_and_force_replaces(tmp_path):
    path = tmp_path / "s"
    path.mkdir()
    (path / "keep.txt").write_text("user data")
    with pytest.raises(StoreError, match="already exists"):
        small_store(path)
    assert (path / "keep.txt").exists()
    model = nn.Linear(2, 2)
    carve(model, lambda: model(torch.ones(1, 2)), path, force=True)
    assert not (path / "keep.txt").exists() and FixtureStore(path).ops
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temp dirs left


def test_a_failing_model_leaves_nothing(tmp_path):
    class Boom(nn.Module):
        def forward(self, x):
            x.mul_(2)
            raise ValueError("boom at step 2")

    with pytest.raises(ModelRaised, match="boom"):
        carve(Boom(), lambda: Boom()(torch.ones(3)), tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parent(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot write"):
        small_store(blocker / "s")


def _shard(store):
    return next((store.path / "tensors").iterdir())


def test_truncated_shard_names_the_file(tmp_path):
    store = small_store(tmp_path / "s")
    shard = _shard(store)
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(StoreError, match=shard.name + ".*truncated"):
        FixtureStore(store.path)


def test_tampered_tensor_bytes_fail_verify(tmp_path):
    store = small_store(tmp_path / "s")
    shard = _shard(store)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    reopened = FixtureStore(store.path)
    with pytest.raises(StoreError, match=shard.name + ".*does not match its content key"):
        reopened.verify()


def test_edited_manifest_is_detected(tmp_path):
    store = small_store(tmp_path / "s")
    mpath = store.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["strings"][m["ops"][0][1]] = "aten.sub.Tensor"  # the first op's name (schema 2: a row, names in strings)
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="manifest.json was modified"):
        FixtureStore(store.path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is corrupt"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json missing"),
        (lambda p: next((p / "tensors").iterdir()).unlink(), "is missing"),
    ],
)
def test_broken_stores(tmp_path, damage, message):
    store = small_store(tmp_path / "s")
    damage(store.path)
    with pytest.raises(StoreError, match=message):
        FixtureStore(store.path)


def test_newer_schema_is_refused(tmp_path):
    store = small_store(tmp_path / "s")
    mpath = store.path / "manifest.json"
    m = json.loads(mpath.read_text())
    m["schema"] = SCHEMA_VERSION + 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(StoreError, match="newer than this tapml reads"):
        FixtureStore(store.path)


def test_streams_shards_instead_of_holding_everything(tmp_path):
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).eval()
    x = torch.randn(4, 256)
    carve(model, lambda: model(x), tmp_path / "s", shard_bytes=256 * 1024)
    store = FixtureStore(tmp_path / "s")
    assert len(store.manifest["shards"]) >= 8  # 8 × 256 KiB of weights alone
    store.verify()


def test_schema_1_stores_still_load(tmp_path):
    """Stores carved before the compact manifest (schema 1: op records with their tensor refs inline)."""
    from tapml.carving.store import _seal

    store = small_store(tmp_path / "s")
    v1 = {k: v for k, v in store.manifest.items() if k not in ("digest", "reference")}  # schema 1 had no reference
    v1["schema"] = 1  # schema 2 is read into schema 1's shape: written back as is, it is a schema 1 manifest
    (store.path / "manifest.json").write_text(_seal(v1))
    old = FixtureStore(store.path)
    assert old.manifest["schema"] == 1 and old.ops == store.ops and old.layers == store.layers
    assert replay(old).ok and old.graph.consumers == store.graph.consumers


def test_shards_written_from_tensor_memory_read_back_by_safetensors(tmp_path, monkeypatch):
    """write_shard: every dtype aligned, tensors sharing memory, the packed blob, writev's partial writes."""
    import os

    import safetensors

    from tapml.carving import shards

    base = torch.arange(64, dtype=torch.float64)
    tensors = {"f64": base, "alias": base[8:24], "bf16": torch.randn(7).bfloat16(), "b": torch.tensor([True, False]),
               "c64": torch.randn(3, dtype=torch.complex64), "i8": torch.arange(5, dtype=torch.int8),
               "empty": torch.empty(0, dtype=torch.int32)}
    packed = [b"abc", b"", bytes(range(200))]
    real = os.writev
    monkeypatch.setattr(shards, "_IOV_MAX", 3)  # several calls, each cut short: every byte still lands once
    monkeypatch.setattr(shards.os, "writev", lambda fd, bufs: real(fd, [bytes(memoryview(bufs[0])[:5])]))
    assert shards.writable(tensors)
    size = shards.write_shard(tmp_path / "s.safetensors", tensors, "__packed__", packed)
    assert size == (tmp_path / "s.safetensors").stat().st_size
    with safetensors.safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)
        assert bytes(f.get_tensor("__packed__").tolist()) == b"".join(packed)
    assert not shards.writable({"t": torch.randn(4, 4).t()})  # not contiguous: the save_file path


def test_shard_reader_reads_what_either_writer_wrote_into_fresh_memory(tmp_path, monkeypatch):
    import safetensors.torch

    from tapml.carving import shards

    tensors = {"f64": torch.arange(64, dtype=torch.float64), "bf16": torch.randn(7).bfloat16(),
               "b": torch.tensor([True, False]), "empty": torch.empty(0, dtype=torch.int32)}
    shards.write_shard(tmp_path / "ours.safetensors", tensors, "__packed__", [b"abc", bytes(range(200))])
    safetensors.torch.save_file(tensors, str(tmp_path / "theirs.safetensors"))  # stores written by the fallback
    real = shards.os.preadv
    monkeypatch.setattr(shards.os, "preadv", lambda fd, bufs, at: real(fd, [bufs[0][:5]], at))  # short reads
    for name in ("ours", "theirs"):
        reader = shards.ShardReader(tmp_path / f"{name}.safetensors")
        for key, t in tensors.items():
            got = reader.read(key)
            assert torch.equal(got.view(t.dtype) if got.numel() else got, t.view(torch.uint8).view(t.dtype))
            got.fill_(7)  # fresh memory: writing into one read leaves the next alone
            assert torch.equal(reader.read(key).view(t.dtype), t) or not t.numel()
        reader.close()
    reader = shards.ShardReader(tmp_path / "ours.safetensors")
    assert bytes(reader.read("__packed__", 2, 3).tolist()) == b"c\x00\x01"
    for name, start, n in (("__packed__", 200, 4), ("__packed__", -1, 1), ("nope", 0, None), ("__metadata__", 0, 1)):
        with pytest.raises(ValueError):
            reader.read(name, start, n)


def _write_shard(path, header: bytes, data: bytes = b"\0" * 16) -> None:
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("content, message", [
    (b"\xff" * 8, "header size"),  # a header longer than the file
    ((10**6).to_bytes(8, "little") + b"{}", "header size"),
    ((2).to_bytes(8, "little") + b"[]", "not an object"),
    ((4000).to_bytes(8, "little") + b"[" * 2000 + b"]" * 2000, "cannot be parsed"),  # nested past the recursion limit
])
def test_shard_headers_that_cannot_be_read_are_refused_when_opened(tmp_path, content, message):
    from tapml.carving import shards

    (tmp_path / "s").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        shards.ShardReader(tmp_path / "s")


def test_a_header_past_its_limit_and_a_file_that_is_not_one_are_refused(tmp_path):
    from tapml.carving import shards

    _write_shard(tmp_path / "s", b'{"t":{"data_offsets":[0,16]}}' + b" " * 200)
    with pytest.raises(ValueError, match="at most 100"):
        shards.ShardReader(tmp_path / "s", header_max=100)
    os.mkfifo(tmp_path / "fifo")  # opened without blocking, then refused
    with pytest.raises(ValueError, match="not a regular file"):
        shards.ShardReader(tmp_path / "fifo")


@pytest.mark.parametrize("entry, message", [
    ('{"data_offsets":[0,999]}', "is 999 bytes long"),  # checked against the manifest before allocating
    ('{"data_offsets":[991,999]}', "outside the file"),
    ('{"data_offsets":[true,4]}', "no valid entry"),
    ('{"data_offsets":[-1,4]}', "no valid entry"),
    ('{"data_offsets":[0.0,4]}', "no valid entry"),
    ('{"data_offsets":[8,4]}', "no valid entry"),
    ('{"data_offsets":[0]}', "no valid entry"),
    ('[0,4]', "no valid entry"),
    ('{"data_offsets":[0,16]}', "is 16 bytes long, not 8"),  # longer than the manifest says: never allocated
])
def test_each_entry_is_checked_before_its_bytes_are_read(tmp_path, entry, message):
    from tapml.carving import shards

    _write_shard(tmp_path / "s", f'{{"t":{entry}}}'.encode())
    reader = shards.ShardReader(tmp_path / "s")
    with pytest.raises(ValueError, match=message):
        reader.read("t", whole=8)
    with pytest.raises(ValueError):  # and without the manifest's length
        reader.read("t", 0, None if "long" not in message else 999)


def test_loads_are_fresh_memory_and_no_mapped_pages_stay_behind(tmp_path):
    def rss_file() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("RssFile"))

    w = torch.randn(4096, 2048)  # 32 MiB: its own entry in its shard, not packed
    model = nn.Linear(2048, 4096, bias=False)
    model.weight.data = w
    carve(model, lambda: model(torch.randn(2, 2048)), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    index = next(op["index"] for op in store.ops if any(t.numel() == w.numel() for t in store.inputs(op["index"])))
    expect = lambda t: w if t.shape == w.shape else w.t()  # noqa: E731  the op read the weight or its transpose
    before = rss_file()
    big = next(t for t in store.inputs(index) if t.numel() == w.numel())
    assert torch.equal(big, expect(big)) and rss_file() - before < (8 << 20)  # one copy held, no mapped pages
    big.fill_(0)
    again = next(t for t in store.inputs(index) if t.numel() == w.numel())
    assert torch.equal(again, expect(again)) and again.data_ptr() != big.data_ptr()


def test_shared_inputs_are_views_of_the_live_weight_while_it_holds_the_carved_content(tmp_path):
    from tapml.engine import ModelState

    model = nn.Linear(512, 256, bias=False)
    x = torch.randn(2, 512)
    state = ModelState(model)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    store.share(state.resident())
    n = model.weight.numel()
    index = next(op["index"] for op in store.ops if any(t.numel() == n for t in store.inputs(op["index"])))
    storage = model.weight.untyped_storage().data_ptr()
    weight = lambda ts: next(t for t in ts if t.numel() == n)  # noqa: E731
    shared, copied = weight(store.inputs(index, shared=True)), weight(store.inputs(index))
    assert shared.untyped_storage().data_ptr() == storage and copied.untyped_storage().data_ptr() != storage
    assert torch.equal(shared, copied) and shared.stride() == copied.stride()
    carved = copied.clone()
    with torch.no_grad():
        model.weight.mul_(2)  # the live weight no longer holds what the op read: the store's bytes again
    again = weight(store.inputs(index, shared=True))
    assert again.untyped_storage().data_ptr() != storage and torch.equal(again, carved)
    store.unshare()
    with torch.no_grad():
        model.weight.div_(2)  # the carved content again, but no longer lent: read from the store
    assert weight(store.inputs(index, shared=True)).untyped_storage().data_ptr() != storage


def test_a_shared_tensor_must_be_its_own_whole_storage(tmp_path):
    """A live tensor that is a slice of a larger buffer is not laid out in place: a use over the whole
    storage would start at the buffer's offset 0, another tensor's bytes."""
    buffer = torch.randn(2 * 4096)
    model = nn.Linear(64, 64, bias=False)
    model.weight.data = buffer[4096:].view(64, 64)
    carve(model, lambda: model(torch.randn(2, 64)), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    key = content_key(model.weight.detach().reshape(-1))
    store.share({key: model.weight})
    for op in store.ops:
        for t in store.inputs(op["index"], shared=True):
            assert t.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()


def test_in_place_writes_after_truncation_leave_the_stored_bytes_alone(tmp_path):
    from tapml.carving import CarveOptions

    w = torch.randn(256, 256)

    def run():
        y = w @ w  # recorded, then --max-bytes is reached
        y.add_(1)  # not recorded, but its memory is still pending: copied first
        w.mul_(2)
        return y

    carve(nn.Identity(), run, tmp_path / "s", options=CarveOptions(max_bytes=1))
    store = FixtureStore(tmp_path / "s")
    store.verify()
    assert store.manifest["truncated"] and replay(store).ok


def test_read_only_uses_are_kept_up_to_a_byte_budget_and_marked_with_their_content(tmp_path, monkeypatch):
    """A comparison's reads: one tensor object per use while it is among the recently read (no memory beyond
    VIEW_BYTES), marked with its ref so what a comparison learns of it is cached per content. A use is kept
    from its second read on, and only if fewer than VIEW_BYTES were read since its first: read back later, it
    would have been pushed out before (a 1B model's forward reads GBs through a 32 MiB budget)."""
    from tapml.carving import store as store_module
    from tapml.core import content_mark

    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).eval()
    x = torch.randn(4, 256)
    carve(model, lambda: model(x), tmp_path / "s", shard_bytes=256 * 1024)
    store = FixtureStore(tmp_path / "s")
    ops = [op["index"] for op in store.ops if op["op"] == "aten.addmm.default"]
    assert store.outputs(ops[0], read_only=True)[0] is not store.outputs(ops[0], read_only=True)[0]
    first = store.outputs(ops[0], read_only=True)  # the third read: kept since the second
    assert store.outputs(ops[0], read_only=True)[0] is first[0]
    ref = store._output_refs[ops[0]][0]
    assert content_mark(first[0]) == ref and ref.key == store.ops[ops[0]]["outputs"]["tensor"]["key"]
    copy = store.outputs(ops[0])[0]
    assert copy is not first[0] and content_mark(copy) is None and torch.equal(copy, first[0])
    monkeypatch.setattr(store_module, "VIEW_BYTES", 3 * (4 * 256 * 4 + store_module.USE_COST))  # three outputs
    for i in ops[1:]:  # more than the budget holds: the first op's use goes, the latest three stay
        store.outputs(i, read_only=True)
        store.outputs(i, read_only=True)
    assert list(store._views) == [store._output_refs[i][0] for i in ops[-3:]]
    assert store._view_bytes == 3 * (4 * 256 * 4 + store_module.USE_COST)  # each use's bytes and its cost
    for _ in range(2):  # read back in a cycle longer than the budget: none is kept (each would go before)
        for i in ops[1:]:
            store.outputs(i, read_only=True)
    assert list(store._views) == [store._output_refs[i][0] for i in ops[-3:]]
    assert len(store._last_read) == 4  # only the reads that ended within the budget are remembered
    largest = store_module.KEPT_USE_BYTES
    monkeypatch.setattr(store_module, "KEPT_USE_BYTES", 4 * 256 * 4 - 1)  # now each output is too large to keep
    store.forget_uses()
    for _ in range(3):
        assert store.outputs(ops[1], read_only=True)[0] is not store.outputs(ops[1], read_only=True)[0]
    assert not store._views
    monkeypatch.setattr(store_module, "KEPT_USE_BYTES", largest)
    store.forget_uses()
    for _ in range(2):
        for i in ops[1:]:
            store.outputs(i, read_only=True)
    assert not store._views
    store.forget_uses()
    assert not store._views and store._view_bytes == 0 and store.outputs(ops[0], read_only=True)[0] is not first[0]
    assert store._view_bytes == sum(t.untyped_storage().nbytes() + store_module.USE_COST for t in store._views.values())
    assert len(store._readers) <= store_module.OPEN_SHARDS
    again = store.outputs(ops[0], read_only=True)[0]
    assert again is not first[0] and torch.equal(again, first[0]) and content_mark(again) == ref


def test_parsed_ops_are_kept_up_to_a_count_and_parsed_again_alike(tmp_path, monkeypatch):
    """At 1.1B parameters a generation's 11538 ops kept parsed held ~8 MB: only the latest PARSED_OPS stay."""
    from tapml.carving import store as store_module

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    x = torch.randn(2, 8)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    first = [(store.op_call(op["index"]), store.output_refs(op["index"])) for op in store.ops]
    monkeypatch.setattr(store_module, "PARSED_OPS", 2)
    store = FixtureStore(tmp_path / "s")
    again = [(store.op_call(op["index"]), store.output_refs(op["index"])) for op in store.ops]
    assert len(store.ops) > 3 and len(store._calls) == len(store._output_refs) == 2
    assert [(c.op, c.args, c.kwargs, c.outputs, refs) for c, refs in first] == \
        [(c.op, c.args, c.kwargs, c.outputs, refs) for c, refs in again]
    assert store.op_call(0) is not again[0][0] and store.op_call(0) is store.op_call(0)


def test_a_hash_memo_forgets_memory_that_is_gone():
    from tapml.core import HashMemo

    memo, kept = HashMemo(), [torch.arange(4.0) + i for i in range(10)]
    for t in kept:
        memo.remember(t, f"k{t[0]}")
    for _ in range(3):
        gone = [torch.full((3,), float(i)) for i in range(2000)]  # at 2000 addresses, then freed
        for t in gone:
            memo.remember(t, "gone")
        del gone, t
    assert len(memo._seen) < 2100 and all(memo.peek(t, t) == f"k{t[0]}" for t in kept)


def test_the_isolated_pass_starts_without_the_uses_the_live_runs_kept(tmp_path):
    """The live runs' kept carved outputs are theirs (read again every forward); the isolated pass reads each
    op's once, so it does not carry them (at 1.1B they were 26 MB under the pass's own peak)."""
    from tapml.engine import local_pass
    from tapml.judging import Judge
    from tapml.platforms import open_local

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    x = torch.randn(4, 64)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    for _ in range(2):
        for op in store.ops:
            store.outputs(op["index"], read_only=True)
    assert store._views
    results = local_pass(store, open_local("torch-cpu"), Judge())
    assert {r.status.value for r in results.values()} <= {"ok", "skipped"} and not store._views


def test_the_isolated_pass_lends_live_weights_only_to_targets_that_copy_them_and_ops_that_write_none(tmp_path):
    from tapml.engine import ModelState, run_local
    from tapml.judging import Judge
    from tapml.platforms import Support, Target

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(64, 64), requires_grad=False)

        def forward(self, x):
            self.weight.mul_(1.0)  # in place on the weight, its content unchanged
            return x @ self.weight

    model = Scaled()
    state = ModelState(model)
    carve(model, lambda: model(torch.randn(2, 64)), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    store.share(state.resident())
    storage = model.weight.untyped_storage().data_ptr()

    class Capture(Target):
        name = "capture"

        def __init__(self, copies: bool):
            self.copies_inputs, self.seen = copies, {}

        def prepare(self, op):
            return Support.yes()

        def execute(self, op, inputs):
            self.seen[op.op] = [t.untyped_storage().data_ptr() == storage for t in inputs]
            return [t.clone() for t in store.outputs(op.index)]

    lent, kept = Capture(True), Capture(False)
    for target in (lent, kept):
        for op in store.ops[1:]:  # after randn (nondeterministic: skipped)
            assert run_local(store, target, Judge(), op["index"]).status.value == "ok"
    assert lent.seen["aten.mm.default"] == [False, True]  # the weight, in place
    assert lent.seen["aten.mul_.Tensor"] == [False] * len(lent.seen["aten.mul_.Tensor"])  # it writes: a copy
    assert not any(any(v) for v in kept.seen.values())  # a target in this process: copies only
