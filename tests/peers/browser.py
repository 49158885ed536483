"""Debian's chromium, headless, driven by Selenium through /usr/bin/chromedriver: the console's real browser.

A real browser is what enforces what the console relies on (SameSite and
HttpOnly cookies, the Origin header on a form POST), so the console's tests
drive one rather than replaying requests.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from tests.peers import needs

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def available() -> bool:
    return CHROMIUM.exists() and CHROMEDRIVER.exists() and importlib.util.find_spec("selenium") is not None


def required() -> pytest.MarkDecorator:
    return needs(available(), "chromium, chromium-driver (apt-get install chromium chromium-driver) and selenium "
                              "(pip install -e .[test]) needed")


def chromium(scratch: Path, width: int = 1400, height: int = 1000):
    """A headless chromium session (the caller quits it), its temporary files in `scratch`.

    Chromium keeps its singleton socket in a folder of its temporary directory and leaves that folder
    behind when chromedriver stops it, one per session; with TMPDIR in the test's own folder, the
    machine's temporary directory is left as the test found it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    scratch.mkdir(parents=True, exist_ok=True)

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    service = Service(str(CHROMEDRIVER), env={**os.environ, "TMPDIR": str(scratch)})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    return driver
