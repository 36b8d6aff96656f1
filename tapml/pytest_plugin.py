"""pytest plugin: every carved op is a unit test, replayed on any target.

Register: the ``pytest11`` entry point ``tapml``. A project that never mentions
tapml sees no change: options are added (they must be, to be parsed), but the
plugin's state, markers and hooks are registered only when a ``--tapml-*``
option, a ``tapml_*`` ini key or a collected tapml store asks for them (as
``_pytest/stepwise.py`` does), and xdist hooks are optional. A store given with
``--tapml-store`` (or a tapml manifest found under the test paths) yields one
item per unique op signature (per call with ``--tapml-all-calls``) × each
``--tapml-platform``; with ``--tapml-units modules``, one item per unique module
unit signature instead: the units a ``--plan top-down`` run compiles on that
platform, each run whole on its carved inputs and judged as the run's isolated
unit pass judges it (later calls of a signature with ``--tapml-all-calls``).
Outcomes follow the isolated pass of ``tapml offload`` (one engine, two front
ends): ok → PASSED, divergent → FAILED with a numeric report, unsupported or not
comparable → SKIPPED with the reason, a worker that crashed or timed out or a
broken store → ERROR (one short report, no traceback).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

__all__ = ["CarvedOpItem", "StoreFile", "TapmlPlugin", "run_pytest", "is_tapml_manifest"]

_SETTINGS = {
    # name: (help, kind) — kind: "path", "list", "bool", "text", "float"
    "store": ("fixture store to turn into tests", "path"),
    "platform": ("target platform(s), comma separated (default torch-cpu)", "list"),
    "remote": ("pool of running workers HOST:PORT,HOST:PORT (one device per xdist worker)", "list"),
    "token-file": ("token for --tapml-remote workers", "path"),
    "all-calls": ("one test per call, not per unique op (or unit) signature", "bool"),
    "units": ("ops (default): a test per carved op; modules: a test per module unit the top-down plan compiles "
              "on the target (the first call of each signature, as the run's isolated unit pass)", "text"),
    "in-process": ("run the platform in this process, not in a spawned worker", "bool"),
    "tolerance": ("tolerance specs as for tapml offload (comma separated)", "text"),
    "config": ("TOML file with a [tolerance] section", "path"),
    "rule": ("bound (default), tolerance or oracle", "text"),
    "json": ("write the tapml summary (counts per status and op type) to this file", "path"),
    "artifacts": ("directory for the obtained tensors of failing tests (default tapml-artifacts)", "path"),
    "timeout": ("seconds per op on the target (default 60)", "float"),
}
PLUGIN_NAME = "tapml-session"


def _dest(name: str) -> str:
    return "tapml_" + name.replace("-", "_")


def pytest_addoption(parser):
    group = parser.getgroup("tapml", "tapml: carved ops as tests")
    for name, (help_, kind) in _SETTINGS.items():
        if kind == "bool":
            group.addoption(f"--tapml-{name}", dest=_dest(name), action="store_true", default=None, help=help_)
            parser.addini(_dest(name), help_, type="bool", default=None)
        else:
            group.addoption(f"--tapml-{name}", dest=_dest(name), default=None, help=help_)
            parser.addini(_dest(name), help_, type="string", default=None)


def _pyproject_table(config) -> dict:
    path = Path(config.rootpath) / "pyproject.toml"
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text()).get("tool", {}).get("tapml", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return table if isinstance(table, dict) else {}


def _raw(config, name: str):
    value = config.getoption(_dest(name))
    if value is None:
        value = config.getini(_dest(name))
    if value in (None, ""):
        value = _pyproject_table(config).get(name.replace("-", "_"))
    return value


def setting(config, name: str):
    """Command line > ini key (tapml_NAME) > [tool.tapml] NAME in pyproject.toml."""
    kind = _SETTINGS[name][1]
    value = _raw(config, name)
    if kind == "list":
        if isinstance(value, list):
            return [str(v) for v in value]
        return [v.strip() for v in str(value).split(",") if v.strip()] if value else []
    if kind == "bool":
        return bool(value)
    if kind == "float":
        try:
            return float(value) if value not in (None, "") else None
        except ValueError:
            raise pytest.UsageError(f"tapml {name}: {value!r} is not a number") from None
    return value or None


def _asked(config) -> bool:
    return any(config.getoption(_dest(n)) not in (None, False) or config.getini(_dest(n)) not in (None, "")
               for n in _SETTINGS)


def pytest_configure(config):
    if _asked(config):
        _ensure_plugin(config)


def _ensure_plugin(config) -> TapmlPlugin:
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        plugin = TapmlPlugin(config)
        config.pluginmanager.register(plugin, PLUGIN_NAME)
    return plugin


def is_tapml_manifest(path: Path) -> bool:
    """A ``manifest.json`` written by tapml (schema, ops, tensors), not any JSON beside a ``tensors/``."""
    if path.name != "manifest.json" or not (path.parent / "tensors").is_dir():
        return False
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("schema"), int) and isinstance(obj.get("ops"), list) \
        and isinstance(obj.get("tensors"), dict)


def pytest_collect_file(file_path: Path, parent):
    if is_tapml_manifest(file_path):
        _ensure_plugin(parent.config)
        return StoreFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """Called before configure, so it lives here; it answers only when a device pool is given."""
    pool = setting(config, "remote")
    return len(pool) if pool else None


class TapmlPlugin:
    """Per-process state (open stores, targets, results) and the hooks that need it."""

    def __init__(self, config):
        self.config = config
        self.stores: dict[str, object] = {}
        self.targets: dict[str, object] = {}
        self.results: list[dict] = []
        self.pool = setting(config, "remote")
        workerinput = getattr(config, "workerinput", None)
        self.device = workerinput.get("tapml_device") if workerinput else (self.pool[0] if self.pool else None)
        self.assigned = self.device  # the device the controller gave this process
        self.dead: set[str] = set()
        self.judges: dict[str, object] = {}
        self.unit_sets: dict[tuple[str, str], tuple[object, list[int]]] = {}  # (store, platform) -> units
        self.settings = self._settings()
        self.units = setting(config, "units") or "ops"
        if self.units not in ("ops", "modules"):
            raise pytest.UsageError(f"--tapml-units {self.units}: choose ops or modules")
        if not self.pool:  # a worker of a pool names its own platform; a local one must resolve here
            self._check_platforms(setting(config, "platform"))
        config.addinivalue_line("markers", "tapml: a carved-op test generated by the tapml plugin")
        for kind in ("compute", "view", "nondeterministic"):
            config.addinivalue_line("markers", f"{kind}: carved op of that kind")
        config.addinivalue_line("markers", "unit: a module unit compiled whole on the target (--tapml-units modules)")
        store = setting(config, "store")
        if store:
            manifest = Path(store) / "manifest.json"
            if not manifest.is_file():
                raise pytest.UsageError(f"--tapml-store {store}: not a fixture store (no manifest.json)")
            config.args.append(str(manifest))

    def _settings(self):
        from tapml.core import TapmlError
        from tapml.judging import split_tolerances
        from tapml.settings import Settings

        try:
            return Settings(timeout=setting(self.config, "timeout") or 60.0,
                            token_file=setting(self.config, "token-file"),
                            tolerances=tuple(split_tolerances(setting(self.config, "tolerance") or "")),
                            config=setting(self.config, "config"), rule=setting(self.config, "rule") or "bound",
                            reconnect_s=2.0, in_process=setting(self.config, "in-process"))
        except TapmlError as e:
            raise pytest.UsageError(f"tapml: {e}") from None

    @staticmethod
    def _check_platforms(names: list[str]) -> None:
        from tapml.core import TapmlError
        from tapml.platforms import platform_class

        for name in names:
            try:
                platform_class(name)
            except TapmlError as e:
                raise pytest.UsageError(f"tapml: {e}") from None

    def store(self, path: str):
        from tapml.carving import FixtureStore

        if path not in self.stores:
            self.stores[path] = FixtureStore(path)
        return self.stores[path]

    def target(self, platform: str):
        if platform not in self.targets:
            self.targets[platform] = self.settings.open_target(platform if self.device is None else None,
                                                               remote=self.device)
        return self.targets[platform]

    def failover(self, platform: str) -> bool:
        """After a device died: move this process to another live device of the pool."""
        if not self.pool or self.device is None:
            return False
        self.dead.add(self.device)
        old = self.targets.pop(platform, None)
        if old is not None:
            old.close()
        for address in self.pool:
            if address not in self.dead:
                self.device = address
                return True
        return False

    def unit_set(self, store, platform: str):
        """The units the top-down plan runs on ``platform`` (compiling each unique one) and those to test."""
        from tapml.engine import select_units

        key = (str(store.path), platform)
        if key not in self.unit_sets:
            self.unit_sets[key] = select_units(store, self.target(platform),
                                               all_calls=setting(self.config, "all-calls"))
        return self.unit_sets[key]

    def judge(self, target):
        if target.name not in self.judges:
            self.judges[target.name] = self.settings.judge(target)
        return self.judges[target.name]

    def pytest_unconfigure(self, config):
        for t in self.targets.values():
            t.close()
        self.targets.clear()

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node):
        if self.pool:
            n = int(node.gateway.id.removeprefix("gw") or 0)
            node.workerinput["tapml_device"] = self.pool[n % len(self.pool)]

    def pytest_sessionfinish(self, session):
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["tapml_results"] = json.dumps(self.results)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        if "tapml_results" in getattr(node, "workeroutput", {}):
            self.results.extend(json.loads(node.workeroutput["tapml_results"]))

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.results:
            return
        by_status = Counter(r["status"] for r in self.results)
        by_op: dict[str, Counter] = {}
        for r in self.results:
            by_op.setdefault(r["op"], Counter())[r["status"]] += 1
        tr = terminalreporter
        tr.section("tapml")
        rescheduled = sum(1 for r in self.results if r.get("rescheduled"))
        every, modules = setting(config, "all-calls"), self.units == "modules"
        # the run record's words: an isolated pass over unique signatures counts signatures, not ops
        unit = "carved ops (every call)" if every else "carved op signatures (the first call of each)"
        if modules:
            unit = "module units (every call)" if every else "module unit signatures (the first call of each)"
        tr.write_line(f"{unit}: " + ", ".join(f"{n} {s}" for s, n in by_status.most_common())
                      + (f"; {rescheduled} rescheduled to another device after a worker failure"
                         if rescheduled else ""))
        for op, c in sorted(by_op.items(), key=lambda kv: -sum(kv[1].values())):
            tr.write_line(f"  {op:40s} " + ", ".join(f"{n} {s}" for s, n in c.most_common()))
        if not every:
            tr.write_line("later calls of a signature are not tested on their own: --tapml-all-calls tests every "
                          "call (and makes each selectable with -k by its module path)")
        path = setting(config, "json")
        if path:
            kind = ("module calls" if every else "module signatures") if modules else \
                ("ops" if every else "signatures")
            Path(path).write_text(json.dumps({"unit": kind, "counts": dict(by_status),
                                              "rescheduled": rescheduled,
                                              "by_op": {k: dict(v) for k, v in by_op.items()}}, indent=1))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        """A carved op's skip points at the op (store, index, module), not at this plugin's source line."""
        outcome = yield
        report = outcome.get_result()
        if isinstance(item, CarvedOpItem) and report.skipped and isinstance(report.longrepr, tuple):
            reason = str(report.longrepr[2]).removeprefix("Skipped: ")
            report.longrepr = (str(item.path.parent), None, f"{item.what()} {reason}")


def _plugin(config) -> TapmlPlugin:
    return config.pluginmanager.get_plugin(PLUGIN_NAME)


def _platform_name(spec: str) -> str:
    """What a platform calls itself (``faulty-gelu``), not the class or file it was loaded from."""
    if ":" not in spec:
        return spec
    from tapml.core import TapmlError
    from tapml.platforms import platform_class

    try:
        return platform_class(spec).name or spec.rsplit(":", 1)[-1]
    except TapmlError:
        return spec.rsplit(":", 1)[-1]  # it fails again, with its reason, when the item opens it


class StoreFile(pytest.File):
    """A fixture store: one item per unique signature (or call) × platform, in store order."""

    def collect(self):
        from tapml.core import TapmlError
        from tapml.engine import select_ops

        try:
            store = _plugin(self.config).store(str(self.path.parent))
        except TapmlError as e:
            raise self.CollectError(f"tapml: {e}") from None
        platforms = setting(self.config, "platform") or ["torch-cpu"]
        labels = {p: _platform_name(p) for p in platforms}
        if _plugin(self.config).units == "modules":
            yield from self._units(store, platforms, labels)
            return
        for index in select_ops(store, all_calls=setting(self.config, "all-calls")):
            rec = store.ops[index]
            for platform in platforms:
                where = f"{rec['module'] or '(model)'}#{rec['call']}"
                name = f"{index:04d}-{rec['op']}[{where}][{labels[platform]}]"
                item = CarvedOpItem.from_parent(self, name=name, index=index, platform=platform)
                item.label = f"{rec['op']} in {where}"
                kind = "nondeterministic" if rec["nondeterministic"] else ("view" if rec["view"] else "compute")
                item.add_marker("tapml")
                item.add_marker(kind)
                marker = "op_" + re.sub(r"\W", "_", rec["op"])
                self.config.addinivalue_line("markers", f"{marker}: carved {rec['op']} ops")
                item.add_marker(marker)
                yield item

    def _units(self, store, platforms: list[str], labels: dict[str, str]):
        """One item per module unit the plan compiles on each platform (it opens the target to know)."""
        from tapml.core import TapmlError

        for platform in platforms:
            try:
                units, layers = _plugin(self.config).unit_set(store, platform)
            except TapmlError as e:
                raise self.CollectError(f"tapml: {e}") from None
            for layer in layers:
                unit, span = units.built[layer]
                where = f"{unit.module or '(model)'}#{unit.call}"
                item = CarvedUnitItem.from_parent(self, name=f"unit-{span.first:04d}-{unit.cls}[{where}]"
                                                  f"[{labels[platform]}]", index=layer, platform=platform)
                item.label = f"{unit.cls} {where}, ops [{span.first}, {span.end})"
                item.add_marker("tapml")
                item.add_marker("unit")
                yield item


class CarvedMismatch(AssertionError):
    """The target's output is out of tolerance (FAILED)."""


