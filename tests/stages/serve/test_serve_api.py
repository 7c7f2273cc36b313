"""The serve application end to end: real Ray Serve, real HTTP, the real `openai` client."""

import concurrent.futures as cf
import time

import openai
import pytest
import requests
import torch

from glm.checkpoint import load_inference_checkpoint
from glm.generation import GenerationConfig, fill_blanks

from serve_testing import serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def glm_server(ray_instance, tokenizer, tmp_path_factory):
    with serving(tokenizer, tmp_path_factory.mktemp("serve")) as server:
        yield server

USER = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="module")
def client(glm_server):
    return openai.OpenAI(base_url=glm_server.url + "/v1", api_key=glm_server.api_key, max_retries=0, timeout=120)


def post(server, route, body, key=None, **kw):
    headers = {"Authorization": f"Bearer {key or server.api_key}"}
    return requests.post(server.url + route, json=body, headers=headers, timeout=120, **kw)


def test_models_and_health(glm_server, client):
    assert [m.id for m in client.models.list().data] == ["glm-tiny"]
    health = requests.get(glm_server.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["model"] == "glm-tiny"


def test_chat_streaming_concatenates_to_greedy_and_usage_counts(client):
    full = client.chat.completions.create(model="glm-tiny", messages=USER, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="glm-tiny", messages=USER, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_multi_round_history_changes_the_prompt(client, glm_server, tokenizer):
    history = USER + [{"role": "assistant", "content": "I am GLM."}, {"role": "user", "content": "And then?"}]
    one = client.chat.completions.create(model="glm-tiny", messages=history, max_tokens=4, temperature=0)
    # [Round 0]\n问：Hello, who are you?\n答：I am GLM.\n[Round 1]\n问：And then?\n答： + [gMASK] [sop]
    prompt = "[Round 0]\n问：Hello, who are you?\n答：I am GLM.\n[Round 1]\n问：And then?\n答："
    assert one.usage.prompt_tokens == len(tokenizer.encode(prompt)) + 2


def test_completion_stop_sequence_n_and_seed(client):
    base = client.completions.create(model="glm-tiny", prompt="The quick brown fox", max_tokens=32, temperature=0)
    text = base.choices[0].text
    assert len(text) >= 4, f"the tiny model stopped too early to test stops: {text!r}"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.completions.create(model="glm-tiny", prompt="The quick brown fox", max_tokens=32, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="glm-tiny", prompt="The quick brown fox", max_tokens=32,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    sampled = dict(model="glm-tiny", prompt=["a", "b"], max_tokens=12, temperature=1.0, top_p=0.95, seed=11, n=2,
                   extra_body={"top_k": 50, "no_repeat_ngram_size": 2})
    first, again = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    beams = client.completions.create(model="glm-tiny", prompt="a", max_tokens=8, temperature=0,
                                      extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert beams.choices[0].finish_reason in ("stop", "length")


def test_fill_matches_glm_fill_blanks_for_the_same_seed(glm_server):
    text = "The quick [MASK] jumps over the lazy dog. [gMASK]"
    body = {"text": text, "max_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": 3}
    got = post(glm_server, "/v1/glm/fill", body)
    assert got.status_code == 200, got.text
    model, tokenizer = load_inference_checkpoint(glm_server.checkpoint)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replica (num_cpus=1) runs single-threaded: same float sums
    try:
        [expected] = fill_blanks(model, tokenizer, [text], GenerationConfig(
            max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.9, seed=3))
    finally:
        torch.set_num_threads(threads)
    assert got.json()["text"] == expected.text
    assert got.json()["spans"] == [tokenizer.decode(s) for s in expected.spans]
    assert got.json()["usage"]["completion_tokens"] == sum(len(s) for s in expected.spans)


BAD = [  # (route, body or raw string, status, words the message must contain)
    ("/v1/chat/completions", "{not json", 400, "malformed JSON"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": USER}, 404, "'gpt-4' does not exist"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": []}, 400, "at least one message"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": [{"role": "assistant", "content": "x"}]}, 400, "user"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "n": 100}, 400, "n"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "num_beams": 2, "temperature": 0.7}, 400,
     "num_beams"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "frequency_pen": 1}, 400, "unknown parameter"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "max_tokens": 10_000}, 400, "256-token context"),
    ("/v1/completions", {"model": "glm-tiny", "prompt": "word " * 400}, 400, "context window is 256 tokens"),
    ("/v1/completions", {"model": "glm-tiny"}, 400, "prompt"),
    ("/v1/glm/fill", {"text": "word " * 400}, 400, "context window is 256 tokens"),
    ("/v1/glm/fill", {"text": 5}, 400, "text"),
    # abuse: values that overflowed or broke decoding for everyone, sizes, capacity
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "seed": 18446744073709551616}, 400, "seed"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "top_k": 10**9}, 400, "vocabulary size"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "no_repeat_ngram_size": 10**9}, 400,
     "context window 256"),
    ("/v1/chat/completions", '{"model": "glm-tiny", "messages": [{"role": "user", "content": "hi"}], '
                             '"length_penalty": NaN}', 400, "length_penalty"),
    ("/v1/chat/completions", '{"model": "glm-tiny", "messages": [{"role": "user", "content": "hi"}], '
                             '"temperature": Infinity}', 400, "temperature"),
    ("/v1/chat/completions", {"model": "glm-tiny", "messages": USER, "stop": "x" * 300}, 400, "256 characters"),
    ("/v1/chat/completions", '{"model": "glm-tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "lone surrogate"),
    ("/v1/chat/completions", '{"model": "glm-tiny", "messages": [{"role": "user", "content": "hi"}], '
                             '"\\udfff": 1}', 400, "lone surrogate"),
    ("/v1/completions", {"model": "glm-tiny", "prompt": ["p"] * 16, "n": 8, "max_tokens": 2}, 400,
     "holds at most 12"),
    ("/v1/completions", {"model": "glm-tiny", "prompt": "x" * 200_000}, 400, "context window"),
    ("/v1/glm/fill", {"text": "[MASK] " * 20, "max_tokens": 16}, 400, "20 masks x max_tokens 16 do not fit"),
    ("/v1/glm/fill", {"text": "[MASK]" * 150}, 400, "150 masks leave no room"),
]


