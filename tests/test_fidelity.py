"""Fidelity on any model (issue 12): every layout carves and replays bit-exactly, the live run stays on the
carved path or the run says it did not, and a run that offloaded nothing is never ok."""

from __future__ import annotations

import io
import itertools
import tempfile
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tapml.carving import CarveError, FixtureStore, carve, replay
from tapml.engine import ModelState, OffCarvedPath, migrate
from tapml.judging import Judge
from tapml.platforms import WrappedPlatform, open_local
from tapml.remote import RemoteTarget


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def carved(tmp_path, fn, *inputs, name="s"):
    model = Fn(fn) if not isinstance(fn, nn.Module) else fn
    model.tapml_state = ModelState(model)  # as tapml.offload does: the state before the carve
    carve(model, lambda: model(*inputs), tmp_path / name)
    return model, FixtureStore(tmp_path / name)


def offload(model, store, inputs, target=None, restore=True, **kw):
    return migrate(lambda: model(*inputs), store, target or open_local("torch-cpu"), judge=Judge(), plan="all",
                   restore=model.tapml_state.restore if restore else None, **kw)


def exact_everywhere(tmp_path, fn, *inputs, name="s"):
    model, store = carved(tmp_path, fn, *inputs, name=name)
    report = replay(store)
    assert report.ok, report.mismatches
    run = offload(model, store, inputs)
    assert run.verdict == "ok", run.summary
    assert all(o.local.max_abs == 0.0 for o in run.ops if o.local is not None)
    assert run.coverage == 1.0, [(o.op, o.reason) for o in run.ops if not o.offloaded]
    return run


def test_a_size_one_dim_with_a_non_unit_stride(tmp_path):
    """The reproduction: x[:, -1] of a [1, 12] tensor is "contiguous" with stride 12."""
    exact_everywhere(tmp_path, lambda x: x[:, -1] + 1, torch.arange(12.0).reshape(1, 12))


def _layouts():
    base = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    yield "contiguous", base
    yield "transposed", base.transpose(1, 3)
    yield "offset slice", base[1:, :, 2:]
    yield "strided slice", base[:, ::2, 1::3]
    yield "size-1 dims, odd strides", base[:1, 2:3, :, -1:]
    yield "size-0 dim", base[:, :0]
    yield "size-0 with stride 0", torch.empty(3, 0).expand(2, 3, 0)
    yield "expanded", torch.arange(5.0).expand(3, 4, 5)
    yield "expanded scalar", torch.tensor(2.0).expand(3, 3)
    yield "overlapping", torch.arange(30.0).as_strided((5, 5, 5), (2, 0, 1))
    yield "overlapping rows", torch.arange(20.0).as_strided((4, 6), (2, 1))
    yield "channels-last", base.contiguous(memory_format=torch.channels_last)
    yield "0-d", torch.tensor(3.5)
    yield "0-d view", base[1, 2, 3, 4]
    yield "int64 strided", torch.arange(24).reshape(4, 6)[:, 1::2]
    yield "bool", torch.tensor([True, False, True]).expand(2, 3)
    yield "float16 transposed", base.half().permute(3, 1, 0, 2)
    yield "bfloat16 offset", base.bfloat16().reshape(-1)[7:50]


@pytest.mark.parametrize("name, x", list(_layouts()), ids=[n for n, _ in _layouts()])
def test_every_layout_carves_and_replays_bit_exactly(tmp_path, name, x):
    fn = (lambda t: t.clone() + 1) if x.dtype != torch.bool else (lambda t: t.logical_not())
    exact_everywhere(tmp_path, fn, x)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3)))[:4])
def test_non_contiguous_outputs_keep_their_layout(tmp_path, perm):
    """An op whose output is not contiguous (the reference's kernel chose its strides)."""
    exact_everywhere(tmp_path, lambda x: (x.permute(*perm) * 2).permute(*perm), torch.randn(3, 4, 5))


def test_as_strided_reading_beyond_its_view(tmp_path):
    x = torch.arange(10.0)
    model, store = carved(tmp_path, lambda t: torch.as_strided(t[5:], (2, 2), (1, 2), 0) * 1, x)
    assert replay(store).ok


def test_sparse_inputs_are_refused_in_one_line_naming_the_op_and_layout(tmp_path):
    a = torch.eye(3).to_sparse_csr()
    b, c = torch.randn(3, 3), torch.randn(3, 3)
    with pytest.raises(CarveError, match=r"op aten\.sparse_sampled_addmm\.default .*sparse_csr tensor"):
        carved(tmp_path, lambda m1, m2, s: torch.sparse.sampled_addmm(s, m1, m2), b, c, a)
    assert not (tmp_path / "s").exists()


def test_a_sparse_module_input_is_named_not_fatal_until_an_op_needs_it(tmp_path):
    class Densify(nn.Module):
        def forward(self, x):
            return x.to_dense() + 1

    with pytest.raises(CarveError, match="sparse_coo tensor") as info:
        carved(tmp_path, Densify(), torch.eye(3).to_sparse())
    assert "raised" not in str(info.value)


