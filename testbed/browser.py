"""A real headless Chromium for the dashboard's tests and the benchmark (Selenium + chromedriver).

Both come from Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them
before the tests; ``ensure_browser`` installs them elsewhere when it can). Selenium is given
chromedriver's path, so Selenium Manager never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from narwhal.cli.engine import ensure_apt_packages

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox",  # root needs --no-sandbox
         "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--metrics-recording-only", "--mute-audio")


def ensure_browser() -> tuple[str, str]:
    """Chromium and chromedriver from Debian; installed when missing (apt-get, as root)."""
    ensure_apt_packages({CHROMIUM: "chromium", CHROMEDRIVER: "chromium-driver"})
    return CHROMIUM, CHROMEDRIVER


def start_browser(width: int = 1280, height: int = 900) -> Any:
    """A Selenium WebDriver on headless Chromium that records the console (``get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ensure_browser()
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium Manager stays quiet and offline
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={width},{height}",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='narwhal-chromium-')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    return webdriver.Chrome(service=service, options=options)
