"""The ``tapml`` command line: a thin layer over the library.

Results go to stdout, progress and errors to stderr. A user mistake is one line
and exit 2; a failed check exits 1; a traceback only with --debug or TAPML_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import CheckFailed, TapmlError

_err = Console(stderr=True)


def _out() -> Console:
    return Console(no_color="NO_COLOR" in os.environ)


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class _Ticker:
    """A live op counter; every method is a no-op when stderr is not a terminal."""

    def __init__(self, progress=None, task=None):
        self._progress, self._task = progress, task

    def count(self, n: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=n)

    def advance(self, *_) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextlib.contextmanager
def _progress(label: str):
    """Progress on stderr only when it is a terminal."""
    if not sys.stderr.isatty():
        yield _Ticker()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description} {task.completed} ops"), console=_err,
                        transient=True)
    task = progress.add_task(label, total=None)
    with progress:
        yield _Ticker(progress, task)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tapml")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also TAPML_DEBUG=1).")
def cli(debug: bool) -> None:
    """tapml: carve a PyTorch model, migrate it op by op, localize divergence."""


@cli.command()
@click.argument("model")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Fixture store directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--generate", type=click.IntRange(1), default=None, help="Carve a generation of N tokens.")
@click.option("--modules", default=None, help="Record only ops under modules matching this regex.")
@click.option("--ops", "op_globs", multiple=True, help="Record only ops matching this glob (repeatable).")
@click.option("--unique", is_flag=True, help="Keep only the first call of each op signature.")
@click.option("--max-bytes", type=click.IntRange(1), default=None, help="Stop recording past this many bytes.")
@click.option("--verify-replay", is_flag=True, help="Replay every op from the store; exit 1 unless bit-exact.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def carve(model, out, force, generate, modules, op_globs, unique, max_bytes, verify_replay, as_json):
    """Run MODEL once on the reference and record every operator call into OUT.

    MODEL is zoo:NAME, path/to/file.py:factory or pkg.module:factory.
    """
    import re

    from .carving import CarveOptions, FixtureStore, ModelRaised, StoreError
    from .carving import carve as carve_model
    from .workloads import load_workload

    if modules:
        try:
            re.compile(modules)
        except re.error as e:
            raise TapmlError(f"--modules {modules!r} is not a valid regex: {e}") from None
    options = CarveOptions(modules=modules, ops=op_globs, unique=unique, max_bytes=max_bytes)
    workload = load_workload(model)
    info = {"spec": model, "name": workload.name, "description": workload.description,
            "class": type(workload.model).__name__, "generate": generate}
    try:
        with _progress("carving") as ticker:
            result = carve_model(workload.model, lambda: workload.run(generate), out, force=force,
                                 options=options, model_info=info, on_op=ticker.count)
    except StoreError as e:
        raise TapmlError(str(e)) from e
    except ModelRaised as e:
        if isinstance(e.__cause__, TapmlError):
            raise e.__cause__ from None
        raise TapmlError(f"{model} raised while carving: {e}") from e
    store = FixtureStore(result.path)
    _show_summary(store, verified=False, as_json=as_json, replay=_replay(store) if verify_replay else None)


def _replay(store):
    from .carving import replay

    return replay(store)


def _show_summary(store, *, verified: bool, as_json: bool, replay=None) -> None:
    from .inspection import summarize

    summary = summarize(store, verified=verified)
    if replay is not None:
        summary["replay"] = {
            "checked": replay.checked, "skipped_nondeterministic": replay.skipped,
            "fidelity": replay.fidelity,
            "mismatches": [vars(m) for m in replay.mismatches],
        }
    if as_json:
        _emit_json(summary)
    else:
        _render_summary(summary)
    if replay is not None and not replay.ok:
        raise CheckFailed(f"replay: {len(replay.mismatches)} of {replay.checked} ops did not reproduce")


def _render_summary(s: dict) -> None:
    out = _out()
    out.print(f"[bold]{s['path']}[/]  {s['model'].get('name') or s['model'].get('class', '')}"
              f"  (torch {s['versions']['torch']}, tapml {s['versions']['tapml']})")
    table = Table(show_header=False, box=None)
    rows = [
        ("ops", f"{s['ops']} ({s['compute_ops']} compute, {s['view_ops']} views, "
                f"{s['nondeterministic_ops']} nondeterministic)"),
        ("unique signatures", str(s["unique_signatures"])),
        ("layers (module calls)", str(s["layers"])),
        ("steps", ", ".join(f"{st['name']} ({st['ops']} ops)" for st in s["steps"])),
        ("tensors", f"{s['tensors']} unique, {s['tensor_uses']} uses"),
        ("stored", f"{_human_bytes(s['stored_bytes'])} on disk, {_human_bytes(s['unique_tensor_bytes'])} "
                   f"unique, {_human_bytes(s['referenced_bytes'])} referenced"),
        ("verified", "yes" if s["verified"] else "not checked"),
    ]
    if s["truncated"]:
        rows.append(("truncated", s["truncated"]))
    if "replay" in s:
        r = s["replay"]
        rows.append(("replay", f"{r['checked'] - len(r['mismatches'])}/{r['checked']} bit-exact "
                               f"({r['skipped_nondeterministic']} nondeterministic skipped)"))
    for k, v in rows:
        table.add_row(f"[cyan]{k}[/]", v)
    out.print(table)
    ops = Table("op", "calls", title="op types")
    for name, n in list(s["op_types"].items())[:15]:
        ops.add_row(name, str(n))
    out.print(ops)
    for m in s.get("replay", {}).get("mismatches", [])[:20]:
        out.print(f"[red]mismatch[/] op {m['index']} {m['op']} in {m['module'] or '(model)'}: {m['reason']}")


@cli.command()
@click.argument("store_dir", metavar="DIR", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--replay", "do_replay", is_flag=True, help="Replay every op; exit 1 unless bit-exact.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the stored tensors.")
def inspect(store_dir, as_json, do_replay, no_verify):
    """Summarize a fixture store, verifying its integrity."""
    from .carving import FixtureStore, StoreError

    try:
        store = FixtureStore(store_dir)
        if not no_verify:
            store.verify()
        _show_summary(store, verified=not no_verify, as_json=as_json,
                      replay=_replay(store) if do_replay else None)
    except StoreError as e:
        raise TapmlError(str(e)) from e


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--matrix", is_flag=True, help="Carve every workload and offload it to every target.")
@click.option("--targets", default="torch-cpu,fp16,bf16,tvm-llvm", show_default=True, help="With --matrix.")
@click.option("--only", help="With --matrix: comma-separated workload names.")
@click.option("-o", "--out", "out", type=click.Path(), help="With --matrix: write zoo-matrix.md and .json here.")
def zoo(as_json, matrix, targets, only, out):
    """List the built-in workloads (or run the zoo matrix)."""
    from .zoo import ZOO

    if matrix:
        from .matrix import run_matrix, to_markdown

        names = [n.strip() for n in only.split(",")] if only else list(ZOO)
        unknown = [n for n in names if n not in ZOO]
        if unknown:
            raise TapmlError(f"no zoo workload {unknown[0]!r}; `tapml zoo` lists them")
        chosen = tuple(t.strip() for t in targets.split(",") if t.strip())
        rows = run_matrix(names, chosen, on_row=lambda r: _err.print(
            f"{r['model']:18s} {r['target']:10s} {r['verdict']:10s} {r['offload_s']:6.1f}s"))
        text = to_markdown(rows, chosen)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "zoo-matrix.md").write_text(text)
            from .migrate import jsonable

            (Path(out) / "zoo-matrix.json").write_text(json.dumps(jsonable(rows), indent=1))
        click.echo(_emit_json(rows) if as_json else text)
        if any(r["verdict"] == "error" for r in rows):
            raise CheckFailed("tapml itself failed on some workloads (see the table)")
        return
    entries = [e.to_json() for e in ZOO.values()]
    if as_json:
        _emit_json(entries)
        return
    table = Table("spec", "description")
    for e in entries:
        table.add_row(e["spec"], e["description"])
    _out().print(table)


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def platforms(names, as_json):
    """List target platforms and whether each is available here (NAMES may add FILE.py:Class)."""
    from .platforms import PlatformError, list_platforms, platform_class

    rows = list_platforms()
    for name in names:
        if any(r["name"] == name for r in rows):
            continue
        try:
            cls = platform_class(name)
        except PlatformError as e:
            raise TapmlError(str(e)) from e
        available = cls.availability()
        rows.append({"name": name, "source": "file" if ".py:" in name else "module", "description": cls.description,
                     "available": available.ok, "reason": available.reason,
                     **({"capabilities": cls().capabilities().to_json()} if available else {})})
    if as_json:
        _emit_json(rows)
        return
    table = Table("platform", "available", "device / why not", "description")
    for r in rows:
        where = r["capabilities"]["device"] if r["available"] else r["reason"]
        if r["available"] and r["capabilities"].get("limits"):
            where += "\n" + "\n".join(f"{k}: {v}" for k, v in r["capabilities"]["limits"])
        table.add_row(r["name"], "[green]yes[/]" if r["available"] else "[red]no[/]", where, r["description"])
    _out().print(table)


@cli.command()
@click.option("--platform", "platform_name", required=True, help="Platform name, entry point or FILE.py:Class.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="Port (0: any free one, printed).")
@click.option("--token-file", type=click.Path(), help="File holding the shared token clients must present.")
@click.option("--max-payload", type=click.IntRange(1), default=1 << 30, show_default=True,
              help="Largest tensor accepted, in bytes.")
@click.option("--cache-bytes", type=click.IntRange(1), default=4 << 30, show_default=True,
              help="Uploaded tensors kept for reuse by hash.")
@click.option("--supervise", is_flag=True, help="Run kernels in a child process; restart it if it dies or hangs.")
@click.option("--kernel-timeout", type=float, default=60.0, show_default=True,
              help="With --supervise: restart the child when one kernel runs longer than this.")
def worker(platform_name, host, port, token_file, max_payload, cache_bytes, supervise, kernel_timeout):
    """Serve one platform to tapml clients over RPC."""
    import ipaddress

    from .platforms import PlatformError, platform_class
    from .remote import WorkerConfig, serve
    from .remote import supervise as run_supervised
    from .targets import read_token

    token = read_token(token_file) or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not token:
        raise TapmlError(f"binding to {host} exposes the worker beyond this machine; give --token-file")
    try:
        available = platform_class(platform_name).availability()
        if not available:
            raise TapmlError(f"platform {platform_name} is not available here: {available.reason}")
        config = WorkerConfig(platform=platform_name, host=host, port=port, token=token,
                              max_payload=max_payload, cache_bytes=cache_bytes)
        if supervise:
            run_supervised(config, kernel_timeout=kernel_timeout)
        else:
            serve(config)
    except PlatformError as e:
        raise TapmlError(str(e)) from e
    except OSError as e:
        raise TapmlError(f"cannot serve on {host}:{port}: {e.strerror or e}") from e


def _judging(f):
    """The options that decide verdicts, shared by replay and offload."""
    f = click.option("--tolerance", "tolerances", multiple=True,
                     help="atol:X,rtol:Y globally, or PATTERN=atol:X,rtol:Y per op glob / module:GLOB.")(f)
    f = click.option("--config", type=click.Path(), help="TOML file with a [tolerance] section.")(f)
    f = click.option("--rule", type=click.Choice(["tolerance", "oracle"]), default="tolerance", show_default=True,
                     help="Plain tolerance, or the fp64-oracle ratio rule.")(f)
    return f


def _target_options(f):
    f = click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per op.")(f)
    f = click.option("--token-file", type=click.Path(), help="Token for --remote.")(f)
    f = click.option("--remote", help="HOST:PORT of a running `tapml worker` (default: spawn one here).")(f)
    f = click.option("--platform", "platform_name", help="Target platform (name, entry point or FILE.py:Class).")(f)
    return f


def _judge(target, tolerances, config, rule):
    from .judge import Judge
    from .tolerance import ToleranceTable

    return Judge(ToleranceTable.build(tolerances, config), target.capabilities().compute_dtype, rule)


def _open_store(path):
    from .carving import FixtureStore, StoreError

    try:
        return FixtureStore(path)
    except StoreError as e:
        raise TapmlError(str(e)) from e


@cli.command()
@click.argument("store_dir", metavar="STORE", type=click.Path())
@_target_options
@_judging
@click.option("--op", "op_indices", type=int, multiple=True, help="Only this op index (repeatable).")
@click.option("--all-calls/--unique", default=True, show_default=True,
              help="Every call, or the first call of each signature.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def replay(store_dir, platform_name, remote, token_file, timeout, tolerances, config, rule, op_indices, all_calls,
           as_json):
    """Run carved ops on a target with the reference inputs: each op's local error."""
    from collections import Counter

    from .localize import local_pass
    from .migrate import jsonable
    from .targets import open_target

    store = _open_store(store_dir)
    bad = [i for i in op_indices if not 0 <= i < len(store.ops)]
    if bad:
        raise TapmlError(f"--op {bad[0]}: the store has ops 0..{len(store.ops) - 1}")
    target = open_target(platform_name, remote=remote, token_file=token_file, timeout=timeout)
    try:
        with _progress(f"replaying on {target.name}") as ticker:
            rows = local_pass(store, target, _judge(target, tolerances, config, rule),
                              indices=list(op_indices) or None, all_calls=all_calls, on_result=ticker.advance)
    finally:
        target.close()
    results = list(rows.values())
    counts = Counter(r["status"] for r in results)
    ran = [r for r in results if "local" in r]
    summary = {"store": store_dir, "platform": target.name, "counts": dict(counts),
               "max_abs_error": max((r["local"]["max_abs"] for r in ran), default=None), "ops": results}
    if as_json:
        _emit_json(jsonable(summary))
        return
    out = _out()
    out.print(f"[bold]{target.name}[/]: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))
    table = Table("#", "op", "module", "status", "max abs", "tolerance", "why", title="largest local errors")
    for r in sorted(ran, key=lambda r: -r["local"]["max_abs"])[:12]:
        tol = r["local"]["tolerance"]
        table.add_row(str(r["index"]), r["op"], r["module"] or "(model)", r["status"], f"{r['local']['max_abs']:.3g}",
                      f"{tol['atol']:.2g}+{tol['rtol']:.2g}·|x|", r["local"].get("why", ""))
    out.print(table)
    reasons = Counter(r["reason"] for r in results if r["status"] in ("unsupported", "crashed", "timeout"))
    for reason, n in reasons.most_common(8):
        out.print(f"  {n:4d} × {reason}")


@cli.command()
@click.argument("model")
@_target_options
@_judging
@click.option("--plan", type=click.Choice(["layers", "single", "ops", "all"]), default="layers", show_default=True,
              help="How ops move to the target step by step.")
@click.option("--layers", "layers_re", help="Regex (full match) of the module paths that form the steps.")
@click.option("--store", "store_dir", type=click.Path(), help="Reuse this carve instead of carving into OUT.")
@click.option("--generate", type=click.IntRange(1), default=None, help="Run a generation of N tokens.")
@click.option("--all-calls", is_flag=True, help="Isolated pass over every call, not every unique signature.")
@click.option("--check-reference", is_flag=True, help="Also replay ops twice on the reference to measure its noise.")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Directory for run.json (and the carve).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def offload(model, platform_name, remote, token_file, timeout, tolerances, config, rule, plan, layers_re, store_dir,
            generate, all_calls, check_reference, out, force, as_json):
    """Carve MODEL (or reuse --store), migrate it to the target step by step, localize divergence."""
    from .carving import AtomicDir, CarveOptions, ModelRaised, OutputError, StoreError
    from .carving import carve as carve_model
    from .migrate import migrate
    from .targets import open_target
    from .tolerance import ToleranceTable
    from .workloads import load_workload

    ToleranceTable.build(tolerances, config)  # bad tolerance input fails before any work
    workload = load_workload(model)
    run = lambda: workload.run(generate)  # noqa: E731
    info = {"spec": model, "name": workload.name, "description": workload.description,
            "class": type(workload.model).__name__, "generate": generate}
    try:
        outdir = AtomicDir(out, force=force)
    except OutputError as e:
        raise TapmlError(str(e)) from e
    with outdir:
        if store_dir is None:
            try:
                carve_model(workload.model, run, outdir.tmp / "store", options=CarveOptions(), model_info=info)
            except (StoreError, ModelRaised) as e:
                raise TapmlError(f"carving {model} failed: {e}") from e
            store = _open_store(outdir.tmp / "store")
        else:
            store = _open_store(store_dir)
            carved = store.manifest.get("model", {})
            if carved.get("spec") not in (None, model) or carved.get("generate") != generate:
                raise TapmlError(f"{store_dir} was carved from {carved.get('spec')} "
                                 f"(generate={carved.get('generate')}), not {model} (generate={generate})")
        target = open_target(platform_name, remote=remote, token_file=token_file, timeout=timeout)
        try:
            with _progress(f"offloading to {target.name}") as ticker:
                def on_event(kind, payload):
                    if kind == "step":
                        ticker.describe(f"step {payload[0] + 1}/{payload[1]}: {payload[2]}")
                    ticker.advance()

                record = migrate(run, store, target, judge=_judge(target, tolerances, config, rule), plan=plan,
                                 layers=layers_re, all_calls=all_calls, check_reference=check_reference,
                                 model_info=info, on_event=on_event,
                                 store_path=str(Path(out) / "store") if store_dir is None else store_dir)
        except ModelRaised as e:
            raise TapmlError(f"{model} raised during a mixed run: {e}") from e
        finally:
            target.close()
        (outdir.tmp / "run.json").write_text(json.dumps(record, indent=1, allow_nan=False))
        from .reports import render_report

        (outdir.tmp / "report.html").write_text(render_report(record))
        outdir.commit()
    _show_run(record, Path(out), as_json)
    if record["verdict"] != "ok":
        raise CheckFailed(f"verdict {record['verdict']}: {record['summary']}")


def _show_run(r: dict, out: Path, as_json: bool) -> None:
    brief = {k: r[k] for k in ("verdict", "summary", "culprit", "counts", "coverage", "compute_ops",
                               "offloaded_ops", "first_nonfinite")}
    brief["victims"] = len(r["victims"])
    brief["run"] = str(out / "run.json")
    brief["report"] = str(out / "report.html")
    brief["steps"] = [{"name": s["name"], "offloaded": s["offloaded"], "end_to_end_max_abs": s["end_to_end"]["max_abs"],
                       "ok": s["end_to_end"]["ok"]} for s in r["steps"]]
    if as_json:
        _emit_json(brief)
        return
    o = _out()
    color = {"ok": "green", "divergent": "red", "incomplete": "yellow"}[r["verdict"]]
    o.print(f"[bold {color}]{r['verdict']}[/]: {r['summary']}")
    table = Table("step", "offloaded", "end-to-end max abs", "ok", "wall", "target", "kernel")
    for s in r["steps"]:
        t = s["timing"]
        table.add_row(s["name"], str(s["offloaded"]), f"{_f(s['end_to_end']['max_abs'])}",
                      "yes" if s["end_to_end"]["ok"] else "[red]no[/]", f"{t['wall_s'] * 1e3:.0f} ms",
                      f"{t['target_s'] * 1e3:.0f} ms", f"{t['kernel_s'] * 1e3:.0f} ms")
    o.print(table)
    o.print("ops: " + ", ".join(f"{n} {k}" for k, n in r["counts"].items() if n)
            + f"; coverage {r['coverage']:.0%} of {r['compute_ops']} compute ops")
    divergent = [x for x in r["ops"] if x["status"] == "divergent"]
    if divergent:
        o.print(f"divergent ops ({len(divergent)}):")
        for x in divergent[:10]:
            o.print(f"  {x['index']:4d} {x['op']} in {x['module'] or '(model)'}: max abs {_f(x['local']['max_abs'])}"
                    f" — {x['local'].get('why', '')}")
    if r["first_nonfinite"]:
        f = r["first_nonfinite"]
        o.print(f"first NaN/Inf: op {f['index']} {f['op']} in {f['module'] or '(model)'} ({f['where']})")
    o.print(f"run record: {out / 'run.json'}  report: {out / 'report.html'}")


def _f(x) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"


@cli.command()
@click.argument("run_json", metavar="RUN.json", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="HTML file to write.")
def report(run_json, out):
    """Render a run record as one self-contained HTML report."""
    from .reports import ReportError, write_report

    try:
        path = write_report(run_json, out)
    except ReportError as e:
        raise TapmlError(str(e)) from e
    except OSError as e:
        raise TapmlError(f"cannot write {out}: {e.strerror or e}") from e
    click.echo(str(path))


@cli.command()
@click.argument("run_a", metavar="RUN_A.json", type=click.Path())
@click.argument("run_b", metavar="RUN_B.json", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="HTML file to write.")
@click.option("--json", "as_json", is_flag=True, help="Also print the per-change counts as JSON.")
def diff(run_a, run_b, out, as_json):
    """Compare the same ops across two runs: worse, better, newly unsupported."""
    from .reports import ReportError, diff_records, load_run, write_diff

    try:
        path = write_diff(run_a, run_b, out)
        counts = dict(diff_records(load_run(run_a), load_run(run_b))["counts"])
    except ReportError as e:
        raise TapmlError(str(e)) from e
    except OSError as e:
        raise TapmlError(f"cannot write {out}: {e.strerror or e}") from e
    if as_json:
        _emit_json({"diff": str(path), "counts": counts})
    else:
        click.echo(f"{path}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("store_dir", metavar="STORE", type=click.Path())
@click.option("--platform", "platforms", multiple=True, help="Target platform(s) (default torch-cpu).")
@click.option("--remote", help="Pool of running workers HOST:PORT[,HOST:PORT...].")
@click.option("--all-calls", is_flag=True, help="One test per call, not per unique signature.")
@click.pass_context
def test(ctx, store_dir, platforms, remote, all_calls):
    """Run a store's carved ops as pytest tests (extra arguments go to pytest)."""
    import pytest

    _open_store(store_dir)
    args = [str(Path(store_dir) / "manifest.json"), "-p", "no:cacheprovider"]
    if platforms:
        args += ["--tapml-platform", ",".join(platforms)]
    if remote:
        args += ["--tapml-remote", remote]
    if all_calls:
        args.append("--tapml-all-calls")
    code = pytest.main(args + list(ctx.args))
    if code not in (0, 1):
        raise TapmlError(f"pytest exited with {int(code)} ({code.name.lower().replace('_', ' ')})")
    if code == 1:
        raise CheckFailed("some carved ops failed on the target")


@cli.command(name="emit-tests")
@click.argument("store_dir", metavar="STORE", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Directory to write the tests into.")
@click.option("--only", help="Only ops whose overload matches this glob (aten.addmm*).")
@click.option("--all-calls", is_flag=True, help="One test per call, not per unique signature.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def emit_tests_command(store_dir, out, only, all_calls, force, as_json):
    """Write standalone pytest files plus the tensors they need (a subset store)."""
    from .carving import OutputError
    from .emit import emit_tests

    store = _open_store(store_dir)
    try:
        result = emit_tests(store, out, only=only, all_calls=all_calls, force=force)
    except OutputError as e:
        raise TapmlError(str(e)) from e
    if as_json:
        _emit_json(result)
        return
    click.echo(f"{result['emitted']} tests written to {result['path']} "
               f"({result['skipped_by_design']} view/random ops left out)")
    for index, why in result["not_reproducible"].items():
        click.echo(f"not emitted: op {index} does not reproduce on the reference: {why}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes (0 ok, 1 check failed, 2 bad input)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("TAPML_DEBUG", "") not in ("", "0")
    try:
        cli.main(args=args, prog_name="tapml", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        _err.print("tapml: aborted")
        return 130
    except (TapmlError, CheckFailed) as e:
        if debug:
            raise
        code = 1 if isinstance(e, CheckFailed) else 2
        label = "check failed" if code == 1 else "error"
        print(f"tapml: {label}: {e}", file=sys.stderr)
        return code
    except Exception as e:
        if debug:
            raise
        print(f"tapml: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