class CarvedOpItem(pytest.Item):
    def __init__(self, *, index: int, platform: str, **kw):
        super().__init__(**kw)
        self.index, self.platform = index, platform
        self.label = ""  # "aten.gelu.default in encoder.layer.3.intermediate.intermediate_act_fn#0"
        self.result = None
        self.rescheduled = False

    def setup(self):
        """The op runs on the target here, so a dead or hung worker (or a broken store) is an ERROR,
        reported in one short paragraph, not a FAILED."""
        from tapml.core import TapmlError

        plugin = _plugin(self.config)
        self.user_properties.append(("tapml_assigned_device", plugin.assigned or "spawned"))
        result, error = None, None
        try:
            store = plugin.store(str(self.path.parent))
            for _ in range(max(1, len(plugin.pool))):
                try:
                    target = plugin.target(self.platform)
                except TapmlError as e:  # the device is unreachable: the next one of the pool, if any
                    if plugin.failover(self.platform):
                        self.rescheduled = True
                        continue
                    raise e
                result = self.run_on(store, target, plugin.judge(target))
                if not result.status.failed or not plugin.failover(self.platform):
                    break
                self.rescheduled = True  # run it again on the next live device of the pool
        except TapmlError as e:  # a store or device problem: an ERROR with tapml's one line, no traceback
            error = f"tapml: {e}"
        if error is not None:
            plugin.results.append({"nodeid": self.nodeid, "op": self.kind(), "status": "error",
                                   "platform": self.platform})
            pytest.fail(error, pytrace=False)
        if result is None:
            pytest.fail(f"tapml: no live device left in the pool {plugin.pool}", pytrace=False)
        self.result = result
        self.user_properties.append(("tapml_device", plugin.device or "spawned"))
        if self.rescheduled:
            self.user_properties.append(("tapml_rescheduled", True))
        self.user_properties.append(("tapml_status", str(result.status)))
        if result.status.failed:
            plugin.results.append(self._summary())
            pytest.fail(f"{self._where()}\n{result.status} on {self.platform}: {result.reason}", pytrace=False)

    def run_on(self, store, target, judge):
        from tapml.engine import run_local

        return run_local(store, target, judge, self.index, keep_outputs=True)

    def kind(self) -> str:
        """What the summary groups it under: the op's overload."""
        return self.name.split("-", 1)[-1].split("[")[0]

    def what(self) -> str:
        return f"op {self.index} ({self.label})"

    def _summary(self) -> dict:
        return {"nodeid": self.nodeid, "op": self.result.op, "status": str(self.result.status),
                "platform": self.platform, "rescheduled": self.rescheduled}

    def runtest(self):
        result = self.result
        _plugin(self.config).results.append(self._summary())
        local = result.local
        if local is not None:
            for key in ("max_abs", "max_rel", "mismatch_fraction", "cosine", "sqnr_db", "max_ulp"):
                if getattr(local, key) is not None:
                    self.user_properties.append((f"tapml_{key}", getattr(local, key)))
        if result.status in ("unsupported", "skipped"):
            pytest.skip(f"{result.status}: {result.reason}")
        if result.status == "divergent":
            self._save_outputs()
            raise CarvedMismatch(result.op)

    def _save_outputs(self) -> None:
        import safetensors.torch

        base = Path(setting(self.config, "artifacts") or "tapml-artifacts")
        base.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^\w.\-\[\]()]", "_", self.name)
        path = base / f"{safe}.safetensors"
        safetensors.torch.save_file({f"output{i}": t.contiguous() for i, t in enumerate(self.result.outputs)},
                                    str(path))
        self.artifact = str(path)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, CarvedMismatch):
            return self._explain()
        return super().repr_failure(excinfo, style)

    def _where(self) -> str:
        from tapml.failure_report import where

        return where(_plugin(self.config).store(str(self.path.parent)), self.index, self.platform)

    def _explain(self) -> str:
        from tapml.failure_report import mismatch_report

        store = _plugin(self.config).store(str(self.path.parent))
        extra = [f"obtained tensors: {self.artifact}"] if getattr(self, "artifact", None) else []
        extra.append(f"repro: tapml replay {store.path} --platform {self.platform} --op {self.index}")
        return mismatch_report(self.result.local, self._where(), extra)

    def reportinfo(self):
        return self.path, None, f"{self.name}"


