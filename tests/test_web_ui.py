"""End-to-end test of the browser UI served by `medvlm serve` at `/`, in headless Chromium (Debian's package).

A real uvicorn server runs the real app (medvlm.app.server.app.create_app) on 127.0.0.1 with an ephemeral port;
Selenium drives /usr/bin/chromium through /usr/bin/chromedriver (`make browser` installs both; nothing is
downloaded). The test uploads a real JSRT radiograph, asks "where is the heart?", checks that the overlay
canvas has coloured pixels inside the returned box, links a two-sentence report, checks the numbered sentence
list, and saves a screenshot to tests/artifacts/web_ui.png (MEDVLM_UPDATE_DOCS=1 also refreshes
docs/web_ui.png for the README).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, data_dir

pytestmark = [pytest.mark.slow, pytest.mark.data]

CHROMIUM = Path(os.environ.get("MEDVLM_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MEDVLM_CHROMEDRIVER", "/usr/bin/chromedriver"))
BROWSER_NOTE = REPO / ".venv" / ".browser-unavailable"  # written by `make browser` when apt could not install
ARTIFACTS = REPO / "tests" / "artifacts"
# Without the background-networking flags Chromium keeps trying to reach Google and hangs on a closed network.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,900", "--force-device-scale-factor=1"]
REQUEST_TIMEOUT_S = float(os.environ.get("MEDVLM_WEB_UI_TIMEOUT", "240"))  # CPU inference on a busy machine

# Counts the overlay pixels drawn (alpha > 0) inside a box of original-image pixels, and along its left edge.
PIXELS_IN_BOX_JS = """
const [box, size] = arguments;
const c = document.getElementById('overlay');
const sx = c.width / size[0], sy = c.height / size[1];
const x0 = Math.max(0, Math.floor(box[0] * sx) - 2), y0 = Math.max(0, Math.floor(box[1] * sy) - 2);
const x1 = Math.min(c.width, Math.ceil(box[2] * sx) + 2), y1 = Math.min(c.height, Math.ceil(box[3] * sy) + 2);
const d = c.getContext('2d').getImageData(x0, y0, x1 - x0, y1 - y0).data;
const w = x1 - x0;
let inside = 0, edge = 0;
for (let i = 3; i < d.length; i += 4) {
  if (d[i] === 0) continue;
  inside++;
  if (((i - 3) / 4) % w <= 4) edge++;
}
return {inside, edge, area: w * (y1 - y0), canvas: [c.width, c.height]};
"""


def _browser_or_skip() -> None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        why = BROWSER_NOTE.read_text().strip() if BROWSER_NOTE.exists() else "not installed"
        pytest.skip(f"headless Chromium unavailable ({CHROMIUM}, {CHROMEDRIVER}): {why}; "
                    "`make browser` installs Debian's chromium and chromium-driver")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")


def _make_app(data_dir: Path, api_key: str | None = None) -> Any:
    try:
        from medvlm.app.server.app import create_app
        from medvlm.app.server.config import ServerConfig
    except ImportError as exc:
        pytest.skip(f"the HTTP API (medvlm.app.server.app.create_app) is not importable: {exc}")
    return create_app(ServerConfig(data_dir=data_dir, request_timeout_s=REQUEST_TIMEOUT_S, api_key=api_key))


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory, None)


WEB_KEY = "web-ui-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory, WEB_KEY)


def _serve(tmp_path_factory: pytest.TempPathFactory, api_key: str | None) -> Iterator[str]:
    _browser_or_skip()
    import uvicorn

    app = _make_app(tmp_path_factory.mktemp("serve"), api_key)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    # an explicit chromedriver path: Selenium Manager (which would download a driver) never runs
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def _wait_done(driver: Any) -> None:
    """Waits for the overlay to leave the busy state; fails with the page's error banner when it shows."""
    from selenium.webdriver.support.ui import WebDriverWait

    def settled(d: Any) -> bool:
        return d.find_element("id", "overlay").get_attribute("data-state") in ("done", "error")

    WebDriverWait(driver, REQUEST_TIMEOUT_S, poll_frequency=0.2).until(settled)
    if driver.find_element("id", "overlay").get_attribute("data-state") == "error":
        banner = driver.find_element("id", "error-banner").text
        pytest.fail(f"the page shows an error: {banner}")