def test_complex_tensors_carve_replay_and_run_on_torch_targets(tmp_path):
    run = exact_everywhere(tmp_path, lambda x: torch.fft.fft(torch.view_as_complex(x)) * 2, torch.randn(8, 2))
    assert any("complex" in (o.local.dtype or "") for o in run.ops if o.local is not None)
    x = torch.randn(8, 2)
    model, store = carved(tmp_path, lambda t: torch.view_as_complex(t) * 2, x, name="c2")
    fp16 = offload(model, store, (x,), target=open_local("fp16"))
    refused = [o for o in fp16.ops if o.status == "unsupported"]
    assert refused and all("complex64 is not supported on fp16" in o.reason for o in refused)


def test_complex_half_compares_without_crashing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact_everywhere(tmp_path, lambda x: x.to(torch.complex32) * 2, torch.randn(3))


def test_ops_a_trusted_library_registers_lazily_run_on_a_worker(tmp_path):
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    x, w, t = torch.randn(8, 16), torch.randn(10, 16), torch.randint(0, 10, (8,))
    options = LinearCrossEntropyOptions()
    model, store = carved(tmp_path, lambda a, b, c: F.linear_cross_entropy(a, b, c, options=options), x, w, t)
    (rec,) = [r for r in store.ops if r["op"].startswith("torch_nn.")]
    assert rec["library"] == "torch.nn.modules.linear_cross_entropy"
    with RemoteTarget(spawn="torch-cpu") as target:  # a fresh process that never imported it
        run = offload(model, store, (x, w, t), target=target)
    assert run.verdict == "ok" and run.ops[rec["index"]].offloaded and run.ops[rec["index"]].local.max_abs == 0


