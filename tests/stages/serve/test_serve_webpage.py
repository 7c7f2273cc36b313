"""The web chat page completes streamed chat turns in headless Chromium (DevTools protocol).

Skipped where Debian's `chromium` is not installed (`make test` installs it when it can).
"""

import itertools
import json
import shutil
import subprocess
import time
import urllib.request

import openai
import pytest

from serve_testing import serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")]


@pytest.fixture(scope="module")
def glm_server(ray_instance, tokenizer, tmp_path_factory):
    with serving(tokenizer, tmp_path_factory.mktemp("serve")) as server:
        yield server


class DevToolsPage:
    """The smallest DevTools-protocol client: one page, Runtime.evaluate and Page.navigate."""

    def __init__(self, user_data_dir):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
             "--remote-debugging-port=0", f"--user-data-dir={user_data_dir}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        self.ws = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.ids = itertools.count(1)

    def call(self, method, **params):
        i = next(self.ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == i:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"page never satisfied: {expression}")

    def close(self):
        if hasattr(self, "ws"):
            self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture
def page(tmp_path):
    page = DevToolsPage(tmp_path / "chromium-profile")
    yield page
    page.close()


def send(page, text, turn):
    """Type `text`, press send, wait until turn number `turn` (1, 2, ...) has its answer."""
    page.js(f"document.getElementById('input').value = {json.dumps(text)}; "
            "document.getElementById('form').requestSubmit(); true")
    page.wait_for(f"document.body.dataset.state === 'idle' && document.querySelectorAll('.msg').length >= {2 * turn}")
    return page.js("Array.from(document.querySelectorAll('.msg')).map(m => [m.className, m.textContent])")


def test_web_page_completes_chat_turns_with_history(glm_server, page):
    page.call("Page.navigate", url=glm_server.url + "/")
    page.wait_for("document.readyState === 'complete'")
    # greedy, so the page's streamed answers can be compared with the API's non-streamed ones
    page.js(f"document.getElementById('api_key').value = {json.dumps(glm_server.api_key)}; "
            "document.getElementById('temperature').value = '0'; "
            "document.getElementById('max_tokens').value = '12'; true")
    messages = send(page, "你好", 1)
    client = openai.OpenAI(base_url=glm_server.url + "/v1", api_key=glm_server.api_key, max_retries=0)
    first = client.chat.completions.create(model="glm-tiny", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=12, temperature=0, top_p=0.7).choices[0].message.content
    assert messages == [["msg user", "你好"], ["msg assistant", first]]

    messages = send(page, "Tell me more", 2)  # the second turn carries the first as history
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "Tell me more"}]
    second = client.chat.completions.create(model="glm-tiny", messages=history, max_tokens=12, temperature=0,
                                            top_p=0.7).choices[0].message.content
    assert messages[2:] == [["msg user", "Tell me more"], ["msg assistant", second]]
    assert page.js("document.getElementById('model').textContent") == "glm-tiny"

    # a system prompt goes first in every turn's messages
    page.js("document.getElementById('clear').click(); "
            "document.getElementById('system').value = 'Answer in one word.'; true")
    messages = send(page, "你好", 1)
    with_system = client.chat.completions.create(
        model="glm-tiny", messages=[{"role": "system", "content": "Answer in one word."},
                                    {"role": "user", "content": "你好"}],
        max_tokens=12, temperature=0, top_p=0.7).choices[0].message.content
    assert messages == [["msg user", "你好"], ["msg assistant", with_system]]
