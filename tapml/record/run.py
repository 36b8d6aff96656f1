"""The run record: what a migration found, as typed data.

The engine builds a ``Run``; the CLI, the HTML report, the pytest plugin, the
matrix and the diff read it. ``run.json`` is ``Run.to_json()``; its JSON Schema
(``schemas/run.schema.json``) is generated from these classes.
"""

from __future__ import annotations

import fnmatch
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tapml.core import Status, from_json, json_schema, to_json

__all__ = ["RUN_SCHEMA", "Tolerance", "Worst", "Oracle", "Metrics", "OpRow", "Timing", "Tokens", "OpRef", "Step",
           "RandomDraw", "RandomCheck", "Culprit", "Plan", "Reference", "Run", "TargetEvent", "BoundCheck",
           "DeadOutput", "Finding", "Candidate", "OpList", "UnitRow", "run_schema"]

RUN_SCHEMA = 2  # 2: "reference" is an object (name, device, description), not a string


@dataclass(frozen=True)
class Tolerance:
    """An assert_close-style tolerance and where it came from."""

    atol: float
    rtol: float
    origin: str

    def to_json(self) -> dict:
        return to_json(self)


@dataclass
class Worst:
    """One of the worst elements of a comparison."""

    index: list[int]
    expected: Any
    got: Any
    diff: float


@dataclass
class Oracle:
    """Distances from a float64 evaluation of the same op on the same inputs."""

    rmse_target: float
    rmse_reference: float
    ratio: float
    ok: bool


@dataclass
class BoundCheck:
    """Where an output sits against the error any correct implementation may show (the ``bound`` rule)."""

    form: str  # the formula, e.g. "4·√K·u·|A|·|B| + 2u·|y| (K=384)", or the fp64-oracle fallback
    ratio: float  # max over elements of |target − exact| / bound: above 1 is out of bounds
    reference_ratio: float  # the same for the reference: a healthy target sits near it
    output: int = 0
    consistent_with: str | None = None  # the arithmetic the target's errors match, when out of bounds
    precision: str | None = None  # that arithmetic's short name: tf32, bfloat16, float16


@dataclass
class DeadOutput:
    """An output no later op reads and the model does not return, whose values are wrong anyway."""

    output: int
    problem: str
    name: str = ""


@dataclass
class Metrics:
    """A comparison of the target's output with the reference's (the worst live output of an op)."""

    ok: bool
    max_abs: float | None = 0.0
    tolerance: Tolerance | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    problem: str | None = None
    exact: bool | None = None
    max_rel: float | None = None
    mismatch_fraction: float | None = None
    mismatches: int | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    max_ulp: int | None = None
    nan: list[int] | None = None  # [target, reference]
    inf: list[int] | None = None
    worst: list[Worst] = field(default_factory=list)
    histogram: list[int] | None = None
    output: int | None = None  # which output of the op these numbers are for
    outputs: int | None = None  # how many outputs were compared
    output_name: str | None = None  # that output's name in the op's schema
    problem_kind: str | None = None  # shape | dtype | count
    nonfinite_mismatches: int | None = None  # NaN/Inf where the reference has another value
    bound: BoundCheck | None = None
    dead: list[DeadOutput] = field(default_factory=list)
    saturated: int | None = None
    new_nonfinite: bool | None = None
    oracle: Oracle | None = None
    why: str | None = None
    rule: str | None = None


@dataclass
class OpRow:
    """One carved op in the run: its status, local and propagated errors."""

    index: int
    op: str
    module: str
    call: int
    signature: str
    status: Status
    source: str | None = None
    step: int | None = None
    layer: int | None = None
    reason: str | None = None
    local: Metrics | None = None
    propagated: Metrics | None = None
    offloaded: bool | None = None
    target_ms: float | None = None
    amplification: float | None = None
    tolerance: Tolerance | None = None
    victim: bool = False
    reference_noise: float | None = None
    view: bool | None = None  # a view op (no compute): it never moves to the target


