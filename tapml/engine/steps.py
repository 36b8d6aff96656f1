"""Running the plan's steps: one live mixed run per step, each judged end to end."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from tapml.carving import FixtureStore
from tapml.core import Status, dtype_name
from tapml.judging import Judge, compare, output_label, rmse, unit_roundoff
from tapml.platforms import Target
from tapml.record import BoundCheck, Metrics, Oracle, Step, Timing, Tokens

from .mixed import MixedResult, run_step

__all__ = ["StepsOutcome", "run_steps", "end_to_end", "tokens_of"]


@dataclass
class StepsOutcome:
    steps: list[Step] = field(default_factory=list)
    propagated: dict[int, MixedResult] = field(default_factory=dict)  # the latest step that offloaded an op wins
    offloaded_with: dict[int, set[int]] = field(default_factory=dict)  # op -> what ran on the target beside it then
    suspects: set[int] | None = None  # what ran on the target in the first step whose output went out of bounds

# the end-to-end rule: the target's distance from the float64 run within this many times the reference's own
E2E_FACTOR = 4.0


def _leaves(output) -> list[torch.Tensor]:
    return [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]


def end_to_end(got, want, judge: Judge, excluded: dict[int, str] | None = None,
               exact: list[torch.Tensor | None] | None = None) -> Metrics:
    """The model's outputs in a mixed run against the reference run's (the worst output); ``excluded``
    outputs (uninitialized memory) are not compared. Under the bound and oracle rules, a float output
    passes when its distance from the float64 run (``exact``) is within ``E2E_FACTOR`` times the
    reference's own — what any correct implementation that rounds differently achieves."""
    got, want = _leaves(got), _leaves(want)
    if len(got) != len(want):
        return Metrics(ok=False, problem_kind="count", problem=f"{len(got)} model outputs ≠ expected {len(want)}",
                       max_abs=None)
    worst = None
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if excluded and i in excluded:
            continue
        dtype = judge.compute_dtype if (w.is_floating_point() and judge.compute_dtype) else dtype_name(w.dtype)
        m = compare(g, w, judge.table.resolve("(model output)", "", dtype), full=False,
                    label=output_label(i, "", len(want)))
        e = exact[i] if exact is not None and i < len(exact) else None
        if judge.rule != "tolerance" and e is not None and w.is_floating_point() and m.problem_kind is None \
                and e.shape == g.shape:
            _against_float64(m, g, w, e, judge.compute_dtype)
        m.output = i
        if worst is None or (not m.ok, _size(m)) > (not worst.ok, _size(worst)):
            worst = m
    return worst or Metrics(ok=True, max_abs=0.0)


def _size(m: Metrics) -> float:
    return m.bound.ratio if m.bound is not None else (m.max_abs if m.max_abs is not None else math.inf)


def _against_float64(m: Metrics, g: torch.Tensor, w: torch.Tensor, e: torch.Tensor,
                     compute_dtype: str | None = None) -> None:
    """The floor's unit roundoff is the coarser of the output's dtype and the target's compute dtype: a
    bfloat16 target on a float32 model rounds every op to 2⁻⁸, as the per-op bounds already allow."""
    r_t, r_r = rmse(g, e), rmse(w, e)
    u = max(unit_roundoff(dtype_name(w.dtype)), unit_roundoff(compute_dtype) if compute_dtype else 0.0)
    floor = 4 * u * math.sqrt(float((e.double() ** 2).mean())) if e.numel() else 0.0
    allowed = E2E_FACTOR * r_r + floor
    m.oracle = Oracle(r_t, r_r, (r_t / r_r) if r_r else (0.0 if r_t == 0 else math.inf), r_t <= allowed)
    m.bound = BoundCheck(f"RMSE to the float64 run ≤ {E2E_FACTOR:g}× the reference's + 4u·rms",
                         r_t / allowed if allowed else (0.0 if r_t == 0 else math.inf),
                         r_r / allowed if allowed else 0.0)
    m.ok = m.oracle.ok and m.problem is None


def tokens_of(got, want, store: FixtureStore) -> Tokens | None:
    """For a generation (an integer token tensor out): where the target's greedy choice first differs."""
    named = [s for s in store.steps if not s["name"].startswith("call ") and s["name"] != "outside the model"]
    if not store.manifest.get("model", {}).get("generate") and not named:
        return None  # only a generation's output is a token sequence
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or want.is_floating_point() \
            or want.is_complex() or want.dim() != 2 or got.shape != want.shape or not want.numel():
        return None
    differs = (got != want).any(dim=0).nonzero()
    first = int(differs[0]) if differs.numel() else None
    generated = [s["name"] for s in store.steps if s["name"] not in ("outside the model",)]
    prompt = want.shape[1] - len(generated)
    step = generated[first - prompt] if first is not None and 0 <= first - prompt < len(generated) else None
    return Tokens(want[0].tolist(), got[0].tolist(), first, (first - prompt) if first is not None else None, step)


def run_steps(run: Callable[[], Any], store: FixtureStore, target: Target, plan: list[dict], judge: Judge,
              reference_out: Any, emit: Callable[[str, Any], None], excluded: dict[int, str] | None = None,
              exact: list[torch.Tensor | None] | None = None) -> StepsOutcome:
    """Each step of ``plan`` as a live mixed run; the record of each and the ops' propagated results."""
    outcome = StepsOutcome()
    for k, step in enumerate(plan):
        emit("step", (k, len(plan), step["name"]))
        before = Counter(target.stats)
        output, mixed, wall = run_step(run, store, target, set(step["offload"]), judge,
                                       on_op=lambda: emit("op", None))
        outcome.propagated.update(mixed.results)
        on_target = {i for i, r in mixed.results.items() if r.status == Status.OFFLOADED}
        outcome.offloaded_with.update({i: on_target for i in mixed.results})
        delta = Counter(target.stats)
        delta.subtract(before)
        counts = Counter(r.status for r in mixed.results.values())
        kernel_s = delta.get("kernel_us", 0) / 1e6 if "kernel_us" in target.stats else mixed.target_s
        e2e = end_to_end(output, reference_out, judge, excluded, exact)
        if not e2e.ok and outcome.suspects is None:
            outcome.suspects = on_target
        outcome.steps.append(Step(
            index=k, name=step["name"], groups=step["groups"], selected=len(step["offload"]),
            offloaded=counts[Status.OFFLOADED], unsupported=counts[Status.UNSUPPORTED],
            failed=counts[Status.CRASHED] + counts[Status.TIMEOUT],
            end_to_end=e2e,
            tokens=tokens_of(output, reference_out, store),
            diverged=mixed.diverged, first_nonfinite=mixed.first_nonfinite,
            timing=Timing(wall_s=wall, target_s=mixed.target_s, kernel_s=kernel_s,
                          transfer_and_overhead_s=max(0.0, mixed.target_s - kernel_s), compare_s=mixed.compare_s,
                          reference_s=max(0.0, wall - mixed.target_s - mixed.compare_s)),
            bytes_sent=delta.get("bytes_sent", 0), bytes_received=delta.get("bytes_received", 0)))
    return outcome
