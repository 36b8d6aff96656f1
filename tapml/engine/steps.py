"""Running the plan's steps: one live mixed run per step, each judged end to end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tapml.carving import FixtureStore
from tapml.core import Status
from tapml.judging import Judge
from tapml.platforms import Target
from tapml.record import Step, Timing, Tokens

from .mixed import MixedResult, run_step
from .outputs import E2E_FACTOR, end_to_end

__all__ = ["StepsOutcome", "run_steps", "end_to_end", "tokens_of", "E2E_FACTOR"]


@dataclass
class StepsOutcome:
    steps: list[Step] = field(default_factory=list)
    propagated: dict[int, MixedResult] = field(default_factory=dict)  # the latest step that offloaded an op wins
    offloaded_with: dict[int, set[int]] = field(default_factory=dict)  # op -> what ran on the target beside it then
    suspects: set[int] | None = None  # what ran on the target in the first step whose output went out of bounds
    units: dict[int, Any] = field(default_factory=dict)  # layer -> UnitResult (the latest step wins)
    unit_step: dict[int, str] = field(default_factory=dict)  # layer -> the step that first ran it

def tokens_of(got, want, store: FixtureStore) -> Tokens | None:
    """For a generation (an integer token tensor out): where the target's greedy choice first differs."""
    named = [s for s in store.steps if not s["name"].startswith("call ") and s["name"] != "outside the model"]
    if not store.manifest.get("model", {}).get("generate") and not named:
        return None  # only a generation's output is a token sequence
    if not (isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)) or want.is_floating_point() \
            or want.is_complex() or want.dim() != 2 or got.shape != want.shape or not want.numel():
        return None
    got, want = got.cpu(), want.cpu()
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
                                       on_op=lambda: emit("op", None), units=step.get("units"))
        outcome.propagated.update(mixed.results)
        if mixed.units is not None:
            for layer, r in mixed.units.results.items():  # a unit's own crash is kept over later quarantines
                if layer not in outcome.units or not outcome.units[layer].status.failed:
                    outcome.units[layer] = r
            for layer in mixed.units.results:
                outcome.unit_step.setdefault(layer, step["name"])
        on_target = {i for i, r in mixed.results.items() if r.status == Status.OFFLOADED}
        outcome.offloaded_with.update({i: on_target for i in mixed.results})
        delta = Counter(target.stats)
        delta.subtract(before)
        counts = Counter(r.status for r in mixed.results.values())
        target_s = mixed.target_seconds + (mixed.units.target_s if mixed.units is not None else 0.0)
        kernel_s = delta.get("kernel_us", 0) / 1e6 if "kernel_us" in target.stats else target_s
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
            timing=Timing(wall_s=wall, target_s=target_s, kernel_s=kernel_s,
                          transfer_and_overhead_s=max(0.0, target_s - kernel_s), compare_s=mixed.compare_s,
                          reference_s=max(0.0, wall - target_s - mixed.compare_s)),
            bytes_sent=delta.get("bytes_sent", 0), bytes_received=delta.get("bytes_received", 0)))
    return outcome
