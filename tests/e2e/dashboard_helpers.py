"""Steps of the dashboard's browser tests: Chromium as DESIGN.md runs it, signing in, reading the live page."""

import hashlib
from pathlib import Path

from playwright.sync_api import Page

from tests.conftest import TEST_OUTPUT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
SCREENSHOTS = TEST_OUTPUT / "screenshots"


def sign_in(page: Page, base_url: str, key: str) -> None:
    page.goto(base_url + "/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()


def session_cookie(page: Page) -> dict:
    [cookie] = [c for c in page.context.cookies() if c["name"] == "lorajobs_session"]
    return cookie


def chart_points(page: Page) -> int:
    """Points of the loss chart (training and validation) as drawn now."""
    return page.evaluate("() => Number(document.querySelector('#loss-chart svg')?.dataset.points || 0)")


def job_state(page: Page) -> tuple[str, float | None, int]:
    """The status badge, the progress bar's value and the chart's points, read in one go."""
    return page.evaluate("""() => [
        document.querySelector('#job-status .badge')?.textContent.trim(),
        document.querySelector('#job-progress') ? Number(document.querySelector('#job-progress').value) : null,
        Number(document.querySelector('#loss-chart svg')?.dataset.points || 0)]""")


def fill_job_form(page: Page, model: str, *, r: str, epochs: str, batch_size: str, max_seq_length: str,
                  eval_steps: str, save_steps: str) -> None:
    page.get_by_label("Base model").select_option(model)
    page.get_by_label("Quantization").select_option("none")
    page.get_by_label("LoRA rank r").fill(r)
    page.get_by_label("Epochs").fill(epochs)
    page.get_by_label("Max sequence length").fill(max_seq_length)
    page.get_by_text("Batch size, evaluation and checkpoints").click()
    page.get_by_label("Batch size").fill(batch_size)
    page.get_by_label("Evaluate every N steps").fill(eval_steps)
    page.get_by_label("Checkpoint every N steps").fill(save_steps)


def screenshot(page: Page, name: str, viewport: dict) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(viewport)
    page.wait_for_timeout(300)  # the chart redraws at the new width after its resize debounce
    path = SCREENSHOTS / f"{name}-{viewport['width']}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
