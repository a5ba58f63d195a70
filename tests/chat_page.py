"""The chat page of `distill serve`, read and driven through a webdriver.Browser: what the page
test and bench/page_screenshot.py both do with it."""

from __future__ import annotations

from webdriver import ENTER, Browser

# Every column's model and turns: the user's text, the answer, the meta line's numbers.
READ_COLUMNS = """
return [...document.querySelectorAll('.column')].map(c => ({
  model: c.dataset.model,
  turns: [...c.querySelectorAll('.turn')].map(t => ({
    user: t.querySelector('.msg.user').textContent,
    answer: t.querySelector('.msg.assistant').textContent,
    error: t.querySelector('.msg.assistant').classList.contains('error'),
    promptTokens: t.querySelector('.meta').dataset.promptTokens,
    firstTokenMs: t.querySelector('.meta').dataset.firstTokenMs,
    meta: t.querySelector('.meta').textContent,
  })),
}));
"""

ANSWERED = """
const turns = document.querySelectorAll('.turn');
return turns.length === arguments[0] && !document.querySelector('.streaming')
  && [...turns].every(t => t.querySelector('.meta').dataset.promptTokens !== undefined
                           || t.querySelector('.msg.error'));
"""


def say(browser: Browser, text: str, timeout: float = 120) -> None:
    """Type one turn (Enter sends it, with what the box held before) and wait until every
    column has answered it or shown its error."""
    turns = browser.run("return document.querySelectorAll('.turn').length")
    columns = browser.run("return document.querySelectorAll('.column').length")
    browser.type("#input", text + ENTER)
    browser.wait_for(ANSWERED, turns + columns, timeout=timeout, what=f"{text!r} answered in every column")
