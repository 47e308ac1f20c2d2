"""The dashboard in headless Chromium, against the real app, real workers on the tiny model, PostgreSQL, Redis and S3."""

import re
import tarfile
import time

import openai
import pytest
from playwright.sync_api import expect

from api.dashboard import session as cookies
from tests.conftest import TINY_MODEL_ID, make_project_key
from tests.e2e.dashboard_helpers import (
    DESKTOP,
    PHONE,
    chart_points,
    fill_job_form,
    job_state,
    screenshot,
    session_cookie,
    sha256,
    sign_in,
)
from tests.e2e.jobs_helpers import create_job, processed_file, support_dataset

pytestmark = pytest.mark.browser


@pytest.fixture
def new_page(browser, stack):
    """Pages in fresh browser contexts (own cookies); script errors, refused assets and outside requests collected."""
    contexts, errors, outside = [], [], []

    def open_page():
        context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if "Refused to" in msg.text else None)
        page.on("request", lambda request: None if request.url.startswith((stack.url, "data:"))
                else outside.append(request.url))
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert errors == []
    assert outside == [], "the dashboard must work on an isolated network"


def watch_until_finished(page, timeout: float = 300) -> list[tuple[str, float | None, int]]:
    """What the open page shows, sampled until the job finishes; the page is never reloaded here."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        seen.append(job_state(page))
        if seen[-1][0] in ("Succeeded", "Failed", "Cancelled"):
            return seen
        page.wait_for_timeout(250)
    raise AssertionError(f"the job page still shows {seen[-1]} after {timeout} s")


def test_sign_in_upload_train_watch_and_download(stack, settings, new_page, tmp_path):
    key = make_project_key(settings)
    page = new_page()
    page.goto(stack.url + "/")
    expect(page).to_have_url(re.compile(r"/login$"))
    sign_in(page, stack.url, "lj-not-a-real-key")
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    sign_in(page, stack.url, key.key)
    expect(page).to_have_url(stack.url + "/jobs")
    expect(page.get_by_text(key.project)).to_be_visible()
    cookie = session_cookie(page)
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and key.key not in cookie["value"]

    page.get_by_role("link", name="Files").click()
    page.get_by_label("JSONL file").set_input_files(
        {"name": "support.jsonl", "mimeType": "application/jsonl", "buffer": support_dataset(24)})
    page.get_by_role("button", name="Upload").click()
    expect(page).to_have_url(re.compile(r"/files/file-"))
    expect(page.locator("#file-report .badge")).to_have_text("Processed", timeout=60_000)
    expect(page.locator("#report-examples")).to_have_text("24")
    expect(page.locator("table.tokens")).to_contain_text(TINY_MODEL_ID)
    screenshot(page, "file", DESKTOP)

    page.get_by_role("link", name="Train on this file").click()
    # 240 steps: long enough for the page's 1.5 s polls to see it run on a fast idle machine too.
    fill_job_form(page, TINY_MODEL_ID, r="0", epochs="20", batch_size="2", max_seq_length="64", eval_steps="20",
                  save_steps="60")
    page.get_by_role("button", name="Create job").click()
    expect(page.locator(".field-error")).to_have_text("Input should be greater than or equal to 1")
    expect(page.get_by_label("LoRA rank r")).to_have_attribute("aria-invalid", "true")
    screenshot(page, "new-job-invalid", DESKTOP)
    page.get_by_label("LoRA rank r").fill("4")
    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(r"/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]

    page.evaluate("window.__sameDocument = true")
    seen = watch_until_finished(page)
    assert page.evaluate("window.__sameDocument") is True
    assert seen[-1][0] == "Succeeded", seen[-1]
    running = [(percent, points) for status, percent, points in seen if status == "Running"]
    percents = [percent for percent, _ in running]
    assert percents == sorted(percents) and len({p for p in percents if 0 < p < 100}) >= 2, running
    assert len({points for _, points in running}) >= 2, running
    # The chart, built poll by poll from the new events only, has every point the job's metrics events carry.
    client = openai.OpenAI(base_url=stack.v1, api_key=key.key, max_retries=0)
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job_id, limit=100) if e.type == "metrics"]
    expected = sum(len({m["step"] for m in metrics if isinstance(m.get(name), (int, float))})
                   for name in ("train_loss", "valid_loss"))
    assert seen[-1][1] == 100 and chart_points(page) == expected >= max(points for _, points in running)
    expect(page.locator("#loss-chart circle.pt.valid")).not_to_have_count(0)
    expect(page.locator("#job-evals")).to_contain_text("Eval loss before training")
    # r=4 on every linear layer (the default) of 2 layers: q, o (64->64), k, v (64->32), gate, up (64->128) and
    # down (128->64): 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) trained weights.
    expect(page.locator("#job-evals")).to_contain_text(re.compile(r"Trainable parameters\s*8,192 of [\d,]+ \(\d"))
    expect(page.locator("#job-settings")).to_contain_text("auto: largest divisor of batch_size 2")
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)

    with page.expect_download() as download:
        page.locator("#download-adapter").click()
    archive = tmp_path / "adapter.tar.gz"
    download.value.save_as(archive)
    with tarfile.open(archive) as tar:
        assert "adapter_config.json" in tar.getnames()
    assert sha256(archive) == page.locator("#adapter-sha256").inner_text()
    with page.expect_download() as download:
        page.get_by_role("link", name=re.compile(r"Download the adapter of step")).first.click()
    download.value.save_as(tmp_path / "checkpoint.tar.gz")
    with tarfile.open(tmp_path / "checkpoint.tar.gz") as tar:
        assert "adapter_config.json" in tar.getnames()

    screenshot(page, "job", DESKTOP)
    screenshot(page, "job", PHONE)
    page.goto(stack.url + "/jobs")
    expect(page.locator(f"tr[data-job='{job_id}'] .badge")).to_have_text("Succeeded")
    screenshot(page, "jobs", PHONE)
    screenshot(page, "jobs", DESKTOP)

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(f"{stack.url}/jobs/{job_id}")
    expect(page).to_have_url(re.compile(r"/login\?next="))


def test_cancel_from_the_job_page_and_only_the_own_project_is_visible(stack, settings, new_page):
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=stack.v1, api_key=key.key, max_retries=0)
    job = create_job(client, processed_file(client, support_dataset(24)),
                     hyperparameters={"n_epochs": 30, "batch_size": 1})
    page = new_page()
    sign_in(page, stack.url, key.key)
    page.goto(f"{stack.url}/jobs/{job.id}")
    expect(page.locator("#job-status .badge")).to_have_text("Running", timeout=60_000)
    page.wait_for_function("() => Number(document.querySelector('#job-progress')?.value) > 0")
    screenshot(page, "job-running", DESKTOP)
    page.goto(stack.url + "/jobs")
    row_progress = f"tr[data-job='{job.id}'] progress"
    expect(page.locator(f"tr[data-job='{job.id}']")).to_contain_text("left")
    shown = page.locator(row_progress).get_attribute("value")
    page.evaluate("window.__sameDocument = true")
    page.wait_for_function(f"v => document.querySelector(\"{row_progress}\").value > Number(v)", arg=shown)
    assert page.evaluate("window.__sameDocument") is True
    screenshot(page, "jobs-running", DESKTOP)
    screenshot(page, "jobs-running", PHONE)
    page.set_viewport_size(DESKTOP)
    page.get_by_role("link", name=TINY_MODEL_ID).click()
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status .badge")).to_have_text("Cancelled", timeout=60_000)
    expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
    refused = page.request.post(f"{stack.url}/jobs/{job.id}/cancel", form={"csrf_token": "forged"})
    assert refused.status == 403

    other = make_project_key(settings)
    theirs = new_page()
    sign_in(theirs, stack.url, other.key)
    expect(theirs.get_by_text("No jobs yet")).to_be_visible()
    response = theirs.goto(f"{stack.url}/jobs/{job.id}")
    assert response.status == 404
    expect(theirs.get_by_role("heading", name="Not found")).to_be_visible()
    assert theirs.request.get(f"{stack.url}/dashboard/api/jobs/{job.id}").status == 404


def test_a_session_cookie_holds_no_key_and_refuses_tampering_and_age():
    secret = "a-test-secret"
    signed_in = cookies.new_session(session_id="ab" * 16)
    value = cookies.encode(signed_in, secret)
    assert cookies.decode(value, secret) == signed_in
    body, _, signature = value.partition(".")
    assert cookies.decode(body + "." + signature[::-1], secret) is None
    assert cookies.decode(value, "another-secret") is None
    assert cookies.decode("not-a-cookie", secret) is None
    assert cookies.decode(value, secret, now=signed_in.issued_at + cookies.MAX_AGE_SECONDS + 1) is None


def test_a_csrf_token_is_bound_to_its_session():
    secret = "a-test-secret"
    first, second = cookies.new_session(), cookies.new_session()
    token = cookies.csrf_token(first, secret)
    assert cookies.csrf_valid(first, secret, token)
    assert not cookies.csrf_valid(second, secret, token)
    assert not cookies.csrf_valid(first, secret, "")
    assert not cookies.csrf_valid(None, secret, token)


def test_check_the_plan_before_creating_and_see_it_on_the_job_page(stack, settings, new_page):
    key = make_project_key(settings)
    client = openai.OpenAI(base_url=stack.v1, api_key=key.key, max_retries=0)
    training_file = processed_file(client, support_dataset(24))
    page = new_page()
    sign_in(page, stack.url, key.key)
    page.goto(f"{stack.url}/jobs/new?training_file={training_file}")
    expect(page.get_by_label("Quantization")).to_have_value("auto")  # the spec's default, chosen by the plan
    fill_job_form(page, TINY_MODEL_ID, r="4", epochs="1", batch_size="4", max_seq_length="64", eval_steps="20",
                  save_steps="60")
    page.get_by_role("button", name="Check plan").click()
    plan = page.locator("#job-plan")
    # r=4 on every linear layer (the default) of 2 layers: 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192), exactly.
    expect(plan).to_contain_text(re.compile(r"8,192 trainable of [\d,]+ parameters"))
    expect(plan.locator("tr", has_text="cpu")).to_contain_text("yes")
    expect(plan).to_contain_text("1 epochs of 22 examples")  # 24 less the 10 % held out; too few to replay
    expect(plan).to_contain_text("Smallest class that fits: gpu-24g")
    expect(page.get_by_label("LoRA rank r")).to_have_value("4")  # the form keeps what was typed
    screenshot(page, "new-job-plan", DESKTOP)
    assert list(client.fine_tuning.jobs.list()) == []

    page.get_by_role("button", name="Create job").click()
    expect(page).to_have_url(re.compile(r"/jobs/ftjob-"))
    expect(page.locator("#job-plan")).to_contain_text(re.compile(r"8,192 trainable of [\d,]+ parameters"))
    expect(page.locator("#job-plan")).to_contain_text("trains on queue gpu")
    watch_until_finished(page)
    expect(page.locator("#job-plan")).to_contain_text(re.compile(r"Peak memory measured: [\d.]+ GiB on cpu"))
