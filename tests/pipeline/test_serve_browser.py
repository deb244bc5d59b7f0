"""`vmr serve` in a real headless Chromium (Debian's `chromium` + `chromedriver`, driven by Selenium):
load the page, pick a video, submit queries, see the moments, click one and watch the video seek.
The screenshot is saved to $VMR_ARTIFACTS_DIR (default artifacts/) as serve.png.

Without chromium the test skips with the reason; CI installs it and sets VMR_REQUIRE_BROWSER=1,
which turns the absence into a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.videos import write_video

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path]
# CI installs Debian's chromium and sets VMR_REQUIRE_BROWSER=1: there its absence is a failure, not a skip
REQUIRED = os.environ.get("VMR_REQUIRE_BROWSER") == "1"
pytestmark = pytest.mark.skipif(bool(MISSING) and not REQUIRED, reason=f"{' and '.join(MISSING)} not on PATH "
                                "(Debian: apt-get install chromium chromium-driver)")


@pytest.fixture
def server(tmp_path, project):
    """`vmr serve --port 0` as users start it; yields its URL and the video folder."""
    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "street.mp4", frames=120, fps=15, width=96, height=64)  # 8 s
    write_video(videos / "kitchen.mp4", frames=60, fps=15)
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", "--model", "mmn", "--params", str(project / "params.yaml"),
           "--checkpoint", str(project / "runs" / "mmn" / "best.pt"), "--video-dir", str(videos), "--cache-dir", str(tmp_path / "cache"), "--port", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()  # "vmr serve: http://127.0.0.1:PORT/ (...)" once it listens
        assert line.startswith("vmr serve: http://127.0.0.1:"), line + proc.stderr.read()
        yield line.split()[2], videos
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser():
    assert not MISSING, f"VMR_REQUIRE_BROWSER=1 but {' and '.join(MISSING)} not on PATH"
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_the_browser_runs(browser):
    """Fast: Selenium, chromedriver and chromium work together (before the slow test trains a model)."""
    browser.get("data:text/html,<title>vmr</title><p id=x>ok</p>")
    assert browser.title == "vmr" and browser.execute_script("return document.getElementById('x').textContent") == "ok"


@pytest.mark.slow
def test_pick_a_video_ask_and_play_a_moment(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    wait = WebDriverWait(browser, 120, poll_frequency=0.1)
    browser.get(url)
    items = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videos button.video-item"))
    assert [i.get_attribute("data-id") for i in items] == ["folder/kitchen.mp4", "folder/street.mp4"]

    # an upload joins the list and is picked; asking nothing is answered with an error line
    browser.find_element(By.ID, "upload").send_keys(str(write_video(tmp_path / "my upload.mp4", frames=30)))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#videos button.selected[data-id="upload/my_upload.mp4"]'))
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: "no query" in d.find_element(By.ID, "error").text)

    browser.find_element(By.CSS_SELECTOR, '#videos button[data-id="folder/street.mp4"]').click()
    # the browser can play the file: metadata read over the Range-capable route
    duration = wait.until(lambda d: d.execute_script(
        "const v = document.getElementById('player'); return v.readyState >= 1 ? v.duration : null;"))
    assert abs(duration - 8.0) < 0.2

    browser.find_element(By.ID, "queries").send_keys("a car drives past\na person crosses the street")
    browser.find_element(By.ID, "top-k").clear()
    browser.find_element(By.ID, "top-k").send_keys("4")
    browser.find_element(By.ID, "submit").click()
    results = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .result"))
    assert [r.get_attribute("data-query") for r in results] == ["a car drives past", "a person crosses the street"]
    assert not browser.find_element(By.ID, "error").text
    rows = results[0].find_elements(By.CSS_SELECTOR, "tr.moment")
    moments = [(float(r.get_attribute("data-start")), float(r.get_attribute("data-end")),
                float(r.get_attribute("data-score"))) for r in rows]
    assert 1 <= len(moments) <= 4
    for start, end, _ in moments:
        assert 0 <= start < end <= duration + 1e-3
    assert [s for *_, s in moments] == sorted((s for *_, s in moments), reverse=True)
    assert len(results[0].find_elements(By.CSS_SELECTOR, ".timeline .segment")) == len(moments)
    # every moment's thumbnail is a decoded image (a JPEG from /api/thumbnail)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results tr.moment img')].every(i => i.complete && i.naturalWidth > 0);"))

    # clicking a moment seeks the video there and plays it. Park the video outside the moment first
    # (where the moment leaves room), so the seek must move it.
    latest = max(range(len(moments)), key=lambda i: moments[i][0])
    start, end, _ = moments[latest]
    park = (end + duration) / 2 if end + 0.3 < duration else start / 2 if start > 0.3 else None
    if park is not None:
        browser.execute_script(f"document.getElementById('player').currentTime = {park};")
        wait.until(lambda d: d.execute_script("return !document.getElementById('player').seeking;"))
    rows[latest].click()
    current = "const v = document.getElementById('player'); return v.seeking ? null : v.currentTime;"
    now = wait.until(lambda d: d.execute_script(current))
    assert start - 0.1 <= now <= end + 0.1, (now, start, end, park)
    assert "playing" in rows[latest].get_attribute("class")
    if end - now > 0.2:  # it plays: the time moves on inside the moment
        wait.until(lambda d: (d.execute_script(current) or 0) > now + 0.05)
    time.sleep(0.3)  # let the frame paint before the screenshot

    artifacts = Path(os.environ.get("VMR_ARTIFACTS_DIR", REPO / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(artifacts / "serve.png"))
    assert (artifacts / "serve.png").stat().st_size > 10_000
