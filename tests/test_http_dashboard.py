"""The web dashboard's HTTP side on a real `lora-mcp http` (server/http/dashboard.py, sessions.py, access.py).

Who gets in: a login with the token sets an HttpOnly, SameSite=Strict cookie; without it every dashboard route
answers the login form or a 401 and nothing of the jobs; the bearer header opens no dashboard route and the
cookie no API route; actions need the page's CSRF token. What it does: the session's long training (`live`,
tests/conftest.py: resumed through the dashboard's action when an earlier test stopped it) reaches the event
stream as `job` events step by step, a stop without the CSRF token is refused and one with it stops the job.
The token's rotation ends the dashboard's sessions too: tests/test_http_access.py checks it on its own server.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import ENDED, LiveTraining
from http_server import call_tool, csrf_token, dashboard_client, events, logged_in

from server.http.access import BAD_TOKEN_LIMIT

LOGIN_REQUIRED = {"error": {"message": "log in at /"}}
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


# --- logging in --------------------------------------------------------------------------------------
def test_the_right_token_sets_an_http_only_strict_cookie(http_server):
    client = dashboard_client(http_server)
    answer = client.post("/dashboard/login", data={"token": http_server.token})
    assert answer.status_code == 303 and answer.headers["location"] == "/"
    cookie = answer.headers["set-cookie"]
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert cookie.startswith("lora_mcp_session=")
    assert {"httponly", "samesite=strict", "path=/"} <= attributes
    assert "secure" not in attributes  # plain HTTP: a Secure cookie would never come back
    assert http_server.token not in cookie

    page = client.get("/")
    assert page.status_code == 200 and 'data-page="jobs"' in page.text and 'name="csrf-token"' in page.text
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "same-origin"
    assert page.headers["cache-control"] == "no-store"
    assert client.get("/dashboard/api/jobs").status_code == 200


def test_a_wrong_token_answers_the_login_again_and_nothing_else(http_server, live):
    client = dashboard_client(http_server, "127.0.0.21")
    answer = client.post("/dashboard/login", data={"token": "a-guess"})
    assert answer.status_code == 401 and 'id="login"' in answer.text and "Wrong token" in answer.text
    assert "set-cookie" not in answer.headers
    assert live.job_id not in answer.text and live.config_name not in answer.text
    followed = client.get("/dashboard/api/jobs")
    assert followed.status_code == 401 and followed.json() == LOGIN_REQUIRED


def test_a_foreign_origin_cannot_log_in(http_server):
    answer = dashboard_client(http_server).post(
        "/dashboard/login", data={"token": http_server.token}, headers={"Origin": "http://evil.example"}
    )
    assert answer.status_code == 403 and "set-cookie" not in answer.headers
    assert "Origin" in answer.json()["error"]["message"]


def test_wrong_logins_count_towards_the_lockout(http_server):
    client = dashboard_client(http_server, "127.0.0.22")
    for _ in range(BAD_TOKEN_LIMIT):
        assert client.post("/dashboard/login", data={"token": "a-guess"}).status_code == 401
    locked = client.post("/dashboard/login", data={"token": http_server.token})  # even the right token
    assert locked.status_code == 429 and 'id="login"' in locked.text and "set-cookie" not in locked.headers
    assert int(locked.headers["retry-after"]) >= 1
    # The same count as the bearer header's: the API refuses that address too.
    assert client.get("/mcp/tools", headers=http_server.headers).status_code == 429


# --- what opens which route ------------------------------------------------------------------------
def dashboard_routes(live: LiveTraining) -> list[tuple[str, str, bool]]:
    """(method, path, is a page) of every dashboard route but the login and the assets."""
    job = live.job_id
    pages = ["/", f"/dashboard/jobs/{job}", "/dashboard/datasets", f"/dashboard/datasets/{live.dataset}"]
    data = [
        ("GET", "/dashboard/api/jobs"), ("GET", f"/dashboard/api/jobs/{job}"), ("GET", "/dashboard/api/datasets"),
        ("GET", f"/dashboard/api/datasets/{live.dataset}"), ("GET", f"/dashboard/files/samples/{job}/step_0.png"),
        ("GET", f"/dashboard/files/thumbnails/{live.dataset}/shape_000.png"), ("GET", "/dashboard/events"),
        ("POST", f"/dashboard/api/jobs/{job}/stop"), ("POST", f"/dashboard/api/jobs/{job}/resume"),
        ("POST", "/dashboard/logout"),
    ]
    return [("GET", path, True) for path in pages] + [(method, path, False) for method, path in data]


@pytest.mark.parametrize("credentials", ["none", "bearer", "forged cookie"])
def test_without_a_valid_cookie_no_dashboard_route_reveals_anything(http_server, live, credentials):
    live.running()  # the stop route below must leave it running
    client = dashboard_client(http_server)
    if credentials == "bearer":  # the API's header is not the dashboard's key
        client.headers["Authorization"] = f"Bearer {http_server.token}"
    elif credentials == "forged cookie":
        client.cookies.set("lora_mcp_session", "someone.99999999999.0123abcd")
    for method, path, page in dashboard_routes(live):
        answer = client.request(method, path)
        assert answer.status_code == 401, (method, path, answer.text)
        assert live.job_id not in answer.text and live.config_name not in answer.text, (method, path)
        if page:
            assert 'id="login"' in answer.text and answer.headers["content-type"].startswith("text/html"), path
        else:
            assert answer.json() == LOGIN_REQUIRED, (method, path)
        assert answer.headers["content-security-policy"] == CSP
    assert call_tool(http_server, "get-training-status", job_id=live.job_id)["state"] not in ENDED


def test_the_cookie_opens_no_api_route(http_server):
    client = logged_in(http_server)
    for method, path in [("GET", "/mcp/tools"), ("POST", "/mcp/tool"), ("GET", "/loras/x.safetensors"),
                         ("POST", "/datasets/x")]:
        answer = client.request(method, path, json={"tool": "list-training-jobs"} if path == "/mcp/tool" else None)
        assert answer.status_code == 401 and "Authorization: Bearer" in answer.json()["error"]["message"], path


def test_assets_are_public_and_only_the_packages_scripts(http_server):
    client = dashboard_client(http_server)
    script = client.get("/dashboard/assets/pages.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "cache-control" not in script.headers and script.headers["x-content-type-options"] == "nosniff"
    for name in ("shell.html", "login.html", "nothing.js"):
        assert client.get(f"/dashboard/assets/{name}").status_code == 404, name
    # Not one plain name (the path is /dashboard/assets/../http/app.py once decoded): not public, so the login form.
    assert client.get("/dashboard/assets/..%2Fhttp%2Fapp.py").status_code == 401


# --- the job through the dashboard -----------------------------------------------------------------
def test_the_event_stream_delivers_the_jobs_steps(http_server, live):
    """A logged-in client's stream tells of each step the running job makes, with the job's row."""
    live.running()
    client = logged_in(http_server)
    with client.stream("GET", "/dashboard/events", timeout=httpx.Timeout(30, read=300)) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        at = call_tool(http_server, "get-training-status", job_id=live.job_id)["step"]
        seen = next(
            data for name, data in events(stream)
            if name == "job" and data["job_id"] == live.job_id and (data["step"] > at or data["state"] in ENDED)
        )
    assert seen["state"] == "running" and seen["config_name"] == live.config_name, seen
    assert seen["step"] > at and seen["total_steps"] == 10_000 and seen["devices"], seen
    assert seen["can_stop"] is True and seen["can_resume"] is False


def test_the_json_views_show_the_job(http_server, live):
    client = logged_in(http_server)
    jobs = client.get("/dashboard/api/jobs").json()["jobs"]
    assert live.job_id in [row["job_id"] for row in jobs]
    view = client.get(f"/dashboard/api/jobs/{live.job_id}")
    assert view.status_code == 200 and view.json()["row"]["job_id"] == live.job_id
    unknown = client.get("/dashboard/api/jobs/no-such-job")
    assert unknown.status_code == 404 and "no job 'no-such-job'" in unknown.json()["error"]["message"]
    page = client.get(f"/dashboard/jobs/{live.job_id}")
    assert page.status_code == 200 and 'data-page="job"' in page.text
    assert f'data-job-id="{live.job_id}"' in page.text


def test_the_dataset_view_and_its_thumbnails(http_server, live):
    client = logged_in(http_server)
    images = client.get(f"/dashboard/api/datasets/{live.dataset}").json()["images"]
    assert len(images) == 4 and all(image["caption"].startswith(live.trigger) for image in images), images
    thumbnail = client.get(f"/dashboard/files/thumbnails/{live.dataset}/{images[0]['filename']}")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert thumbnail.content.startswith(b"\xff\xd8\xff")  # a JPEG
    for escape in ("..%2F..%2Fhttp-token", f"..%2F{live.dataset}%2F" + images[0]["filename"]):
        answer = client.get(f"/dashboard/files/thumbnails/{live.dataset}/{escape}")
        assert answer.status_code in (404, 422) and http_server.token not in answer.text, escape
    missing = client.get(f"/dashboard/files/samples/{live.job_id}/nothing.png")
    assert missing.status_code == 404 and "get-training-status lists them" in missing.json()["error"]["message"]


def test_an_action_needs_the_pages_csrf_token(http_server, live):
    live.running()
    client = logged_in(http_server)
    stop = f"/dashboard/api/jobs/{live.job_id}/stop"
    other = logged_in(http_server)  # another session's token is not this one's
    for headers in ({}, {"X-CSRF-Token": "0" * 64}, {"X-CSRF-Token": csrf_token(other)}):
        answer = client.post(stop, headers=headers)
        assert answer.status_code == 403 and "X-CSRF-Token" in answer.json()["error"]["message"], headers
    assert call_tool(http_server, "get-training-status", job_id=live.job_id)["state"] in ("queued", "running")


def test_stop_through_the_action_stops_the_job(http_server, live):
    """The page's stop button: the action answers the job's status, and the stream then tells of the end."""
    live.running()
    client = logged_in(http_server)
    with client.stream("GET", "/dashboard/events", timeout=httpx.Timeout(30, read=180)) as stream:
        stop = f"/dashboard/api/jobs/{live.job_id}/stop"
        answer = client.post(stop, headers={"X-CSRF-Token": csrf_token(client)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["job_id"] == live.job_id
        ended = next(
            data for name, data in events(stream) if name == "job" and data["job_id"] == live.job_id
            and data["state"] in ENDED
        )
    assert ended["state"] == "stopped" and ended["can_stop"] is False, ended
    assert call_tool(http_server, "get-training-status", job_id=live.job_id)["state"] == "stopped"
    again = client.post(f"/dashboard/api/jobs/{live.job_id}/stop", headers={"X-CSRF-Token": csrf_token(client)})
    assert again.status_code == 409 and "nothing to stop" in again.json()["error"]["message"]


def test_resume_through_the_action_runs_the_stopped_job_again(http_server, live):
    """The page's resume button: `running()` posts the action with the CSRF token, asserts its 200 and reads the
    job's return to queued, then running, from the event stream."""
    live.stop()  # as the test above left it
    assert call_tool(http_server, "get-training-status", job_id=live.job_id)["state"] == "stopped"
    live.running()
    assert call_tool(http_server, "get-training-status", job_id=live.job_id)["state"] == "running"


# --- --no-auth ------------------------------------------------------------------------------------
def test_without_auth_the_pages_open_and_actions_still_need_the_csrf_token(open_http_server):
    client = dashboard_client(open_http_server)
    page = client.get("/")
    assert page.status_code == 200 and 'data-page="jobs"' in page.text
    stop = "/dashboard/api/jobs/no-such-job/stop"
    assert client.post(stop).status_code == 403
    unknown = client.post(stop, headers={"X-CSRF-Token": csrf_token(client)})
    assert unknown.status_code == 409 and "no job 'no-such-job'" in unknown.json()["error"]["message"]
