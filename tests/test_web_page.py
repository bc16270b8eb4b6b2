"""The web chat page in headless Chromium (Debian's ``chromium``, driven by playwright's Python driver): load
the page, send a message, see the streamed reply and recommendation cards with reasons; "why?" opens the
evidence; with the LLM on (a fake backend), each card's reason is replaced in place as the LLM writes it."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.llm.base import TextRequest
from agent.service import RecommenderService
from agent.settings import Settings
from retrieval.index import Index
from serve import create_app

sys.path.insert(0, str(Path(__file__).parent))
from test_api_fakes import FakeBackend, running_server  # noqa: E402

pytestmark = pytest.mark.browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed (bash scripts/ensure-chromium.sh)")
    return path


@pytest.fixture(scope="module")
def base_url(tiny_index: Index) -> Iterator[str]:
    pytest.importorskip("agent.chat.agent")
    app = create_app(Settings(llm="none"), service=RecommenderService(tiny_index, backend=None))
    with running_server(app) as url:
        yield url


class SlowReasons(FakeBackend):
    """The fake LLM, taking a moment per reason, so the cards are on the page before their LLM reasons."""

    def complete(self, request: TextRequest) -> str:
        time.sleep(0.3)
        return super().complete(request)


@pytest.fixture(scope="module")
def llm_url(tiny_index: Index) -> Iterator[str]:
    pytest.importorskip("agent.chat.agent")
    app = create_app(Settings(llm="fake"), service=RecommenderService(tiny_index, backend=SlowReasons()))
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(base_url: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def test_chat_page_shows_cards_with_reasons(page: Any, base_url: str) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base_url + "/")
    assert page.title() == "recagent chat"
    page.fill("#message", "I loved Star Voyager, recommend me something similar")
    page.click("#send")
    page.wait_for_selector(".card .reason")
    cards = page.query_selector_all(".card")
    assert cards
    reasons = [c.query_selector(".reason").inner_text().strip() for c in cards]
    assert all(reasons), reasons
    titles = [c.query_selector(".title").inner_text() for c in cards]
    assert all(titles)
    bot = page.query_selector_all(".msg.bot")[-1].inner_text()
    assert bot.strip()
    # "why?" opens the reason and evidence panel
    cards[0].query_selector(".why").click()
    panel = cards[0].query_selector(".why-panel")
    page.wait_for_function("el => !el.hidden && el.textContent.length > 0", arg=panel)
    assert reasons[0][:20] in panel.inner_text()
    assert not errors, errors


def test_second_message_continues_the_session(page: Any) -> None:
    before = len(page.query_selector_all(".msg.bot"))
    page.fill("#message", "something else please")
    page.click("#send")
    page.wait_for_function(f"document.querySelectorAll('.msg.bot').length > {before}")
    page.wait_for_function("!document.querySelector('#send').disabled")
    assert page.evaluate("sessionStorage.getItem('recagent.session')")
    assert not page.query_selector_all(".msg.error")


def test_reasons_replace_the_templates_in_place(page: Any, llm_url: str) -> None:
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(llm_url + "/")
    page.fill("#message", "I loved Star Voyager, recommend me something similar")
    page.click("#send")
    first = page.wait_for_selector(".card[data-reason-source='template']")  # the cards come with templates
    first.evaluate("el => { el.dataset.seen = 'yes'; }")
    page.wait_for_function("!document.querySelector('#send').disabled")
    cards = page.query_selector_all(".card")
    assert len(page.query_selector_all(".cards")) == 1 and cards  # updated in place, not rendered again
    assert page.query_selector_all(".card[data-seen='yes']")
    assert all(c.get_attribute("data-reason-source") == "llm" for c in cards)
    assert all(c.query_selector(".source").inner_text().strip() == "LLM" for c in cards)
    reasons = [c.query_selector(".reason").inner_text().strip() for c in cards]
    titles = [c.query_selector(".title").inner_text().strip() for c in cards]
    assert all(t in r for t, r in zip(titles, reasons, strict=True)), reasons  # each card its own sentence
    assert len(set(reasons)) == len(reasons)
    cards[0].query_selector(".why").click()
    panel = cards[0].query_selector(".why-panel")
    page.wait_for_function("el => !el.hidden && el.textContent.includes('Star Voyager')", arg=panel)
    assert reasons[0] in panel.inner_text() and "language model" in panel.inner_text()
    assert not errors, errors
