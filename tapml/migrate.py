"""The migration engine: plan steps on live mixed runs, the isolated pass, localization → run record.

The engine talks to the target only through the ``Platform`` interface, so it
cannot tell a spawned worker, a remote one or an in-process platform apart.
"""

from __future__ import annotations

import datetime
import math
import platform as _platform
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ._version import __version__
from .carving import FixtureStore
from .compare import compare
from .errors import TapmlError
from .judge import Judge
from .localize import find_culprit, find_victims, local_pass, random_input_check, reference_noise, run_local
from .offload import run_step
from .plans import make_plan
from .platforms import Platform

__all__ = ["migrate", "RUN_SCHEMA", "jsonable", "summary_line"]

RUN_SCHEMA = 1
STATUSES = ("ok", "divergent", "unsupported", "crashed", "timeout", "skipped")


def jsonable(value):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _leaves(output) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def _end_to_end(got, want, judge: Judge) -> dict:
    """The model's outputs in a mixed run against the reference run's."""
    got, want = _leaves(got), _leaves(want)
    if len(got) != len(want):
        return {"ok": False, "problem": f"{len(got)} outputs instead of {len(want)}", "max_abs": math.inf}
    worst = None
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        dtype = judge.compute_dtype if (w.is_floating_point() and judge.compute_dtype) else str(w.dtype)[6:]
        m = compare(g, w, judge.table.resolve("(model output)", "", dtype))
        m["output"] = i
        if worst is None or (not m["ok"], m["max_abs"]) > (not worst["ok"], worst["max_abs"]):
            worst = m
    return worst or {"ok": True, "max_abs": 0.0}


def _tokens(got, want, store: FixtureStore) -> dict | None:
    """For a generation (an integer token tensor out): where the target's greedy choice first differs."""
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or want.is_floating_point() \
            or want.dim() != 2 or got.shape != want.shape:
        return None
    differs = (got != want).any(dim=0).nonzero()
    first = int(differs[0]) if differs.numel() else None
    generated = [s["name"] for s in store.steps if s["name"] not in ("outside the model",)]
    prompt = want.shape[1] - len(generated)
    step = generated[first - prompt] if first is not None and 0 <= first - prompt < len(generated) else None
    return {"reference": want[0].tolist(), "target": got[0].tolist(), "first_difference": first,
            "first_difference_generated": (first - prompt) if first is not None else None, "step": step}


def _check_store(store: FixtureStore) -> None:
    m = store.manifest
    if m.get("truncated"):
        raise TapmlError(f"{store.path} was carved with --max-bytes and is incomplete; offload needs a full carve")
    opts = m.get("options", {})
    if opts.get("modules") or opts.get("ops") or opts.get("unique"):
        raise TapmlError(f"{store.path} was carved with filters; offload needs every op of the run")


