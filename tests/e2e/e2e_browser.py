"""What a user looks at, for e2e tests: a `kubectl port-forward` to a Service and the
Prefect UI (the default one a browser is sent to: Prefect's `/v2` UI) in headless
Chromium (Debian's `chromium` and `chromium-driver`, driven by Selenium over WebDriver;
nothing is downloaded). Every wait has a hard timeout, scaled by $E2E_TIMEOUT_SCALE, and
every process started here is ended on the way out.

Screenshots go to tests/.artifacts/ (git-ignored; CI keeps what it likes from there).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_kube import KUBECTL, REPO, Cluster, eventually, scaled

ARTIFACTS = Path(os.environ.get("E2E_ARTIFACTS", REPO / "tests" / ".artifacts"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def port_forward(cluster: Cluster, namespace: str, target: str, local: int, remote: int) -> Iterator[str]:
    """`kubectl port-forward <target> local:remote` on 127.0.0.1 until the block ends;
    yields the base URL once something answers there."""
    cmd = [
        KUBECTL, "--kubeconfig", cluster.kubeconfig, "-n", namespace, "port-forward", "--address", "127.0.0.1",
        target, f"{local}:{remote}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{local}"

    def answers() -> bool:
        assert proc.poll() is None, f"port-forward exited: {proc.stdout.read() if proc.stdout else ''}"
        try:
            with urllib.request.urlopen(f"{url}/api/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    try:
        eventually(answers, timeout=60, interval=1, message=f"port-forward to {target} answers on {url}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def headless_chromium(width: int = 1600, height: int = 1000) -> Iterator[Any]:
    """A Selenium WebDriver for the system's headless Chromium; quit (Chromium and its
    driver ended) on the way out."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(
            f"no Chromium at {CHROMIUM} or chromedriver at {CHROMEDRIVER}: `make e2e` installs them "
            "(apt-get install chromium chromium-driver); or set CHROMIUM and CHROMEDRIVER",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(arg)
    if os.geteuid() == 0:  # Chromium refuses to run its sandbox as root (CI runs as root)
        options.add_argument("--no-sandbox")
    # The driver is given, so Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(scaled(60))
        driver.set_script_timeout(scaled(30))
        yield driver
    finally:
        driver.quit()


def page_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver: Any, *texts: str, timeout: float = 90) -> str:
    """Until the page shows every one of `texts`; returns the page's text."""

    def shown() -> str:
        text = page_text(driver)
        missing = [t for t in texts if t not in text]
        assert not missing, f"not on the page yet: {missing}; page text: {text[:1500]!r}"
        return text

    return eventually(shown, timeout=timeout, interval=1, message=f"page {driver.current_url} shows {list(texts)}")


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"no screenshot saved to {path}"
    return path


PASSWORD = "input[type=password]"


def log_in_to_prefect_ui(driver: Any, url: str, auth: str) -> str:
    """Open the UI at `url` as a user does: it asks for the auth string (`user:password`);
    give it. Returns the base URL of the UI it landed on (e.g. `<url>/v2`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(url + "/")
    wait_for_text(driver, "Login", timeout=60)
    fields = eventually(lambda: driver.find_elements(By.CSS_SELECTOR, PASSWORD), timeout=30, message="a password field")
    fields[0].send_keys(auth, Keys.ENTER)

    def logged_in() -> bool:
        return "/login" not in driver.current_url and not driver.find_elements(By.CSS_SELECTOR, PASSWORD)

    eventually(logged_in, timeout=60, interval=1, message="logged in to the Prefect UI (is the auth string right?)")
    wait_for_text(driver, "Dashboard", timeout=60)
    return driver.current_url.split("/dashboard")[0]


def task_runs_of_flow_run(driver: Any, base: str, flow_run_id: str, *texts: str, timeout: float = 90) -> str:
    """Open a flow run's page, then its Task Runs tab, until it shows every one of `texts`."""
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/runs/flow-run/{flow_run_id}")
    tab = "//*[@role='tab' and normalize-space()='Task Runs']"
    eventually(lambda: driver.find_elements(By.XPATH, tab), timeout=60, message="the Task Runs tab")[0].click()
    return wait_for_text(driver, *texts, timeout=timeout)
