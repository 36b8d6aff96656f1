"""Quarantine: an op signature that crashed or hung the target is not sent to it again in the same run.

Why: a hang costs the op timeout (60 s by default) every time it is tried — once
per cumulative step and again in the isolated pass, eight times for a layer-0 op
of MiniLM. The first failure is the finding; repeating it only costs time.
"""

from __future__ import annotations

from collections import deque

import torch

from tapml.core import OpCall, OpFailed, Status, UnitCall
from tapml.platforms import Support, Target, TargetWrapper

__all__ = ["Quarantine"]


class Quarantine(TargetWrapper):
    """The engine's view of a target, remembering which signatures crashed or timed out on it."""

    def __init__(self, target: Target):
        super().__init__(target)
        self.failed: dict[str, tuple[OpFailed, int]] = {}  # signature -> (the failure, the op it happened on)
        self.spared = 0  # calls not sent because their signature is quarantined
        self._flight: deque[OpCall | UnitCall] = deque()  # runs sent and not yet answered, oldest first

    def _check(self, op: OpCall) -> None:
        hit = self.failed.get(op.signature)
        if hit is not None:
            self.spared += 1
            error, where = hit
            if op.index == where:  # the very call that failed: its failure, recorded once, reused
                raise OpFailed(f"{error} (recorded earlier in this run; not sent again)", error.status)
            raise OpFailed(f"quarantined: this signature {error.status} on the target at op {where} "
                           f"earlier in this run ({error}); not sent again", Status.SKIPPED)

    def prepare(self, op: OpCall) -> Support:
        self._check(op)
        try:
            return self.target.prepare(op)
        except OpFailed as e:
            self._remember(op, e)
            raise

    def execute(self, op: OpCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        self._check(op)
        try:
            return self.target.execute(op, inputs)
        except OpFailed as e:
            self._remember(op, e)
            raise

    def send_run(self, op: OpCall, inputs: list[torch.Tensor], named) -> list[str] | None:
        """Not sent when quarantined: the op then runs one at a time, where ``execute`` says why."""
        if op.signature in self.failed:
            return None
        names = self.target.send_run(op, inputs, named)
        if names is not None:
            self._flight.append(op)
        return names

    def send_unit(self, unit: UnitCall, inputs: list[torch.Tensor], named) -> list[str] | None:
        """Not sent when quarantined: the unit then runs one at a time, where ``execute_unit`` says why."""
        if "unit:" + unit.signature in self.failed:
            return None
        names = self.target.send_unit(unit, inputs, named)
        if names is not None:
            self._flight.append(unit)
        return names

    def receive_run(self, into: list | None = None) -> tuple[list[torch.Tensor] | None, BaseException | None, float]:
        """The answer, with a crash or a hang remembered against the op it answers (runs come back in order)."""
        op = self._flight.popleft()  # before the call: an answer that raises is still this op's
        answer = self.target.receive_run(into)
        if isinstance(answer[1], OpFailed):
            if isinstance(op, UnitCall):
                self._remember_unit(op, answer[1])
            else:
                self._remember(op, answer[1])
        return answer

    # units: a signature that crashed or hung is not sent again either (keyed apart from op signatures)
    def execute_unit(self, unit: UnitCall, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        hit = self.failed.get("unit:" + unit.signature)
        if hit is not None:
            self.spared += 1
            raise OpFailed(f"quarantined: this unit signature {hit[0].status} on the target earlier in this run "
                           f"({hit[0]}); not sent again", Status.SKIPPED)
        try:
            return self.target.execute_unit(unit, inputs)
        except OpFailed as e:
            self._remember_unit(unit, e)
            raise

    def _remember_unit(self, unit: UnitCall, e: OpFailed) -> None:
        if not e.fatal and e.status.failed:
            self.failed.setdefault("unit:" + unit.signature, (e, unit.index))

    def _remember(self, op: OpCall, e: OpFailed) -> None:
        if not e.fatal and e.status.failed:
            self.failed.setdefault(op.signature, (e, op.index))
