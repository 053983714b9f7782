"""The offline HTML report: structure, no external URLs, atomic save, PNG export, run folders, the CLI, and a
real headless Chromium that loads the page from disk (console errors, network requests, rendered figures,
screenshot kept at artifacts/report-screenshot.png)."""

from __future__ import annotations

import base64
import fcntl
import html as html_lib
import json
import os
import queue
import re
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

from abft_lens.reporting import html_page as report_module
from abft_lens.cli import main
from abft_lens.training.comparison import Comparison
from abft_lens.errors import AbftLensError
from abft_lens.io import read_json, write_json
from abft_lens.reporting.html_page import Report
from abft_lens.reporting.report import build_report, report_from_run
from test_viz import SCORES, synthetic_comparison

FEW = ["induction", "label_attention", "sink_attention"]  # fewer figures where the page's content is not the point

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "Debian chromium is not installed (scripts/setup.sh installs it: apt-get install -y chromium)"


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    return synthetic_comparison()


@pytest.fixture(scope="module")
def report(comparison) -> Report:
    return build_report(comparison)


@pytest.fixture(scope="module")
def page(report) -> str:
    return report.html()


def strip_libraries(page: str) -> str:
    """The page without the two inlined JavaScript libraries (plotly.js and circuitsvis's bundle), whose source
    text mentions URLs (map tiles, docs) that this report never uses."""
    plotly_js = get_plotlyjs()
    library = report_module._circuitsvis_library()
    assert page.count(plotly_js) == 1
    assert library is not None and page.count(library) == 1
    return page.replace(plotly_js, "").replace(library, "")


# ------------------------------------------------------------------------------------------- structure


def test_report_has_every_section_and_one_figure_div_per_figure(report, page):
    keys = list(report.figures)
    assert keys[:3] == ["accuracy", "training_trace", "layer_curves"] and keys[-1] == "weight_change"
    assert len(keys) == 3 + 3 * len(SCORES) + 1
    for name in SCORES:
        assert {f"{name}_before", f"{name}_after", f"{name}_difference"} <= set(keys)
    assert page.count('class="plotly-graph-div"') == len(keys)
    assert page.count("Plotly.newPlot(") == len(keys)
    for key in keys:
        assert page.count(f'id="fig-{key}"') == 1
    for section in ("summary", "trace", "layers", "heatmaps", "weights", "attention"):
        assert f'<section id="{section}">' in page
    assert "Test accuracy 0.6100 → <b>0.7000</b>" in page
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")


def test_plotlyjs_and_circuitsvis_are_inlined_exactly_once(report, page):
    assert page.count(get_plotlyjs()) == 1
    assert page.count("var CircuitsVis=") == 1  # the bundle once, however many views
    assert page.count("CircuitsVis.render(") == len(report.attention) == 2
    # each circuitsvis target div is closed, so the before/after views sit side by side, not nested
    assert len(re.findall(r'<div id="circuits-vis-[^"]+" style="[^"]*"></div>', page)) == 2
    assert "/>" not in "".join(re.findall(r'<div id="circuits-vis-[^>]*>', page))


def test_hostile_strings_cannot_break_out_of_scripts():
    comparison = synthetic_comparison(scores=["induction"])
    comparison.run["model"]["name"] = "</script><script>alert(1)</script>"
    report = build_report(comparison)
    page = strip_libraries(report.html())
    assert comparison.prompt_example["tokens"][3] == " </script><b>"
    # every </script> closes a <script> the report opened itself
    assert page.count("</script>") == page.count("<script")
    assert "<!--" not in page and "<script>alert(1)" not in page
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in page  # in the title and the summary


def test_report_loads_nothing_from_outside(page):
    rest = strip_libraries(page)
    assert "http://" not in rest and "https://" not in rest
    assert not re.search(r"cdn", rest, re.IGNORECASE)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", rest, re.IGNORECASE)
    assert not re.search(r"""url\(\s*["']?\s*(https?:)?//|@import|@font-face""", rest, re.IGNORECASE)
    assert not re.search(r"""\bimport\b[^;]*\bfrom\s*["']""", rest)  # no ES module imports (the CDN version's way)
    assert "<script src" not in rest and "<link" not in rest
    # the inlined libraries themselves are the installed offline bundles, not loaders
    assert '<script src="' not in page and "unpkg.com" not in page


