"""The web page in a real browser: headless Debian chromium driven by selenium against the
real server; the result is saved as test-artifacts/browser-result.png for a human to look at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import MSLD_DIR
from pox_pipeline.config import project_root
from serve_helpers import (
    CLASSES,
    image_bytes,
    msld_samples,
    running_service,
    save_champion,
    write_serve_params,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = project_root() / "test-artifacts"
WAIT_S = 60

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason=f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian: apt-get install chromium "
        "chromium-driver; .ci/run installs them)",
    ),
]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    save_champion()
    root = tmp_path_factory.mktemp("browser")
    params = write_serve_params(root / "params.yaml", f"serve.upload_dir={root / 'uploads'}")
    with running_service(params, root / "server.log") as url:
        yield f"{url}/"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1200,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def a_photo(tmp_path: Path) -> Path:
    """A real MSLD photo when the data set is beside us, else a synthetic one."""
    if MSLD_DIR.is_dir():
        return msld_samples(1)[0]
    path = tmp_path / "photo.png"
    path.write_bytes(image_bytes(size=(224, 224)))
    return path


def test_upload_shows_label_probability_heatmap_and_the_disclaimer(
    browser, page_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url)
    assert browser.current_url.endswith("/ui/")
    assert "not a diagnosis" in browser.find_element(By.CLASS_NAME, "notice").text
    browser.find_element(By.ID, "file").send_keys(str(a_photo(tmp_path)))
    WebDriverWait(browser, WAIT_S).until(ready.visibility_of_element_located((By.ID, "result")))
    assert browser.find_element(By.ID, "label").text in CLASSES
    meters = browser.find_elements(By.CSS_SELECTOR, "[role=meter]")
    assert len(meters) == len(CLASSES)
    total = sum(float(m.get_attribute("aria-valuenow")) for m in meters)
    assert total == pytest.approx(1.0, abs=2e-3)
    heatmap = browser.find_element(By.ID, "heatmap")
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", heatmap) > 0
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "browser-result.png"))


def test_a_file_that_is_not_a_photo_shows_the_reason(
    browser, page_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    browser.get(page_url)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    error = WebDriverWait(browser, WAIT_S).until(
        ready.visibility_of_element_located((By.ID, "error"))
    )
    assert "not an image" in error.text
    assert not browser.find_element(By.ID, "result").is_displayed()
