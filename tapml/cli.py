"""The ``tapml`` command line: argument handling only; the work is ``tapml.api``, the output ``console``.

Results go to stdout, progress and errors to stderr. A user mistake is one line
and exit 2; a failed check exits 1; a traceback only with --debug or TAPML_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from . import api, console
from .core import CheckFailed, TapmlError, __version__
from .settings import Settings

WORKFLOW = ("zoo", "carve", "inspect", "offload", "report", "diff", "repro", "replay", "test", "emit-tests",
            "platforms", "worker")


class _Group(click.Group):
    def list_commands(self, ctx):  # workflow order, not alphabetical
        return sorted(self.commands, key=lambda c: WORKFLOW.index(c) if c in WORKFLOW else len(WORKFLOW))

    def format_commands(self, ctx, formatter):  # each command's first sentence whole (wrapped, never cut)
        rows = [(name, self.commands[name].get_short_help_str(limit=1000)) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tapml")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (also TAPML_DEBUG=1).")
def cli(debug: bool) -> None:
    """tapml: carve a PyTorch model, migrate it op by op, localize divergence."""


_REFERENCE_DEVICE = click.option("--reference-device", default="cpu", show_default=True,
                                 help="Where the reference runs: cpu, cuda or cuda:N (model and inputs moved there).")


@cli.command()
@click.argument("model")
@_REFERENCE_DEVICE
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Fixture store directory to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--generate", type=click.IntRange(1), default=None, help="Carve a generation of N tokens.")
@click.option("--modules", default=None, help="Record only ops under modules matching this regex.")
@click.option("--ops", "op_globs", multiple=True, help="Record only ops matching this glob (repeatable).")
@click.option("--unique", is_flag=True, help="Keep only the first call of each op signature.")
@click.option("--max-bytes", type=click.IntRange(1), default=None, help="Stop recording past this many bytes.")
@click.option("--verify-replay", is_flag=True, help="Replay every op from the store; exit 1 unless bit-exact.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def carve(model, reference_device, out, force, generate, modules, op_globs, unique, max_bytes, verify_replay, as_json):
    """Run MODEL once on the reference and record every operator call into OUT.

    MODEL is zoo:NAME, path/to/file.py:factory or pkg.module:factory.
    """
    options = api.CarveOptions(modules=modules, ops=op_globs, unique=unique, max_bytes=max_bytes)
    with console.progress("carving") as bar:
        store = api.carve(model, out=out, force=force, generate=generate, options=options, on_op=bar.count,
                          reference_device=reference_device)
    _show_store(store, verify=False, replay=verify_replay, as_json=as_json)


def _show_store(store, *, verify: bool, replay: bool, as_json: bool) -> None:
    summary, report = api.inspect(store, verify=verify, replay=replay)
    console.show_store(summary, as_json)
    if report is not None and not report.ok:
        raise CheckFailed(f"replay: {len(report.mismatches)} of {report.checked} ops did not reproduce")


@cli.command()
@click.argument("store_dir", metavar="DIR", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--replay", "do_replay", is_flag=True, help="Replay every op; exit 1 unless bit-exact.")
@click.option("--no-verify", is_flag=True, help="Skip re-hashing the stored tensors.")
def inspect(store_dir, as_json, do_replay, no_verify):
    """Summarize a fixture store, verifying its integrity."""
    _show_store(store_dir, verify=not no_verify, replay=do_replay, as_json=as_json)


def _settings_options(f):
    """The options that pick and judge the target, shared by replay and offload (same defaults)."""
    for option in reversed([
        click.option("--platform", "platform", help="Target platform (name, entry point or FILE.py:Class)."),
        click.option("--remote", help="HOST:PORT of a running `tapml worker` (default: spawn one here)."),
        click.option("--token-file", type=click.Path(), help="Token for --remote."),
        click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds per op."),
        click.option("--in-process", is_flag=True, help="Run the platform in this process instead of a worker."),
        click.option("--tolerance", "tolerances", multiple=True,
                     help="atol:X,rtol:Y globally, or PATTERN=atol:X,rtol:Y per op glob / module:GLOB."),
        click.option("--config", type=click.Path(), help="TOML file with a [tolerance] section."),
        click.option("--rule", type=click.Choice(["bound", "tolerance", "oracle"]), default="bound",
                     show_default=True,
                     help="Error-analysis bounds, assert_close tolerances, or the fp64-oracle ratio."),
        click.option("--all-calls/--unique", default=False, show_default=True,
                     help="Measure every call in isolation, or the first call of each unique signature."),
    ]):
        f = option(f)
    return f


def _settings(kw: dict) -> Settings:
    names = ("platform", "remote", "token_file", "timeout", "tolerances", "config", "rule", "all_calls", "in_process")
    return Settings(**{k: kw.pop(k) for k in names})


@cli.command()
@click.argument("model")
@_settings_options
@click.option("--plan", type=click.Choice(["layers", "top-down", "single", "ops", "all"]), default="layers",
              show_default=True, help="How ops move to the target step by step (top-down: whole modules compiled "
              "as units, descending where they fail).")
@click.option("--layers", "layers_re", help="Regex (full match) of the module paths that form the steps.")
@click.option("--store", "store_dir", type=click.Path(),
              help="Reuse this carve instead of carving into OUT; its outputs are the reference.")
@_REFERENCE_DEVICE
@click.option("--generate", type=click.IntRange(1), default=None, help="Run a generation of N tokens.")
@click.option("--check-reference", is_flag=True, help="Also replay ops twice on the reference to measure its noise.")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Directory for run.json (and the carve).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def offload(model, plan, layers_re, store_dir, reference_device, generate, check_reference, out, force, as_json, **kw):
    """Carve MODEL (or reuse --store), migrate it to the target step by step, localize divergence.

    Writes OUT/run.json, OUT/report.html, OUT/model-explorer.json and, for a culprit, OUT/repro/.
    """
    settings = _settings(kw)
    with console.progress("offloading") as bar:
        run = api.offload(model, settings=settings, store=store_dir, out=out, force=force, plan=plan,
                          layers=layers_re, generate=generate, check_reference=check_reference, on_progress=bar.show,
                          reference_device=reference_device)
    console.show_run(run, Path(out), as_json)
    if run.verdict != "ok":
        raise CheckFailed(f"verdict {run.verdict}: {run.summary}")


@cli.command()
@click.argument("store_dir", metavar="STORE", type=click.Path())
@_settings_options
@click.option("--op", "op_indices", type=int, multiple=True, help="Only this op index (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def replay(store_dir, op_indices, as_json, **kw):
    """Run carved ops on a target with the reference inputs: each op's local error."""
    settings = _settings(kw)
    with console.progress("replaying") as bar:
        result = api.replay(store_dir, settings=settings, ops=list(op_indices), on_progress=bar.show)
    console.show_replay(result, as_json)
    if not result.ok:
        raise CheckFailed(f"{result.counts.get('divergent', 0)} replayed ops are divergent, "
                          f"{result.counts.get('crashed', 0) + result.counts.get('timeout', 0)} crashed or timed out")


