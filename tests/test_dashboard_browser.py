"""The web dashboard in headless Chromium against a real `lora-mcp http` while a job trains (issue 16, item 1).

The training is the session's (`live`, tests/conftest.py): builtin:tiny-sd15 at 64 px for far more steps than the
tests watch, sampling every 10 steps so the sample grid fills while the page is open; the main test makes sure it
runs (resuming it through the dashboard if an earlier module stopped it) and stops it from the page.
The browser logs in through the form with the token, as a person does; the job is checked through the
bearer-token API (POST /mcp/tool), which the dashboard's cookie never opens.
"""

from __future__ import annotations

from browser import (
    WAIT_S,
    console_errors,
    image_counts,
    present,
    replaced,
    screenshot,
    text_of,
    wait_for,
)
from conftest import ENDED
from http_server import call_tool
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions

# Chromium logs the login page's own 401 (how every dashboard route answers without a session) as a failed load.
LOGIN_PAGE_401 = "the server responded with a status of 401"


def submit_token(driver, server, token: str) -> None:
    """Open the dashboard, which answers the login form, send `token` through it and wait for the answer (the form
    sent goes stale)."""
    driver.get(f"{server.url}/")
    (form,) = wait_for(driver, present("form#login"), "no login form")
    form.find_element(By.CSS_SELECTOR, "input[name=token]").send_keys(token)
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, replaced(form), "the login form was not answered")


def errors_but_the_login_pages(driver) -> list[str]:
    return [error for error in console_errors(driver) if LOGIN_PAGE_401 not in error]


def log_in(driver, server) -> None:
    """Log in with the right token and land on the jobs page."""
    submit_token(driver, server, server.token)
    wait_for(driver, present("table#jobs"), "the jobs page did not show")
    assert errors_but_the_login_pages(driver) == []


def test_a_wrong_token_shows_the_login_again_and_reveals_nothing(browser, live):
    server, job_id = live.server, live.job_id
    submit_token(browser, server, "not-the-token")
    login = wait_for(browser, present("form#login"), "no login form after a bad token")
    assert login[0].find_element(By.CSS_SELECTOR, "input[name=token]").get_attribute("type") == "password"
    assert browser.find_element(By.CSS_SELECTOR, "#login-error").text.strip()  # says the token was wrong
    assert not browser.find_elements(By.CSS_SELECTOR, "table#jobs, #job")
    assert job_id not in browser.page_source and live.config_name not in browser.page_source
    assert "lora_mcp_session" not in {cookie["name"] for cookie in browser.get_cookies()}
    # A job's own address shows the login too, and nothing of the job.
    browser.get(f"{server.url}/dashboard/jobs/{job_id}")
    wait_for(browser, present("form#login"), "no login form on a job page without a session")
    assert live.config_name not in browser.page_source and not browser.find_elements(By.CSS_SELECTOR, "#job")
    assert errors_but_the_login_pages(browser) == []


def loss_points(driver) -> int:
    """data-points of the job page's loss chart (raw loss points drawn), 0 before the chart is there."""
    value = driver.execute_script("return document.querySelector('svg#loss-chart')?.getAttribute('data-points')")
    return int(value or 0)


def job_state(driver) -> str | None:
    return driver.execute_script("return document.querySelector('#job')?.getAttribute('data-state')")


def test_the_dashboard_follows_the_training_live_and_stops_it(browser, live):
    live.running()
    server, job_id = live.server, live.job_id
    log_in(browser, server)
    row_selector = f"table#jobs tr[data-job-id='{job_id}']"
    (row,) = wait_for(browser, present(row_selector), "the job is not listed")
    assert row.find_element(By.CSS_SELECTOR, "td.state").text.strip() in ("queued", "running")
    assert row.find_element(By.CSS_SELECTOR, "button.stop").is_displayed()  # a live job can be stopped from the list
    row.find_element(By.CSS_SELECTOR, f"a[href$='/dashboard/jobs/{job_id}']").click()

    wait_for(browser, present(f"#job[data-job-id='{job_id}'][data-rendered]"), "no job drawn")
    assert browser.find_element(By.CSS_SELECTOR, "body").get_attribute("data-job-id") == job_id
    wait_for(browser, lambda d: text_of(d, "#live") == "live", "the event stream is not live")
    first = wait_for(browser, loss_points, "the loss chart drew no point")
    # The page follows the job over the event stream, without a reload (which would drop this mark).
    browser.execute_script("window.sameDocument = true")
    wait_for(browser, lambda d: loss_points(d) > first, f"the loss chart stayed at {first} points")
    assert browser.execute_script("return window.sameDocument") is True
    for chart in ("svg#lr-chart", "svg#grad-chart"):
        assert browser.find_elements(By.CSS_SELECTOR, chart), f"no {chart}"

    browser.execute_script("document.querySelector('#samples')?.scrollIntoView()")
    wait_for(browser, lambda d: image_counts(d, "#samples img.sample")["decoded"], "no sample image decoded")
    assert image_counts(browser, "#samples img.sample")["broken"] == 0
    assert browser.find_elements(By.CSS_SELECTOR, "#samples .control")  # the control prompt's column is marked
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "dashboard-job-running")
    browser.find_element(By.CSS_SELECTOR, "#samples img.sample").click()
    wait_for(browser, expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#lightbox")), "no lightbox")
    assert console_errors(browser) == []

    browser.find_element(By.CSS_SELECTOR, "#lightbox").click()  # a click closes it
    wait_for(browser, expected_conditions.invisibility_of_element_located((By.CSS_SELECTOR, "#lightbox")), "it stayed")
    stop = wait_for(browser, expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button#stop")), "no stop")
    stop.click()
    wait_for(browser, lambda d: job_state(d) in ENDED, "the job page did not show the job ending", timeout=WAIT_S * 2)
    assert job_state(browser) == "stopped"
    assert text_of(browser, "#state") == "stopped"
    assert call_tool(server, "get-training-status", job_id=job_id)["state"] == "stopped"

    browser.get(f"{server.url}/")
    listed = f"{row_selector} td.state"
    wait_for(browser, lambda d: text_of(d, listed) == "stopped", "the jobs page does not say stopped")
    # Stopped with a checkpoint (a stop saves one): resume is offered, stop no longer.
    buttons = browser.find_elements(By.CSS_SELECTOR, f"{row_selector} button")
    buttons = {button.get_attribute("class") for button in buttons if button.is_displayed()}
    assert "resume" in buttons and "stop" not in buttons, buttons
    assert console_errors(browser) == []


def test_the_datasets_page_shows_thumbnails_with_captions(browser, live):
    server, dataset = live.server, live.dataset
    log_in(browser, server)
    browser.find_element(By.CSS_SELECTOR, "nav a[href='/dashboard/datasets']").click()
    (row,) = wait_for(browser, present(f"table#datasets tr[data-dataset='{dataset}']"), "the dataset is not listed")
    row.find_element(By.CSS_SELECTOR, f"a[href$='/dashboard/datasets/{dataset}']").click()
    wait_for(browser, lambda d: image_counts(d, "#dataset figure.image img.thumb")["decoded"] == 4, "4 thumbnails")
    captions = [element.text for element in browser.find_elements(By.CSS_SELECTOR, "#dataset figcaption.caption")]
    assert len(captions) == 4 and all(live.trigger in caption for caption in captions), captions
    assert browser.find_element(By.CSS_SELECTOR, "#report").text.strip()
    assert console_errors(browser) == []
