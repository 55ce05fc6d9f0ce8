"""The web page in a real browser: headless Debian chromium driven by selenium against the
real server; the results are saved as test-artifacts/browser-*.png for a human to look at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from helpers.browser import ARTIFACTS, requires_chromium
from helpers.serve import (
    CLASSES,
    running_service,
    save_champion,
    save_png,
    skin_like_photos,
    write_serve_params,
)

WAIT_S = 60

pytestmark = [pytest.mark.browser, requires_chromium]


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    save_champion(guard_photos=skin_like_photos(24))
    root = tmp_path_factory.mktemp("browser")
    params = write_serve_params(root / "params.yaml", f"serve.upload_dir={root / 'uploads'}")
    with running_service(params, root / "server.log") as url:
        yield f"{url}/"


def a_photo(tmp_path: Path) -> Path:
    """A photo like the test champion's 'training photos' (its guard's reference)."""
    return save_png(tmp_path / "photo.png", skin_like_photos(24)[0])


def wait_for_result(browser: object, path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.find_element(By.ID, "file").send_keys(str(path))
    WebDriverWait(browser, WAIT_S).until(ready.visibility_of_element_located((By.ID, "result")))


def test_upload_shows_label_probability_heatmap_and_the_disclaimer(
    browser, page_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    assert browser.current_url.endswith("/ui/")
    assert "not a diagnosis" in browser.find_element(By.CLASS_NAME, "notice").text
    wait_for_result(browser, a_photo(tmp_path))
    label = browser.find_element(By.ID, "label").text
    assert label in CLASSES
    assert not browser.find_element(By.ID, "ood").is_displayed()
    # the label in plain words: what the threshold does, so 30% flagged is no contradiction
    explanation = browser.find_element(By.ID, "explanation").text
    flagged = "Flagged for a clinician" if label == CLASSES[0] else "Not flagged"
    assert explanation.startswith(flagged)
    assert "screening threshold of 50%" in explanation
    assert "caught 95% of Monkeypox cases, at the cost of false alarms on 40%" in explanation
    # the page shows the API's answer for the same file: its label and every probability
    photo = a_photo(tmp_path)
    answer = requests.post(
        f"{page_url}explain", files={"image": (photo.name, photo.read_bytes(), "image/png")},
        timeout=WAIT_S,
    ).json()  # fmt: skip
    assert label == answer["label"]
    meters = browser.find_elements(By.CSS_SELECTOR, "[role=meter]")
    shown = {
        m.get_attribute("aria-label").removeprefix("Probability of "): float(
            m.get_attribute("aria-valuenow")
        )
        for m in meters
    }
    assert shown == pytest.approx(answer["probabilities"], abs=6e-4)  # shown to 3 decimals
    heatmap = browser.find_element(By.ID, "heatmap")
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    assert browser.execute_script("return arguments[0].naturalWidth", heatmap) > 0
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "browser-result.png"))


def test_a_photo_unlike_the_training_photos_gets_no_label(
    browser, page_url: str, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    blue = save_png(tmp_path / "blue.png", np.tile(np.array([30.0, 60.0, 220.0]), (64, 64, 1)))
    browser.get(page_url)
    wait_for_result(browser, blue)
    ood = browser.find_element(By.ID, "ood")
    assert ood.is_displayed()
    assert "does not look like a skin photo like those the model was trained on" in ood.text
    assert browser.find_element(By.ID, "label").text not in CLASSES
    assert not browser.find_element(By.ID, "bars").is_displayed()
    # scores and a heatmap of such an image mean nothing: neither is shown
    assert not browser.find_element(By.ID, "explanation").is_displayed()
    assert not browser.find_element(By.ID, "heatmap").is_displayed()
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "browser-out-of-distribution.png"))


def test_the_model_card_is_linked_from_the_page(browser, page_url: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(page_url)
    browser.find_element(By.ID, "model-card-link").click()
    WebDriverWait(browser, WAIT_S).until(ready.url_contains("/model-card"))
    assert browser.find_element(By.TAG_NAME, "h1").text.startswith("Model card: pox-classifier v1")
    text = browser.find_element(By.TAG_NAME, "body").text
    for words in ("Intended use", "Not a diagnosis", "Operating threshold",
                  "Out-of-distribution rule", "Known limits"):  # fmt: skip
        assert words in text
    assert "caught 95% of Monkeypox cases" in text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "browser-model-card.png"))


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