@cli.command()
@click.argument("source", metavar="RUN.json|STORE", type=click.Path())
@click.option("--op", "op_index", type=int, default=None, help="The op index (default: the run's culprit).")
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Directory to write the repro into.")
@click.option("--platform", help="Platform the script runs on (default: the run's target, or torch-cpu).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def repro(source, op_index, out, platform, force):
    """Write a standalone repro of one op: its inputs and a short script that calls it on a platform."""
    path = api.repro(source, out, op=op_index, platform=platform, force=force)
    click.echo(f"python {path / 'repro.py'}")


@cli.command()
@click.argument("run_json", metavar="RUN.json", type=click.Path())
@click.option("-o", "--out", "out", type=click.Path(), help="HTML file to write (default: report.html beside RUN).")
@click.option("--model-explorer", "explorer", type=click.Path(),
              help="Also write per-module errors as a Model Explorer node-data JSON file.")
def report(run_json, out, explorer):
    """Render a run record as one self-contained HTML report."""
    click.echo(str(api.report(run_json, out, model_explorer=explorer)))


@cli.command()
@click.argument("run_a", metavar="RUN_A.json", type=click.Path())
@click.argument("run_b", metavar="RUN_B.json", type=click.Path())
@click.option("-o", "--out", "out", type=click.Path(), help="HTML file to write (default: beside RUN_A).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts and every matched op's row as JSON.")
def diff(run_a, run_b, out, as_json):
    """Compare the same ops across two runs: worse, better, newly unsupported."""
    console.show_diff(api.diff(run_a, run_b, out), as_json)


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("store_dir", metavar="STORE", type=click.Path())
@click.option("--platform", "platforms", multiple=True, help="Target platform(s) (default torch-cpu).")
@click.option("--remote", help="Pool of running workers HOST:PORT[,HOST:PORT...].")
@click.option("--all-calls", is_flag=True, help="One test per call, not per unique signature.")
@click.pass_context
def test(ctx, store_dir, platforms, remote, all_calls):
    """Run a store's carved ops as pytest tests (extra arguments go to pytest)."""
    if api.test(store_dir, platforms, remote, all_calls, list(ctx.args)) == 1:
        raise CheckFailed("some carved ops failed on the target")


@cli.command(name="emit-tests")
@click.argument("store_dir", metavar="STORE", type=click.Path())
@click.option("-o", "--out", "out", required=True, type=click.Path(), help="Directory to write the tests into.")
@click.option("--only", help="Only ops whose overload (with --units modules: units whose module path) matches.")
@click.option("--all-calls", is_flag=True, help="One test per call, not per unique signature.")
@click.option("--units", type=click.Choice(["ops", "modules"]), default="ops", show_default=True,
              help="A test per carved op, or per module unit a top-down run compiles.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def emit_tests_command(store_dir, out, only, all_calls, units, force, as_json):
    """Write standalone, readable pytest files plus the tensors they need (a subset store)."""
    result = api.emit_tests(store_dir, out, only=only, all_calls=all_calls, force=force, units=units)
    if as_json:
        console.emit_json(result)
        return
    click.echo(f"{result['emitted']} tests written to {result['path']}"
               + (f" ({result['skipped_by_design']} view/random ops left out)" if units == "ops" else ""))
    for index, why in result["not_reproducible"].items():
        click.echo(f"not emitted: {'op' if units == 'ops' else 'unit'} {index} does not reproduce on the "
                   f"reference: {why}", err=True)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--matrix", is_flag=True, help="Carve every workload and offload it to every target.")
@click.option("--targets", default="torch-cpu,fp16,bf16,tvm-llvm", show_default=True, help="With --matrix.")
@click.option("--only", help="With --matrix: comma-separated workload names.")
@click.option("-o", "--out", "out", type=click.Path(), help="With --matrix: write zoo-matrix.md and .json here.")
def zoo(as_json, matrix, targets, only, out):
    """List the built-in workloads (or run the zoo matrix)."""
    if not matrix:
        console.show_zoo(api.zoo(), as_json)
        return
    names = [n.strip() for n in only.split(",")] if only else None
    chosen = tuple(t.strip() for t in targets.split(",") if t.strip())
    rows, text = api.matrix(names, chosen, out, on_row=console.show_matrix_row)
    console.emit_json(rows) if as_json else click.echo(text)
    if any(r["verdict"] == "error" for r in rows):
        raise CheckFailed("tapml itself failed on some workloads (see the table)")


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def platforms(names, as_json):
    """List target platforms and whether each is available here (NAMES may add FILE.py:Class)."""
    console.show_platforms(api.platforms(names), as_json)


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
    api.serve(platform_name, host=host, port=port, token_file=token_file, max_payload=max_payload,
              cache_bytes=cache_bytes, supervise=supervise, kernel_timeout=kernel_timeout)


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps errors to exit codes (0 ok, 1 check failed, 2 bad input, 3 a tapml bug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("TAPML_DEBUG", "") not in ("", "0")
    try:
        cli.main(args=args, prog_name="tapml", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        print(f"tapml: error: {e.format_message()}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        print("tapml: aborted", file=sys.stderr)
        return 130
    except (TapmlError, CheckFailed) as e:
        if debug:
            raise
        code = 1 if isinstance(e, CheckFailed) else 2
        print(f"tapml: {'check failed' if code == 1 else 'error'}: {e}", file=sys.stderr)
        return code
    except Exception as e:
        if debug:
            raise
        print(f"tapml: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