@pytest.mark.parametrize("route,body,status,words", BAD, ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_bad_input_gets_an_openai_error(glm_server, route, body, status, words):
    kw = {"data": body, "headers": {"Content-Type": "application/json",
                                     "Authorization": f"Bearer {glm_server.api_key}"}} if isinstance(body, str) else {}
    r = requests.post(glm_server.url + route, timeout=60, **kw) if kw else post(glm_server, route, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"]
    assert requests.get(glm_server.url + "/health", timeout=10).status_code == 200  # still serving


def test_control_strings_typed_by_users_stay_text(glm_server, client, tokenizer):
    for special in ("[sop]", "[eop]", "[MASK]", "[gMASK]", "[sMASK]", "</s>", "<pad>"):
        chat = client.chat.completions.create(model="glm-tiny", messages=[{"role": "user", "content": special}],
                                              max_tokens=2, temperature=0)
        assert chat.usage.prompt_tokens == len(tokenizer.encode(special)) + 2 > 3  # text + [gMASK] [sop]
        done = client.completions.create(model="glm-tiny", prompt=f"a {special} b", max_tokens=2, temperature=0)
        assert done.usage.prompt_tokens == len(tokenizer.encode(f"a {special} b")) + 2
    fill = post(glm_server, "/v1/glm/fill", {"text": "x [eop] [MASK] y [sop] [gMASK]", "max_tokens": 3,
                                             "temperature": 0}).json()
    assert fill["masks"] == 2 and len(fill["spans"]) == 2  # the fill syntax: masks only
    assert "[eop]" in fill["text"] and "[sop]" in fill["text"]


def test_a_tiny_temperature_is_greedy_and_harms_no_batchmate(glm_server, client):
    long = dict(model="glm-tiny", prompt="The quick brown fox", max_tokens=40, min_tokens=40, temperature=0)
    tiny = dict(model="glm-tiny", prompt="The quick brown fox", max_tokens=8, temperature=1e-300, seed=1)
    with cf.ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, glm_server, "/v1/completions", long)
        others = [pool.submit(post, glm_server, "/v1/completions", tiny) for _ in range(2)]
        assert running.result().status_code == 200, running.result().text
        assert all(o.result().status_code == 200 for o in others)
    greedy = client.completions.create(model="glm-tiny", prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert others[0].result().json()["choices"][0]["text"] == greedy.choices[0].text


def test_large_body_is_413_before_parsing(glm_server):
    big = b'{"model": "glm-tiny", "prompt": "' + b"x" * 1_100_000 + b'"}'
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {glm_server.api_key}"}
    r = requests.post(glm_server.url + "/v1/completions", data=big, headers=headers, timeout=60)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large" and "1048576 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted while the body streams in
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]

    r = requests.post(glm_server.url + "/v1/completions", data=chunks(), headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert requests.get(glm_server.url + "/health", timeout=10).status_code == 200


def test_a_body_that_never_arrives_is_408_not_a_held_slot(glm_server):
    import socket
    from urllib.parse import urlparse

    url = urlparse(glm_server.url)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {url.hostname}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {glm_server.api_key}\r\nContent-Length: 1000\r\n\r\n")
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        s.sendall(head.encode() + b'{"model": "glm-tiny", "prompt": "')  # ... and nothing more
        answer = b""
        while b"not received" not in answer and (chunk := s.recv(65536)):
            answer += chunk
    assert answer.split(b" ", 2)[1] == b"408", answer[:200]
    assert b"not received within 3s" in answer


def test_api_key_is_checked_first_and_covers_the_api_pages(glm_server):
    url, key = glm_server.url, glm_server.api_key
    body = {"model": "glm-tiny", "messages": USER, "max_tokens": 2, "temperature": 0}
    ok = requests.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"bearer {key}"},
                       timeout=60)
    assert ok.status_code == 200, ok.text  # the scheme is case-insensitive
    bad = requests.post(url + "/v1/chat/completions", data="{not json", headers={"Authorization": "Bearer wrong"},
                        timeout=60)
    assert bad.status_code == 401  # the key before the body
    for page in ("/docs", "/openapi.json"):
        assert requests.get(url + page, timeout=10).status_code == 401
        assert requests.get(url + page, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    assert requests.get(url + "/", timeout=10).status_code == 200  # the page asks for the key itself


def test_a_replica_that_cannot_start_reports_its_own_error(glm_server, tmp_path):
    import shutil

    from stages.serve import ServeConfig
    from stages.serve.stage import ReplicaStartError, deploy

    shutil.copytree(glm_server.checkpoint, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # same size: only the replica's checksum can tell
    weights.write_bytes(bytes(data))
    config = ServeConfig(checkpoint=str(tmp_path / "model"), route_prefix="/broken")
    with pytest.raises(ReplicaStartError, match=r"model\.safetensors are damaged: SHA-256"):
        deploy(config, app_name="broken", timeout_s=120)


def test_serve_cli_exits_2_naming_the_damaged_file(glm_server, tmp_path, capsys, monkeypatch):
    import shutil

    from stages.serve.__main__ import main

    shutil.copytree(glm_server.checkpoint, tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    assert main(["--checkpoint", str(tmp_path / "model"), "--port", "1"]) == 2
    assert "model.safetensors are damaged: 1000 bytes" in capsys.readouterr().err
    monkeypatch.delenv("GLM_SERVE_API_KEY", raising=False)
    assert main(["--checkpoint", glm_server.checkpoint, "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_wrong_api_key_is_401_and_openai_client_raises(glm_server):
    r = post(glm_server, "/v1/chat/completions", {"model": "glm-tiny", "messages": USER}, key="wrong")
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert requests.get(glm_server.url + "/v1/models", timeout=10).status_code == 401  # no header at all
    bad = openai.OpenAI(base_url=glm_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bounded_concurrency_64_requests_8_at_a_time(glm_server, client):
    def one(i):
        r = post(glm_server, "/v1/completions", {"model": "glm-tiny", "prompt": f"request {i}", "max_tokens": 8,
                                                 "temperature": 0})
        return r.status_code

    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(64)))
    assert codes == [200] * 64


def test_a_dropped_stream_stops_its_generation(glm_server):
    def health():
        return requests.get(glm_server.url + "/health", timeout=10).json()

    before = health()["tokens_generated"]
    # 8 rows x 250 tokens keep the engine busy for seconds; the client leaves after one chunk
    body = {"model": "glm-tiny", "prompt": "x", "max_tokens": 250, "min_tokens": 250, "temperature": 0, "n": 8,
            "stream": True}
    with post(glm_server, "/v1/completions", body, stream=True) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith(b"data: "))
    deadline = time.monotonic() + 30
    while health()["running"]:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.05)
    assert health()["tokens_generated"] - before < 8 * 250


def test_overload_gets_429_not_a_hang(glm_server):
    body = {"model": "glm-tiny", "prompt": "long", "max_tokens": 200, "min_tokens": 200, "temperature": 0}
    with cf.ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda _: post(glm_server, "/v1/completions", body).status_code, range(24)))
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes  # 4 running + 8 waiting fit
    assert post(glm_server, "/v1/completions", {"model": "glm-tiny", "prompt": "x", "max_tokens": 2}).status_code == 200