def migrate(run: Callable[[], Any], store: FixtureStore, target: Platform, *, judge: Judge, plan: str = "layers",
            layers: str | None = None, all_calls: bool = False, check_reference: bool = False,
            model_info: dict | None = None, on_event: Callable[[str, Any], None] | None = None,
            store_path: str | None = None) -> dict:
    """Migrate step by step, localize, and return the run record (plain data)."""
    _check_store(store)
    emit = on_event or (lambda *_: None)
    steps_plan = make_plan(store, plan, layers)
    carved_seq = max((op["seq"] for op in store.ops), default=-1) + 1

    # the reference run, live: the yardstick for end-to-end error and a check that the run repeats the carve
    reference_out, probe, _ = run_step(run, store, target, set(), judge)
    if probe.seq != carved_seq:
        raise TapmlError(f"the model dispatched {probe.seq} ops now but {carved_seq} when carved: "
                         "its path is not repeatable, so carved ops cannot be matched to the live run")

    propagated: dict[int, dict] = {}
    steps = []
    stats_before = Counter(target.stats)
    for k, step in enumerate(steps_plan):
        emit("step", (k, len(steps_plan), step["name"]))
        before = Counter(target.stats)
        output, off, wall = run_step(run, store, target, set(step["offload"]), judge,
                                     on_op=lambda: emit("op", None))
        for i, res in off.results.items():
            propagated[i] = res  # the latest step that offloaded an op wins
        delta = Counter(target.stats)
        delta.subtract(before)
        counts = Counter(r["status"] for r in off.results.values())
        kernel_s = delta.get("kernel_us", 0) / 1e6 if "kernel_us" in target.stats else off.target_s
        steps.append({
            "index": k, "name": step["name"], "groups": step["groups"],
            "selected": len(step["offload"]), "offloaded": counts.get("offloaded", 0),
            "unsupported": counts.get("unsupported", 0),
            "failed": counts.get("crashed", 0) + counts.get("timeout", 0),
            "end_to_end": _end_to_end(output, reference_out, judge),
            "tokens": _tokens(output, reference_out, store),
            "diverged": off.diverged, "first_nonfinite": off.first_nonfinite,
            "timing": {"wall_s": wall, "target_s": off.target_s, "kernel_s": kernel_s,
                       "transfer_and_overhead_s": max(0.0, off.target_s - kernel_s),
                       "compare_s": off.compare_s,
                       "reference_s": max(0.0, wall - off.target_s - off.compare_s)},
            "bytes_sent": delta.get("bytes_sent", 0), "bytes_received": delta.get("bytes_received", 0),
        })

    # the isolated pass: every unique signature, plus every call whose chained output went wrong
    emit("local", None)
    rows = local_pass(store, target, judge, all_calls=all_calls, on_result=lambda _: emit("op", None))
    isolated = Counter(r["status"] for r in rows.values())
    for i in sorted(propagated):
        p = propagated[i].get("propagated")
        if i not in rows and p is not None and not p["ok"]:
            rows[i] = run_local(store, target, judge, i)
    culprit_row = find_culprit(rows)
    victims = find_victims(rows, {i: r["propagated"] for i, r in propagated.items() if "propagated" in r})

    ops = []
    for rec in store.ops:
        i = rec["index"]
        row = rows.get(i)
        p = propagated.get(i, {})
        entry = {"index": i, "op": rec["op"], "module": rec["module"], "call": rec["call"],
                 "source": rec["source"], "step": rec["step"], "layer": rec["layer"], "signature": rec["signature"]}
        if row is not None:
            entry.update(status=row["status"], reason=row.get("reason"), local=row.get("local"))
            if "reference_noise" in row:
                entry["reference_noise"] = row["reference_noise"]
        elif p.get("status") in ("unsupported", "crashed", "timeout"):
            entry.update(status=p["status"], reason=p["reason"])
        elif "propagated" in p:
            entry.update(status="ok", reason="local error measured on an earlier call of the same signature")
        else:
            entry.update(status="skipped", reason="not selected by the plan")
        if "propagated" in p:
            entry["propagated"] = p["propagated"]
            entry["offloaded"] = p["status"] == "offloaded"
            entry["target_ms"] = p["target_ms"]
            local_abs = (entry.get("local") or {}).get("max_abs")
            if local_abs:
                entry["amplification"] = p["propagated"]["max_abs"] / local_abs
        entry["tolerance"] = (entry.get("local") or entry.get("propagated") or {}).get("tolerance")
        entry["victim"] = i in victims
        if check_reference and row is not None and row["status"] in ("ok", "divergent"):
            entry["reference_noise"] = reference_noise(store, i)
        ops.append(entry)

    compute = [o for o in ops if not store.ops[o["index"]]["view"]]
    offloaded = [o for o in compute if o.get("offloaded")]
    counts = Counter(o["status"] for o in ops)
    culprit = None
    if culprit_row is not None:
        i = culprit_row["index"]
        downstream = [v for v in victims if v > i]
        culprit = {k: culprit_row[k] for k in ("index", "op", "module", "call", "source", "signature")}
        culprit.update(local=culprit_row["local"], victims_downstream=len(downstream),
                       step=store.steps[store.ops[i]["step"]]["name"] if store.steps else None,
                       random_inputs=random_input_check(store, target, judge, i),
                       repro=f"tapml replay {store_path or store.path} --platform {target.name} --op {i}")
    final = steps[-1]["end_to_end"] if steps else {"ok": True}
    failed = counts.get("crashed", 0) + counts.get("timeout", 0)
    verdict = "divergent" if (culprit or not final["ok"]) else ("incomplete" if failed else "ok")
    first_nonfinite = next(({"index": o["index"], "op": o["op"], "module": o["module"], "where": "local"}
                            for o in ops if (o.get("local") or {}).get("new_nonfinite")), None) \
        or next((s["first_nonfinite"] | {"where": f"step {s['name']}"} for s in steps if s["first_nonfinite"]), None)
    record = {
        "schema": RUN_SCHEMA,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"tapml": __version__, "torch": torch.__version__, "python": _platform.python_version()},
        "model": model_info or store.manifest.get("model", {}),
        "store": store_path or str(store.path),
        "reference": "torch-cpu (eager)",
        "target": target.describe(),
        "plan": {"kind": plan, "layers": layers, "steps": [s["name"] for s in steps_plan]},
        "rule": judge.rule,
        "compute_dtype": judge.compute_dtype,
        "verdict": verdict,
        "culprit": culprit,
        "victims": victims,
        "counts": {s: counts.get(s, 0) for s in STATUSES},
        "isolated_counts": {s: isolated.get(s, 0) for s in STATUSES},
        "coverage": len(offloaded) / len(compute) if compute else 1.0,
        "compute_ops": len(compute),
        "offloaded_ops": len(offloaded),
        "first_nonfinite": first_nonfinite,
        "saturated_ops": [o["index"] for o in ops if (o.get("local") or {}).get("saturated")],
        "end_to_end": final,
        "tokens": steps[-1]["tokens"] if steps else None,
        "steps": steps,
        "ops": ops,
        "target_stats": {k: int(v) for k, v in (Counter(target.stats) - stats_before).items()},
    }
    record["summary"] = summary_line(record)
    return jsonable(record)


def summary_line(r: dict) -> str:
    """The verdict in one sentence."""
    c = r["culprit"]
    tokens = r.get("tokens") or {}
    token_note = ""
    if tokens.get("first_difference") is not None:
        token_note = (f"; the generated tokens first differ at position {tokens['first_difference']} "
                      f"(generated token {tokens['first_difference_generated']}, step {tokens['step']})")
    if c is not None:
        m, tol = c["local"], c["local"]["tolerance"]
        where = f"{c['source'].rsplit('/', 1)[-1]}" if c.get("source") else "unknown source"
        return (f"{c['op']} in {c['module'] or '(model)'} (call {c['call']}, {where}) diverges: max abs "
                f"{_g(m['max_abs'])} against a tolerance of atol {tol['atol']:.3g} + rtol {tol['rtol']:.3g}; "
                f"{c['victims_downstream']} later ops inherit it{token_note}")
    if r["verdict"] == "divergent":
        return (f"no single op is out of tolerance, but the model output is (max abs "
                f"{_g(r['end_to_end'].get('max_abs', 0))}): small errors accumulate{token_note}")
    if r["verdict"] == "incomplete":
        return f"{r['counts']['crashed']} ops crashed and {r['counts']['timeout']} timed out on the target"
    return (f"every offloaded op is within tolerance on {r['target']['name']}; "
            f"{r['coverage']:.0%} of compute ops ran on the target")


def _g(x) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"