def test_report_without_prompt_example_or_trace_or_metrics():
    comparison = synthetic_comparison()
    comparison.prompt_example, comparison.trace = {}, []
    comparison.accuracy = {"fore": None, "post": None}
    report = build_report(comparison, title="Bare <run>", scores=["induction"])
    page = report.html()
    assert "<title>Bare &lt;run&gt;</title>" in page
    assert "var CircuitsVis=" not in page and "no prompt example" in page
    assert page.count('class="plotly-graph-div"') == len(report.figures) == 3 + 3 + 1
    with pytest.raises(AbftLensError, match="not in the comparison"):
        build_report(comparison, scores=["nonexistent"])


def test_repr_html_is_the_same_page_in_an_isolated_iframe(report, page):
    shown = report._repr_html_()
    match = re.fullmatch(r'<iframe srcdoc="(.*)" style="[^"]*" sandbox="allow-scripts allow-downloads"></iframe>', shown, re.DOTALL)
    assert match and html_lib.unescape(match.group(1)) == page


def test_comparison_round_trips_through_json_into_the_same_report(tmp_path, comparison, report):
    path = write_json(tmp_path / "comparison.json", comparison.to_dict())
    again = build_report(Comparison.from_dict(read_json(path)))
    assert list(again.figures) == list(report.figures)
    for key, figure in report.figures.items():
        assert again.figures[key].to_plotly_json()["data"] == figure.to_plotly_json()["data"]


# ----------------------------------------------------------------------------------------------- saving


