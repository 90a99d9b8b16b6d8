"""The report in a real headless browser (Debian's chromium, driven by Selenium).

The page must load with no console error and every figure decoded; a screenshot is kept
in reports/ (or $FEATCACHE_SCREENSHOT_DIR). The fixture installs chromium and its driver
with apt-get when they are missing, as CI's clean machine needs.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from featcache.reporting.page import ReportConfig, write_report

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900"]


def _install_chromium():
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if shutil.which("apt-get") is None:
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = sudo + ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.fail(f"could not install chromium: {done.stderr[-500:]}")


@pytest.fixture(scope="module")
def browser():
    _install_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> dict:
    """Load a file and return what went wrong: console errors and figures that did not render."""
    driver.get(path.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0}))")
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return {"images": images, "broken": [i["alt"] for i in images if not i["ok"]], "errors": errors}


def test_report_renders_in_chromium_without_errors(browser, report_runs, tmp_path):
    tmp, _ = report_runs
    out = write_report(ReportConfig(runs_dir=tmp / "runs", out=tmp_path / "study.html", gradcam_images=2),
                       log=lambda m: None)
    seen = open_page(browser, out)
    assert seen["errors"] == []
    assert seen["broken"] == []
    assert len(seen["images"]) == out.read_text().count("<img ")
    assert len(seen["images"]) >= 20  # 7 runs x (architecture, confusion, per-class, predictions) and more
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, min(height, 16000))
    shots = Path(os.environ.get("FEATCACHE_SCREENSHOT_DIR", ROOT / "reports"))
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / "browser-test-report.png"))
    browser.set_window_size(1280, 900)


def test_the_table_sorts_by_a_clicked_header_and_wraps_only_between_words(browser, report_runs, tmp_path):
    from selenium.webdriver.common.by import By

    tmp, _ = report_runs
    out = write_report(ReportConfig(runs_dir=tmp / "runs", out=tmp_path / "sorted.html", gradcam_images=0,
                                    grid_images=0), log=lambda m: None)
    assert open_page(browser, out)["errors"] == []
    headers = browser.find_elements(By.CSS_SELECTOR, "#runs-table th")
    names = [h.text for h in headers]
    assert "test acc" in names and not [n for n in names if "_" in n]  # human headers
    column = names.index("test acc")

    def scores():
        return [float(r.find_elements(By.TAG_NAME, "td")[column].text)
                for r in browser.find_elements(By.CSS_SELECTOR, "#runs-table tbody tr")]

    headers[column].click()
    assert scores() == sorted(scores(), reverse=True) and len(scores()) >= 5
    headers[column].click()
    assert scores() == sorted(scores())
    # every cell is on one line but the label's, which wraps only at spaces: never inside a word or number
    lines = browser.execute_script("""
        return Array.from(document.querySelectorAll('#runs-table td')).map(td => {
            const r = document.createRange(); r.selectNodeContents(td);
            const tops = new Set(Array.from(r.getClientRects()).map(x => Math.round(x.top)));
            return [td.className, td.textContent.trim(), tops.size]; });""")
    assert all(n <= 1 for cls, _, n in lines if cls != "label"), [x for x in lines if x[2] > 1]  # 0: an empty cell
    browser.set_window_size(700, 900)  # narrow: the labels wrap, between words only
    words = browser.execute_script("""
        return Array.from(document.querySelectorAll('#runs-table td.label a')).flatMap(a => {
            const text = a.firstChild, out = [];
            for (let i = 0; i < text.length; i++) {
                const r = document.createRange(); r.setStart(text, i); r.setEnd(text, i + 1);
                out.push([text.data[i], Math.round(r.getBoundingClientRect().top)]); }
            return [out]; });""")
    browser.set_window_size(1280, 900)
    for chars in words:  # a line break falls on a space, never between two letters of a word
        for (a, top_a), (b, top_b) in zip(chars, chars[1:]):
            assert top_a == top_b or a == " " or b == " " or a == "·", "".join(c for c, _ in chars)


def test_the_check_catches_a_broken_figure_and_a_console_error(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
                    '<img alt="fig" src="data:image/png;base64,bm90IGEgcG5n">'
                    '<script>console.error("boom")</script></body></html>')
    seen = open_page(browser, page)
    assert seen["broken"] == ["fig"]
    assert any("boom" in e for e in seen["errors"])


def test_html_in_folder_class_and_run_names_runs_no_script_in_the_browser(browser, tmp_path):
    from conftest import hostile_runs
    from selenium.common.exceptions import NoAlertPresentException

    out = write_report(ReportConfig(runs_dir=hostile_runs(tmp_path), out=tmp_path / "r.html", gradcam_images=0),
                       log=lambda m: None)
    seen = open_page(browser, out)
    assert seen["errors"] == [] and seen["broken"] == []  # an unescaped <img src=x> would be a broken image
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    browser.execute_script("document.querySelectorAll('*').forEach(e => e.dispatchEvent(new MouseEvent('mouseover')))")
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