def _submit(driver: Any, field_id: str, text: str, button_id: str) -> None:
    field = driver.find_element("id", field_id)
    field.clear()
    field.send_keys(text)
    driver.execute_script("document.getElementById('overlay').dataset.state = 'submitted';")
    driver.find_element("id", button_id).click()


@pytest.fixture(scope="module")
def jsrt_image() -> Path:
    """The first radiograph of the JSRT/SCR folder (checked before the server and the browser start)."""
    images = sorted((data_dir("cxr_jsrt_scr") / "images").glob("*.png"))
    if not images:
        pytest.skip("no PNG in cxr_jsrt_scr/images")
    return images[0]


def test_web_ui_grounds_a_question_and_links_a_report(jsrt_image: Path, server_url: str, driver: Any,
                                                      tmp_path: Path) -> None:
    from PIL import Image
    from selenium.webdriver import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    image = jsrt_image
    with Image.open(image) as im:
        size = list(im.size)  # [width, height]
    t0 = time.monotonic()
    driver.get(server_url + "/")
    assert driver.find_element("id", "image-input").get_attribute("type") == "file"
    for control in ("question-input", "ask-button", "report-input", "link-button", "layer-boxes", "layer-masks",
                    "layer-points", "download-json", "download-png", "download-zip", "download-nii"):
        driver.find_element("id", control)  # the controls the page promises, by id
    driver.find_element("id", "image-input").send_keys(str(image))

    # 1. a question: the heart's box and mask are drawn on the overlay canvas
    _submit(driver, "question-input", "where is the heart?", "ask-button")
    _wait_done(driver)
    t_ask = time.monotonic() - t0
    overlay = driver.find_element("id", "overlay")
    assert int(overlay.get_attribute("data-region-count")) >= 1
    items = driver.find_elements("css selector", "#region-list li")
    assert items, "no region listed"
    box = json.loads(items[0].get_attribute("data-box"))
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1], box
    drawn = driver.execute_script(PIXELS_IN_BOX_JS, box, size)
    assert drawn["canvas"][0] > 100, drawn
    assert drawn["inside"] > 0.02 * drawn["area"], f"too few overlay pixels inside the box: {drawn}"
    assert drawn["edge"] > 0, f"no box outline on its left edge: {drawn}"
    # toggling every layer off clears the canvas; on again redraws it
    for layer in ("layer-boxes", "layer-masks", "layer-points", "layer-labels"):
        driver.find_element("id", layer).click()
    assert driver.execute_script(PIXELS_IN_BOX_JS, box, size)["inside"] == 0
    for layer in ("layer-boxes", "layer-masks", "layer-points", "layer-labels"):
        driver.find_element("id", layer).click()
    assert driver.execute_script(PIXELS_IN_BOX_JS, box, size)["inside"] == drawn["inside"]
    # the JSON download is the result just drawn
    href = driver.find_element("id", "download-json").get_attribute("href")
    with urllib.request.urlopen(href, timeout=30) as resp:
        result = json.loads(resp.read())
    assert [round(v) for v in result["regions"][0]["box"]] == [round(v) for v in box]
    with urllib.request.urlopen(driver.find_element("id", "download-png").get_attribute("href"), timeout=60) as resp:
        assert resp.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not driver.find_element("id", "download-dcm").is_displayed()  # DICOM SEG only for a DICOM upload

    # 2. a two-sentence report: two numbered sentence entries beside the image
    report = "The heart is enlarged. There is no pleural effusion."
    _submit(driver, "report-input", report, "link-button")
    _wait_done(driver)
    sentences = driver.find_elements("css selector", "#sentence-list li")
    assert len(sentences) == 2, [s.text for s in sentences]
    numbers = [s.find_element("css selector", ".num").text for s in sentences]
    assert numbers == ["1", "2"]
    assert "heart" in sentences[0].text.lower() and "effusion" in sentences[1].text.lower()
    assert sentences[1].get_attribute("data-status") == "negated"
    # sentence 1's checkbox hides and shows its regions
    heart_box = json.loads(driver.find_element("css selector", "#region-list li").get_attribute("data-box"))
    shown = driver.execute_script(PIXELS_IN_BOX_JS, heart_box, size)["inside"]
    driver.find_element("id", "sentence-toggle-1").click()
    assert shown > 0 and driver.execute_script(PIXELS_IN_BOX_JS, heart_box, size)["inside"] == 0
    driver.find_element("id", "sentence-toggle-1").click()
    ActionChains(driver).move_to_element(sentences[0]).perform()  # hover highlights sentence 1's regions

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "web_ui.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("MEDVLM_UPDATE_DOCS") == "1":  # the README's picture, kept under 300 KB
        docs = REPO / "docs" / "web_ui.png"
        with Image.open(shot) as im:
            im.convert("RGB").save(docs, optimize=True)
            if docs.stat().st_size > 290_000:
                im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(docs, optimize=True)

    # 3. a file that is not an image: the server's error (its JSON type and message) is shown in the banner
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not an image")
    driver.find_element("id", "image-input").send_keys(str(bad))
    _submit(driver, "question-input", "where is the heart?", "ask-button")
    WebDriverWait(driver, 60).until(lambda d: d.find_element("id", "error-banner").is_displayed())
    kind, message = (driver.find_element("id", i).text.strip() for i in ("error-type", "error-message"))
    assert message and kind and not kind.startswith("http_") and kind not in ("network", "no_image"), (kind, message)
    assert overlay.get_attribute("data-state") == "error"
    print(f"error banner: {kind}: {message}")
    print(f"web UI: first answer after {t_ask:.1f} s, whole test {time.monotonic() - t0:.1f} s; screenshot {shot}")


