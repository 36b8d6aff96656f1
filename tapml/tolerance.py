"""Which tolerance judges an op, and where it came from.

Layers, last wins: the default for the dtype the *target computes in* (as
``torch.testing.assert_close`` sets it), then a global setting, then per-op
patterns, then per-module patterns. Sources are ``--tolerance`` flags and a TOML
config (``[tolerance]`` in a file given with ``--config``, or
``[tool.tapml.tolerance]`` in ./pyproject.toml). Every verdict carries the
origin, so a user can see why an op passed or failed.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import TapmlError

__all__ = ["Tolerance", "ToleranceTable", "DTYPE_DEFAULTS", "parse_tolerance"]

# (rtol, atol), as torch.testing.assert_close
DTYPE_DEFAULTS = {
    "float16": (1e-3, 1e-5),
    "bfloat16": (1.6e-2, 1e-5),
    "float32": (1.3e-6, 1e-5),
    "float64": (1e-7, 1e-7),
}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    origin: str

    def to_json(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol, "origin": self.origin}


def _parse_values(text: str, where: str) -> dict[str, float]:
    values = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        if not sep or name not in ("atol", "rtol"):
            raise TapmlError(f"{where}: expected atol:X,rtol:Y, got {text!r}")
        try:
            values[name] = float(value)
        except ValueError:
            raise TapmlError(f"{where}: {value!r} is not a number") from None
        if values[name] < 0:
            raise TapmlError(f"{where}: {name} must be >= 0")
    return values


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
    return kind, pattern, _parse_values(values, f"--tolerance {spec!r}")


@dataclass
class ToleranceTable:
    """Global, per-op and per-module overrides on top of the dtype defaults."""

    global_: dict[str, float] = field(default_factory=dict)
    global_origin: str = ""
    ops: list[tuple[str, dict[str, float], str]] = field(default_factory=list)
    modules: list[tuple[str, dict[str, float], str]] = field(default_factory=list)

    @classmethod
    def build(cls, flags: tuple[str, ...] = (), config: str | None = None) -> ToleranceTable:
        table = cls()
        table._load_config(config)
        for spec in flags:
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
            if not path.is_file():
                raise TapmlError(f"config file {config} does not exist")
        else:
            path, key = Path("pyproject.toml"), ("tool", "tapml", "tolerance")
            if not path.is_file():
                return
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise TapmlError(f"{path} is not valid TOML: {e}") from None
        for k in key:
            data = data.get(k, {}) if isinstance(data, dict) else {}
        where = f"{path} [{'.'.join(key)}]"
        for name in ("atol", "rtol"):
            if name in data:
                self.global_[name] = float(data[name])
                self.global_origin = where
        for kind, target in (("ops", self.ops), ("modules", self.modules)):
            for pattern, values in (data.get(kind) or {}).items():
                if not isinstance(values, dict):
                    raise TapmlError(f"{where}.{kind}: {pattern} must be a table like {{atol = 1e-3}}")
                target.append((pattern, {k: float(v) for k, v in values.items() if k in ("atol", "rtol")},
                               f"{where}.{kind} {pattern}"))

    def resolve(self, op: str, module: str, dtype: str) -> Tolerance:
        """The tolerance for an op computed in ``dtype``; integer and bool dtypes are exact."""
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
