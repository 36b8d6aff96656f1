"""The HTML report of a real fault-injected run, checked as text and in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tapml.cli import main

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers" / "failing_platforms.py"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROME_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--disable-quic"]


def offload(tmp, name, platform, verdict, *extra):
    out = tmp / name
    code = main(["offload", "zoo:minilm", "--platform", platform, "-o", str(out), "--store", str(tmp / "store"),
                 "--plan", "all", *extra])
    assert code == (0 if verdict == "ok" else 1)
    assert json.loads((out / "run.json").read_text())["verdict"] == verdict
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    assert main(["carve", "zoo:minilm", "-o", str(tmp / "store")]) == 0
    return {
        "fault": offload(tmp, "fault", f"{ROOT}/examples/faulty_gelu.py:FaultyGelu", "divergent", "--plan", "layers"),
        "fp16": offload(tmp, "fp16", "fp16", "divergent"),
        "nosoftmax": offload(tmp, "nosoftmax", f"{HELPERS}:NoSoftmax", "ok"),
        "torch": offload(tmp, "torch", "torch-cpu", "ok"),
    }


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs it with apt)")
        pytest.skip("chromium is not installed here (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_FLAGS)
        yield b
        b.close()


def open_page(browser, path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning")
            else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("request", lambda r: problems.append(f"request {r.url}") if not r.url.startswith("file://") else None)
    page.goto(path.as_uri())
    return page, problems


EXTERNAL = re.compile(r"""(?:\b(?:src|href|action|poster)\s*=\s*["']?\s*(?!#|data:)[a-z]+:)|url\(\s*["']?(?!#|data:)"""
                      r"""[a-z]+:|@import|<link\b|<script\b[^>]*\bsrc""", re.I)


def test_report_is_self_contained_and_small(runs):
    html = (runs["fault"] / "report.html").read_text()
    assert not EXTERNAL.search(html), EXTERNAL.search(html).group(0)
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls  # namespace names only
    assert len(html.encode()) < 2_000_000


def test_report_reads_without_javascript(runs):
    html = (runs["fault"] / "report.html").read_text()
    text = re.sub(r"<script.*?</script>", "", html, flags=re.S)
    assert "aten.gelu.default in encoder.layer.3.intermediate.intermediate_act_fn" in text
    assert 'id="culprit-op">aten.gelu.default<' in text and "<svg" in text
    assert "tapml replay" in text and ".tapml-tmp-" not in text  # the repro names the real store, not a temp dir


def test_report_in_a_real_browser(runs, browser):
    record = json.loads((runs["fault"] / "run.json").read_text())
    page, problems = open_page(browser, runs["fault"] / "report.html")
    assert page.locator("#culprit-op").inner_text() == "aten.gelu.default"
    assert page.locator("#culprit-module").inner_text() == "encoder.layer.3.intermediate.intermediate_act_fn"
    assert "divergent" in page.locator("#verdict").inner_text()
    page.select_option("#f-status", "divergent")
    visible = page.locator("#ops tbody tr:visible")
    assert visible.count() == record["counts"]["divergent"] == 1
    assert "aten.gelu.default" in visible.first.inner_text()
    page.select_option("#f-status", "victim")
    assert page.locator("#ops tbody tr:visible").count() == len(record["victims"])
    page.select_option("#f-status", "")
    page.fill("#f-module", "encoder.layer.3.attention")
    shown = page.locator("#ops tbody tr:visible")
    assert shown.count() > 0 and all("encoder.layer.3.attention" in shown.nth(i).inner_text()
                                     for i in range(shown.count()))
    page.fill("#f-module", "")
    page.click("#ops th:nth-child(5)")  # sort by local error
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report-fault.png"), full_page=False)
    assert (ARTIFACTS / "report-fault.png").stat().st_size > 10_000
    assert not problems, problems


def test_fp16_report_shows_first_nonfinite(runs, browser):
    page, problems = open_page(browser, runs["fp16"] / "report.html")
    assert "first NaN/Inf" in page.inner_text("body")
    page.select_option("#f-status", "divergent")
    record = json.loads((runs["fp16"] / "run.json").read_text())
    assert page.locator("#ops tbody tr:visible").count() == record["counts"]["divergent"]
    assert not problems, problems


def test_diff_of_two_real_runs(runs, browser, tmp_path, capsys):
    out = tmp_path / "diff.html"
    code = main(["diff", str(runs["torch"] / "run.json"), str(runs["nosoftmax"] / "run.json"), "-o", str(out),
                 "--json"])
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert code == 0 and counts["newly unsupported"] == 6  # MiniLM's six softmaxes
    code = main(["diff", str(runs["torch"] / "run.json"), str(runs["fp16"] / "run.json"), "-o", str(out)])
    assert code == 0
    page, problems = open_page(browser, out)
    assert "worse" in page.locator("#diff-summary").inner_text()
    assert page.locator('table[data-change="worse"] tr').count() > 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "diff-torch-vs-fp16.png"))
    assert not problems, problems


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("not json", "is not JSON"),
    ('{"schema": 1}', "is not a tapml run record"),
    ('{"schema": 99, "verdict": "ok", "ops": [], "steps": [], "counts": {}, "target": {}}', "newer than this tapml"),
])
def test_report_bad_input(tmp_path, capsys, content, message):
    run = tmp_path / "run.json"
    if content is not None:
        run.write_text(content)
    for args in (["report", str(run), "-o", str(tmp_path / "r.html")],
                 ["diff", str(run), str(run), "-o", str(tmp_path / "d.html")]):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "d.html").exists()