def test_web_ui_sends_the_api_key_the_user_enters(jsrt_image: Path, keyed_server_url: str, driver: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(keyed_server_url + "/")  # the page itself needs no key
    driver.execute_script("sessionStorage.clear();")
    driver.get(keyed_server_url + "/")
    driver.find_element("id", "image-input").send_keys(str(jsrt_image))
    # no key: the server's 401, and the page says where the key goes
    _submit(driver, "question-input", "where is the heart?", "ask-button")
    WebDriverWait(driver, REQUEST_TIMEOUT_S, poll_frequency=0.2).until(
        lambda d: d.find_element("id", "overlay").get_attribute("data-state") == "error")
    banner = driver.find_element("id", "error-banner").text
    assert "API key" in banner and WEB_KEY not in banner, banner
    # a wrong key: 401 again, said so
    key = driver.find_element("id", "api-key-input")
    key.send_keys("not-the-key-at-all")
    _submit(driver, "question-input", "where is the heart?", "ask-button")
    WebDriverWait(driver, REQUEST_TIMEOUT_S, poll_frequency=0.2).until(
        lambda d: d.find_element("id", "overlay").get_attribute("data-state") == "error")
    assert "not the server's" in driver.find_element("id", "error-banner").text
    # the right key: answered and drawn
    key.clear()
    key.send_keys(WEB_KEY)
    _submit(driver, "question-input", "where is the heart?", "ask-button")
    _wait_done(driver)
    assert int(driver.find_element("id", "overlay").get_attribute("data-region-count")) >= 1
    # a download fetched with the key (the plain link would get 401)
    got = driver.execute_async_script(
        "const done = arguments[0];"
        "fetch(document.getElementById('download-json').href, {headers: authHeaders()})"
        ".then(r => r.json().then(b => done([r.status, b.regions.length])))"
        ".catch(e => done(['error', String(e)]));")
    assert got[0] == 200 and got[1] >= 1, got
    plain = driver.execute_async_script(
        "const done = arguments[0]; fetch(document.getElementById('download-json').href)"
        ".then(r => done(r.status));")
    assert plain == 401
