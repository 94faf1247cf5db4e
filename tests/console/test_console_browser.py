"""The review console in a real headless browser (Debian's chromium and chromium-driver,
driven by selenium) against a real `lethe serve` with its embedded executor: sign in with a
key (never in a URL, no cookie), the request list, a held request's evidence drawn as
pictures (per-record scores against the member and unseen distributions, the calibration
trajectory, per-class accuracy), a read key refused at promote, an admin promoting it, the
audit chain status and the receipt. Screenshots of each page are kept in
tests/console/artifacts/; LETHE_UPDATE_SCREENSHOTS=1 also refreshes the README's
docs/console-request.png."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.families import family, request_rows
from service.devtools.localserver import LocalService

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
README_SHOT = Path(__file__).resolve().parents[2] / "docs" / "console-request.png"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None,
        reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
        "chromium-driver; .ci/run does)",
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    home = tmp_path_factory.mktemp("console-home")
    service = LocalService(home, env={"OMP_NUM_THREADS": "1", "LETHE_EMBEDDED_POLL_SECONDS": "0.2"})
    service.start()
    try:
        admin, reader = (
            service.create_key("admin", "console-admin"),
            service.create_key("read", "console-read"),
        )
        fam = family("digits-mlp")
        http = httpx.Client(
            base_url=service.url, headers={"Authorization": f"Bearer {admin}"}, timeout=60
        )
        ids = {}
        for name, role, body in (
            ("train", "train", fam.npz(None)),
            ("eval", "eval", fam.npz(None, "eval")),
        ):
            resp = http.post(
                "/v1/datasets",
                data={"name": name, "kind": "tensor", "role": role},
                files={"file": (f"{name}.npz", body)},
            )
            assert resp.status_code == 201, resp.text
            ids[name] = resp.json()["id"]
        spec = {
            "name": "digits-mlp",
            "architecture": "mlp",
            "arch_kwargs": fam.arch_kwargs,
            "eval_dataset": ids["eval"],
        }
        resp = http.post(
            "/v1/models",
            data={"spec": json.dumps(spec)},
            files={"weights": fam.trained().weights["model"]},
        )
        assert resp.status_code == 201, resp.text
        requests = {}
        for kind in ("class", "random3"):
            rows, _ = request_rows(fam, kind)
            keys = [fam.ids[i] for i in rows]
            body = {
                "model": "digits-mlp",
                "dataset": ids["train"],
                "record_keys": keys,
                "subject_ref": f"console-{kind}",
            }
            rid = http.post("/v1/deletion-requests", json=body).json()["id"]
            deadline = time.monotonic() + 300
            while (state := http.get(f"/v1/deletion-requests/{rid}").json())["status"] in (
                "queued",
                "running",
            ):
                assert time.monotonic() < deadline
                time.sleep(0.3)
            requests[kind] = state
        yield {
            "url": service.url,
            "admin": admin,
            "reader": reader,
            "requests": requests,
            "fam": fam,
        }
    finally:
        service.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1200,1600",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, predicate, timeout: float = 30.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: predicate(d))


def _shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _sign_in(driver, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url + "/console")
    driver.execute_script("sessionStorage.clear()")
    driver.get(url + "/console#/requests")
    field = _wait(
        driver,
        lambda d: (
            d.find_element(By.ID, "api-key").is_displayed() and d.find_element(By.ID, "api-key")
        ),
    )
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "a.request-link"))
    assert key not in driver.current_url and driver.get_cookies() == []


def test_a_reviewer_sees_why_a_request_is_held_and_decides(served: dict, browser) -> None:
    from selenium.webdriver.common.by import By

    url, held = served["url"], served["requests"]["random3"]
    completed = served["requests"]["class"]
    assert held["status"] == "needs_review" and completed["status"] == "completed"

    # A wrong key is refused on the sign-in form itself.
    browser.get(url + "/console")
    browser.execute_script("sessionStorage.clear()")
    browser.get(url + "/console#/requests")
    _wait(browser, lambda d: d.find_element(By.ID, "api-key").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys("lethe_wrong")
    browser.find_element(By.CSS_SELECTOR, "#sign-in-form button").click()
    _wait(browser, lambda d: "401" in d.find_element(By.ID, "sign-in-error").text)
    _shot(browser, "sign-in-refused")

    # A read key: the list, the evidence, and a promote that the API refuses.
    _sign_in(browser, url, served["reader"])
    rows = browser.find_elements(By.CSS_SELECTOR, "a.request-link")
    assert len(rows) == 2
    _shot(browser, "requests")
    browser.get(url + f"/console#/requests/{held['id']}")
    summary = _wait(browser, lambda d: d.find_elements(By.ID, "evidence-summary"))[0]
    evidence = held["evidence"]
    assert summary.text.startswith(evidence["outcome"]) and f"n = {evidence['n']}" in summary.text
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.evidence-chart rect.z-bar")
    assert sum(int(b.get_attribute("data-count")) for b in bars) == evidence["n"]
    assert browser.find_elements(By.CSS_SELECTOR, "polyline.curve-unseen")
    assert browser.find_elements(By.CSS_SELECTOR, "polyline.curve-member")
    steps = len(held["job"]["metrics"]["influence"]["calibration"]["trajectory"])
    assert (
        len(browser.find_elements(By.CSS_SELECTOR, "svg.trajectory-z circle.traj-point")) == steps
    )
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.per-class-chart rect.pc-bar")) == 20
    policy = browser.find_element(By.ID, "policy-decision").text
    assert "candidate" in policy and held["policy"]["reason"] in policy
    assert "intact" in browser.find_element(By.ID, "audit-status").text
    shot = _shot(browser, "request-held")
    if os.environ.get("LETHE_UPDATE_SCREENSHOTS") == "1":  # refresh the README's picture
        README_SHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, README_SHOT)
    browser.find_element(By.ID, "promote-button").click()
    note = _wait(browser, lambda d: d.find_element(By.ID, "review-note").text)
    assert "403" in note
    assert browser.find_element(By.ID, "request-status").text == "needs_review"

    # An admin promotes it: completed, receipted (approximate), the audit still intact.
    browser.find_element(By.ID, "sign-out").click()
    _sign_in(browser, url, served["admin"])
    browser.get(url + f"/console#/requests/{held['id']}")
    _wait(browser, lambda d: d.find_elements(By.ID, "promote-button"))[0].click()
    _wait(browser, lambda d: d.find_element(By.ID, "request-status").text == "completed")
    kind = _wait(browser, lambda d: d.find_elements(By.ID, "receipt-kind"), timeout=60)[0]
    assert kind.text == "approximate"
    assert "intact" in browser.find_element(By.ID, "audit-status").text
    _shot(browser, "request-promoted")

    # The class-wise request, released by the policy, and the other lists.
    browser.get(url + f"/console#/requests/{completed['id']}")
    _wait(browser, lambda d: d.find_elements(By.ID, "receipt-kind"), timeout=60)
    _shot(browser, "request-completed")
    for page, probe in (("jobs", "table"), ("models", "table"), ("audit", "#audit-status")):
        browser.get(url + f"/console#/{page}")
        _wait(
            browser,
            lambda d, p=page: d.find_element(By.ID, "view").get_attribute("data-ready") == f"/{p}",
        )
        assert browser.find_elements(By.CSS_SELECTOR, f"#view {probe}")
        _shot(browser, page)
    browser.get(url + "/console#/models")
    _wait(browser, lambda d: "digits-mlp" in d.find_element(By.ID, "view").text)
    assert "none" not in browser.find_element(By.ID, "view").text  # it has an eval dataset
    assert (
        httpx.get(url + "/console")
        .headers["content-security-policy"]
        .startswith("default-src 'none'")
    )
