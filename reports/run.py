"""Reading a run record: the only input the reports have."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tapml.core import SchemaError, TapmlError
from tapml.record import RUN_SCHEMA, Run

__all__ = ["ReportError", "load_run", "number", "SUPPORTED_SCHEMA"]

SUPPORTED_SCHEMA = RUN_SCHEMA
_REQUIRED = ("schema", "verdict", "ops", "steps", "counts", "target")


class ReportError(TapmlError):
    """A run record that cannot be reported; the message names the file and the problem."""


def load_run(path: str | Path) -> Run:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        record = json.loads(text)
    except ValueError as e:
        raise ReportError(f"{path} is not JSON ({e})") from None
    missing = [k for k in _REQUIRED if not isinstance(record, dict) or k not in record]
    if missing:
        raise ReportError(f"{path} is not a tapml run record (missing {', '.join(missing)})")
    if not isinstance(record["schema"], int) or record["schema"] > SUPPORTED_SCHEMA:
        raise ReportError(f"{path} has run schema {record['schema']}, newer than this tapml reads "
                          f"({SUPPORTED_SCHEMA}); upgrade tapml")
    try:
        return Run.from_json(record)
    except SchemaError as e:
        raise ReportError(f"{path} is not a valid run record: {e}") from None


def number(x) -> float | None:
    """A recorded number as a float: the record writes non-finite values as "inf", "-inf", "nan"."""
    if x is None:
        return None
    if isinstance(x, str):
        return math.inf if x in ("inf", "-inf") else math.nan
    return float(x)
