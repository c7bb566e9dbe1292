"""Fixtures for the web view: a headless Chromium driven by Selenium, Debian's binaries only.

The browser test skips with a reason where Debian's ``chromium`` and ``chromium-driver`` (or the
``selenium`` package) are missing, and fails instead where ``REGSEG_BROWSER_REQUIRED=1`` (.ci/run
sets it after installing them), as the OpenIGTLink interop tests do with REGSEG_IGTL_REQUIRED.
Selenium is pointed at /usr/bin/chromium and /usr/bin/chromedriver, so Selenium Manager never
runs and nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("REGSEG_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("REGSEG_CHROMEDRIVER", "/usr/bin/chromedriver"))
HINT = ("install them with `apt-get install chromium chromium-driver` and `pip install "
        "'selenium<4.52'` (what .ci/run does)")


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"the selenium package is not installed: {HINT}"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: {HINT}"
    return None


def new_browser(width: int = 1000, height: int = 800):
    """A headless Chromium (Debian's binary and driver; no download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
def browsers() -> Iterator[Callable[[], object]]:
    """``browsers()`` opens one more headless Chromium; all are quit afterwards."""
    missing = _missing()
    if missing:
        if os.environ.get("REGSEG_BROWSER_REQUIRED") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    opened = []

    def open_one():
        driver = new_browser()
        opened.append(driver)
        return driver

    yield open_one
    for driver in opened:
        driver.quit()
