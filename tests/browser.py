"""Headless Chromium (Debian's chromium and chromedriver: `make browser`) for tests that look at a web UI as a person
does: a page is loaded and the test waits until the single-page app has rendered what it expects."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         # Wide enough for the Prefect UI's run list to show each run's name (at the default 800 px it does not)
         "--window-size=1400,1000")


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A headless Chromium driven by selenium, its profile in `profile`; skips the test where it is not installed."""
    binary, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (binary and driver_bin):
        pytest.skip("Debian's chromium + chromium-driver are not installed (make test installs them as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_bin))
    try:
        yield driver
    finally:
        driver.quit()


def shown_text(driver: Any, url: str, expected: list[str], timeout: float = 60) -> str:
    """Load `url` and return the page's visible text once every string of `expected` is in it; fail with the text
    after `timeout` seconds."""
    driver.get(url)
    return text_once_shown(driver, expected, timeout)


def text_once_shown(driver: Any, expected: list[str], timeout: float = 60) -> str:
    """The visible text of the page the browser is on (not loaded again) once every string of `expected` is in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = driver.execute_script("return document.body ? document.body.innerText : ''")
        if all(word in text for word in expected):
            return text
        missing = [word for word in expected if word not in text]
        assert time.monotonic() < deadline, f"{driver.current_url} shows no {missing}:\n{text[-3000:]}"
        time.sleep(0.5)


def requested_hosts(driver: Any) -> set[str]:
    """The hosts of every http(s) and ws(s) request the pages loaded so far made."""
    messages = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in messages if m["method"] == "Network.requestWillBeSent"}
    return {urlparse(url).hostname for url in urls if urlparse(url).scheme in ("http", "https", "ws", "wss")}
