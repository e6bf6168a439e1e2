"""attnkit.viz.to_html: a self-contained page; escaping; and a real headless Chromium run (marker ``browser``)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from attnkit.viz import AttentionView, to_html

INJECTION = "<img src=x onerror=alert(1)>"
TOKENS = ["[CLS]", "the", INJECTION, "猫", "sat", "[SEP]"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _maps() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.softmax(3 * torch.randn(2, 2, 3, 6, 6), -1)  # (layers, B, H, L, S)


def _data_block(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="attnkit-view-data">(.*?)</script>', page, re.S)
    assert m is not None
    return json.loads(m.group(1))


def test_page_is_self_contained_and_escapes_tokens(tmp_path):
    maps = _maps()
    view = to_html(maps, TOKENS, tmp_path / "v.html", layer_names=["enc 0", "enc 1"])
    page = (tmp_path / "v.html").read_text(encoding="utf-8")
    assert view.path == tmp_path / "v.html"
    assert "<img" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<link" not in page and "src=" not in page.replace("src=x", "")
    data = _data_block(page)
    assert data["tokens"][0] == TOKENS and data["layer_names"] == ["enc 0", "enc 1"]
    assert data["heads"] == 3 and data["batch"] == 2
    torch.testing.assert_close(torch.tensor(data["weights"]), maps, atol=5e-5, rtol=0)
    frag = view._repr_html_()
    assert frag.startswith("<style>") and 'class="attnkit-view"' in frag
    assert re.search(r'id="(attnkit-[0-9a-f]{12})"', frag).group(1) != re.search(
        r'id="(attnkit-[0-9a-f]{12})"', view._repr_html_()
    ).group(1)  # a fresh id each time it is shown, so two outputs in one notebook do not collide


def test_inputs_and_errors():
    one_layer = to_html(torch.softmax(torch.randn(4, 5, 3), -1), list("abcde"), key_tokens=["x", "y", "z"])
    assert isinstance(one_layer, AttentionView) and one_layer.data["heads"] == 4
    assert one_layer.data["key_tokens"] == [["x", "y", "z"]]
    with pytest.raises(ValueError, match="key_tokens for the 3 keys"):
        to_html(torch.rand(4, 5, 3), list("abcde"))
    with pytest.raises(ValueError, match="expected 6 tokens"):
        to_html(_maps(), TOKENS[:5])
    with pytest.raises(ValueError, match="one token list per batch item"):
        to_html(_maps(), [TOKENS])
    with pytest.raises(ValueError, match="finite"):
        to_html(torch.full((2, 2), float("nan")), ["a", "b"])


def _chromium():
    webdriver = pytest.importorskip("selenium.webdriver")
    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
    driver = driver or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver).exists()):
        pytest.skip("chromium / chromedriver not installed (Debian: apt-get install chromium chromium-driver)")
    return webdriver, binary, driver


@pytest.mark.browser
def test_viewer_in_headless_chromium(tmp_path):
    webdriver, binary, driver_path = _chromium()
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    page = to_html(_maps(), [TOKENS, ["a", "b", "c", "d", "e", "f"]], tmp_path / "viewer.html").path
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,800",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        browser.get(page.as_uri())
        root = browser.find_element(By.ID, "attnkit-view")
        assert root.get_attribute("data-ready") == "1"

        def opacities():
            return browser.execute_script(
                "return Array.from(document.querySelectorAll('svg[data-view=lines] line'))"
                ".map(l => l.getAttribute('data-q') + ',' + l.getAttribute('data-k') + ',' +"
                " l.getAttribute('stroke-opacity'));"
            )

        def cells():
            return browser.execute_script(
                "return Array.from(document.querySelectorAll('svg[data-view=heatmap] rect'))"
                ".map(r => r.getAttribute('data-w'));"
            )

        head0, cells0 = opacities(), cells()
        assert head0 and len(cells0) == 36
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-role=head]")).select_by_value("1")
        head1, cells1 = opacities(), cells()
        assert browser.find_element(By.CSS_SELECTOR, "svg[data-view=lines]").get_attribute("data-head") == "1"
        assert head1 != head0 and cells1 != cells0  # another head draws other lines and cells
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-role=layer]")).select_by_value("1")
        assert cells() != cells1

        # hovering a query token keeps only its lines
        from selenium.webdriver.common.action_chains import ActionChains

        query_texts = browser.find_elements(By.CSS_SELECTOR, "svg[data-view=lines] text.ak-query")
        ActionChains(browser).move_to_element(query_texts[3]).perform()
        visible_q = browser.execute_script(
            "return Array.from(document.querySelectorAll('svg[data-view=lines] line'))"
            ".filter(l => l.getAttribute('visibility') !== 'hidden').map(l => l.getAttribute('data-q'));"
        )
        assert visible_q and set(visible_q) == {"3"}

        # the injection token is text: visible, no <img> element, no alert
        shown = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "svg text")]
        assert INJECTION in shown
        assert browser.find_elements(By.TAG_NAME, "img") == []
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018

        # batch selector switches the token lists
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-role=batch]")).select_by_value("1")
        assert [t.text for t in browser.find_elements(By.CSS_SELECTOR, "svg[data-view=lines] text.ak-query")] == list(
            "abcdef"
        )
        Select(browser.find_element(By.CSS_SELECTOR, "select[data-role=batch]")).select_by_value("0")

        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "viz_viewer.png"))
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
