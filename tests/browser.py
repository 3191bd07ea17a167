"""Headless Chromium for the browser tests: Debian's `chromium` and `chromium-driver` packages (`make setup` installs
them where apt and root are there; .ci/run makes sure of it), driven through Selenium.

`chrome` is one browser for the test session (tests/conftest.py imports both fixtures, so every test module gets
them and Chromium starts once); `browser` hands it to a test with its cookies and console log cleared
and saves a screenshot named after the test under test-artifacts/ when the test ends (passed or not), so a run
leaves a picture of each page the tests looked at. Tests fail on any SEVERE console entry (`console_errors`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
# Debian's paths; another Linux may name the browser chromium-browser.
CHROMIUM_NAMES = ("chromium", "chromium-browser")
WINDOW = (1280, 900)
# Waits for something the page or the training does on its own (a render, an update, a step, an image decode).
# Generous: on two busy CPU cores a trainer has taken over a minute from start to its first step.
WAIT_S = 120


def chromium_paths() -> tuple[str, str]:
    """(browser, driver) executables, or a skip that says what to install."""
    browser = next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "headless Chromium is missing (chromium and chromedriver): `make setup` installs Debian's chromium and "
            "chromium-driver packages as root, or run `apt-get install chromium chromium-driver`"
        )
    return browser, driver


def start_chrome(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium: pip install -e .[test]")
    from selenium.webdriver.chrome.service import Service

    browser, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.add_argument("--headless=new")
    if os.geteuid() == 0:  # Chromium refuses to run as root inside its sandbox (CI runs as root)
        options.add_argument("--no-sandbox")
    # Containers give /dev/shm 64 MB, which a renderer can exhaust; /tmp instead.
    options.add_argument("--disable-dev-shm-usage")
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would otherwise look for (and try to download) a driver.
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="session")
def chrome(tmp_path_factory):
    """One headless Chromium for the session, on a fresh profile."""
    driver = start_chrome(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture
def browser(chrome, request):
    """The session's Chromium, clean for this test: no cookies, an empty console log; a screenshot of where the test
    left it in test-artifacts/<test name>.png afterwards."""
    # Every site's cookies: delete_all_cookies() only clears those of the page a previous test left open.
    chrome.execute_cdp_cmd("Network.clearBrowserCookies", {})
    chrome.get_log("browser")  # reading the log empties it: what a test sees is its own
    yield chrome
    screenshot(chrome, request.node.name)


def screenshot(driver, name: str) -> Path:
    """Save what the browser shows as test-artifacts/<name>.png (characters a file name should not carry replaced)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / (re.sub(r"[^\w.-]+", "_", name) + ".png")
    driver.save_screenshot(str(path))
    return path


def console_errors(driver) -> list[str]:
    """The SEVERE entries of the console since the last call (a failed load, an uncaught error, console.error)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver, condition: Callable, message: str, timeout: float = WAIT_S):
    """WebDriverWait(driver, timeout).until(condition): the condition's first truthy value, or a failure that says
    what did not happen (and the console's errors, the usual reason)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"{message} within {timeout} s; console errors: {console_errors(driver)}")


def present(selector: str) -> Callable:
    """A wait condition: the elements `selector` matches, once there is one."""
    return lambda driver: driver.find_elements("css selector", selector)


def replaced(element) -> Callable:
    """A wait condition: `element` is gone from the page, its document replaced by a navigation. Asked about a node in
    the middle of that navigation, chromedriver may answer "Node with given id does not belong to the document" (a
    plain WebDriverException, not Selenium's stale element): the same answer, the node is gone."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    def gone(_driver) -> bool:
        try:
            element.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as error:
            if "does not belong to the document" not in str(error):
                raise
            return True
        return False

    return gone


def text_of(driver, selector: str) -> str | None:
    """The trimmed text of the first element `selector` matches (None without one), read in one script: no stale
    element while the page re-renders."""
    return driver.execute_script("return document.querySelector(arguments[0])?.textContent.trim() ?? null", selector)


def image_counts(driver, selector: str) -> dict[str, int]:
    """Of the `selector` images: how many there are, how many are decoded (complete, natural width > 0) and how many
    are broken (complete with no width: a failed load or undecodable data). One script: the page may re-render
    between two calls."""
    return driver.execute_script(
        "const images = [...document.querySelectorAll(arguments[0])];"
        "const done = images.filter((image) => image.complete);"
        "return {total: images.length, decoded: done.filter((image) => image.naturalWidth > 0).length,"
        "        broken: done.filter((image) => image.naturalWidth === 0).length};",
        selector,
    )
