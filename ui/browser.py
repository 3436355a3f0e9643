"""A headless Chromium driven by Selenium, for the page's tests and its screenshots.

Debian's `chromium` and `chromium-driver` packages (`make browser` installs them): the driver is
given by path, so Selenium Manager never looks for one on the network.  Each browser gets a fresh
profile directory, removed when it quits.
"""
from __future__ import annotations

import base64
import io
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# No sandbox: CI runs the tests as root, where Chromium's sandbox refuses to start.  No GPU, QUIC,
# background networking, component updates or sync: nothing leaves the machine, nothing slows the start.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--force-device-scale-factor=1")
WINDOW_SIZE = (1280, 1000)
ANSWER_TIMEOUT_S = 600.0


class BrowserMissing(RuntimeError):
    pass


def missing_browser() -> Optional[str]:
    """Why the browser cannot start here (None: it can)."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        return f"{' and '.join(missing)} missing: run `make browser` (apt-get install chromium chromium-driver, as root)"
    return None


class HeadlessChromium:
    """`with HeadlessChromium() as browser: browser.driver.get(url)`."""

    def __init__(self, window_size=WINDOW_SIZE):
        reason = missing_browser()
        if reason is not None:
            raise BrowserMissing(reason)
        self.profile = Path(tempfile.mkdtemp(prefix="evfsam-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={window_size[0]},{window_size[1]}")
        try:
            self.driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def image_pixels(self, element: Any) -> np.ndarray:
        """The RGB pixels of a loaded <img> as the browser decoded them (drawn at its natural size on a
        canvas and read back losslessly as PNG)."""
        data_url = self.driver.execute_script(
            "const img = arguments[0];"
            "const canvas = document.createElement('canvas');"
            "canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;"
            "canvas.getContext('2d').drawImage(img, 0, 0);"
            "return canvas.toDataURL('image/png');", element)
        encoded = data_url.split(",", 1)[1]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))

    def full_page_screenshot(self, path: Path) -> None:
        """The whole page, however tall, as PNG (the viewport is stretched to the page's height)."""
        width, height = self.driver.execute_script(
            "return [document.documentElement.clientWidth, document.documentElement.scrollHeight]")
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "HeadlessChromium":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.quit()


# ----------------------------------------------------------------------------------------------------
# Driving the page (ui/static): what a person does, by element id.

def submit(browser: HeadlessChromium, prompts: Sequence[str], sample: Optional[str] = None,
           upload: Optional[Path] = None, protocol: Optional[str] = None, reuse_key: bool = False,
           timeout: float = ANSWER_TIMEOUT_S) -> None:
    """Fill the form (a shipped `sample` or an `upload`, the prompts one per line, the protocol) and
    submit it; returns once the page shows the answer (a result or an error)."""
    driver = browser.driver
    if sample is not None:
        Select(driver.find_element(By.ID, "sample")).select_by_value(sample)
    if upload is not None:
        driver.find_element(By.ID, "image").send_keys(str(upload))
    if protocol is not None:
        driver.find_element(By.ID, f"protocol-{protocol}").click()
    reuse = driver.find_element(By.ID, "reuse-key")
    if reuse.is_selected() != reuse_key:
        reuse.click()
    text = driver.find_element(By.ID, "prompts")
    text.clear()
    if prompts:
        text.send_keys("\n".join(prompts))
    answered = answers(browser)
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, timeout).until(lambda _: answers(browser) > answered)


def answers(browser: HeadlessChromium) -> int:
    return int(browser.driver.find_element(By.TAG_NAME, "body").get_attribute("data-answers") or 0)


def open_page(browser: HeadlessChromium, url: str, timeout: float = 30.0) -> None:
    """Load the page and wait until it shows the served model (or why it cannot)."""
    browser.driver.get(url)
    WebDriverWait(browser.driver, timeout).until(
        lambda d: d.find_element(By.ID, "model-family").text not in ("", "…")
        or d.find_element(By.ID, "model-error").is_displayed())
