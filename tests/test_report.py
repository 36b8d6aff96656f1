"""The HTML report of a real fault-injected run, checked as text and in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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
        "topdown": offload(tmp, "topdown", f"{HELPERS}:FusionBug", "divergent", "--plan", "top-down",
                           "--in-process"),  # the worker keys units by signature: FusionBug sees layer 0
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


def open_page(browser, path: Path, width: int = 1280):
    page = browser.new_page(viewport={"width": width, "height": 900})
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
    assert f"--platform {ROOT}/examples/faulty_gelu.py:FaultyGelu --op 258" in text  # a spec that opens it


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


def test_diff_of_two_real_runs(runs, browser, capsys):
    code = main(["diff", str(runs["torch"] / "run.json"), str(runs["nosoftmax"] / "run.json"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["counts"]["newly unsupported"] == 6  # MiniLM's six softmaxes
    softmax = [r for r in result["ops"] if r["change"] == "newly unsupported"]
    assert {r["op"] for r in softmax} == {"aten._softmax.default"} and all(r["a_err"] == 0 for r in softmax)
    assert Path(result["diff"]) == runs["torch"] / "diff-nosoftmax.html"  # beside run A without -o
    code = main(["diff", str(runs["torch"] / "run.json"), str(runs["fp16"] / "run.json")])
    out = runs["torch"] / "diff-fp16.html"
    assert code == 0 and str(out) in capsys.readouterr().out
    page, problems = open_page(browser, out)
    assert "worse" in page.locator("#diff-summary").inner_text()
    worse = page.locator('#diff tbody tr[data-change="worse"]')
    assert worse.count() > 0
    views = page.locator("#diff tbody tr.view")
    assert views.count() > 0 and not views.first.is_visible()  # view ops hidden, one click away
    page.check("#show-views")
    assert views.first.is_visible()
    page.select_option("#f-change", "worse")
    assert page.locator("#diff tbody tr:visible").count() == worse.count()
    first = page.locator("#diff tbody tr:visible").first.locator("td")
    assert first.nth(6).inner_text() != "" and first.nth(7).inner_text() != ""  # both sides' errors
    titles = page.locator("#plot-overlay svg title").all_text_contents()
    assert any(t.startswith("A (torch-cpu): op ") for t in titles)
    assert any(t.startswith("B (fp16): op ") for t in titles)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "diff-torch-vs-fp16.png"))
    assert not problems, problems


def test_report_and_diff_write_beside_the_run_by_default(runs, tmp_path, capsys):
    run_json = tmp_path / "copy" / "run.json"
    run_json.parent.mkdir()
    run_json.write_text((runs["fault"] / "run.json").read_text())
    assert main(["report", str(run_json)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy" / "report.html")
    html = (tmp_path / "copy" / "report.html").read_text()
    assert 'id="repro-link" href="repro/repro.py"' in html
    assert main(["report", str(runs["fault"] / "run.json"), "-o", str(tmp_path / "r.html"),
                 "--model-explorer", str(tmp_path / "me.json")]) == 0
    link = re.search(r'id="repro-link" href="([^"]+)"', (tmp_path / "r.html").read_text()).group(1)
    assert (tmp_path / link).resolve() == (runs["fault"] / "repro" / "repro.py").resolve()
    overlay = json.loads((tmp_path / "me.json").read_text())
    gelu = overlay["results"]["encoder.layer.3.intermediate.intermediate_act_fn"]["value"]
    assert gelu > 1 and overlay["results"]["encoder.layer.2"]["value"] <= 1  # the bound ratio: 1 is the bound
    assert overlay == json.loads((runs["fault"] / "model-explorer.json").read_text())


@pytest.mark.parametrize("width", [800, 1400])
def test_report_at_any_width(runs, browser, width):
    """Nothing overflows the page; tables scroll in their own box; at 1400 px the plot fills the column and its
    legend sits above the plotted area, not on it."""
    page, problems = open_page(browser, runs["fault"] / "report.html", width=width)
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    assert page.evaluate("""() => Array.from(document.querySelectorAll('body *')).filter(e => !e.closest('.scroll')
        && e.getBoundingClientRect().right > window.innerWidth + 1).length""") == 0
    column = page.evaluate("document.body.clientWidth - parseFloat(getComputedStyle(document.body).paddingLeft) * 2")
    plot = page.locator("#plot-along svg").bounding_box()
    assert plot["width"] >= 0.95 * column
    legend, area = (page.locator(f"#plot-along svg #{gid}").bounding_box() for gid in ("legend", "plot-area"))
    assert legend["y"] + legend["height"] <= area["y"] + 1
    numbers = page.locator("td.num, .n").all_inner_texts()
    assert all("\n" not in t for t in numbers)  # never split, not even at an exponent's hyphen
    page.screenshot(path=str(ARTIFACTS / f"report-{width}.png"), full_page=True)
    assert not problems, problems


def test_every_point_names_its_op(runs, browser):
    record = json.loads((runs["fault"] / "run.json").read_text())
    page, problems = open_page(browser, runs["fault"] / "report.html")
    titles = page.locator("#plot-along svg g.pt > title").all_text_contents()
    measured = sum(1 for o in record["ops"] for k in ("local", "propagated") if k in o)
    assert len(titles) == measured + 1  # every point, and the culprit's ring
    culprit = [t for t in titles if t.startswith("culprit: ")]
    assert culprit == [next(t for t in titles if t.startswith("culprit: "))]
    assert "op 258 aten.gelu.default · encoder.layer.3.intermediate.intermediate_act_fn · local 0.137" in culprit[0]
    ring = page.locator("#plot-along svg #pts-culprit g.pt")
    box, line = ring.bounding_box(), page.locator("#plot-along svg g.pt").first.bounding_box()
    assert box["width"] > line["width"]  # the ring is drawn larger than the points, above the culprit line
    assert not problems, problems


def test_sorting_views_and_measured_signatures(runs, browser):
    page, problems = open_page(browser, runs["fault"] / "report.html")
    record = json.loads((runs["fault"] / "run.json").read_text())
    views = sum(1 for o in record["ops"] if o.get("view"))
    rows = page.locator("#ops tbody tr")
    assert page.locator("#ops tbody tr:visible").count() == rows.count() - views > 0
    page.check("#show-views")
    assert page.locator("#ops tbody tr:visible").count() == rows.count()
    page.uncheck("#show-views")
    header = page.locator("#ops th", has_text="local max abs")
    for direction in ("ascending", "descending"):
        header.click()
        assert header.get_attribute("aria-sort") == direction
        cells = [t.strip() for t in page.locator("#ops tbody tr:visible td:nth-child(5)").all_inner_texts()]
        filled = [float(t) for t in cells if t]
        assert filled == sorted(filled, reverse=direction == "descending")
        assert cells[len(filled):] == [""] * (len(cells) - len(filled))  # blanks last both ways
    inherited = page.locator("#ops tbody tr:visible .inherited")
    assert inherited.count() > 0 and "measured on op" in inherited.first.get_attribute("title")
    assert "KiB" in page.locator("#steps").inner_text() or "MiB" in page.locator("#steps").inner_text()
    assert not problems, problems


def test_module_tree(runs, browser):
    page, problems = open_page(browser, runs["fault"] / "report.html")
    layer3 = page.locator('#tree details[data-path="encoder.layer.3"]')
    assert layer3.get_attribute("open") is not None and "divergent" in layer3.locator("> summary").inner_text()
    act = page.locator('#tree [data-path="encoder.layer.3.intermediate.intermediate_act_fn"]')
    assert act.is_visible() and "divergent" in act.inner_text() and "op 258" in act.inner_text()
    layer0 = page.locator('#tree details[data-path="encoder.layer.0"]')
    assert layer0.get_attribute("open") is None and "ok" in layer0.locator("> summary").inner_text()
    query = page.locator('#tree [data-path="encoder.layer.0.attention.self.query"]')
    assert not query.is_visible()
    layer0.locator("> summary").click()
    page.locator('#tree details[data-path="encoder.layer.0.attention"] > summary').click()
    page.locator('#tree details[data-path="encoder.layer.0.attention.self"] > summary').click()
    assert query.is_visible()
    page.locator('#tree details[data-path="encoder"] > summary').click()  # collapses the whole encoder
    assert not act.is_visible()
    assert not problems, problems


def test_repro_of_the_culprit_runs_anywhere(runs, tmp_path):
    """The offload's repro directory, copied to a fresh directory, runs with plain python: it passes on torch-cpu
    and fails on the faulty platform it came from."""
    repro = tmp_path / "elsewhere" / "repro"
    shutil.copytree(runs["fault"] / "repro", repro)
    script = (repro / "repro.py").read_text()
    assert "torch.ops.aten.gelu.default(x)" in script and "assert_close" in script
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    run = lambda *args: subprocess.run([sys.executable, str(repro / "repro.py"), *args], cwd=tmp_path / "elsewhere",  # noqa: E731
                                       capture_output=True, text=True, env=env, timeout=300)
    faulty = run()
    assert faulty.returncode == 1 and "divergent" in faulty.stdout and "assert_close" in faulty.stdout, faulty.stderr
    good = run("torch-cpu")
    assert good.returncode == 0 and "tapml (bound rule) on torch-cpu: ok" in good.stdout, good.stdout + good.stderr
    command = json.loads((runs["fault"] / "run.json").read_text())["culprit"]["repro"].split()
    assert command[:2] == ["tapml", "replay"] and main(command[1:]) == 1  # the replay command works as written


def test_repro_command_from_a_store_and_a_run(runs, tmp_path, capsys):
    record = json.loads((runs["fp16"] / "run.json").read_text())
    addmm = next(o["index"] for o in record["ops"] if o["op"] == "aten.addmm.default")
    assert main(["repro", str(runs["fp16"] / "run.json"), "--op", str(addmm), "-o", str(tmp_path / "r")]) == 0
    assert capsys.readouterr().out.strip() == f"python {tmp_path / 'r' / 'repro.py'}"
    script = (tmp_path / "r" / "repro.py").read_text()
    assert "PLATFORM = sys.argv[1] if len(sys.argv) > 1 else 'fp16'" in script
    assert "torch.as_strided(" in script  # the transposed weight keeps its layout
    store = record["store"]
    assert main(["repro", store, "-o", str(tmp_path / "s")]) == 2
    assert "give --op N" in capsys.readouterr().err
    assert main(["repro", store, "--op", str(addmm), "-o", str(tmp_path / "s")]) == 0
    proc = subprocess.run([sys.executable, str(tmp_path / "s" / "repro.py")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


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
                 ["diff", str(run), str(run), "-o", str(tmp_path / "d.html")], ["report", str(run)],
                 ["diff", str(run), str(run)]):
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == (["run.json"] if content is not None else [])


def test_top_down_report_shows_the_units_tree_and_the_descent(runs, browser):
    """A graph-level fault (encoder.layer.2 wrong only when compiled whole): the units tree with each unit's
    status, errors and times, the descent highlighted, and the culprit's level on its card."""
    record = json.loads((runs["topdown"] / "run.json").read_text())
    page, problems = open_page(browser, runs["topdown"] / "report.html")
    rows = page.locator("#units tbody tr")
    assert rows.count() == len(record["units"])
    layer2 = page.locator('#units tr[data-module="encoder.layer.2"]')
    assert "descent" in layer2.get_attribute("class") and "culprit" in layer2.get_attribute("class")
    cells = layer2.locator("td").all_inner_texts()
    assert cells[1] == "BertLayer" and cells[2] == "compiled" and "culprit: unit" in cells[0]
    assert cells[3].endswith("× bound") and float(cells[3].split("×")[0]) > 1  # local, out of bounds
    assert cells[4].startswith("max abs") and cells[7].endswith(" ms") and cells[8].endswith(" ms")
    root = page.locator('#units tr[data-module=""]')
    assert root.get_attribute("data-status") == "fell back" and "repeated blocks" in root.inner_text()
    child = page.locator('#units tr[data-module="encoder.layer.2.attention"]')
    assert child.get_attribute("data-status") == "checked" and child.get_attribute("data-depth") == "3"
    assert "descent" not in (child.get_attribute("class") or "")  # within bounds alone: not on the path
    layer0 = page.locator('#units tr[data-module="encoder.layer.0"]')
    assert "descent" not in layer0.get_attribute("class") and "compiled" in layer0.inner_text()
    assert page.locator('#units tr[data-module="encoder.layer.1"] .inherited').count() == 1  # one signature
    steps = page.locator("#units-descent li").all_inner_texts()
    assert steps == record["culprit"]["descent"] and steps[0].startswith("encoder.layer.2 (BertLayer)")
    assert "graph-level" in page.locator("#units-descent li.end").inner_text()
    assert page.locator("#culprit-level").inner_text().startswith("unit")
    assert page.locator("#culprit-module").inner_text() == "encoder.layer.2"
    assert page.locator("#culprit-op").count() == 0 and page.locator("#repro-link").count() == 0  # no one-op repro
    assert "--plan top-down" in page.locator("#culprit").inner_text()
    assert "encoder.layer.0" in page.locator("#units-dag").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    layer2.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "report-top-down.png"))
    assert not problems, problems


