"""The playground page (serving/playground.html) in a real browser, against a real server.

Headless Chromium types a prompt and presses Generate; the page streams the completion over
server-sent events. The text it shows must be exactly what the API returns for the same request
in one piece (not streamed), greedy or sampled with a seed: the page drops, reorders or repeats
no token, and keeps every space and newline. An error shows the server's own message, and Stop
ends the request on the server too.
The browser is Debian's chromium with its chromedriver, named by path, so that Selenium never
tries to download one (the tests run offline); a missing one fails the test and says how to
install it.
"""
import shutil

import pytest

import helpers
from test_http import Server

CHARS = "ab \n"  # the tiny model's vocabulary: every prompt below is made of these
WAIT = 60  # seconds: a hang guard for a busy machine, not a speed limit
LONG = 100_000  # tokens: a completion that runs for a minute or more, until Stop
ENDED = ("done", "error", "stopped")  # how the status line begins once a run has ended


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """python -m serving.http on a free port, with an untrained character model. It takes
    completions far longer than a test, which only Stop ends, and buffers all their tokens, so
    that a browser slowed by a busy machine is never cancelled as too slow a reader."""
    s = Server(helpers.char_checkpoint(tmp_path_factory.mktemp("play"), chars=CHARS),
               f"--max_tokens={LONG}", f"--stream_buffer={LONG}")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -r requirements-test.txt")
    for program in ("chromium", "chromedriver"):
        if shutil.which(program) is None:
            pytest.fail(f"{program} is missing: apt-get install chromium chromium-driver "
                        "(Debian's packages; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")),
                              options=options)
    yield driver
    driver.quit()


def generate(browser, server, fields):
    """Open the page, fill its form (fields: {element id: value}), press Generate."""
    browser.get(server.url)
    for name, value in fields.items():
        field = browser.find_element("id", name)
        field.clear()
        field.send_keys(str(value))
    browser.find_element("id", "go").click()


def status_once(browser, *beginnings):
    """The status line, once it begins with one of beginnings."""
    from selenium.webdriver.support.ui import WebDriverWait
    status = browser.find_element("id", "status")
    WebDriverWait(browser, WAIT).until(lambda _: status.text.startswith(beginnings))
    return status.text


def text_of(browser, element):
    """An element's text as the page holds it: its textContent. Selenium's .text is the text
    as laid out, with its runs of spaces collapsed."""
    return browser.execute_script(f"return document.getElementById('{element}').textContent")


# The untrained model's greedy text is 9 spaces, then runs of a and b; sampled with a seed (the
# same draws on the page as in the API), it mixes all four characters, newlines included.
@pytest.mark.parametrize("settings", [{"temperature": 0},
                                      {"temperature": 1, "top_p": 0.9, "seed": 7}],
                         ids=["greedy", "seeded"])
def test_streamed_page_equals_the_api(browser, server, settings):
    prompt, max_tokens = "ab ", 30
    generate(browser, server, {"prompt": prompt, "max_tokens": max_tokens, **settings})
    status, text = status_once(browser, *ENDED), text_of(browser, "completion")
    code, _, reply = server.post({"prompt": prompt, "max_tokens": max_tokens, **settings})
    assert code == 200, reply
    choice = reply["choices"][0]
    assert text == choice["text"] and len(text) == max_tokens
    assert status.startswith(f"done ({choice['finish_reason']}): {max_tokens} tokens"), status
    assert text_of(browser, "shown_prompt") == prompt


def test_an_error_shows_the_servers_message(browser, server):
    request = {"prompt": "ab", "max_tokens": 5, "temperature": -1}
    generate(browser, server, request)
    status, text = status_once(browser, *ENDED), text_of(browser, "completion")
    code, _, reply = server.post(request)
    assert code == 400 and text == ""
    assert status == f"error: {reply['error']['message']}"


def test_stop_cancels_the_request_on_the_server(browser, server):
    cancelled = server.get("health")["requests"]["cancelled"]
    generate(browser, server, {"prompt": "ab", "max_tokens": LONG})
    status_once(browser, "generating")
    browser.find_element("id", "stop").click()
    assert status_once(browser, *ENDED).startswith("stopped after ")
    # The aborted fetch closes the connection; the server notices, and ends the request.
    health = server.settle()
    assert health["requests"]["cancelled"] == cancelled + 1, health


def test_the_api_key_box_reaches_a_server_that_wants_one(browser, tmp_path):
    s = Server(helpers.char_checkpoint(tmp_path, chars=CHARS), "--api_key=sesame")
    try:
        generate(browser, s, {"prompt": "ab", "max_tokens": 5})
        assert status_once(browser, *ENDED).startswith("error: a valid API key is needed")
        generate(browser, s, {"prompt": "ab", "max_tokens": 5, "api_key": "sesame"})
        assert status_once(browser, *ENDED).startswith("done (length): 5 tokens")
    finally:
        s.stop()