@dataclass
class Timing:
    """Where a step's wall time went."""

    wall_s: float
    target_s: float
    kernel_s: float
    transfer_and_overhead_s: float
    compare_s: float
    reference_s: float
    compile_s: float | None = None  # preparing kernels (compiling), when measured; not in transfer_and_overhead_s


@dataclass
class Tokens:
    """A generation: the reference's and the target's tokens, and where they first differ."""

    reference: list[int]
    target: list[int]
    first_difference: int | None = None
    first_difference_generated: int | None = None
    step: str | None = None


@dataclass
class OpRef:
    """A pointer to one op (e.g. the first that produced a non-finite value)."""

    index: int
    op: str
    module: str
    where: str | None = None


@dataclass
class Step:
    """One migration step: a live mixed run with the plan's selected ops on the target."""

    index: int
    name: str
    groups: list[str]
    selected: int
    offloaded: int
    unsupported: int
    failed: int
    end_to_end: Metrics
    timing: Timing
    tokens: Tokens | None = None
    diverged: str | None = None
    first_nonfinite: OpRef | None = None
    bytes_sent: int = 0
    bytes_received: int = 0


@dataclass
class RandomDraw:
    draw: str
    ok: bool
    max_abs: float | None = None
    error: str | None = None


@dataclass
class RandomCheck:
    """Would random inputs of the same shapes have revealed the culprit's fault?"""

    draws: list[RandomDraw]
    revealed: bool
    summary: str


@dataclass
class Candidate:
    """An op out of bounds on its own, ranked by how much it moves the model's output alone."""

    index: int
    op: str
    module: str
    call: int
    local_ratio: float | None = None  # its bound ratio (or max abs under other rules)
    end_to_end: float | None = None  # the model output's error with only this op's signature on the target


@dataclass
class Culprit:
    """The op whose own (local) error explains the divergence."""

    index: int
    op: str
    module: str
    call: int
    signature: str
    local: Metrics
    victims_downstream: int
    repro: str
    source: str | None = None
    step: str | None = None
    random_inputs: RandomCheck | None = None
    candidates: list[Candidate] = field(default_factory=list)  # when several ops were out of bounds
    explains: str | None = None  # why this one and not the others
    nondeterministic: bool | None = None  # the target gave two answers for the same call
    repro_dir: str | None = None  # a standalone repro (script + inputs), relative to run.json's directory
    level: str = "op"  # op | unit (graph-level: every part is fine alone) | kernel (a fused kernel inside a unit)
    unit: str | None = None  # the module path of the unit the culprit was found in
    kernel: str | None = None  # the fused kernel's name (level kernel)
    covers: list[str] = field(default_factory=list)  # the aten ops a culprit kernel computes
    descent: list[str] = field(default_factory=list)  # model → module → ... → culprit, with each level's error


@dataclass
class TargetEvent:
    """The process behind the target crashed or hung during the run, and what became of it."""

    what: str  # crashed | timed out
    recovery: str  # respawned | reconnected | lost
    op: int | None = None
    log: str | None = None  # the last lines of a spawned worker's log


@dataclass
class Finding:
    """Something wrong that does not decide the verdict (a dead output's values, a noisy target, ...)."""

    kind: str  # dead-output | nondeterministic-target | reference-noise | ...
    severity: str  # info | warning
    message: str
    index: int | None = None
    op: str | None = None
    module: str | None = None


@dataclass
class Plan:
    kind: str
    steps: list[str]
    layers: str | None = None
    dag: list[list[str]] = field(default_factory=list)  # top-down: the units of each step (siblings share a step)
    edges: list[list[str]] = field(default_factory=list)  # top-down: [producer unit, consumer unit]


