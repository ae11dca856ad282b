"""The web app, driven as people and scripts drive it.

One server (``python -m hash3d_dg.apps.web --config configs/smoke.yaml`` on a free loopback port)
serves every test here. A real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
through Selenium) uploads ``data/ball.png``, waits for the result, checks that the 3D viewer's
canvas shows a model and that the GLB download button gives a valid GLB; a text file renamed
``.png`` must show the CLI's one-line error and leave nothing behind. ``gradio_client`` drives
the ``/generate`` endpoint and reads the progress fed from the stage loops.

Set ``HASH3D_DG_APP_SCREENSHOT=docs/app_screenshot.png`` to keep the finished page's screenshot.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hash3d_dg.apps import web as app

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
START_TIMEOUT = 180  # gradio import + tiny model on a busy 2-core machine
JOB_TIMEOUT = 120


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install Debian's chromium and chromium-driver (missing {missing})")
        pytest.skip(f"needs Debian's chromium and chromium-driver (missing {missing})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    output = root / "out"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hash3d_dg.apps.web", "--config", "configs/smoke.yaml",
                                 "--text-config", "configs/text_smoke.yaml",
                                 "--port", str(port), "--output", str(output)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the app did not answer within {START_TIMEOUT}s: {log_path.read_text()[-2000:]}")
        time.sleep(0.5)
    yield {"url": url, "output": output, "root": root, "log": log_path}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser(server):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = server["root"] / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
                "--enable-unsafe-swiftshader", "--window-size=1400,1250", "--no-first-run"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver, downloads
    driver.quit()


def _wait(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _find(driver, css):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0] if found else None


def _open_and_submit(driver, url: str, photo: Path) -> None:
    driver.get(url)
    upload = _wait(lambda: _find(driver, "#photo input[type=file]"), 30, "the photo upload field")
    assert _find(driver, "#model3d canvas") is None  # the viewer starts empty
    upload.send_keys(str(photo))

    def uploaded():
        text = driver.find_element("css selector", "#photo").text.replace("\n", "")
        return photo.name in text and "Uploading" not in text

    try:
        _wait(uploaded, 30, "the upload")
    except AssertionError:
        driver.save_screenshot(str(Path(os.environ.get("TMPDIR", "/tmp")) / "hash3d_dg_app_upload_failed.png"))
        raise AssertionError(f"upload did not finish; #photo shows {driver.find_element('css selector', '#photo').text!r}")
    driver.find_element("css selector", "#generate-btn").click()


def check_glb(path: Path) -> None:
    import trimesh

    data = path.read_bytes()
    assert data[:4] == b"glTF", "not a binary glTF"
    assert int.from_bytes(data[4:8], "little") == 2, "glTF version is not 2"
    assert int.from_bytes(data[8:12], "little") == len(data), "GLB length field disagrees with the file"
    scene = trimesh.load(path, file_type="glb", force="scene")
    assert sum(len(g.faces) for g in scene.geometry.values()) > 100


def canvas_shows_model(png: bytes) -> bool:
    """The centre of the viewer (away from its label and buttons) is not one flat colour."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    h, w, _ = pixels.shape
    centre = pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4].reshape(-1, 3)
    background = np.median(pixels[h // 8: h // 4, 3 * w // 8: 5 * w // 8].reshape(-1, 3), axis=0)
    differs = np.abs(centre - background).sum(axis=1) > 40
    colours = len(np.unique(centre // 8, axis=0))
    return bool(differs.mean() > 0.05 and colours > 20)


def test_browser_upload_ball_shows_model_and_downloads_glb(server, browser, tmp_path):
    driver, downloads = browser
    before = set(server["output"].iterdir()) if server["output"].exists() else set()
    _open_and_submit(driver, server["url"], REPO / "data" / "ball.png")
    summary = _wait(lambda: driver.find_element("css selector", "#summary textarea").get_attribute("value"),
                    JOB_TIMEOUT, "the summary line")
    assert summary.startswith("ball-") and " | stage1 " in summary and "ref PSNR" in summary

    # The preprocessed input is shown.
    assert _wait(lambda: _find(driver, "#preprocessed img"), 20, "the preprocessed input")

    # The 3D viewer draws a model: read the canvas pixels from a screenshot of the element.
    canvas = _wait(lambda: _find(driver, "#model3d canvas"), 30, "the 3D viewer's canvas")
    _wait(lambda: canvas_shows_model(canvas.screenshot_as_png), 45, "a model drawn in the 3D viewer", interval=1)

    # The GLB download button gives a valid GLB.
    driver.find_element("css selector", "#download-glb").click()
    glb = _wait(lambda: [p for p in downloads.glob("*.glb")], 30, "the GLB download")[0]
    _wait(lambda: glb.stat().st_size > 0 and not list(downloads.glob("*.crdownload")), 30, "the download to finish")
    check_glb(glb)

    # One new job folder holding the whole result, named after the photo.
    new = sorted(set(server["output"].iterdir()) - before)
    assert len(new) == 1 and new[0].name.startswith("ball-")
    assert (new[0] / f"{new[0].name}.glb").read_bytes() == glb.read_bytes()
    for suffix in ("_obj.zip", "_gaussians.ply", "_report.json", "_views.png", "_turntable.mp4"):
        assert (new[0] / f"{new[0].name}{suffix}").is_file()

    page = tmp_path / "app_page.png"
    driver.save_screenshot(str(page))
    target = os.environ.get("HASH3D_DG_APP_SCREENSHOT")
    if target:
        image = Image.open(page).convert("RGB")
        image.thumbnail((1100, 1400))
        image.quantize(colors=256).save(target, optimize=True)


def test_browser_text_file_named_png_shows_one_line_error(server, browser, tmp_path, capsys):
    from hash3d_dg.apps import cli

    driver, _ = browser
    bad = tmp_path / "notes.png"
    bad.write_text("a shopping list, not a picture\n")
    # What the CLI prints for this file, with the path as the page's upload sees it cut out.
    capsys.readouterr()
    assert cli.main(["--image", str(bad), "--config", "configs/smoke.yaml", "--output", str(tmp_path / "cli"),
                     "--quiet"]) == 2
    cli_line = capsys.readouterr().err.strip()
    assert cli_line.startswith("error: ") and "\n" not in cli_line
    tail = cli_line.split(str(bad), 1)[1]

    before = sorted(server["output"].iterdir()) if server["output"].exists() else []
    _open_and_submit(driver, server["url"], bad)
    toast = _wait(lambda: [e.text for e in driver.find_elements("css selector", "[data-testid='toast-body']")
                           if "error:" in e.text], JOB_TIMEOUT, "the error message")[0]
    line = next(line for line in toast.splitlines() if line.startswith("error: "))
    assert line.endswith(tail) and "notes.png" in line
    assert "Traceback" not in driver.find_element("css selector", "body").text
    after = sorted(server["output"].iterdir()) if server["output"].exists() else []
    assert after == before  # nothing left behind, not even a staging folder


def test_api_generate_honours_options_and_reports_progress(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False, download_files=str(tmp_path))
    job = client.submit(handle_file(str(REPO / "data" / "box.png")), "off", 12, 3, 10.0, 7, True,
                        api_name="/generate")
    descriptions = []
    deadline = time.monotonic() + JOB_TIMEOUT
    while not job.done() and time.monotonic() < deadline:
        status = job.status()
        if status.progress_data:
            descriptions += [(p.desc, p.index, p.length) for p in status.progress_data]
        time.sleep(0.05)
    outputs = job.result(timeout=JOB_TIMEOUT)
    check_glb(Path(outputs[0]))  # the first output is the GLB
    report = json.loads(Path(outputs[6]).read_text())
    assert report["config"]["stage1"]["iters"] == 12 and report["config"]["stage2"]["iters"] == 3
    assert report["config"]["elevation"] == 10.0 and report["config"]["seed"] == 7
    assert report["hash3d"]["mode"] == "off" and report["unet_total"]["shallow_calls"] == 0
    assert outputs[7].split(":")[0] in report["name"] and outputs[7].startswith("box-")
    # Progress came from the stage loop itself: its iteration counter and loss.
    stage1 = [d for d in descriptions if d[0] and d[0].startswith("stage 1 (gaussians): iteration")]
    assert stage1, f"no stage-1 progress seen in {descriptions[:10]}"
    assert all(1 <= index <= 12 and length == 12 for _, index, length in stage1 if index is not None)
    assert all(", loss " in desc for desc, _, _ in stage1)


def test_api_generate_from_a_prompt(server, tmp_path):
    """The prompt box: the same endpoint, a prompt instead of a photo, the text config's model."""
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False, download_files=str(tmp_path))
    outputs = client.predict(None, "paper", 2, 1, 0.0, 5, True, "a ceramic mug with a blue glaze", "blurry",
                             api_name="/generate")
    check_glb(Path(outputs[0]))
    assert outputs[1] is None  # no preprocessed input for a prompt
    report = json.loads(Path(outputs[6]).read_text())
    assert report["prompt"] == "a ceramic mug with a blue glaze" and report["negative_prompt"] == "blurry"
    assert report["config"]["guidance"]["type"] == "sd" and report["config"]["seed"] == 5
    assert report["name"].startswith("a-ceramic-mug-with-a-blue-glaze-") and report["hash3d"]["mode"] == "paper"
    with pytest.raises(Exception, match="not both"):
        client.predict(handle_file(str(REPO / "data" / "box.png")), "paper", 2, 1, 0.0, 5, True, "a mug", "",
                       api_name="/generate")
    with pytest.raises(Exception, match="empty"):
        client.predict(None, "paper", 2, 1, 0.0, 5, True, "   ", "", api_name="/generate")


def test_app_bad_config_is_one_line(capsys):
    assert app.main(["--config", "no-such-config.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: config file") and "\n" not in err
