"""A real Prefect server with both UIs, and Debian's Chromium driven by Playwright."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from harness.browser import CHROMIUM_ARGS, INSTALL_HINT, find_chromium
from harness.prefect_server import PrefectServer, prefect_server

REPO = Path(__file__).resolve().parents[2]
# Assertions wait as long as actions do (Playwright's 5 s default is short for a loaded 2-core
# machine rendering Prefect's UI).
expect.set_options(timeout=30_000)


def chromium_path() -> str:
    found = find_chromium()
    if found is None:
        pytest.fail(f"No Chromium found. {INSTALL_HINT}", pytrace=False)
    return found


@pytest.fixture(scope="module")
def prefect_with_ui(tmp_path_factory) -> Iterator[PrefectServer]:
    with prefect_server(tmp_path_factory.mktemp("prefect-ui-home"), ui=True) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as exc:
            pytest.fail(f"Chromium at {executable} did not start: {exc}. {INSTALL_HINT}")
        yield browser
        browser.close()


class Screens:
    """The pages of one test; on a failure, a screenshot of each, and where they are."""

    def __init__(self, browser: Browser, folder: Path) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(30_000)  # a loaded 2-core machine renders slowly
        self.folder = folder
        self.step = "start"

    def new_page(self) -> Page:
        return self.context.new_page()

    @contextmanager
    def during(self, step: str) -> Iterator[None]:
        """Names the step a failure happened in, and saves every page when it does."""
        self.step = step
        try:
            yield
        except BaseException as exc:
            saved = self.save(step)
            exc.add_note(f"UI step failed: {step}. Screenshots: {', '.join(saved) or 'none'}")
            raise

    def save(self, step: str) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")
        saved = []
        for number, page in enumerate(self.context.pages, start=1):
            path = self.folder / f"{slug}-page{number}.png"
            try:
                page.screenshot(path=str(path), full_page=True, timeout=10_000)
                saved.append(str(path))
            except Exception as exc:  # a crashed page: say so instead of hiding the failure
                saved.append(f"{path} (not saved: {exc})")
        return saved


@pytest.fixture
def screens(browser, request) -> Iterator[Screens]:
    root = Path(os.environ.get("UI_SCREENSHOTS", REPO / "out" / "ui-screenshots"))
    folder = root / re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)
    shutil.rmtree(folder, ignore_errors=True)  # only this run's pictures
    screens = Screens(browser, folder)
    yield screens
    screens.context.close()
