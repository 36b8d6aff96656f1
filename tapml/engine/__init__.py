"""The migration engine: mixed runs step by step, localization, and the run record they produce.

Three parts: ``steps`` runs the plan's steps (live mixed runs, ``mixed``),
``localize`` runs the isolated pass and finds the culprit and its victims, and
``build`` turns what they found into a ``Run`` (a pure function). ``migrate``
strings them together; the reference is a parameter (``Reference``).
"""

from .build import OP_STATUSES, build_run, summary_line
from .heap import HeapTrimmer
from .localize import (
    DRAWS,
    Localization,
    LocalResult,
    find_culprit,
    find_victims,
    local_pass,
    localize,
    random_input_check,
    reference_noise,
    run_local,
    select_ops,
    skip_reason,
)
from .migrate import check_store, migrate
from .mixed import MixedResult, MixedRun, MixedRunFailed, run_step
from .plans import PLANS, find_blocks, groups_for, make_plan
from .probe import ModelState, OffCarvedPath
from .reference import Reference, reference_info, torch_reference
from .steps import end_to_end, run_steps, tokens_of
from .topdown import plan_top_down
from .unitcheck import select_units, unit_alone
from .units import Units, carved_outputs, unit_inputs
from .vouch import carved_for

__all__ = ["DRAWS", "OP_STATUSES", "PLANS", "HeapTrimmer", "LocalResult", "Localization", "MixedResult", "MixedRun",
           "MixedRunFailed", "ModelState", "OffCarvedPath", "Reference", "Units", "build_run", "carved_for",
           "carved_outputs", "check_store", "end_to_end", "find_blocks", "find_culprit",
           "find_victims", "groups_for", "local_pass", "localize", "make_plan", "migrate", "plan_top_down",
           "random_input_check", "reference_info", "reference_noise", "run_local", "run_step", "run_steps",
           "select_ops", "select_units", "skip_reason", "summary_line", "tokens_of", "torch_reference", "unit_alone",
           "unit_inputs"]