def test_runs_without_units_render_as_before(runs):
    html = (runs["fault"] / "report.html").read_text()
    assert 'id="units"' not in html and "Units (top-down)" not in html and 'id="culprit-level"' not in html
    assert 'id="culprit-op">aten.gelu.default<' in html


def test_kernel_culprits_name_the_kernel_and_its_ops(runs, tmp_path):
    """A fused-kernel culprit (what a TVM target's descent ends in), from a record edited to hold one."""
    from tapml import reports

    record = json.loads((runs["topdown"] / "run.json").read_text())
    c = record["culprit"]
    c.update(level="kernel", kernel="fused_matmul_add_gelu", covers=["aten.addmm.default", "aten.gelu.default"],
             op="fused_matmul_add_gelu", descent=c["descent"][:-1] + ["fused kernel fused_matmul_add_gelu "
                                                                       "(aten.addmm.default, aten.gelu.default): 9×"])
    (tmp_path / "run.json").write_text(json.dumps(record))
    run = reports.load_run(tmp_path / "run.json")
    html = reports.render_report(run)
    assert 'id="culprit-kernel">fused_matmul_add_gelu<' in html
    assert "<code>aten.addmm.default</code>, <code>aten.gelu.default</code>" in html
    assert "in fused kernel <code>fused_matmul_add_gelu</code>" in html  # the descent box
    card = run._repr_html_()
    assert "culprit level: <strong>kernel</strong>" in card and "fused_matmul_add_gelu" in card
    assert 'class="end">fused kernel fused_matmul_add_gelu' in card


def test_the_card_and_the_terminal_name_the_culprit_level(runs, capsys):
    from tapml import console, reports

    run = reports.load_run(runs["topdown"] / "run.json")
    card = run._repr_html_()
    assert "culprit level: <strong>unit</strong> (graph-level)" in card and 'id="descent"' in card
    assert "culprit level" not in reports.load_run(runs["fault"] / "run.json")._repr_html_()
    console.show_run(run, runs["topdown"], False)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("units: 8 compiled of ") for line in lines)
    layer2 = next(line for line in lines if line.startswith("encoder.layer.2 "))
    assert "BertLayer" in layer2 and "compiled" in layer2 and "× bound" in layer2
    assert any(line.startswith("encoder.layer.2.attention ") and "checked" in line for line in lines)
    k = lines.index("descent to the culprit, level unit:")
    assert lines[k + 1].strip() == run.culprit.descent[0]
    assert lines[k + 2].strip() == "→ " + run.culprit.descent[1]
    console.show_run(reports.load_run(runs["fault"] / "run.json"), None, False)
    assert "units:" not in capsys.readouterr().out  # a per-op run prints as before
