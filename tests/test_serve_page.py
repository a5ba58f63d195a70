"""`distill serve`'s page at `/`, driven in headless Chromium (tests/webdriver.py) against the
real server test_serve.py starts (a tiny run, --teacher, a bearer token). The browser test
is skipped unless chromium and chromedriver are installed (`make test-browser` installs them).
"""

from __future__ import annotations

import httpx
import pytest
from test_serve import KEY, STUDENT, SYSTEM_PROMPT, TEACHER, served
from chat_page import READ_COLUMNS, say
from webdriver import ENTER, browser_binaries, headless_chromium

SEED = 7  # typed into the page's seed field: the same answers every run
needs_browser = pytest.mark.skipif(browser_binaries() is None,
                                   reason="chromium and chromedriver not found (make test-browser installs them)")


@pytest.fixture(scope="module")
def srv(tmp_path_factory, pytestconfig):
    return served(tmp_path_factory, pytestconfig)


def test_the_page_loads_without_the_token_and_the_prompts_need_it(srv):
    url = srv.server.url
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/page/page.js"' in page.text and 'href="/page/page.css"' in page.text
    for name, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):
        r = httpx.get(f"{url}/page/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.text.strip()
    assert httpx.get(f"{url}/page/..%2Fserve.py").status_code == 404  # only the page's own files
    assert httpx.get(f"{url}/page/system_prompts").status_code == 401
    prompts = httpx.get(f"{url}/page/system_prompts", headers={"Authorization": f"Bearer {KEY}"})
    assert prompts.json() == {TEACHER: SYSTEM_PROMPT}  # the teacher's prompt, and the student has none


# Each answer's text lengths as the page showed them, recorded on every change to the columns.
RECORD_LENGTHS = """
window.seenLengths = {};
new MutationObserver(() => {
  for (const column of document.querySelectorAll('.column')) {
    column.querySelectorAll('.msg.assistant').forEach((answer, i) => {
      const seen = (window.seenLengths[column.dataset.model + '#' + i] ??= []);
      const n = answer.textContent.length;
      if (n && seen[seen.length - 1] !== n) seen.push(n);
    });
  }
}).observe(document.getElementById('columns'), {childList: true, subtree: true, characterData: true});
"""

def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    from promptdistill.render import prompt_ids

    return len(prompt_ids(tokenizer, messages))


def api_answer(srv, model: str, messages: list[dict]) -> str:
    """The server's answer to the same request without streaming, with the page's seed."""
    r = httpx.post(f"{srv.server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": model, "messages": messages, "seed": SEED})
    return r.json()["choices"][0]["message"]["content"]


@needs_browser
def test_two_turns_side_by_side_in_headless_chromium(srv, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(srv.model)
    with headless_chromium(tmp_path / "chromium") as browser:
        browser.open(f"{srv.server.url}/")
        # no token yet: the page says what it needs, and nothing can be sent
        message = browser.wait_for("return !document.getElementById('token-panel').hidden "
                                   "&& document.getElementById('token-message').textContent", what="the token request")
        assert "needs a bearer token" in message and "--token-env" in message
        assert browser.run("return document.getElementById('send').disabled")
        browser.type("#token", "sk-wrong" + ENTER)
        assert "refused this token" in browser.wait_for(
            "const m = document.getElementById('token-message').textContent; return m.includes('refused') && m",
            what="the refusal")
        browser.type("#token", KEY + ENTER)
        browser.wait_for("return document.querySelectorAll('.column').length === 2", what="two columns")
        assert browser.run("return document.getElementById('token-panel').hidden")
        assert KEY not in browser.run("return document.body.innerText")  # the token is never shown
        browser.run(RECORD_LENGTHS)
        browser.type("#seed", str(SEED))

        said = ["Tell me about the sea.", "And what about the storm?", "Was it cold?"]
        for text in said[:2]:
            say(browser, text)
        seen = browser.run("return window.seenLengths")
        browser.screenshot(tmp_path / "page.png")
        # a token refused in the middle of a chat: the turn fails in both columns, the page asks for
        # the token again, and once given the chat goes on with what was said before, the text back in the box
        browser.run("sessionStorage.setItem('promptdistill.token', 'sk-stale')")
        say(browser, said[2])
        assert "refused this token" in browser.run("return document.getElementById('token-message').textContent")
        assert browser.run("return document.getElementById('input').value") == said[2]
        browser.type("#token", KEY + ENTER)
        browser.wait_for("return document.getElementById('token-panel').hidden", what="the token taken again")
        say(browser, "")  # Enter sends what the box holds
        columns = browser.run(READ_COLUMNS)

        assert [c["model"] for c in columns] == [STUDENT, TEACHER]
        for column in columns:
            turns = column["turns"]
            assert [t["user"] for t in turns] == [*said, said[2]]
            assert [t["error"] for t in turns] == [False, False, True, False], column
            assert "refused the bearer token" in turns[2]["answer"] and turns[2]["meta"] == "not kept in the conversation"
            # The tokens each turn read are the whole conversation so far, rendered: the student's
            # with no system prompt, the teacher's with the run's, each with its own earlier answers.
            history = [{"role": "system", "content": SYSTEM_PROMPT}] if column["model"] == TEACHER else []
            for turn in (t for t in turns if not t["error"]):
                history.append({"role": "user", "content": turn["user"]})
                assert int(turn["promptTokens"]) == prompt_tokens(tokenizer, history), (column["model"], turn)
                assert turn["answer"] == api_answer(srv, column["model"], history)  # shown whole, as streamed
                assert f"read {turn['promptTokens']} tokens" in turn["meta"]
                if turn["answer"]:
                    assert 0 <= int(turn["firstTokenMs"]) < 60_000 and "first token" in turn["meta"]
                history.append({"role": "assistant", "content": turn["answer"]})
        # the answers arrived piece by piece: some answer was shown at more than one length
        assert any(len(lengths) > 1 for lengths in seen.values()), seen
        assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # another model: a new chat with the teacher alone (chosen, so not also beside itself)
        browser.click(f"#model option[value='{TEACHER}']")
        browser.wait_for("return document.querySelectorAll('.column').length === 1 "
                         "&& document.querySelectorAll('.turn').length === 0", what="a new chat with the teacher")
        say(browser, said[1])
        [column] = browser.run(READ_COLUMNS)
        assert column["model"] == TEACHER
        alone = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": said[1]}]
        assert int(column["turns"][0]["promptTokens"]) == prompt_tokens(tokenizer, alone)

        browser.click("#new-chat")
        browser.wait_for("return document.querySelectorAll('.turn').length === 0", what="the new chat")