def test_save_writes_the_page_atomically(tmp_path, report, page, monkeypatch):
    calls = []
    real = report_module.atomic_write_text
    monkeypatch.setattr(report_module, "atomic_write_text", lambda path, text: calls.append(path) or real(path, text))
    target = tmp_path / "sub" / "report.html"
    assert report.save(target) == target
    assert calls == [target]
    assert target.read_text(encoding="utf-8") == page
    # a failure while rendering leaves the previous file untouched and no temporary file behind
    monkeypatch.setattr(Report, "html", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        report.save(target)
    assert target.read_text(encoding="utf-8") == page
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_save_pngs_without_a_browser_says_how_to_get_one(tmp_path, report, monkeypatch):
    pytest.importorskip("kaleido")
    monkeypatch.setattr(report_module, "find_browser", lambda: None)
    with pytest.raises(AbftLensError, match="Chromium or Chrome") as error:
        report.save_pngs(tmp_path / "png")
    assert "apt-get install" in str(error.value) and "BROWSER_PATH" in str(error.value)
    assert not (tmp_path / "png").exists() or not any((tmp_path / "png").iterdir())


def test_save_pngs_without_kaleido(tmp_path, report, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "kaleido", None)
    with pytest.raises(AbftLensError, match="kaleido"):
        report.save_pngs(tmp_path / "png")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_save_pngs_exports_every_figure_offline(tmp_path, no_network):
    pytest.importorskip("kaleido")
    report = build_report(synthetic_comparison(scores=["induction"]))
    paths = report.save_pngs(tmp_path / "png")
    assert [p.name for p in paths] == [f"{key}.png" for key in report.figures]
    sizes = {p.stem: png_size(p) for p in paths}
    assert sizes["induction_difference"] == (600, 360)
    assert sizes["training_trace"] == (1200, 520)
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(p.name for p in paths)  # no staging left


# ------------------------------------------------------------------------------------------ run folders


def fake_run(tmp_path: Path, comparison: Comparison | None = None) -> Path:
    run_dir = tmp_path / "run"
    write_json(run_dir / "config.json", {"train": {"method": "ABFT"}, "model": {"name": "tiny"}, "task": {"name": "sst2"}})
    if comparison is not None:
        write_json(run_dir / "comparison.json", comparison.to_dict())
    return run_dir


def test_report_from_run_reuses_comparison_json_without_a_model(tmp_path, no_network, monkeypatch):
    from abft_lens.reporting import report

    monkeypatch.setattr(report, "compare_run", lambda *a, **k: pytest.fail("compare_run must not be called"))
    run_dir = fake_run(tmp_path, synthetic_comparison(seed=3, scores=FEW))
    result = report_from_run(run_dir)
    assert result.reused and result.html_path == run_dir / "report.html" and result.png_paths == []
    assert result.comparison_path == run_dir / "comparison.json"
    assert result.html_path.read_text(encoding="utf-8") == result.report.html()
    other = report_from_run(run_dir, output=tmp_path / "elsewhere.html")
    assert other.html_path == tmp_path / "elsewhere.html" and other.html_path.is_file()


def test_report_from_run_computes_and_saves_the_comparison(tmp_path, monkeypatch):
    from abft_lens.reporting import report

    seen = {}

    def fake_compare_run(run_dir, *, n_prompts, **kwargs):
        seen.update(run_dir=Path(run_dir), n_prompts=n_prompts, **kwargs)
        return synthetic_comparison(seed=4, scores=FEW)

    monkeypatch.setattr(report, "compare_run", fake_compare_run)
    run_dir = fake_run(tmp_path)
    result = report_from_run(run_dir, n_prompts=7, batch_size=2)
    assert seen == dict(run_dir=run_dir, n_prompts=7, batch_size=2)
    assert not result.reused and (run_dir / "comparison.json").is_file() and (run_dir / "report.html").is_file()
    saved = Comparison.from_dict(read_json(run_dir / "comparison.json"))
    assert saved.to_dict() == synthetic_comparison(seed=4, scores=FEW).to_dict()


def test_report_from_run_errors(tmp_path):
    with pytest.raises(AbftLensError, match="not an abft-lens run folder"):
        report_from_run(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(AbftLensError, match="not an abft-lens run folder"):
        report_from_run(tmp_path / "plain")
    run_dir = fake_run(tmp_path)
    (run_dir / "comparison.json").write_text("{not json")
    with pytest.raises(AbftLensError, match="delete it"):
        report_from_run(run_dir)


def test_cli_report(tmp_path, capsys, no_network):
    run_dir = fake_run(tmp_path, synthetic_comparison(scores=FEW))
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run_dir / 'report.html'}" in out and "(reused)" in out
    assert main(["report", str(run_dir), "--output", str(tmp_path / "r.html"), "--n-prompts", "8"]) == 0
    assert (tmp_path / "r.html").is_file()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    err = capsys.readouterr().err
    assert "abft-lens: error:" in err and "not an abft-lens run folder" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ headless Chromium


class HeadlessChromium:
    """Debian's Chromium driven over the DevTools protocol on ``--remote-debugging-pipe`` (requests on fd 3,
    replies and events on fd 4, NUL-separated JSON): the standard library only, no websocket client."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             # belt and braces: even a bug that tried to reach a host could not resolve it
             "--host-resolver-rules=MAP * ~NOTFOUND")

    def __init__(self, executable: str, user_data_dir: Path):
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Park the child's ends above 3/4 so that the dup2 calls in the child cannot clobber each other.
        child_in = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD_CLOEXEC, 20)
        child_out = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD_CLOEXEC, 20)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def connect_pipes():
            os.dup2(child_in, 3)
            os.dup2(child_out, 4)

        user_data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = user_data_dir.parent / f"{user_data_dir.name}-chromium.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [executable, *self.FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(3, 4), preexec_fn=connect_pipes)
        os.close(child_in)
        os.close(child_out)
        self._out = os.fdopen(to_chrome_w, "wb", buffering=0)
        self._in = from_chrome_r
        self._replies: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._in, 1 << 20):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    if (waiting := self._replies.get(message["id"])) is not None:
                        waiting.put(message)
                else:
                    self.events.append(message)
        for waiting in list(self._replies.values()):
            waiting.put({"error": {"message": "Chromium closed the DevTools pipe"}})

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        with self._lock:
            self._next_id += 1
            call, waiting = self._next_id, queue.Queue()
            self._replies[call] = waiting
        message = {"id": call, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self._out.write(json.dumps(message).encode() + b"\0")
        try:
            reply = waiting.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer {method} within {timeout} s") from None
        finally:
            self._replies.pop(call, None)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_for(self, method: str, session: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            time.sleep(0.05)
        raise TimeoutError(f"no {method} within {timeout} s; Chromium log:\n{self.log_path.read_text()[-2000:]}")

    def evaluate(self, expression: str, session: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self._out.close()
        self._reader.join(timeout=5)
        os.close(self._in)


# Geometry of every plotly figure and circuitsvis view, read in the page.
PAGE_STATE = """(() => {
  const box = el => { const r = el.getBoundingClientRect(); return [r.width, r.height]; };
  const figures = [...document.querySelectorAll('.plotly-graph-div')].map(div => {
    const svg = div.querySelector('.main-svg');
    return {id: div.id, size: box(div), svg: svg ? box(svg) : [0, 0], plotted: div.classList.contains('js-plotly-plot'),
            traces: (div._fullData || []).length,
            marks: div.querySelectorAll('.main-svg .trace, .main-svg .hm image, .main-svg .table').length};
  });
  const views = [...document.querySelectorAll('.attention div[id^="circuits-vis-"]')].map(div => ({
    id: div.id, size: box(div), canvases: [...div.querySelectorAll('canvas')].map(box)}));
  return {figures, views, height: Math.ceil(document.body.getBoundingClientRect().bottom + window.scrollY)};
})()"""

ALLOWED_SCHEMES = ("data:", "blob:", "about:")


def figures_ready(state: dict) -> bool:
    return all(f["plotted"] and f["svg"][0] > 0 and f["svg"][1] > 0 and f["marks"] > 0 for f in state["figures"])


def views_ready(state: dict) -> bool:
    # circuitsvis draws the head selector thumbnails and one zoomed pattern per view on canvases
    return all(any(w > 100 and h > 100 for w, h in v["canvases"]) for v in state["views"])


def poll(browser: HeadlessChromium, session: str, ready, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    state = browser.evaluate(PAGE_STATE, session)
    while not ready(state) and time.monotonic() < deadline:
        time.sleep(0.2)
        state = browser.evaluate(PAGE_STATE, session)
    return state


@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_report_renders_offline_in_headless_chromium(tmp_path, report):
    path = report.save(tmp_path / "report.html")
    url = path.as_uri()
    browser = HeadlessChromium(CHROMIUM, tmp_path / "profile")
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.send(f"{domain}.enable", session=session)
        width = 1400
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False}, session)
        browser.send("Page.navigate", {"url": url}, session)
        browser.wait_for("Page.loadEventFired", session, timeout=90)
        state = poll(browser, session, lambda s: figures_ready(s) and views_ready(s))

        # (c) every plotly figure rendered, non-empty; both attention views drawn
        figures = state["figures"]
        assert [f["id"] for f in figures] == [f"fig-{key}" for key in report.figures]
        for figure in figures:
            assert figure["plotted"] and figure["traces"] > 0 and figure["marks"] > 0, figure
            assert min(figure["size"]) > 100 and min(figure["svg"]) > 100, figure
        assert len(state["views"]) == 2 and views_ready(state), state["views"]

        # (d) a screenshot of the whole page: grow the viewport to the page (a capture beyond the viewport
        # would resize circuitsvis's responsive charts mid-capture), let the layout settle, capture
        height = 0
        for _ in range(5):
            if height == min(state["height"], 16000):
                break
            height = min(state["height"], 16000)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
            state, last = poll(browser, session, lambda s: figures_ready(s) and views_ready(s)), None
            for _ in range(20):  # until two reads 0.25 s apart agree
                if state == last:
                    break
                time.sleep(0.25)
                last, state = state, browser.evaluate(PAGE_STATE, session)
        shot = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"}, session)["data"])
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "report-screenshot.png"
        staging = ARTIFACTS / f".report-screenshot.{os.getpid()}.png"
        staging.write_bytes(shot)
        os.replace(staging, screenshot)
        assert png_size(screenshot) == (width, height)
    finally:
        browser.close()

    # (a) no console errors, no uncaught exceptions, no error log entries
    errors = [e for e in browser.events if e.get("sessionId") == session and (
        e["method"] == "Runtime.exceptionThrown"
        or (e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error"))]
    assert errors == []
    # (b) no request leaves the page: only the file itself and inline data (plotly's heatmap images)
    requests = [e["params"]["request"]["url"] for e in browser.events
                if e.get("sessionId") == session and e["method"] == "Network.requestWillBeSent"]
    assert url in requests
    outside = [u for u in requests if u != url and not u.startswith(ALLOWED_SCHEMES)]
    assert outside == []
    assert not [e for e in browser.events if e.get("method") == "Network.loadingFailed"]


# ---------------------------------------------------------------------------------------- integration


def test_report_from_a_real_tiny_run(tmp_path, no_network):
    """End to end on the tiny model: `abft-lens train` two steps, then report_from_run computes the comparison
    with compare_run."""
    run_dir = tmp_path / "run"
    assert main(["train", "--model", "tiny", "--dataset", "sst2", "--k", "2", "--train-samples", "4",
                 "--epochs", "1", "--pseudo-batch-size", "2", "--no-fore-test", "--no-post-test",
                 "--run-dir", str(run_dir)]) == 0
    # the CLI path is covered above with a saved comparison; here small head-score settings keep it quick
    result = report_from_run(run_dir, n_prompts=2, n_seqs=4, seq_len=16)
    assert not result.reused and result.html_path == run_dir / "report.html"
    comparison = Comparison.from_dict(read_json(run_dir / "comparison.json"))
    assert tuple(comparison.weight_change.shape) == (comparison.n_layers, 2)
    assert len([e for e in comparison.trace if e.get("event") == "step"]) == 2
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count('class="plotly-graph-div"') == len(build_report(comparison).figures)
    assert page.count("CircuitsVis.render(") == 2
    assert "http://" not in strip_libraries(page) and "https://" not in strip_libraries(page)
