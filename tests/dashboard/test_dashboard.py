"""The dashboard in a real browser, used as a person would: Debian's chromium driven by
Playwright, against the real keyed service of tests/live_service.py (its one training worker
is shared: the jobs here are tiny).

A job is submitted through the form (files uploaded, advanced fields filled), its loss curve
is watched gaining points while it trains, it succeeds and an artifact is downloaded through
the page and checked against the API's sha256; a sweep made over HTTP shows its table, then
its Pareto plot; a wrong key shows the API's error; keyless local mode never asks for a key.
A long job is canceled with the job page's button; a config the API refuses (422) is shown
next to the form, and no job is made.
Screenshots of the jobs, job and sweep pages at 1366x768 go to $SQAKD_SCREENSHOTS (README).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from api.main import create_app
from tests.cutting_proxy import CuttingProxy
from tests.fixtures_paths import unavailable
from tests.live_service import TINY_CONFIG, LiveService, TinyInputs
from tests.utils import SettingsFactory, served_by_uvicorn

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1366, "height": 768}
WAIT_MS = 120_000  # for a job or a sweep on the shared worker
# Jobs the tests watch while they run: 2-10 s of training on 2 cores, quiet or busy (TINY_CONFIG
# trains 12 steps); one curve point per step below 200 steps, agreement probed 20 times a job.
CURVE_STEPS = 60
WATCHED_CONFIG = TINY_CONFIG | {"steps": CURVE_STEPS}
PROBE_POINTS = 20
DOWNLOADED = "model_qdq.onnx"
CUT_AFTER_BYTES = 4096  # of the event stream's answer: its head and a dozen events
# Far more training than any test waits for: still running when the Cancel button is clicked.
LONG_CONFIG = TINY_CONFIG | {"steps": 100_000}
STATUS_BADGE = "document.querySelector('.page-head .badge')?.textContent"
JOB_IS_FINAL = f"() => ['succeeded', 'failed', 'canceled'].includes({STATUS_BADGE})"
# Each redraw of the loss chart (its data-points attribute), with the status shown then.
RECORD_REDRAWS = f"""() => {{
    const chart = document.querySelector('#loss-chart');
    const record = () => window.redraws.push([Number(chart.dataset.points), {STATUS_BADGE}]);
    window.redraws = [];
    record();
    new MutationObserver(record).observe(chart, {{attributeFilter: ['data-points']}});
}}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        unavailable(f"no browser at {CHROMIUM} (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield browser
        browser.close()


@contextmanager
def tab_on(browser: Browser, base_url: str) -> Iterator[Page]:
    """A fresh tab (its own sessionStorage) at 1366x768; no script of the page may throw."""
    context = browser.new_context(viewport=VIEWPORT, base_url=base_url, accept_downloads=True)
    context.set_default_timeout(15_000)
    page = context.new_page()
    script_errors: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert script_errors == []


@pytest.fixture
def page(browser: Browser, live_service: LiveService) -> Iterator[Page]:
    with tab_on(browser, live_service.url) as tab:
        yield tab


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("SQAKD_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def api(live_service: LiveService) -> httpx.Client:
    headers = {"Authorization": f"Bearer {live_service.api_key}"}
    return httpx.Client(base_url=live_service.url, headers=headers, timeout=30)


def sign_in(page: Page, key: str, route: str = "") -> None:
    page.goto(f"/{route}")
    page.fill("#api-key", key)
    page.get_by_role("button", name="Use this key").click()


def store_inputs(client: httpx.Client, inputs: TinyInputs) -> dict[str, str]:
    """The tiny model and training images, stored (the same bytes again: the stored ones)."""

    def store(route: str, path: Path) -> str:
        response = client.post(f"/v1/{route}", files={"file": (path.name, path.read_bytes())})
        return str(response.json()["id"])

    return {"model_id": store("models", inputs.model), "data_id": store("datasets", inputs.data)}


def start_job(client: httpx.Client, inputs: TinyInputs, config: dict[str, object]) -> str:
    """A job on the tiny inputs, made over HTTP; its id."""
    response = client.post("/v1/jobs", json={**store_inputs(client, inputs), "config": config})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def all_job_ids(client: httpx.Client) -> list[str]:
    """Every job of the tenant, newest first, a page at a time."""
    ids: list[str] = []
    params: dict[str, str | int] = {"limit": 100}
    while True:
        page = client.get("/v1/jobs", params=params).json()
        ids += [job["id"] for job in page["items"]]
        if not page["next_cursor"]:
            return ids
        params["cursor"] = page["next_cursor"]


def screenshot(page: Page, path: Path) -> None:
    page.mouse.move(0, VIEWPORT["height"] - 1)  # no link drawn as hovered
    page.screenshot(path=path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_wrong_key_shows_the_services_error(page: Page) -> None:
    page.goto("/")
    expect(page.locator(".key-form")).to_contain_text("missing API key")
    page.fill("#api-key", "not-the-key-of-this-service-0123456789")
    page.get_by_role("button", name="Use this key").click()

    expect(page.get_by_role("alert")).to_contain_text("invalid API key")
    expect(page.locator("#api-key")).to_be_visible()  # asked again, not a blank page
    assert page.evaluate("sessionStorage.length") == 0  # the wrong key is not kept


def test_keyless_local_mode_never_asks_for_a_key(
    browser: Browser, make_settings: SettingsFactory
) -> None:
    app = create_app(make_settings(), sweeper=False)  # no API keys
    with (
        served_by_uvicorn(app, lifespan="off") as port,
        tab_on(browser, f"http://127.0.0.1:{port}") as tab,
    ):
        tab.goto("/")
        expect(tab.locator("#jobs-table")).to_contain_text("No jobs yet")
        expect(tab.locator("#session-note")).to_have_text("local mode: no key needed")
        assert tab.locator("#api-key").count() == 0


def test_a_job_from_the_form_to_a_checked_download(
    page: Page,
    live_service: LiveService,
    tiny_inputs: TinyInputs,
    screenshots: Path,
    tmp_path: Path,
) -> None:
    sign_in(page, live_service.api_key)
    expect(page.locator("#jobs-table")).to_be_visible()
    page.locator("nav").get_by_role("link", name="New job").click()

    # The form, with the tiny job's settings in its advanced fields.
    preprocessing = TINY_CONFIG["preprocessing"]
    page.set_input_files("#model-file", tiny_inputs.model)
    page.set_input_files("#data-file", tiny_inputs.data)
    page.select_option("#weight-bits", "4")
    page.select_option("#activation-bits", "4")
    page.select_option("#method", "lsq")
    page.locator("#advanced summary").click()
    page.set_input_files("#eval-file", tiny_inputs.eval_data)
    page.fill("#steps", str(CURVE_STEPS))
    page.fill("#batch-size", str(TINY_CONFIG["batch_size"]))
    page.fill("#input-height", str(preprocessing["input_size"][0]))
    page.fill("#input-width", str(preprocessing["input_size"][1]))
    page.fill("#mean", ", ".join(map(str, preprocessing["mean"])))
    page.fill("#std", ", ".join(map(str, preprocessing["std"])))
    page.uncheck("#export-speed")
    page.click("#submit-job")
    page.wait_for_url(re.compile(r"#/jobs/[0-9a-f-]{36}$"))
    job_id = page.url.rsplit("/", 1)[1]
    assert live_service.api_key not in page.url

    with api(live_service) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    # Uploaded once as stored resources, then started as JSON with the form's config.
    assert job["inputs"]["model"]["id"] and job["inputs"]["eval_data"]["id"]
    assert job["config"]["steps"] == CURVE_STEPS
    assert job["config"]["batch_size"] == TINY_CONFIG["batch_size"]
    assert job["config"]["preprocessing"]["mean"] == preprocessing["mean"]
    assert job["config"]["export"]["speed"] is False

    # The loss curve gains points while the job trains, without a reload: every redraw is
    # recorded in the page with the job's status badge at that moment.
    page.wait_for_selector("#loss-chart")
    page.evaluate(RECORD_REDRAWS)
    page.wait_for_function(JOB_IS_FINAL, timeout=WAIT_MS)
    redraws: list[tuple[int, str]] = page.evaluate("window.redraws")
    counts = [count for count, _ in redraws]
    while_running = {count for count, status in redraws if status == "running"}
    print(f"loss curve points drawn while the job ran: {sorted(while_running)}")
    assert len(while_running & set(range(1, CURVE_STEPS))) >= 2, redraws
    assert counts == sorted(counts)

    # It succeeds: every point plotted, the stages timed, the metrics in their tables.
    status = page.locator(".page-head .badge")
    expect(status).to_have_text("succeeded")
    with api(live_service) as client:
        events = client.get(f"/v1/jobs/{job_id}/events", params={"limit": 500}).json()
    metric_events = [e for e in events["items"] if e["type"] == "metrics"]
    assert len(metric_events) == CURVE_STEPS  # a point per step below 200 steps
    expect(page.locator("#loss-chart")).to_have_attribute("data-points", str(CURVE_STEPS))
    expect(page.locator("#agreement-chart")).to_have_attribute("data-points", str(PROBE_POINTS))
    expect(page.locator("#timeline .stage.done")).to_have_count(5)
    expect(page.locator("#accuracy-table")).to_contain_text("Agreement with the teacher")
    expect(page.locator("#metrics")).to_contain_text("KiB")
    expect(page.locator("#metrics")).to_contain_text("TensorRT rules")
    screenshot(page, screenshots / "job.png")

    # A download through the page, checked against the API's listing.
    with page.expect_download() as started:
        page.click(f'button[data-artifact="{DOWNLOADED}"]')
    download = started.value
    assert download.suggested_filename == DOWNLOADED
    saved = tmp_path / DOWNLOADED
    download.save_as(saved)
    with api(live_service) as client:
        listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert sha256(saved) == next(a["sha256"] for a in listing if a["name"] == DOWNLOADED)
    expect(page.locator("#artifacts-table")).to_contain_text("saved; SHA-256 checked")


def test_the_cancel_button_cancels_a_running_job(
    page: Page, live_service: LiveService, tiny_inputs: TinyInputs
) -> None:
    with api(live_service) as client:
        job_id = start_job(client, tiny_inputs, LONG_CONFIG)
        try:
            sign_in(page, live_service.api_key, f"#/jobs/{job_id}")
            status = page.locator(".page-head .badge")
            # Running, so the page must follow the worker stopping it, a step later.
            expect(status).to_have_text("running", timeout=WAIT_MS)
            page.once("dialog", lambda dialog: dialog.accept())  # were the page to ask to confirm
            page.get_by_role("button", name="Cancel job").click()

            expect(status).to_have_text("canceled")
            expect(page.locator("#cancel-job")).to_have_count(0)
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert (job["status"], job["cancel_requested"]) == ("canceled", True)
        finally:  # the one training worker is shared: never leave it busy with this job
            client.post(f"/v1/jobs/{job_id}/cancel")


def test_a_config_the_api_refuses_is_shown_by_the_form(
    page: Page, live_service: LiveService, tiny_inputs: TinyInputs
) -> None:
    with api(live_service) as client:
        jobs_before = all_job_ids(client)
    sign_in(page, live_service.api_key, "#/new")
    page.set_input_files("#model-file", tiny_inputs.model)
    page.set_input_files("#data-file", tiny_inputs.data)
    page.locator("#advanced summary").click()
    page.fill("#raw-config", '{"weight_bits": 99}')  # valid JSON: only the API can refuse it
    with page.expect_response(
        lambda r: r.request.method == "POST" and r.url.endswith("/v1/jobs")
    ) as answered:
        page.click("#submit-job")
    assert answered.value.status == 422
    refusal = answered.value.json()["error"]
    assert refusal["code"] == "invalid_config" and "weight_bits" in refusal["message"]

    # The API's words, next to the form, which stays filled for another try.
    shown = page.locator("#form-errors").get_by_role("alert")
    expect(shown).to_contain_text("The service refused the job")
    expect(shown).to_contain_text(refusal["message"])
    expect(shown.locator("code")).to_have_text(refusal["code"])
    expect(page.locator("#raw-config")).to_have_value('{"weight_bits": 99}')
    expect(page.locator("#submit-job")).to_be_enabled()
    assert page.url.endswith("#/new")
    with api(live_service) as client:
        assert all_job_ids(client) == jobs_before


def test_a_cut_event_stream_resumes_with_last_event_id(
    browser: Browser, live_service: LiveService, tiny_inputs: TinyInputs
) -> None:
    """The job page through a connection that drops while the job trains: it reconnects with
    Last-Event-ID and plots every point once."""
    with api(live_service) as client:
        job_id = start_job(client, tiny_inputs, WATCHED_CONFIG)
    events_path = f"/v1/jobs/{job_id}/events"
    with CuttingProxy(live_service.url) as proxy, tab_on(browser, proxy.url) as tab:
        proxy.cut_next("GET", events_path, after_bytes=CUT_AFTER_BYTES)
        sign_in(tab, live_service.api_key, f"#/jobs/{job_id}")
        expect(tab.locator(".page-head .badge")).to_have_text("succeeded", timeout=WAIT_MS)
        expect(tab.locator("#loss-chart")).to_have_attribute("data-points", str(CURVE_STEPS))
        expect(tab.locator("#agreement-chart")).to_have_attribute("data-points", str(PROBE_POINTS))
        streams = [r for r in proxy.requests if r.target.startswith(events_path)]
    assert proxy.cuts == 1
    assert [int(r.headers.get("last-event-id", 0)) > 0 for r in streams] == [False, True]


def test_a_sweeps_table_then_its_pareto_plot(
    page: Page, live_service: LiveService, tiny_inputs: TinyInputs, screenshots: Path
) -> None:
    with api(live_service) as client:
        response = client.post(
            "/v1/sweeps",
            json={
                **store_inputs(client, tiny_inputs),
                "base_config": WATCHED_CONFIG,
                "configs": [
                    {"weight_bits": 8, "activation_bits": 8},
                    {"weight_bits": 4, "activation_bits": 4},
                ],
            },
        )
    assert response.status_code == 202, response.text
    sweep = response.json()
    job_ids = [row["job_id"] for row in sweep["rows"]]

    # While it runs: its table, and a word on when the plot comes.
    sign_in(page, live_service.api_key, f"#/sweeps/{sweep['id']}")
    expect(page.locator("#plot-waiting")).to_contain_text("when every job is final")
    expect(page.locator("#sweep-table tbody tr")).to_have_count(2)

    # The jobs list follows its jobs live, to the end.
    page.locator("nav").get_by_role("link", name="Jobs").click()
    rows = [page.locator("#jobs-table tr", has=page.locator(f'a[title="{i}"]')) for i in job_ids]
    first_seen = [row.locator(".badge").inner_text() for row in rows]
    assert first_seen != ["succeeded", "succeeded"], "the sweep ended before the page showed it"
    for row in rows:
        expect(row.locator(".badge")).to_have_text("succeeded", timeout=WAIT_MS)
    screenshot(page, screenshots / "jobs.png")

    # Every job final: the plot, from pareto.svg, and the front in the table.
    page.go_back()
    plot = page.locator("#pareto img")
    expect(plot).to_be_visible(timeout=WAIT_MS)
    page.wait_for_function(
        "() => { const img = document.querySelector('#pareto img');"
        " return img && img.complete && img.naturalWidth > 0; }"
    )
    assert plot.get_attribute("src", timeout=1000).startswith("blob:")
    expect(page.locator("#sweep-table tbody tr")).to_have_count(2)
    expect(page.locator("#sweep-table")).to_contain_text("recommended")
    screenshot(page, screenshots / "sweep.png")
