"""The widgets in a real browser: JupyterLab on 127.0.0.1, the widgets notebook run in headless Chromium (Playwright
driving Debian's `chromium`), a slider moved and the cursor moved, with the redraw and the read-out checked.

Needs `/usr/bin/chromium` (`apt-get install -y chromium`) and the `playwright` package. Without them the test skips,
unless `STEREO_KIT_REQUIRE_BROWSER=1` (set by `.ci/run`), where it fails. `STEREO_KIT_UPDATE_SCREENSHOTS=1` also copies
the screenshots to `nbs/images/`, where the notebooks and the README show them."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "08_widgets.ipynb"
SCREENSHOTS = {"stereo-kit-viewer": "disparity_viewer.png", "stereo-kit-inspector": "augmentation_inspector.png",
               "stereo-kit-monitor": "training_monitor.png"}


def _browser_available() -> str | None:
    "Why the browser test cannot run here, or None."
    if not CHROMIUM.exists(): return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return "the playwright package is not installed"
    return None


def _require_browser():
    reason = _browser_available()
    if reason is None: return
    if os.environ.get("STEREO_KIT_REQUIRE_BROWSER") == "1": pytest.fail(f"browser test required: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    "A JupyterLab server on 127.0.0.1 serving a copy of the widgets notebook beside the repository's data and configs."
    _require_browser()
    root = tmp_path / "lab"
    (root / "nbs").mkdir(parents=True)
    shutil.copy(ROOT / "nbs" / NOTEBOOK, root / "nbs" / NOTEBOOK)
    for name in ("data_samples", "configs"): (root / name).symlink_to(ROOT / name)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), "stereo-kit-browser-test"
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "PYTHONWARNINGS": "ignore"}
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--allow-root"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    pytest.fail(f"JupyterLab did not start:\n{server.stdout.read()}")
                time.sleep(0.3)
        yield url, token, root
    finally:
        server.terminate()
        try: server.wait(timeout=15)
        except subprocess.TimeoutExpired: server.kill()


def _not_blank(path: Path) -> float:
    "The standard deviation of a screenshot's grey levels (a blank or one-colour image is near 0)."
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert image is not None and image.size > 0, f"{path}: not a readable image"
    return float(image.std())


def _save_compact(source: Path, target: Path):
    "Copy a screenshot as a 256-colour PNG (a third of the bytes; these are committed), atomically."
    from PIL import Image
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    palette = Image.open(source).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette.save(temporary, format="png", optimize=True)
    os.replace(temporary, target)


def _wait_idle(page, timeout_ms: int):
    page.wait_for_selector("text=| Idle", timeout=timeout_ms)


def _run_all(page):
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def _cells_done(page) -> bool:
    return page.evaluate("""() => {
        const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent);
        return prompts.length > 0 && prompts.every(text => /\\[\\d+\\]/.test(text));
    }""")


def _slider(page, description: str):
    return page.locator(".widget-slider", has=page.locator(".widget-label", has_text=description)).first


def _drag(page, handle, dx: float):
    "Drag a slider handle `dx` px to the right, as a person does."
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y, steps=4)
    page.mouse.move(x + dx, y, steps=4)
    page.mouse.up()


@pytest.mark.slow
def test_widgets_notebook_in_chromium(jupyterlab, tmp_path):
    from playwright.sync_api import sync_playwright
    url, token, root = jupyterlab
    started = time.perf_counter()
    timings = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2400})   # tall: each widget fits whole
        try: _drive(page, url, token, tmp_path, started, timings)
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            print(f"browser test failed; the page is in {tmp_path / 'failure.png'}")
            raise
        finally: browser.close()
    timings["test_s"] = time.perf_counter() - started
    (tmp_path / "timings.json").write_text(json.dumps(timings, indent=2))
    print("browser test:", json.dumps({key: round(value, 1) for key, value in timings.items()}))


def _drive(page, url: str, token: str, tmp_path: Path, started: float, timings: dict):
    "Open and run the notebook, move a slider and the cursor, take the screenshots."
    page.goto(f"{url}/lab/tree/nbs/{NOTEBOOK}?token={token}")
    _wait_idle(page, 90_000)
    _run_all(page)
    page.wait_for_timeout(1000)
    deadline = time.monotonic() + 240
    while not _cells_done(page):
        assert time.monotonic() < deadline, "the notebook did not finish running in 240 s"
        page.wait_for_timeout(500)
    _wait_idle(page, 60_000)
    timings["run_all_s"] = time.perf_counter() - started

    # no cell shows an error
    outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
    errors = [text[:400] for text in outputs if "Traceback (most recent call last)" in text or "Error Traceback" in text]
    assert errors == [], errors

    # an augmentation slider redraws the augmented view
    inspector = page.locator(".stereo-kit-inspector").first
    inspector.scroll_into_view_if_needed()
    augmented = inspector.locator('img[data-title="augmented left"]')
    before_png, before_version = augmented.screenshot(), augmented.get_attribute("data-version")
    slider = _slider(page, "jittering.brightness")
    slider.scroll_into_view_if_needed()
    value_before = slider.locator(".widget-readout").inner_text()
    _drag(page, slider.locator(".noUi-handle").last, 60)
    pressed = time.perf_counter()
    page.wait_for_function("([selector, version]) => document.querySelector(selector).dataset.version !== version",
                           arg=['.stereo-kit-inspector img[data-title="augmented left"]', before_version], timeout=10_000)
    timings["slider_to_redraw_ms"] = (time.perf_counter() - pressed) * 1000
    page.wait_for_timeout(300)
    assert slider.locator(".widget-readout").inner_text() != value_before
    augmented.scroll_into_view_if_needed()
    assert augmented.screenshot() != before_png, "moving the brightness slider did not change the augmented view"
    assert "valid config" in inspector.locator(".stereo-kit-status").inner_text()

    # the viewer's read-out follows the cursor
    viewer = page.locator(".stereo-kit-viewer").first
    viewer.scroll_into_view_if_needed()
    ground_truth = viewer.locator('img[data-title="ground truth"]')
    readout = viewer.locator(".stereo-kit-readout")
    ground_truth.scroll_into_view_if_needed()
    box = ground_truth.bounding_box()
    texts = [readout.inner_text()]
    for fx, fy in ((0.3, 0.5), (0.7, 0.6)):
        ground_truth.hover(position={"x": fx * box["width"], "y": fy * box["height"]})
        page.wait_for_function("([selector, text]) => document.querySelector(selector).innerText !== text",
                               arg=[".stereo-kit-viewer .stereo-kit-readout", texts[-1]], timeout=10_000)
        texts.append(readout.inner_text())
    texts = texts[1:]
    assert texts[0] != texts[1] and all(text.startswith("x ") and "ground truth" in text for text in texts), texts

    # screenshots of each widget, not blank
    for css_class, name in SCREENSHOTS.items():
        widget = page.locator(f".{css_class}").first
        widget.scroll_into_view_if_needed()
        path = tmp_path / name
        widget.screenshot(path=str(path))
        assert _not_blank(path) > 10, f"{name}: the screenshot is blank"
        if os.environ.get("STEREO_KIT_UPDATE_SCREENSHOTS") == "1": _save_compact(path, ROOT / "nbs" / "images" / name)