def test_an_untrusted_library_op_stays_on_the_reference_with_its_reason(tmp_path):
    @torch.library.custom_op("tapml_test_lib::double", mutates_args=())
    def double(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    x = torch.randn(4)
    model, store = carved(tmp_path, lambda t: double(t) + 1, x)
    run = offload(model, store, (x,))
    row = next(o for o in run.ops if o.op.startswith("tapml_test_lib."))
    assert row.status == "skipped" and "not a trusted library" in row.reason


def test_target_outputs_keep_the_carved_strides_through_a_worker(tmp_path):
    """The reproduction: the wire returns contiguous tensors; fc(gelu(x.T)) must still see the carved layout."""
    fc = nn.Linear(4, 5)
    x = torch.randn(2, 4, 3)
    model, store = carved(tmp_path, lambda t: fc(F.gelu(t.transpose(1, 2))), x)
    with RemoteTarget(spawn="torch-cpu") as target:
        run = offload(model, store, (x,), target=target)
    assert run.verdict == "ok" and run.coverage == 1.0 and not any(s.diverged for s in run.steps)


class SelfScaling(nn.Module):
    """Rescales its own weight on every forward: the second run computes something else."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin.weight.data.mul_(1.5)
        return self.lin(x)


class FirstCallFlag(nn.Module):
    """Takes another path after its first call."""

    def __init__(self):
        super().__init__()
        self.lin, self.warm = nn.Linear(4, 4), False

    def forward(self, x):
        y = self.lin(x)
        if not self.warm:
            self.warm = True
            return y.relu()
        return y.tanh()


@pytest.mark.parametrize("model", [SelfScaling(), FirstCallFlag()], ids=["self-scaling", "first-call-flag"])
def test_a_model_that_left_the_carved_path_is_refused_up_front(tmp_path, model):
    x = torch.randn(2, 4)
    model, store = carved(tmp_path, model, x)
    with pytest.raises(OffCarvedPath, match="does not repeat the carve"):
        offload(model, store, (x,), restore=False)


def test_a_model_that_rescales_its_weights_runs_the_carved_path_from_its_carved_state(tmp_path):
    x = torch.randn(2, 4)
    model, store = carved(tmp_path, SelfScaling(), x)
    run = offload(model, store, (x,))  # tapml.offload puts the weights back before every live run
    assert run.verdict == "ok" and run.end_to_end.max_abs == 0.0


class NegatedMatmul(WrappedPlatform):
    name = "negated-mm"

    def run(self, kernel, op, inputs):
        outputs = super().run(kernel, op, inputs)
        return [-o for o in outputs] if op.op == "aten.addmm.default" else outputs


def test_a_step_that_leaves_the_carved_path_is_incomplete_not_ok(tmp_path):
    lin = nn.Linear(4, 4)
    with torch.no_grad():
        lin.bias.fill_(5.0)

    def branchy(x):
        y = lin(x)
        return y.exp() if y.sum() > 0 else y.sin()  # the target's numbers pick the branch

    x = torch.randn(2, 4)
    model, store = carved(tmp_path, branchy, x)
    from tapml.platforms import LocalTarget

    run = offload(model, store, (x,), target=LocalTarget(NegatedMatmul()))
    assert run.verdict != "ok"
    assert run.steps[0].diverged and "left the carved path" in run.summary or run.verdict == "divergent"


def test_uninitialized_outputs_are_not_compared(tmp_path):
    x = torch.randn(3)
    model, store = carved(tmp_path, lambda t: (torch.empty_like(t), t * 2), x)
    run = offload(model, store, (x,))
    assert run.verdict == "ok" and any("uninitialized" in n for n in run.notes)
    model, store = carved(tmp_path, lambda t: torch.empty_like(t).copy_(t) * 2, x, name="filled")
    run = offload(model, store, (x,))
    assert run.verdict == "ok" and not run.notes  # filled before use: compared


def test_random_ops_repeat_what_the_carve_drew(tmp_path):
    x = torch.randn(3)
    model, store = carved(tmp_path, lambda t: t + torch.rand_like(t), x)
    run = offload(model, store, (x,))
    assert run.verdict == "ok" and run.end_to_end.max_abs == 0.0


def test_no_compute_ops_is_not_ok(tmp_path):
    x = torch.randn(3, 2)
    model, store = carved(tmp_path, lambda t: t.t(), x)
    run = offload(model, store, (x,))
    assert run.verdict == "incomplete" and "no compute ops" in run.summary and "100%" not in run.summary


def test_nothing_offloaded_is_not_ok(tmp_path):
    x = torch.randn(8, 2)
    model, store = carved(tmp_path, lambda t: torch.view_as_complex(t) * 2, x)
    run = offload(model, store, (x,), target=open_local("fp16"))
    assert run.verdict == "incomplete" and "nothing was offloaded" in run.summary


class MatvecAndNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.w = nn.BatchNorm1d(5).train(), nn.Parameter(torch.ones(10))

    def forward(self, t):
        return torch.matmul(t, self.w), self.bn(t[:, :5] * 1)  # matmul with a 1-D weight squeezes in place


def test_in_place_metadata_ops_and_unreturned_writes_stay_on_the_reference(tmp_path):
    x = torch.randn(4, 10)
    model, store = carved(tmp_path, MatvecAndNorm(), x)
    run = offload(model, store, (x,))
    assert run.verdict == "ok", run.summary
    reasons = {o.op: o.reason for o in run.ops if o.status == "skipped"}
    assert any("writes inputs it does not return" in r for r in reasons.values()), reasons


def test_batch_norm_running_stats_do_not_poison_a_workers_cache(tmp_path):
    """Regression: native_batch_norm writes running_mean without (a!) in its schema, so version counters
    stayed put and a later op was sent stale bytes under the old content key."""
    class NormThenStats(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(5).train()

        def forward(self, x):
            return self.bn(x) + self.bn.running_mean * torch.arange(5.0)  # reads what the op just wrote

    x = torch.randn(8, 5)
    model, store = carved(tmp_path, NormThenStats(), x)
    with RemoteTarget(spawn="torch-cpu") as target:
        run = offload(model, store, (x,), target=target)
    assert run.verdict == "ok" and all(o.local.max_abs == 0.0 for o in run.ops if o.local is not None)


@pytest.mark.parametrize("fn, x", [
    (torch.linalg.cholesky, torch.eye(3) * 2),  # returns None from an error check
    (torch.nonzero, torch.tensor(0.0)),  # a [0, 0] output with a stride-0 dim
    (lambda t: torch.fft.hfft(t, n=10), torch.randn(5, 6)),  # conjugate views
    (lambda t: torch.quantile(t, 0.5), torch.randn(())),
    (lambda t: torch.broadcast_to(t, (5, 5, 5)) + 1, torch.randn(1)),
], ids=["none-output", "zero-size-stride-0", "conj-view", "quantile", "broadcast-one"])
def test_classes_the_fidelity_sweep_found(tmp_path, fn, x):
    model, store = carved(tmp_path, fn, x)
    assert replay(store).ok
    run = offload(model, store, (x,))
    assert run.verdict in ("ok", "incomplete"), run.summary  # incomplete only where nothing computes


def test_the_model_state_keeps_no_copy_in_memory_and_puts_back_what_changed():
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    state = ModelState(model, (torch.randn(2, 4),))
    assert not any(isinstance(kept, torch.Tensor) for _, kept in state.saved)  # kept on disk by content key
    model.weight.data.mul_(1.5)  # a .data write: no version bump, found by its content
    state.restore()
    assert torch.equal(model.weight, before)


def test_the_model_state_falls_back_to_clones_when_the_disk_is_full(monkeypatch):
    class Full(io.BytesIO):
        def write(self, data):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **_: Full())
    model = nn.Linear(4, 4)
    before = model.weight.detach().clone()
    state = ModelState(model)
    assert all(isinstance(kept, torch.Tensor) for _, kept in state.saved)
    model.weight.data.mul_(1.5)
    state.restore()
    assert torch.equal(model.weight, before)
