"""Per-op offload, pipelined: runs sent before the last is answered give exactly what one at a time does.

Real spawned workers on loopback; each test runs the same step both ways and compares every op's
status, reason and metric, and the model's output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tapml.carving import FixtureStore, ModelRaised
from tapml.engine import MixedRunFailed, run_step, skip_reason
from tapml.judging import Judge
from tapml.remote import RemoteTarget
from tapml.workloads import load_workload

HELPERS = Path(__file__).resolve().parent / "helpers" / "failing_platforms.py"


@pytest.fixture(scope="module")
def minilm():
    return load_workload("zoo:minilm")


def _step(workload, store, pipeline: bool, platform: str = "torch-cpu", env: dict | None = None, **kw):
    every = {op["index"] for op in store.ops if not skip_reason(op)}
    with RemoteTarget(spawn=platform, pipeline=pipeline, spawn_options={"env": env} if env else None, **kw) as t:
        run_step(workload.run, store, t, every, Judge())  # the first forward prepares every op
        output, mixed, _ = run_step(workload.run, store, t, every, Judge())
        restarts = t.restarts
    results = {i: (r.status, r.reason, None if r.propagated is None else (r.propagated.ok, r.propagated.max_abs))
               for i, r in mixed.results.items()}
    pipelined = mixed.flight.pipelined if mixed.flight is not None else 0
    return output, results, pipelined, restarts


def _same(a, b) -> None:
    assert torch.equal(a[0].last_hidden_state, b[0].last_hidden_state)

    def told(results):  # how a dead worker's socket reported it (reset or closed) is the kernel's choice
        return {i: (st, r.split(" (")[0] if r and r.startswith("WorkerCrashed") else r, m)
                for i, (st, r, m) in results.items()}

    assert told(a[1]) == told(b[1])


def test_pipelined_equals_one_at_a_time(minilm, minilm_store):
    one = _step(minilm, minilm_store, pipeline=False)
    many = _step(minilm, minilm_store, pipeline=True)
    _same(one, many)
    assert one[2] == 0 and many[2] >= 150  # nearly every op went without waiting for the one before
    assert all(r[0].value == "offloaded" and r[2] == (True, 0.0) for r in many[1].values())


def _victim(store, n: int) -> int:
    """A compute op whose output later ops read (so a wrong answer would travel on)."""
    compute = [op["index"] for op in store.ops if not skip_reason(op) and not op["view"]]
    return compute[n]


@pytest.mark.parametrize("platform,status", [("Raises", "crashed"), ("Reshaped", "fell back"),
                                             ("KillSelf", "crashed")])
def test_a_failure_in_flight_costs_what_it_costs_one_at_a_time(minilm, minilm_store, platform, status):
    victim = _victim(minilm_store, 40)
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    kw = {"env": env, "platform": f"{HELPERS}:{platform}"}
    one = _step(minilm, minilm_store, False, **kw)
    many = _step(minilm, minilm_store, True, **kw)
    assert many[1][victim][0].value == status
    _same(one, many)
    assert many[3] == one[3]  # as many worker restarts (one for a worker that died on the op)
    others = [r for i, r in many[1].items() if i != victim]
    assert all(r[0].value == "offloaded" and r[2] == (True, 0.0) for r in others)


@pytest.mark.slow
def test_a_hung_kernel_in_flight_times_out_once(minilm, minilm_store):
    victim = _victim(minilm_store, 30)
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    # the limit is waited out once per forward; long enough that no sound op reaches it on a loaded machine
    many = _step(minilm, minilm_store, True, platform=f"{HELPERS}:Hang", env=env, timeout=8)
    assert many[1][victim][0].value == "timeout"
    assert all(r[0].value == "offloaded" for i, r in many[1].items() if i != victim)
    assert many[3] == 2  # one per forward: the first (which prepares) and the second


def test_the_engine_s_wrappers_pipeline_and_quarantine_a_crash_in_flight(minilm, minilm_store):
    """migrate sees a target through ``Quarantine`` (and the API through ``CompileClock``): both pass the
    pipelined runs on, and a crash answered in flight quarantines its signature like one run alone."""
    from tapml.engine.quarantine import Quarantine
    from tapml.progress import CompileClock

    seen, repeats = set(), []  # calls whose signature ran before: the first forward sends them in flight
    for i in sorted(i for i in (op["index"] for op in minilm_store.ops) if not skip_reason(minilm_store.ops[i])):
        sig = minilm_store.op_call(i).signature
        if sig in seen and not minilm_store.ops[i]["view"]:
            repeats.append(i)
        seen.add(sig)
    victim = repeats[40]
    signature = minilm_store.op_call(victim).signature
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))
    every = {op["index"] for op in minilm_store.ops if not skip_reason(op)}
    with RemoteTarget(spawn=f"{HELPERS}:Raises", spawn_options={"env": env}) as raw:
        target = Quarantine(CompileClock(raw))
        assert target.pipelines
        _, first, _ = run_step(minilm.run, minilm_store, target, every, Judge())
        assert first.flight.pipelined > 0 and first.results[victim].status.value == "crashed"
        assert target.failed[signature][1] == victim
        _, second, _ = run_step(minilm.run, minilm_store, target, every, Judge())
    same = [i for i in every if minilm_store.op_call(i).signature == signature]
    assert len(same) > 1 and all(second.results[i].status.value == "skipped" and "quarantined" in
                                 second.results[i].reason for i in same if i != victim)
    assert second.results[victim].status.value == "crashed" and "not sent again" in second.results[victim].reason
    assert second.flight.pipelined >= 150 and raw.stats["runs_pipelined"] >= first.flight.pipelined + 150


def test_the_client_s_own_work_runs_on_one_thread_and_the_reference_s_ops_on_the_caller_s(
        minilm, minilm_store, monkeypatch):
    """While a worker on the same cores runs the target's kernels, tapml's own work in the client opens no
    parallel region (one thread); the reference's ops keep the thread count the run began with, so a mixed
    step still repeats the carve bit for bit; the count is the caller's again afterwards."""
    from tapml.engine import mixed as mixed_module

    seen = {"reference": set(), "judge": set()}
    reference, judge = mixed_module._reference, Judge.judge

    def counted_reference(func, args, kwargs):
        seen["reference"].add(torch.get_num_threads())
        return reference(func, args, kwargs)

    def counted_judge(self, *a, **kw):
        seen["judge"].add(torch.get_num_threads())
        return judge(self, *a, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            local = minilm.run()
        monkeypatch.setattr(mixed_module, "_reference", counted_reference)
        monkeypatch.setattr(Judge, "judge", counted_judge)
        half = {op["index"] for op in minilm_store.ops
                if not skip_reason(op) and any(f"layer.{k}." in (op["module"] or "") for k in (0, 2, 4))}
        with RemoteTarget(spawn="torch-cpu") as target:
            for _ in range(2):  # the first prepares every op; the second pipelines
                output, mixed, _ = run_step(minilm.run, minilm_store, target, half, Judge())
                assert torch.get_num_threads() == 2
        assert mixed.flight.pipelined > 50 and all(r.status.value == "offloaded" for r in mixed.results.values())
        assert seen == {"reference": {2}, "judge": {1}}
        assert torch.equal(output.last_hidden_state, local.last_hidden_state)
    finally:
        torch.set_num_threads(before)


def test_a_judge_that_fails_in_the_final_settle_leaves_the_target_in_step(minilm, minilm_store):
    """Answers are judged as they come at the end of a step; if judging one raises (a MemoryError at scale,
    Ctrl-C), the answers still due are read past, so the same target's next step is answered in order."""
    every = {op["index"] for op in minilm_store.ops if not skip_reason(op)}
    armed = []

    class FailsOnce(Judge):
        def judge(self, *a, **kw):
            if armed:
                armed.clear()
                raise MemoryError("the judge ran out of memory")
            return super().judge(*a, **kw)

    def run():
        out = minilm.run()
        armed.append(True)  # the next judgement is in run_step's final settle, with runs still in flight
        return out

    with RemoteTarget(spawn="torch-cpu") as target:
        run_step(minilm.run, minilm_store, target, every, Judge())  # prepares every op
        with pytest.raises(MixedRunFailed, match="tapml failed judging .* MemoryError"):  # tapml's, not the model's
            run_step(run, minilm_store, target, every, FailsOnce())
        assert target.in_flight == 0
        output, mixed, _ = run_step(minilm.run, minilm_store, target, every, Judge())
    with torch.no_grad():
        local = minilm.run()
    assert torch.equal(output.last_hidden_state, local.last_hidden_state)
    assert mixed.flight.pipelined >= 150 and all(r.status.value == "offloaded" for r in mixed.results.values())


def test_failures_are_named_for_who_failed_tapml_or_the_model(minilm, minilm_store):
    """A failure of tapml's own work mid-run (a judge raising while answers arrive) is tapml's; an op of the
    model that raises (an in-place add on a tensor of another shape, computed by the reference) is the
    model's, as it would be without tapml."""
    every = {op["index"] for op in minilm_store.ops if not skip_reason(op)}

    class Fails(Judge):
        def judge(self, *a, **kw):
            raise ZeroDivisionError("a bug in a comparison")

    def model_fails():
        minilm.run()
        torch.ones(3).add_(torch.ones(4))  # raises in the model's code, under the dispatch mode

    with RemoteTarget(spawn="torch-cpu") as target:
        with pytest.raises(MixedRunFailed, match="ZeroDivisionError: a bug in a comparison") as failed:
            run_step(minilm.run, minilm_store, target, every, Fails())
        assert "not the model" in str(failed.value)
        with pytest.raises(ModelRaised, match="RuntimeError"):
            run_step(model_fails, minilm_store, target, every, Judge())
        assert target.in_flight == 0


def test_the_worker_lets_go_of_outputs_the_client_has_read(minilm, minilm_store):
    """A pending output's name holds it on the worker only until the client has read its answer: the steps
    of an offload (each replays the carve's inputs) must not keep every forward's outputs alive there."""
    every = {op["index"] for op in minilm_store.ops if not skip_reason(op)}
    with RemoteTarget(spawn="torch-cpu") as t:
        held = []
        for _ in range(5):  # the first forward prepares every op
            _, mixed, _ = run_step(minilm.run, minilm_store, t, every, Judge())
            held.append(t.worker_stats()["cached_bytes"])
        assert mixed.flight.pipelined >= 150
    # one forward's outputs are ~20 MB: what the worker holds after the fifth is what it held after the
    # second, give or take the names not yet released (fewer than RELEASE_EVERY outputs)
    assert held[4] - held[1] < 8 << 20, held


def test_a_bit_exact_worker_s_outputs_are_judged_without_reading_the_carve(minilm, minilm_store, monkeypatch):
    """The worker's content key of an output it sent is the carve's: the output stands for its carved self.
    Only outputs that differ (one ULP, within tolerance, and what it flows into) are read from the store and
    compared; every status and metric is what reading them all gives."""
    victim = _victim(minilm_store, 40)
    kw = {"env": dict(os.environ, TAPML_TEST_OP_INDEX=str(victim)), "platform": f"{HELPERS}:OneUlp"}
    reads, load = [], FixtureStore.load

    def counted(self, ref, *, read_only=False):
        if read_only:
            reads.append(ref)
        return load(self, ref, read_only=read_only)

    monkeypatch.setattr(FixtureStore, "load", counted)
    vouched = _step(minilm, minilm_store, True, **kw)
    read_vouched = list(reads)
    monkeypatch.setattr(RemoteTarget, "content_key", lambda self, output: None)
    reads.clear()
    read_all = _step(minilm, minilm_store, True, **kw)
    _same(vouched, read_all)
    exact = {i for i, r in vouched[1].items() if r[2] == (True, 0.0)}
    read_by = {ref: i for i in vouched[1] for ref in minilm_store.output_refs(i)}
    assert read_by[read_vouched[0]] == victim and exact == {i for i in vouched[1] if i < victim} and exact
    assert all(read_by[ref] not in exact for ref in read_vouched)  # off the carve, or taken as the carve
    assert len(reads) > 2 * 150  # every output read when the worker's keys are not known
    ok, max_abs = vouched[1][victim][2]
    assert ok and max_abs > 0  # judged: one ULP off, within tolerance


def test_the_isolated_pass_judges_a_bit_exact_worker_s_outputs_without_reading_the_carve(minilm_store,
                                                                                          monkeypatch):
    from tapml.engine import run_local

    ops = [op["index"] for op in minilm_store.ops if not skip_reason(op)][:40]
    reads, load = [], FixtureStore.load

    def counted(self, ref, *, read_only=False):
        reads.append(read_only)
        return load(self, ref, read_only=read_only)

    monkeypatch.setattr(FixtureStore, "load", counted)
    with RemoteTarget(spawn="torch-cpu") as target:
        vouched = [run_local(minilm_store, target, Judge(), i).local for i in ops]
        read_vouched = list(reads)
        monkeypatch.setattr(RemoteTarget, "content_key", lambda self, output: None)
        read_all = [run_local(minilm_store, target, Judge(), i).local for i in ops]
    assert vouched == read_all and all(m.ok and m.exact for m in vouched)
    assert True not in read_vouched and reads.count(True) >= len(ops)  # the carved outputs: read only unvouched


def test_a_placeholder_overwritten_by_a_fallback_is_sent_with_its_new_values(tmp_path):
    """``max.dim`` answers its values one ULP off (received in their placeholder, the worker holding them by
    key) and its indices in another shape: it falls back, and the reference's values overwrite the
    placeholder. The ``mul`` that reads them must get those values, as one at a time — not the worker's
    copy under the key the placeholder was received with (tapml's write bumps its version: core.overwrite)."""
    from tapml.carving import carve
    from tapml.zoo import Workload

    class MaxThenScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            values, indices = torch.max(self.lin(x), dim=1)
            return values * 3.0 + indices

    torch.manual_seed(0)
    model, x = MaxThenScale().eval(), torch.randn(4, 16)
    workload = Workload(model=model, inputs=x, name="max-then-scale")
    carve(model, workload.run, tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    victim, scale, add = (next(op["index"] for op in store.ops if op["op"] == name)
                          for name in ("aten.max.dim", "aten.mul.Tensor", "aten.add.Tensor"))
    chosen = {op["index"] for op in store.ops if not skip_reason(op)} - {add}  # add: the reference's, so it
    env = dict(os.environ, TAPML_TEST_OP_INDEX=str(victim))  # waits for mul and max inside the dispatch mode

    def step(pipeline: bool):
        with RemoteTarget(spawn=f"{HELPERS}:UlpAndReshaped", pipeline=pipeline, spawn_options={"env": env}) as t:
            run_step(workload.run, store, t, chosen, Judge())
            output, mixed, _ = run_step(workload.run, store, t, chosen, Judge())
        return output, {i: (r.status.value, r.propagated and (r.propagated.ok, r.propagated.max_abs))
                        for i, r in mixed.results.items()}, mixed.flight.pipelined if mixed.flight else 0

    one, many = step(False), step(True)
    assert many[1][victim][0] == "fell back" and many[2] >= 2
    assert torch.equal(one[0], many[0]) and one[1] == many[1]
    assert many[1][scale][1] == (True, 0.0)  # the reference's values went in: bit-exact


def _units_step(workload, store, pipeline: bool, env: dict | None = None):
    from tapml.engine.topdown import plan_top_down, top_down_steps

    with RemoteTarget(spawn=f"{HELPERS}:PickyUnits", pipeline=pipeline,
                      spawn_options={"env": env} if env else None) as t:
        last = top_down_steps(store, plan_top_down(store, t))[-1]
        run_step(workload.run, store, t, set(last["offload"]), Judge(), units=last["units"])  # prepares each unit
        output, mixed, _ = run_step(workload.run, store, t, set(last["offload"]), Judge(), units=last["units"])
    units = {store.layers[k]["module"]: (r.status.value, (r.reason or "").split(" (")[0],
                                         None if r.propagated is None else r.propagated.max_abs)
             for k, r in mixed.units.results.items()}
    pipelined = mixed.flight.pipelined if mixed.flight is not None else 0
    return output.last_hidden_state, units, pipelined


def test_a_unit_s_bit_exact_outputs_are_judged_without_reading_the_carve(minilm, minilm_store, monkeypatch):
    """Top-down: the units' outputs a worker vouches for by content key stand for the carved module outputs;
    the units that answer otherwise (PickyUnits: layer 5 doubled) are read and judged as before."""
    import sys

    reads, load = [], FixtureStore.load

    def counted(self, ref, *, read_only=False):  # the reads judging a unit makes
        frame = sys._getframe(1)
        while frame is not None and not frame.f_code.co_filename.endswith("unitrun.py"):
            frame = frame.f_back
        reads.append(frame is not None)
        return load(self, ref, read_only=read_only)

    monkeypatch.setattr(FixtureStore, "load", counted)
    vouched = _units_step(minilm, minilm_store, True)
    read_vouched = reads.count(True)
    monkeypatch.setattr(RemoteTarget, "content_key", lambda self, output: None)
    reads.clear()
    read_all = _units_step(minilm, minilm_store, True)
    assert torch.equal(vouched[0], read_all[0]) and vouched[1] == read_all[1]
    exact = sum(v[2] == 0.0 for v in vouched[1].values())
    assert exact and any(v[2] for v in vouched[1].values())  # bit-exact units, and layer 5 doubled
    assert read_vouched <= reads.count(True) - 2 * exact  # no read for an exact unit's output, either forward


@pytest.mark.parametrize("kill", [False, True], ids=["refused-wrong-doubled", "worker-killed"])
def test_units_in_flight_end_as_they_end_one_at_a_time(minilm, minilm_store, kill):
    """Top-down units are sent without waiting for the one before; a unit the worker refuses, answers with
    wrong shapes or dies on — while later units are already on their way — ends exactly as it does one at
    a time: the same statuses, metrics and model output (the refused and broken ones recomputed on the
    reference, the later ones run again)."""
    env = dict(os.environ, TAPML_TEST_KILL_UNIT="1") if kill else None
    one = _units_step(minilm, minilm_store, pipeline=False, env=env)
    many = _units_step(minilm, minilm_store, pipeline=True, env=env)
    assert torch.equal(one[0], many[0])
    assert one[1] == many[1]
    assert one[2] == 0 and many[2] >= 6  # the encoder layers went without waiting for each other
    status = {m: s for m, (s, _, _) in many[1].items()}
    assert status["encoder.layer.1"] == "unsupported" and status["encoder.layer.3"] == "fell back"
    assert status["encoder.layer.4"] == ("crashed" if kill else "offloaded")
    assert status["encoder.layer.5"] == "offloaded" and many[1]["encoder.layer.5"][2] > 0  # doubled: it flowed on


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class _ViewBetween(torch.nn.Module):
    """Three units; the second reads a view of the first's output taken outside any unit."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block(), _Block()])

    def forward(self, x):
        return self.blocks[2](self.blocks[1](self.blocks[0](x).unsqueeze(0)))


def test_a_unit_in_flight_that_falls_back_leaves_no_stand_in_behind_a_view(tmp_path):
    """The live run goes on while a unit is in flight and may take views of its outputs; when the unit
    then runs on the reference instead, those views must see the reference's values, not the NaN of the
    stand-ins (found in review: the output was all NaN and the later units 'offloaded' with max abs inf)."""
    from tapml.carving import FixtureStore, carve
    from tapml.engine.topdown import plan_top_down, top_down_steps

    torch.manual_seed(0)
    model, x = _ViewBetween().eval(), torch.randn(3, 8)
    carve(model, lambda: model(x), tmp_path / "s")
    store = FixtureStore(tmp_path / "s")
    env = dict(os.environ, TAPML_TEST_REFUSE_UNITS="blocks.0")
    with RemoteTarget(spawn=f"{HELPERS}:PickyUnits", spawn_options={"env": env}) as t:
        last = top_down_steps(store, plan_top_down(store, t))[-1]
        run_step(lambda: model(x), store, t, set(last["offload"]), Judge(), units=last["units"])
        out, mixed, _ = run_step(lambda: model(x), store, t, set(last["offload"]), Judge(), units=last["units"])
    assert mixed.flight.pipelined >= 2
    status = {store.layers[k]["module"]: (r.status.value, r.propagated and r.propagated.max_abs)
              for k, r in mixed.units.results.items()}
    assert status == {"blocks.0": ("unsupported", None), "blocks.1": ("offloaded", 0.0),
                      "blocks.2": ("offloaded", 0.0)}
    with torch.no_grad():
        assert torch.equal(out, model(x))


def _lost_step(workload, store, pipeline: bool, tmp: Path):
    from tapml.engine.topdown import plan_top_down, top_down_steps

    env = dict(os.environ, TAPML_TEST_KILL_UNIT="encoder.layer.2", TAPML_TEST_ARMED=str(tmp / "armed"),
               TAPML_TEST_DEAD=str(tmp / "dead"))
    with RemoteTarget(spawn=f"{HELPERS}:LostAtUnit", pipeline=pipeline, spawn_options={"env": env},
                      reconnect_s=1) as t:
        last = top_down_steps(store, plan_top_down(store, t))[-1]
        run_step(workload.run, store, t, set(last["offload"]), Judge(), units=last["units"])
        (tmp / "armed").touch()
        output, mixed, _ = run_step(workload.run, store, t, set(last["offload"]), Judge(), units=last["units"])
        assert t.lost is not None
    return output.last_hidden_state, {store.layers[k]["module"]: (r.status.value, (r.reason or "")[:20])
                                      for k, r in mixed.units.results.items()}


def test_a_target_lost_with_units_in_flight_ends_the_units_as_one_at_a_time(minilm, minilm_store, tmp_path):
    """The worker dies for good on one unit while later ones are on their way: that unit crashed, the
    next one finds the target lost, and the rest run on the reference with no result of their own — as
    one at a time (found in review: every unit in flight was recorded as crashed)."""
    (tmp_path / "one").mkdir(), (tmp_path / "many").mkdir()
    one = _lost_step(minilm, minilm_store, False, tmp_path / "one")
    many = _lost_step(minilm, minilm_store, True, tmp_path / "many")
    assert torch.equal(one[0], many[0])
    assert one[1] == many[1]
    assert one[1]["encoder.layer.2"][0] == "crashed" and "encoder.layer.4" not in one[1]
