"""Terminal output: plain lines off a terminal, folded tables on a narrow one, real progress bars on one."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import textwrap
import threading

from click.testing import CliRunner
from rich.console import Console

from tapml import console
from tapml.cli import cli

FAULTY = f"{os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}/examples/faulty_gelu.py:FaultyGelu"


def test_offload_output_off_a_terminal(minilm_store, tmp_path):
    """CI logs: the summary sentence on one line, one line per step with its whole name, nothing cut."""
    result = CliRunner().invoke(cli, ["offload", "zoo:minilm", "--platform", FAULTY, "--store",
                                      str(minilm_store.path), "-o", str(tmp_path / "run")])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    lines = result.stdout.splitlines()
    assert lines[0] == f"divergent: {record['summary']}"
    steps = [line for line in lines if line.startswith("+ ")]
    assert [line.split("  ")[0] for line in steps] == [s["name"] for s in record["steps"]]
    assert all("…" not in line for line in lines)
    header = next(line for line in lines if line.startswith("step "))
    assert "compile" in header and "transfer + RPC" in header and "bytes sent" in header
    assert any(re.search(r"\d+\.\d MiB$", line) for line in steps)
    assert f"repro: python {tmp_path / 'run' / 'repro' / 'repro.py'}" in lines


def test_long_lists_are_whole_off_a_terminal_and_say_so_on_one(capsys):
    o = Console(file=io.StringIO(), force_terminal=True, width=100, no_color=True, highlight=False)
    console._listed(o, list(range(20)), lambda i: o.print(f"item {i}"))
    shown = o.file.getvalue()
    assert "item 11" in shown and "item 12" not in shown and "… and 8 more" in shown
    plain = Console(file=io.StringIO(), force_terminal=False)
    console._listed(plain, list(range(20)), lambda i: plain.print(f"item {i}"))
    assert "item 19" in plain.file.getvalue() and "more" not in plain.file.getvalue()


def test_tables_fold_columns_not_cells_when_narrow():
    rows = [["+ before encoder.layer.0", "22", "0.0183", "1000 ms"], ["+ encoder.layer.5", "172", "0", "99 ms"]]
    narrow = Console(file=io.StringIO(), force_terminal=True, width=40, no_color=True, highlight=False)
    console.table(["step", "offloaded", "end-to-end max abs", "wall"], rows, console=narrow)
    text = re.sub(r"\x1b\[[0-9;]*m", "", narrow.file.getvalue())  # styles aside
    assert "+ before encoder.layer.0" in text and "end-to-end max abs: 0.0183" in text and "…" not in text
    wide = Console(file=io.StringIO(), force_terminal=True, width=120, no_color=True, highlight=False)
    console.table(["step", "offloaded", "end-to-end max abs", "wall"], rows, console=wide)
    text = re.sub(r"\x1b\[[0-9;]*m", "", wide.file.getvalue())
    assert "┃ step" in text and "│ + before encoder.layer.0 │" in text


MODEL = textwrap.dedent("""
    import torch

    def build():
        torch.manual_seed(0)
        layers = [torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(3)]
        return torch.nn.Sequential(*layers).eval(), (torch.randn(4, 16),)
""")


def on_a_terminal(args: list[str], cwd) -> str:
    """Run the CLI with stderr on a pseudo-terminal; return what the terminal received."""
    leader, follower = pty.openpty()
    chunks: list[bytes] = []

    def drain():
        while True:
            try:
                data = os.read(leader, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    proc = subprocess.run([sys.executable, "-m", "tapml.cli", *args], cwd=cwd, stderr=follower,
                          stdout=subprocess.PIPE, timeout=300, env=dict(os.environ, COLUMNS="120"))
    os.close(follower)
    reader.join(timeout=30)
    os.close(leader)
    assert proc.returncode in (0, 1), b"".join(chunks).decode(errors="replace")[-2000:]
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))  # styles aside


def test_progress_bars_on_a_terminal(tmp_path):
    (tmp_path / "m.py").write_text(MODEL)
    shown = on_a_terminal(["offload", "m.py:build", "--platform", "fp16", "--plan", "single", "-o", "run"], tmp_path)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    steps = len(record["steps"])
    for k, step in enumerate(record["steps"]):
        assert f"step {k + 1}/{steps} {step['name']}" in shown
        done = [(int(a), int(b)) for a, b in re.findall(rf"step {k + 1}/{steps} {re.escape(step['name'])}.*? "
                                                       r"(\d+)/(\d+) ops", shown)]
        assert done and all(b == step["offloaded"] for _, b in done) and max(a for a, _ in done) <= step["offloaded"]
    assert re.search(r"isolated pass.*? \d+/\d+ ops", shown)
    assert re.search(r"\d:\d\d:\d\d", shown)  # elapsed and remaining