@dataclass
class UnitRow:
    """A module call considered as a unit: compiled whole, or why not, and its errors."""

    layer: int
    module: str
    cls: str
    call: int
    ops: list[int]  # [first, end) of the carved ops inside it
    status: str  # compiled | fell back (to its children) | not a unit | checked (by localization only)
    parent: int | None = None
    reason: str | None = None  # why it fell back or is not a unit
    signature: str | None = None
    nodes: int = 0  # carved ops in its program
    step: str | None = None  # the plan step that first ran it on the target
    local: Metrics | None = None  # on its carved inputs, against the float64 run of the same program
    propagated: Metrics | None = None  # in the live mixed run, against the carved outputs
    compile_s: float | None = None
    run_ms: float | None = None
    round_trips: int = 0  # per forward


@dataclass
class Reference:
    """The platform whose results are trusted."""

    name: str
    device: str
    description: str = ""
    saved: str | None = None  # the store whose outputs were the reference (offload --store), when they were
    live: str | None = None  # with ``saved``: the live reference run that checked the model repeats the carve


class OpList(list):
    """The run's ops: a list, also indexed by a glob on the overload (``ops["aten.addmm*"]``) or on the
    module path (``ops["module:encoder.layer.3.*"]``), as ``--tolerance`` patterns are written."""

    def __getitem__(self, key):
        if not isinstance(key, str):
            return super().__getitem__(key)
        if key.startswith("module:"):
            pattern = key.removeprefix("module:")
            return OpList(o for o in self if fnmatch.fnmatchcase(o.module, pattern))
        return OpList(o for o in self if fnmatch.fnmatchcase(o.op, key))


@dataclass
class Run:
    """A migration's whole record: verdict, culprit, steps and every op."""

    # how Jupyter shows a run (``_repr_html_``); ``tapml.reports`` installs the report's summary card
    html_fragment: ClassVar[Callable[[Run], str] | None] = None

    schema: int
    created: str
    versions: dict[str, str]
    model: dict[str, Any]
    store: str
    reference: Reference
    target: dict[str, Any]
    plan: Plan
    rule: str
    verdict: Status
    summary: str
    counts: dict[str, int]
    isolated_counts: dict[str, int]
    coverage: float
    compute_ops: int
    offloaded_ops: int
    end_to_end: Metrics
    steps: list[Step]
    ops: list[OpRow]
    compute_dtype: str | None = None
    culprit: Culprit | None = None
    victims: list[int] = field(default_factory=list)
    first_nonfinite: OpRef | None = None
    saturated_ops: list[int] = field(default_factory=list)
    tokens: Tokens | None = None
    target_stats: dict[str, int] = field(default_factory=dict)
    target_events: list[TargetEvent] = field(default_factory=list)
    reason: str | None = None  # why the verdict is incomplete (or which step made it divergent)
    notes: list[str] = field(default_factory=list)  # what was not compared and why (uninitialized outputs, ...)
    findings: list[Finding] = field(default_factory=list)
    units: list[UnitRow] = field(default_factory=list)  # top-down plans: every module call considered

    def __post_init__(self) -> None:
        self.ops = OpList(self.ops)

    def _repr_html_(self) -> str:
        render = Run.html_fragment
        if render is not None:
            return render(self)
        return f"<p><strong>{html.escape(str(self.verdict))}</strong>: {html.escape(self.summary)}</p>"

    def to_json(self) -> dict:
        return to_json(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, obj: dict) -> Run:
        return from_json(cls, _upgrade(obj))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.dumps())
        return path


def _upgrade(obj: dict) -> dict:
    """Read schema 1 records too: their reference was a plain string."""
    if isinstance(obj, dict) and obj.get("schema") == 1 and isinstance(obj.get("reference"), str):
        obj = dict(obj, reference={"name": obj["reference"], "device": "cpu"})
    return obj


def run_schema() -> dict:
    return json_schema(Run, title="tapml run record", schema_id="https://tapml.dev/schemas/run.schema.json")
