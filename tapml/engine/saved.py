"""A saved reference: the store's model outputs as the end-to-end yardstick (Polygraphy's ``--load-outputs``).

Why: a store carved where the reference is trusted (PyTorch on a CUDA GPU, another machine) can
judge an offload run somewhere else. Each op's local and propagated errors already compare with
the carved outputs; this replaces the live reference run's *model outputs* by the carved ones. It
is valid only where the live run repeats the carve — the probe checks the op sequence, every
weight and input by content — so it is applied after the probe and refused where the store lacks
what it needs. How far the live reference lands from the saved one is reported, not hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from tapml.carving import FixtureStore
from tapml.judging import compare, output_label
from tapml.record import Finding, Tolerance

__all__ = ["SavedReference", "saved_reference"]


@dataclass
class SavedReference:
    """The reference outputs to judge with, and what the record says about them."""

    output: Any  # the store's outputs (a tensor, or a list of tensors in the live output's leaf order)
    used: bool
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def _leaves(value) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def saved_reference(store: FixtureStore, live_output: Any, live_name: str) -> SavedReference:
    """The store's model outputs in place of ``live_output`` (the live reference run's), or the live
    ones with a note saying why not (a store that does not record which op returned each output)."""
    live = _leaves(live_output)
    returns = store.graph.returns
    where = f"{store.reference['name']} on {store.reference['device']}"
    if not returns or len(returns) != len(live):
        return SavedReference(live_output, False, [f"the store does not record the model's {len(live)} outputs: "
                                                   f"the live reference ({live_name}) judges the run instead"])
    saved: list[torch.Tensor] = []
    for i, (leaf, ret) in enumerate(zip(live, returns, strict=True)):
        t = leaf.cpu() if ret is None else store.outputs(ret[0])[ret[1]]  # None: the model returned an input
        if t.shape != leaf.shape or t.dtype != leaf.dtype:
            return SavedReference(live_output, False, [
                f"model output {i} is {leaf.dtype}{list(leaf.shape)} live but {t.dtype}{list(t.shape)} in the "
                f"store: the live reference ({live_name}) judges the run instead"])
        saved.append(t)
    result = SavedReference(saved[0] if len(saved) == 1 and isinstance(live_output, torch.Tensor) else saved, True,
                            [f"the reference outputs are the store's, carved by {where} (saved reference); the live "
                             f"run on {live_name} repeated the carve's ops, weights and inputs"])
    worst = max(((compare(leaf.cpu(), t, Tolerance(0.0, 0.0, "exact"), full=False,
                          label=output_label(i, "", len(saved))).max_abs or 0.0, i)
                 for i, (leaf, t) in enumerate(zip(live, saved, strict=True)) if leaf.is_floating_point()),
                default=(0.0, None))
    if worst[0]:
        result.findings.append(Finding(
            kind="reference-difference", severity="info",
            message=f"the live reference ({live_name}) differs from the saved one ({where}) by max abs "
                    f"{worst[0]:.3g} at model output {worst[1]}: what two references' rounding differs by"))
    return result
