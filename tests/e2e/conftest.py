"""Fixtures of the end-to-end tests that drive the dashboard in a real headless Chromium."""

import pytest
from playwright.sync_api import sync_playwright

from tests.e2e.dashboard_helpers import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
