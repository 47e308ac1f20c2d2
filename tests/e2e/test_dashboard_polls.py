"""The dashboard's polls in headless Chromium: only new events travel, the page rides out an API restart with a
visible notice, the status is announced once per change; and the contrast of focus rings and input borders."""

import re

import openai
import pytest
from playwright.sync_api import expect

from api.routes.dashboard import STATIC_DIR
from tests.conftest import TINY_MODEL_ID, make_project_key
from tests.e2e.dashboard_helpers import DESKTOP, sign_in
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset, wait_status
from tests.stack import ApiServer

pytestmark = pytest.mark.browser


# --- contrast (WCAG 2.x relative luminance), from the stylesheet's own colours -----------------------------------


def luminance(hex_colour: str) -> float:
    channels = [int(hex_colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_ratio_matches_the_wcag_examples():
    assert round(contrast("#000000", "#ffffff"), 1) == 21.0
    assert round(contrast("#767676", "#ffffff"), 2) == 4.54  # the lightest grey WCAG's examples pass on white


def test_focus_rings_and_input_borders_keep_3_to_1_against_their_backgrounds():
    css = (STATIC_DIR / "dashboard.css").read_text()
    colours = dict(re.findall(r"--([\w-]+):\s*(#[0-9a-fA-F]{6})", css))

    def declared(selector: str, prop: str) -> str:
        rule = re.search(re.escape(selector) + r"\s*\{([^}]*)\}", css)
        assert rule, f"no rule for {selector}"
        value = re.search(prop + r":[^;]*?(#[0-9a-fA-F]{6}|var\(--([\w-]+)\))", rule.group(1))
        assert value, f"{selector} sets no {prop} colour"
        return value.group(1) if value.group(1).startswith("#") else colours[value.group(2)]

    ring, ring_on_dark = declared("\n:focus-visible", "outline"), declared(".topbar :focus-visible", "outline-color")
    border = declared("input[type=password], select", "border")
    topbar = declared(".topbar", "background")
    for name, background in (("page", colours["bg"]), ("panel", colours["panel"])):
        assert contrast(ring, background) >= 3, (name, ring)
        assert contrast(border, background) >= 3, (name, border)
    assert contrast(ring_on_dark, topbar) >= 3
    assert contrast(ring_on_dark, "#1d2939") >= 3  # a focused top-bar link that is also hovered


# --- live pages ----------------------------------------------------------------------------------------------------


@pytest.fixture
def page(browser, stack):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert errors == []


def event_ids(page) -> list[str]:
    return page.evaluate("() => [...document.querySelectorAll('#event-log li')].map(li => li.dataset.event)")


def test_job_page_polls_new_events_only_and_rides_out_an_api_restart(stack, settings, page):
    """A running job watched through an API that is stopped and started again on the same port."""
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=stack.v1, api_key=key.key, max_retries=0)
    job = create_job(client, processed_file(client, support_dataset(24)),
                     hyperparameters={"n_epochs": 30, "batch_size": 1})
    api = ApiServer(settings).start()
    polls = []
    page.on("response", lambda r: polls.append((r.url, r.json())) if "/dashboard/api/jobs/" in r.url and r.ok
            else None)
    try:
        sign_in(page, api.url, key.key)
        page.goto(f"{api.url}/jobs/{job.id}")
        expect(page.locator("#job-status .badge")).to_have_text("Running", timeout=60_000)
        assert page.locator("#job-status").get_attribute("aria-live") is None
        page.evaluate("""() => { window.__announced = [];
            new MutationObserver(() => window.__announced.push(document.getElementById('status-announcer').textContent))
              .observe(document.getElementById('status-announcer'), {childList: true, characterData: true, subtree: true});
            window.__sameDocument = true; }""")
        # Loading torch and the model in the worker takes a while on a busy machine.
        page.wait_for_function("() => Number(document.querySelector('#job-progress')?.value) > 0", timeout=120_000)
        page.wait_for_timeout(4000)  # a few polls while it trains

        api.stop()
        notice = page.locator("#connection-status")
        expect(notice).to_be_visible(timeout=10_000)
        expect(notice).to_contain_text("Connection lost")
        before = float(page.locator("#job-progress").get_attribute("value"))
        page.wait_for_timeout(3000)  # the job trains on while the page cannot see it
        api = ApiServer(settings, port=api.port).start()
        expect(notice).to_be_hidden(timeout=20_000)
        page.wait_for_function("v => Number(document.querySelector('#job-progress').value) > v", arg=before,
                               timeout=60_000)

        client.fine_tuning.jobs.cancel(job.id)
        expect(page.locator("#job-status .badge")).to_have_text("Cancelled", timeout=60_000)
        page.wait_for_function("() => document.querySelector('main').dataset.pollDone === 'true'", timeout=10_000)
    finally:
        api.stop()
        if client.fine_tuning.jobs.retrieve(job.id).status not in ("succeeded", "failed", "cancelled"):
            client.fine_tuning.jobs.cancel(job.id)
        wait_status(client, job.id)

    # The log the page built poll by poll is the job's newest events, each once, newest first.
    shown = event_ids(page)
    assert len(shown) == len(set(shown))
    newest = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert shown[:len(newest)] == newest
    assert page.evaluate("window.__sameDocument") is True  # never reloaded, through the restart too
    # Each poll asked for events after the last one seen, and received only events it had not seen.
    running = [(url, body) for url, body in polls if body["summary"]["status"] == "running"]
    assert len(running) >= 3 and all("since=" in url for url, _ in running[1:])  # how many: the machine's pace
    received = [m for _, body in polls for m in re.findall(r'data-event="([^"]+)"', body["events"]["html"])]
    assert len(received) == len(set(received)) > 0
    # (That the slower panels travel only when they change: test_polls_answer_nothing_new_when_nothing_changed.)
    assert all("job-status" in body["fragments"] for _, body in polls)
    # The status was announced on its change only (Running -> Cancelled), not on each redrawn step.
    assert page.evaluate("window.__announced") == ["Job status: Cancelled"]


def test_polls_answer_nothing_new_when_nothing_changed(stack, settings, page):
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=stack.v1, api_key=key.key, max_retries=0)
    sign_in(page, stack.url, key.key)
    jobs_poll = page.request.get(f"{stack.url}/dashboard/api/jobs").json()
    assert "No jobs" in jobs_poll["fragments"]["job-rows"] and jobs_poll["interval"] == 10_000
    again = page.request.get(f"{stack.url}/dashboard/api/jobs?v={jobs_poll['version']}").json()
    assert "fragments" not in again and again["version"] == jobs_poll["version"]

    job = create_job(client, processed_file(client, support_dataset(12)))
    client.fine_tuning.jobs.cancel(job.id)
    wait_status(client, job.id)
    changed = page.request.get(f"{stack.url}/dashboard/api/jobs?v={jobs_poll['version']}").json()
    assert job.id in changed["fragments"]["job-rows"] and changed["version"] != jobs_poll["version"]

    first = page.request.get(f"{stack.url}/dashboard/api/jobs/{job.id}").json()
    events = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert re.findall(r'data-event="([^"]+)"', first["events"]["html"]) == events
    assert first["events"]["since"] == events[0] and first["done"] is True
    assert first["summary"]["status"] == "cancelled"
    quiet = page.request.get(f"{stack.url}/dashboard/api/jobs/{job.id}?since={events[0]}&v={first['version']}").json()
    assert quiet["events"]["html"] == "" and quiet["chart"]["train_loss"] == []
    assert list(quiet["fragments"]) == ["job-status"]
    older = page.request.get(f"{stack.url}/dashboard/api/jobs/{job.id}?since={events[-1]}").json()
    assert re.findall(r'data-event="([^"]+)"', older["events"]["html"]) == events[:-1]


