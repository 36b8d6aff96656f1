"""Which tolerance judges an op, and where it came from.

Layers, last wins: the default for the dtype the *target computes in* (as
``torch.testing.assert_close`` sets it), then a global setting, then per-op
patterns, then per-module patterns. Sources are ``--tolerance`` specs (CLI,
pytest option or ini key — one parser for all) and a TOML config (``[tolerance]``
in a file given with ``--config``, or ``[tool.tapml.tolerance]`` in
./pyproject.toml). Every verdict carries the origin, so a user can see why an op
passed or failed.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tapml.core import TapmlError
from tapml.record import Tolerance

__all__ = ["Tolerance", "ToleranceTable", "DTYPE_DEFAULTS", "parse_tolerance", "split_tolerances"]

# (rtol, atol), as torch.testing.assert_close
DTYPE_DEFAULTS = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}
_NAMES = ("atol", "rtol")


def _number(name: str, value, where: str) -> float:
    """A tolerance value: a finite number >= 0, or a one-line ``TapmlError``."""
    if isinstance(value, bool):
        raise TapmlError(f"{where}: {name} = {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TapmlError(f"{where}: {name} = {value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise TapmlError(f"{where}: {name} must be a finite number >= 0, not {value!r}")
    return number


def _parse_values(text: str, where: str) -> dict[str, float]:
    values = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in _NAMES:
            raise TapmlError(f"{where}: expected atol:X,rtol:Y, got {text!r}")
        values[name] = _number(name, value, where)
    return values


def split_tolerances(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """Specs from one comma-separated setting (a pytest option or ini key).

    A comma separates specs *and* the values inside one (``aten.softmax*=atol:1e-3,rtol:0``),
    so a piece without ``=`` continues the spec before it."""
    pieces = [p for item in ([text] if isinstance(text, str) else text) for p in str(item).split(",")]
    specs: list[str] = []
    for piece in (p.strip() for p in pieces):
        if not piece:
            continue
        if "=" not in piece and specs and piece.partition(":")[0].strip() in _NAMES:
            specs[-1] = f"{specs[-1]},{piece}"
        else:
            specs.append(piece)
    return specs


def parse_tolerance(spec: str) -> tuple[str | None, str | None, dict[str, float]]:
    """``atol:1e-3,rtol:0`` (global), ``aten.softmax*=atol:...`` (op) or
    ``module:encoder.layer.3.*=atol:...`` (module) → (kind, pattern, values)."""
    if "=" not in spec:
        return None, None, _parse_values(spec, f"--tolerance {spec!r}")
    pattern, _, values = spec.partition("=")
    kind = "op"
    if pattern.startswith("module:"):
        kind, pattern = "module", pattern.removeprefix("module:")
    elif pattern.startswith("op:"):
        pattern = pattern.removeprefix("op:")
    elif "." in pattern and pattern.split(".")[0] not in ("aten", "prims", "quantized", "torchvision"):
        kind = "module"  # a module path like encoder.layer.3.*
    if not pattern:
        raise TapmlError(f"--tolerance {spec!r}: the pattern before '=' is empty")
    return kind, pattern, _parse_values(values, f"--tolerance {spec!r}")


@dataclass
class ToleranceTable:
    """Global, per-op and per-module overrides on top of the dtype defaults."""

    global_: dict[str, float] = field(default_factory=dict)
    global_origin: str = ""
    ops: list[tuple[str, dict[str, float], str]] = field(default_factory=list)
    modules: list[tuple[str, dict[str, float], str]] = field(default_factory=list)
    _resolved: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, specs: tuple[str, ...] | list[str] = (), config: str | None = None) -> ToleranceTable:
        """From ``--tolerance`` specs (each may hold several, comma-joined) and a TOML config."""
        table = cls()
        table._load_config(config)
        for spec in split_tolerances(list(specs)):
            kind, pattern, values = parse_tolerance(spec)
            origin = f"--tolerance {spec}"
            if kind is None:
                table.global_, table.global_origin = dict(table.global_, **values), origin
            else:
                (table.ops if kind == "op" else table.modules).append((pattern, values, origin))
        return table

    def _load_config(self, config: str | None) -> None:
        if config is not None:
            path, key = Path(config), ("tolerance",)
            if path.is_dir():
                raise TapmlError(f"--config {config} is a directory, not a TOML file")
            if not path.is_file():
                raise TapmlError(f"--config {config}: no such file")
        else:
            path, key = Path("pyproject.toml"), ("tool", "tapml", "tolerance")
            if not path.is_file():
                return
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise TapmlError(f"{path} is not valid TOML: {e}") from None
        for k in key:
            data = data.get(k, {}) if isinstance(data, dict) else {}
        if not isinstance(data, dict):
            raise TapmlError(f"{path} [{'.'.join(key)}] must be a table")
        where = f"{path} [{'.'.join(key)}]"
        for name in _NAMES:
            if name in data:
                self.global_[name] = _number(name, data[name], where)
                self.global_origin = where
        for kind, target in (("ops", self.ops), ("modules", self.modules)):
            entries = data.get(kind) or {}
            if not isinstance(entries, dict):
                raise TapmlError(f"{where}.{kind} must be a table of PATTERN = {{atol = ..., rtol = ...}}")
            for pattern, values in entries.items():
                if not isinstance(values, dict):
                    raise TapmlError(f"{where}.{kind}: {pattern} must be a table like {{atol = 1e-3}}")
                target.append((pattern, {k: _number(k, v, f"{where}.{kind} {pattern}")
                                         for k, v in values.items() if k in _NAMES}, f"{where}.{kind} {pattern}"))

    def resolve(self, op: str, module: str, dtype: str) -> Tolerance:
        """The tolerance for an op computed in ``dtype``; integer and bool dtypes are exact. Memoized: a
        per-op offload asks once per op per forward, and the table is filled only while it is built."""
        key = (op, module, dtype)
        hit = self._resolved.get(key)
        if hit is None:
            hit = self._resolved[key] = self._resolve(op, module, dtype)
        return hit

    def _resolve(self, op: str, module: str, dtype: str) -> Tolerance:
        rtol, atol = DTYPE_DEFAULTS.get(dtype, (0.0, 0.0))
        origin = f"default for {dtype} (torch.testing)" if dtype in DTYPE_DEFAULTS else f"exact ({dtype})"
        values = {"atol": atol, "rtol": rtol}
        if self.global_:
            values.update(self.global_)
            origin = self.global_origin
        for pattern, override, where in self.ops:
            if fnmatch.fnmatchcase(op, pattern):
                values.update(override)
                origin = where
        for pattern, override, where in self.modules:
            if fnmatch.fnmatchcase(module, pattern):
                values.update(override)
                origin = where
        return Tolerance(values["atol"], values["rtol"], origin)
