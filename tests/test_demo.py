"""`instructloop demo`, the embedded default: no PostgreSQL, no Redis, the whole loop's processes.

Starts the real command on SQLite and the filesystem broker, logs in as the
demo labeler and the demo admin in Chromium, waits for the demo batch to be
sampled by the real Celery worker, and checks that SIGTERM leaves no process
behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, wait_for_http, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # the demo starts three processes


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("demo-data")
    port = free_port()
    env = dict(
        os.environ,
        INSTRUCTLOOP_DATA_DIR=str(data_dir),
        INSTRUCTLOOP_DATABASE_URL="",
        INSTRUCTLOOP_BROKER_URL="",
        INSTRUCTLOOP_ENVIRONMENT="demo",
    )
    # The demo process keeps its own copy of the log file's descriptor; ours is closed once it has started.
    with open(data_dir / "demo.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "demo", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", timeout=90, proc=proc)
    except Exception as err:
        proc.kill()
        raise AssertionError((data_dir / "demo.log").read_text()[-3000:]) from err
    credentials = json.loads((data_dir / "demo-credentials.json").read_text())
    yield {"url": url, "proc": proc, "credentials": credentials, "data_dir": data_dir}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def _login(page, url: str, cred: dict) -> None:
    page.goto(url + "/login")
    page.fill("input[name=username]", cred["username"])
    page.fill("input[name=password]", cred["password"])
    page.click("button[type=submit]")


def test_demo_uses_sqlite_and_prints_credentials(demo):
    assert (demo["data_dir"] / "instructloop.sqlite3").exists()
    output = (demo["data_dir"] / "demo.log").read_text()
    assert demo["credentials"]["labeler"]["password"] in output
    assert "InstructLoop demo running at" in output


@pytest.mark.browser
def test_demo_labeler_and_admin_see_their_home_pages(demo, page):
    _login(page, demo["url"], demo["credentials"]["labeler"])
    page.wait_for_selector("[data-testid=labeler-home]")
    assert "demo-labeler" in page.inner_text("[data-testid=whoami]")
    page.context.clear_cookies()
    _login(page, demo["url"], demo["credentials"]["admin"])
    page.wait_for_selector("[data-testid=admin-home]")
    assert "demo-admin" in page.inner_text("[data-testid=whoami]")


@pytest.mark.browser
def test_demo_batch_is_sampled_by_the_real_worker(demo, page):
    """The sampling task goes through Celery on the filesystem broker and opens ranking tasks."""
    _login(page, demo["url"], demo["credentials"]["labeler"])

    def rankings_available() -> int:
        page.goto(demo["url"] + "/label")
        return int(page.inner_text("[data-testid=avail-ranking]"))

    assert wait_until(rankings_available, timeout=180, interval=2, message="the demo batch to be sampled") == 24


def test_sigterm_stops_every_demo_process(demo):
    proc = demo["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)  # anything left in the demo's process group?
        except ProcessLookupError:
            return
        time.sleep(0.5)
    pytest.fail("processes of the demo were still running 20 s after it exited")
