"""The page driven in headless Chromium, as a person would use it: for its tests and its latency benchmark.

Uses the system's Chromium and ChromeDriver (Debian: apt-get install chromium chromium-driver) through Selenium;
browser builds downloaded by Selenium or Playwright are not used. Needs selenium (the `dev` extra).
"""
from __future__ import annotations

import base64
import importlib.util
import io
import os
import shutil
import time
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Chromium as root in a container, with no network beyond this machine: no sandbox, no GPU, no background calls
# home (each would be refused by a closed network, many at a time).
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
         "--window-size=1280,1000")


def find_chromium() -> Tuple[Optional[str], Optional[str], str]:
    """(browser path, driver path, why not) — the paths are None when this machine lacks them."""
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver = shutil.which("chromedriver")
    if importlib.util.find_spec("selenium") is None:
        return browser, driver, "selenium is not installed (pip install 'movq-deploy[dev]')"
    if browser is None or driver is None:
        return browser, driver, ("no Chromium and ChromeDriver on this machine "
                                 "(Debian: apt-get install chromium chromium-driver; or run `make test-ui`)")
    return browser, driver, ""


class PageDriver:
    """One headless Chromium on one page, with the moves a person makes on it (elements by their elem_id)."""

    def __init__(self, url: str, download_dir: Optional[str] = None, timeout: float = 60.0):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        browser, driver, why_not = find_chromium()
        if why_not:
            raise RuntimeError(why_not)
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in FLAGS:
            options.add_argument(flag)
        if download_dir is not None:
            options.add_experimental_option("prefs", {"download.default_directory": os.path.abspath(download_dir),
                                                      "download.prompt_for_download": False})
        self.download_dir = download_dir
        self.timeout = timeout
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.get(url)
        self.wait_until(lambda: self.find("#tab-sample") or self.find("button[role=tab]"), "the page to load")

    def close(self) -> None:
        self.driver.quit()

    # -------------------------------------------------------------------------------------------- finding
    def find(self, css: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def one(self, css: str):
        self.wait_until(lambda: self.find(css), f"{css} to appear")
        return self.find(css)[0]

    def wait_until(self, condition, what: str, timeout: Optional[float] = None):
        """Polls condition() until it is truthy; returns its value or raises TimeoutError naming `what`.

        An element that the page re-rendered while condition() read it counts as "not yet".
        """
        from selenium.common.exceptions import StaleElementReferenceException

        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                value = condition()
            except StaleElementReferenceException:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout or self.timeout:.0f} s for {what}")
            time.sleep(0.05)

    def text(self, css: str) -> str:
        return self.one(css).text

    # -------------------------------------------------------------------------------------------- acting
    def open_tab(self, label: str) -> None:
        tab = next((b for b in self.find("button[role=tab]") if b.text.strip() == label), None)
        if tab is None:
            raise LookupError(f"no tab {label!r}")
        tab.click()

    def click(self, elem_id: str) -> None:
        button = self.one(f"#{elem_id}")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", button)
        button.click()

    def set_number(self, elem_id: str, value) -> None:
        """Types a value into a Number or Slider box and leaves it, as a person does (gradio reads it on blur)."""
        from selenium.webdriver.common.keys import Keys

        box = self.one(f"#{elem_id} input[type=number]")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", box)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)
        self.wait_until(lambda: box.get_attribute("value") == str(value), f"#{elem_id} to read {value}")

    def upload(self, elem_id: str, path: str) -> None:
        """Chooses a file in an upload box or button (gradio puts a button's file input just before it)."""
        from selenium.webdriver.common.by import By

        target = self.one(f"#{elem_id}")
        inputs = (target.find_elements(By.CSS_SELECTOR, "input[type=file]")
                  or target.find_elements(By.XPATH, "preceding-sibling::input[@type='file'][1]"))
        if not inputs:
            raise LookupError(f"#{elem_id} has no file input")
        inputs[0].send_keys(os.path.abspath(path))

    def paint(self, canvas_css: str, points: Sequence[Tuple[int, int]]) -> None:
        """One brush stroke through points (pixels from the canvas element's centre): pointer down, moves, up."""
        from selenium.webdriver.common.action_chains import ActionChains

        canvas = self.one(canvas_css)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
        (x, y), rest = points[0], points[1:]
        actions = ActionChains(self.driver).move_to_element_with_offset(canvas, x, y).click_and_hold()
        for next_x, next_y in rest:
            actions = actions.move_by_offset(next_x - x, next_y - y)
            x, y = next_x, next_y
        actions.release().perform()

    # ------------------------------------------------------------------------------------------- reading
    def image_sources(self, css: str) -> List[str]:
        return [img.get_attribute("src") for img in self.find(f"{css} img")]

    def fetch_image(self, url: str) -> np.ndarray:
        """The bytes the browser gets for url (fetched by the page itself), decoded: uint8 [H, W, 3]."""
        encoded = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch(arguments[0]).then(r => r.arrayBuffer()).then(buffer => {"
            "  let text = ''; const bytes = new Uint8Array(buffer);"
            "  for (let i = 0; i < bytes.length; i++) text += String.fromCharCode(bytes[i]);"
            "  done(btoa(text)); }).catch(error => done('error: ' + error));", url)
        if encoded.startswith("error: "):
            raise RuntimeError(f"the browser could not fetch {url}: {encoded[7:]}")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))

    def error_lines(self) -> List[str]:
        """The error messages the page shows now (gradio's toasts), one string each."""
        lines = []
        for toast in self.find(".toast-body"):
            text = [line for line in toast.text.splitlines() if line.strip() not in ("", "Error", "×")]
            lines.extend(text)
        return lines

    def dismiss_errors(self) -> None:
        from selenium.common.exceptions import WebDriverException

        for close in self.find(".toast-close"):
            try:
                close.click()
            except WebDriverException:  # a toast that timed out between find and click
                pass

    def screenshot(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.driver.save_screenshot(path)