def test_clone_this_job_prefills_the_new_job_form(stack, settings, page):
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=stack.v1, api_key=key.key, max_retries=0)
    training_file = processed_file(client, support_dataset(12))
    job = create_job(client, training_file, hyperparameters={"n_epochs": 3, "batch_size": 2},
                     lora={"r": 6, "target_modules": ["q_proj", "k_proj"]}, max_seq_length=96)
    client.fine_tuning.jobs.cancel(job.id)
    sign_in(page, stack.url, key.key)
    page.goto(f"{stack.url}/jobs/{job.id}")
    page.get_by_role("link", name="Clone this job").click()
    expect(page).to_have_url(re.compile(r"/jobs/new\?clone=ftjob-"))
    expect(page.locator("#cloned-from")).to_contain_text(job.id)
    expect(page.get_by_label("Base model")).to_have_value(TINY_MODEL_ID)
    expect(page.get_by_label("Training file")).to_have_value(training_file)
    expect(page.get_by_label("Suffix")).to_have_value("e2e")
    expect(page.get_by_label("LoRA rank r")).to_have_value("6")
    expect(page.get_by_label("Target modules")).to_have_value("q_proj, k_proj")
    expect(page.get_by_label("Epochs")).to_have_value("3")
    expect(page.get_by_label("Max sequence length")).to_have_value("96")
    expect(page.get_by_label("Quantization")).to_have_value("none")
    page.get_by_role("button", name="Check plan").click()  # what was cloned is a valid job
    expect(page.locator("#job-plan")).to_contain_text("trainable of")
    wait_status(client, job.id)


def test_upload_shows_progress_and_a_refused_upload_says_why(stack, settings, page):
    key = make_project_key(settings)
    sign_in(page, stack.url, key.key)
    shown = []  # what the page's upload status said, recorded from the page (it navigates away once done)
    page.expose_function("recordUploadStatus", lambda text, value: shown.append((text, value)))
    page.add_init_script("""document.addEventListener('DOMContentLoaded', () => {
        const percent = document.getElementById('upload-percent');
        if (percent) new MutationObserver(() => window.recordUploadStatus(percent.textContent,
            document.getElementById('upload-progress').value)).observe(percent, {childList: true});
    });""")
    page.goto(stack.url + "/files")
    data = support_dataset(16000)  # about 3.5 MB
    page.get_by_label("JSONL file").set_input_files({"name": "big.jsonl", "mimeType": "application/jsonl",
                                                     "buffer": data})
    page.get_by_role("button", name="Upload").click()
    expect(page).to_have_url(re.compile(r"/files/file-"), timeout=30_000)  # its validation report follows there
    assert shown[0] == ("0 % uploaded", 0)
    assert shown[-1] == ("Uploaded; validating…", 100), shown
    values = [value for _, value in shown]
    assert values == sorted(values)

    page.goto(stack.url + "/files")
    page.get_by_label("JSONL file").set_input_files({"name": "notes.jsonl", "mimeType": "application/jsonl",
                                                     "buffer": b"x" * (settings.max_upload_bytes + 1)})
    page.get_by_role("button", name="Upload").click()
    expect(page.locator("#upload-error")).to_be_visible(timeout=30_000)
    expect(page.locator("#upload-error")).to_contain_text("larger than the 8,388,608-byte limit")
    expect(page).to_have_url(stack.url + "/files")
    expect(page.get_by_role("button", name="Upload")).to_be_enabled()
    expect(page.locator("#upload-status")).to_be_hidden()