class CarvedUnitItem(CarvedOpItem):
    """A module unit (``index``: its module call among the carved layers) compiled whole on the target, run
    on its carved inputs and judged as the run's isolated unit pass judges it."""

    def run_on(self, store, target, judge):
        from tapml.engine import carved_outputs, unit_alone, unit_inputs

        unit, span = _plugin(self.config).unit_set(store, self.platform)[0].built[self.index]
        return unit_alone(target, judge, unit, unit_inputs(store, unit), carved_outputs(store, span),
                          keep_outputs=True)

    def kind(self) -> str:
        return self.label.split(" ", 1)[0]

    def what(self) -> str:
        return f"unit {self.label}"

    def _where(self) -> str:
        store = _plugin(self.config).store(str(self.path.parent))
        unit, span = _plugin(self.config).unit_set(store, self.platform)[0].built[self.index]
        shapes = ", ".join(f"{s.dtype}{list(s.shape)}" for s in unit.input_specs)
        return (f"{unit.module or '(model)'} ({unit.cls}, call {unit.call}, carved ops [{span.first}, {span.end})) "
                f"compiled as one unit on {self.platform}\ninputs: {shapes}")

    def _explain(self) -> str:
        from tapml.failure_report import mismatch_report

        store = _plugin(self.config).store(str(self.path.parent))
        spec = store.manifest.get("model", {}).get("spec") or "MODEL"
        extra = [f"obtained tensors: {self.artifact}"] if getattr(self, "artifact", None) else []
        extra.append(f"repro: tapml offload {spec} --store {store.path} --platform {self.platform} --plan top-down")
        return mismatch_report(self.result.local, self._where(), extra)


def run_pytest(store: Path, platforms: tuple[str, ...] | list[str], remote: str | None, all_calls: bool,
               extra: list[str]) -> int:
    """``tapml test``: pytest over one store; rootdir stays the current directory."""
    from tapml.core import TapmlError

    args = [str(Path(store) / "manifest.json"), "-p", "no:cacheprovider", "--rootdir", str(Path.cwd())]
    if platforms:
        args += ["--tapml-platform", ",".join(platforms)]
    if remote:
        args += ["--tapml-remote", remote]
    if all_calls:
        args.append("--tapml-all-calls")
    said = io.StringIO()  # a usage error is tapml's one line, not pytest's "ERROR:" and then tapml's
    with contextlib.redirect_stderr(said):
        code = pytest.main(args + extra)
    errors = [line.removeprefix("ERROR: ").strip() for line in said.getvalue().splitlines()
              if line.startswith("ERROR: ")]
    if code == pytest.ExitCode.USAGE_ERROR and errors:
        raise TapmlError(errors[0].removeprefix("tapml: "))
    sys.stderr.write(said.getvalue())
    if code not in (0, 1):
        raise TapmlError(f"pytest exited with {int(code)} ({code.name.lower().replace('_', ' ')})")
    return int(code)
