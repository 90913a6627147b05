"""`vsi review`: the page in headless Chromium driven by selenium (mark two images, reviews.csv, resume
excludes them), the server's refusals, and the command line (address printed, loopback bound).

The run is a real tiny run stopped after round 1's filter (leakage check only, so the filter accepts
images a reviewer can then veto).
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
from contextlib import contextmanager
from pathlib import Path

import pytest
from cli_helpers import vsi
from tiny_run import copy_run, make_run

from vision_si.filter import FilterResult
from vision_si.gate import GateDecision
from vision_si.loop import resume
from vision_si.review import make_server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1000")


@pytest.fixture(scope="module")
def filtered_run(tmp_path_factory):
    """A tiny run stopped after round-01/filter: candidates scored, the gate not run yet."""
    run = make_run(tmp_path_factory.mktemp("review"), until="filter", filter={"enabled": []})
    assert len(FilterResult.load(run / "round-01/filter").accepted_ids) >= 3
    return run


@contextmanager
def serving(run_dir: Path, host: str = "127.0.0.1"):
    server = make_server(run_dir, host=host, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    res = conn.getresponse()
    data = res.read()
    conn.close()
    return res.status, data


def post(server, obj, **headers):
    return request(server, "POST", "/api/reviews", json.dumps(obj).encode(),
                   {"Content-Type": "application/json", **headers})


def read_reviews_csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "reviews.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- the page in a browser


@pytest.mark.browser
@pytest.mark.slow
def test_mark_two_images_in_chromium_then_resume_excludes_them(filtered_run, tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) is not installed")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run = copy_run(filtered_run, tmp_path)
    accepted = FilterResult.load(run / "round-01/filter").accepted_ids
    first, second = accepted[0], accepted[-1]

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        with serving(run) as server:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            # the page re-renders a card after each mark, so an element found a moment ago may be
            # replaced before it is read: the wait retries a stale read, and reads go by script at once
            wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "true")
            cards = driver.find_elements(By.CSS_SELECTOR, ".card")
            assert len(cards) == len(FilterResult.load(run / "round-01/filter").rows)
            # every image really decoded: candidates and the real exemplars beside them
            images = driver.find_elements(By.CSS_SELECTOR, ".card img")
            assert any("kind=exemplar" in img.get_attribute("src") for img in images)
            wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                      img) for img in images))

            def card(candidate_id):
                return driver.find_element(By.CSS_SELECTOR, f'.card[data-id="{candidate_id}"]')

            def review_of(candidate_id):
                return driver.execute_script(
                    "const c = document.querySelector(`.card[data-id=\"${arguments[0]}\"]`);"
                    " return c ? c.getAttribute('data-review') : null;", candidate_id)

            def saved(d):
                return "saved reviews.csv" in d.find_element(By.ID, "status").text

            card(first).find_element(By.CSS_SELECTOR, "button.reject").click()  # a single image
            wait.until(saved)
            wait.until(lambda d: review_of(first) == "reject")
            driver.find_element(By.ID, "status").text  # noqa: B018 - settle before the next action
            card(second).find_element(By.CSS_SELECTOR, "input.select").click()  # and one by selection
            toolbar = driver.find_element(By.ID, "reject-selected")
            assert toolbar.text == "Reject selected (1)" and toolbar.is_enabled()
            toolbar.click()
            wait.until(lambda d: review_of(second) == "reject")
            assert "2 rejected in all" in driver.find_element(By.ID, "status").text
            assert {r["id"]: r["verdict"] for r in read_reviews_csv(run)} == {first: "reject", second: "reject"}
            assert review_of(accepted[1]) == "none"
    finally:
        driver.quit()

    resume(run, progress=False, echo=lambda _m: None)
    result = FilterResult.load(run / "round-01/filter")
    rows = {r["id"]: r for r in result.rows}
    for vetoed in (first, second):
        assert rows[vetoed]["decision"] == "rejected" and rows[vetoed]["reason"] == "human_review"
        assert vetoed not in result.accepted_ids
    assert set(result.accepted_ids) == set(accepted) - {first, second}
    assert GateDecision.load(run / "round-01/gate").training["n_candidates"] == len(accepted) - 2
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "stage_redo" and e["stage"] == "round-01/filter" for e in events)

    with serving(run) as server:  # the gate has decided: the round is read-only now
        status, body = post(server, {"ids": [accepted[1]], "verdict": "reject"})
        assert status == 409 and "already passed the gate" in json.loads(body)["error"]
        state = json.loads(request(server, "GET", "/api/state")[1])
        assert state["rounds"][0]["decided"] and not state["rounds"][0]["editable"]


# --------------------------------------------------------------------------- the server without a browser


def test_a_review_written_after_the_filter_is_applied_on_resume(filtered_run, tmp_path):
    run = copy_run(filtered_run, tmp_path)
    accepted = FilterResult.load(run / "round-01/filter").accepted_ids
    with serving(run) as server:  # as the page does it, without a browser
        assert post(server, {"ids": [accepted[0]], "verdict": "reject"})[0] == 200
    messages = []
    resume(run, progress=False, echo=messages.append)
    assert any("1 review(s) in reviews.csv are newer than the filter; filtering again" in m for m in messages)
    result = FilterResult.load(run / "round-01/filter")
    assert accepted[0] not in result.accepted_ids and result.reason_of(accepted[0]) == "human_review"
    assert set(result.accepted_ids) == set(accepted[1:])  # everything else decided as before
    assert not (run / "round-01/filter.tmp").exists()



def test_the_server_refuses_bad_requests(filtered_run, tmp_path):
    run = copy_run(filtered_run, tmp_path)
    some = FilterResult.load(run / "round-01/filter").rows[0]["id"]
    with open(run / "splits.csv", newline="") as fh:
        test_image = next(r["id"] for r in csv.DictReader(fh) if r["split"] == "test")
    (run / "secret.txt").write_text("not for the page")
    with serving(run) as server:
        assert server.server_address[0] == "127.0.0.1"
        status, page = request(server, "GET", "/")
        assert status == 200 and b'<script src="/review.js"' in page
        status, png = request(server, "GET", f"/image?kind=candidate&id={some}")
        assert status == 200 and png.startswith(b"\x89PNG")
        for path in ("/../config.yaml", "/secret.txt", "/review_page/index.html", "/%2e%2e/%2e%2e/etc/passwd",
                     "/image?kind=candidate&id=../../config.yaml", "/image?kind=candidate&id=syn-r09-000000",
                     "/image?kind=exemplar&id=" + urllib.parse.quote(test_image), "/image?kind=file&id=config.yaml"):
            status, body = request(server, "GET", path)
            assert 400 <= status < 500, (path, status)
            assert b"not for the page" not in body and b"seed:" not in body
        assert request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
        assert request(server, "PUT", "/api/reviews", b"{}")[0] == 405
        assert request(server, "DELETE", "/")[0] == 405

        assert post(server, {"ids": ["syn-r01-999999"], "verdict": "reject"})[0] == 404
        assert post(server, {"ids": [some, "../../x"], "verdict": "reject"})[0] == 404  # nothing written at all
        assert post(server, {"ids": [some], "verdict": "accept-all"})[0] == 400
        assert post(server, {"ids": "everything", "verdict": "reject"})[0] == 400
        assert post(server, {"ids": [some], "verdict": "reject"}, Origin="http://evil.example")[0] == 403
        assert request(server, "POST", "/api/reviews", b'{"ids": ["x"]}', {"Content-Type": "text/plain"})[0] == 415
        assert request(server, "POST", "/api/reviews", b"{not json", {"Content-Type": "application/json"})[0] == 400
        assert request(server, "POST", "/api/other", b"{}", {"Content-Type": "application/json"})[0] == 404
        assert not (run / "reviews.csv").exists()

        (run / "lock").write_text(str(os.getpid()))  # a live process is working on the run
        status, body = post(server, {"ids": [some], "verdict": "reject"})
        assert status == 409 and str(os.getpid()) in json.loads(body)["error"]
        (run / "lock").unlink()

        (run / "reviews.csv").write_text("id,verdict\nhand-written,accept\n")  # rows of others are kept
        assert post(server, {"ids": [some], "verdict": "reject"})[0] == 200
        assert read_reviews_csv(run) == [{"id": "hand-written", "verdict": "accept"}, {"id": some, "verdict": "reject"}]
        assert post(server, {"ids": [some], "verdict": None})[0] == 200  # withdrawn
        assert read_reviews_csv(run) == [{"id": "hand-written", "verdict": "accept"}]


def test_vsi_review_prints_the_address_and_binds_loopback(filtered_run, tmp_path):
    run = copy_run(filtered_run, tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "vision_si.cli", "review", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("review page: http://127.0.0.1:"), line + proc.stderr.read()
        url = urllib.parse.urlsplit(line.split()[2])
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        conn.request("GET", "/api/state")
        state = json.loads(conn.getresponse().read())
        assert state["rounds"][0]["round"] == 1 and state["rounds"][0]["editable"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "review server stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_vsi_review_bad_arguments_exit_2(tmp_path, capsys):
    code, err = vsi(capsys, "review", tmp_path)
    assert code == 2 and "not a run directory" in err
    (tmp_path / "config.yaml").write_text("name: x\n")
    code, err = vsi(capsys, "review", tmp_path, "--port", "70000")
    assert code == 2 and "--port 70000" in err


def test_state_groups_candidates_by_class_and_slice_with_scores(filtered_run):
    with serving(filtered_run) as server:
        state = json.loads(request(server, "GET", "/api/state")[1])
    (round1,) = state["rounds"]
    assert round1["filtered"] and not round1["decided"] and round1["gate"] is None
    keys = [(g["class"], g["slice"]) for g in round1["groups"]]
    assert keys == sorted(set(keys))
    for group in round1["groups"]:
        for c in group["candidates"]:
            assert c["decision"] in ("accepted", "rejected") and c["exemplars"]
            assert "memorisation_cosine" in c["scores"] and "id" not in c["scores"]
    n = sum(len(g["candidates"]) for g in round1["groups"])
    assert n == len(FilterResult.load(filtered_run / "round-01/filter").rows)

