"""The Python API as a notebook uses it: the README's example, cell by cell, and how a Run displays."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_like_a_notebook(source: str) -> tuple[dict, list]:
    """Each top-level statement is executed in one namespace; a bare expression is displayed as Jupyter
    does: by its ``_repr_html_`` when it has one, else its ``repr``."""
    namespace: dict = {}
    shown = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), "<cell>", "eval"), namespace)
            shown.append(value._repr_html_() if hasattr(value, "_repr_html_") else repr(value))
        else:
            exec(compile(ast.Module([node], []), "<cell>", "exec"), namespace)
    return namespace, shown


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns, shown = run_like_a_notebook(readme_block("The Python API"))
    run = ns["run"]
    verdict = shown[1]  # shown[0]: torch.manual_seed's generator
    assert "divergent" in verdict and "'aten.addmm.default', '0')" in verdict
    assert all(o.op == "aten.addmm.default" for o in ns["addmms"]) and len(ns["addmms"]) == 2
    assert ns["record"]["verdict"] == "divergent" and ns["record"]["culprit"]["index"] == run.culprit.index
    card = shown[3]
    assert card.startswith('<div class="tapml-run">') and "<html" not in card and "<script" not in card
    assert "divergent" in card and 'id="culprit-op">aten.addmm.default<' in card and "overflow" in card
    assert shown[4] == repr({"divergent": 1}) and "repro" in shown[5]
    assert (tmp_path / "repro" / "repro.py").is_file() and (tmp_path / "stores" / "m" / "manifest.json").is_file()


def test_op_globs_and_module_globs():
    from tapml.core import Status
    from tapml.record import OpList, OpRow

    ops = OpList(OpRow(i, op, module, 0, "s", Status.OK) for i, (op, module) in enumerate(
        [("aten.addmm.default", "encoder.layer.3.output.dense"), ("aten.gelu.default", "encoder.layer.3.act"),
         ("aten.addmm.default", "encoder.layer.4.output.dense")]))
    assert [o.index for o in ops["aten.addmm*"]] == [0, 2]
    assert [o.index for o in ops["module:encoder.layer.3.*"]] == [0, 1]
    assert ops[1].op == "aten.gelu.default" and len(ops[0:2]) == 2 and ops["nothing*"] == []


def test_an_ok_run_displays_without_a_culprit(tmp_path):
    import torch

    import tapml

    model = torch.nn.Linear(4, 4).eval()
    run = tapml.offload(model, (torch.randn(2, 4),), settings=tapml.Settings(platform="torch-cpu", in_process=True))
    html = run._repr_html_()
    assert run.verdict == "ok" and run.culprit is None and "culprit-op" not in html and "ok" in html


def test_the_cli_is_a_client_of_the_api():
    """cli.py reaches tapml only through the API, the console and the bottom-layer errors and settings."""
    tree = ast.parse((ROOT / "tapml" / "cli.py").read_text())
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    imported = {node.module or f".{a.name}" for node in relative for a in node.names}
    assert imported == {"core", "settings", ".api", ".console"}, imported


@pytest.mark.parametrize("bad", [dict(op=5), dict()])
def test_repro_needs_an_op_of_the_store(tmp_path, bad):
    import torch

    import tapml

    model = torch.nn.Linear(4, 4).eval()
    store = tapml.carve(model, (torch.randn(2, 4),), tmp_path / "s")
    with pytest.raises(tapml.TapmlError, match="ops 0..|give --op N"):
        tapml.repro(store, tmp_path / "r", **bad)
    assert not (tmp_path / "r").exists()


def test_offload_through_the_api_keeps_the_targets_crash_record(minilm_store, monkeypatch):
    """The API times kernel preparation around the target; the engine still sees its crashes and restarts."""
    import tapml

    gelu = next(o["index"] for o in minilm_store.ops if o["op"] == "aten.gelu.default")
    monkeypatch.setenv("TAPML_TEST_OP_INDEX", str(gelu))
    killer = f"{ROOT}/tests/helpers/failing_platforms.py:KillSelf"
    run = tapml.offload("zoo:minilm", store=minilm_store, platform=killer, plan="all")
    assert run.verdict == "incomplete" and run.ops[gelu].status == "crashed"
    assert run.target_events and run.target_events[0].what == "crashed"
    assert all(s.timing.compile_s is not None for s in run.steps)


def test_offload_without_out_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """A reused store needs no folder; a failing carve takes its folder with it; a store carved here stays
    where ``run.store`` says (the Run's store) and nothing else."""
    import tempfile

    import torch

    import tapml

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    left = lambda: sorted(p.name for p in (tmp_path / "temp").glob("tapml-run-*"))  # noqa: E731

    class Raises(torch.nn.Module):
        def forward(self, x):
            raise ValueError("the model's own failure")

    model, inputs = torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),)
    settings = tapml.Settings(platform="torch-cpu", in_process=True)
    store = tapml.carve(model, inputs, tmp_path / "store")
    assert tapml.offload(model, inputs, settings=settings, store=store).verdict == "ok"
    assert left() == []
    with pytest.raises(tapml.TapmlError, match="the model's own failure"):
        tapml.offload(Raises(), inputs, settings=settings)
    assert left() == []
    run = tapml.offload(model, inputs, settings=settings)
    assert Path(run.store).parent.parent == tmp_path / "temp" and left() == [Path(run.store).parent.name]
