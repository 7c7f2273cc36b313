"""The replica's ASGI guard on its own (no Ray): the in-flight bound, the key, the body limit."""

import asyncio
import json

import pytest


def call(app, method="POST", path="/v1/completions", headers=(), body=b"", chunks=None):
    """Drive an ASGI app once; returns (status, parsed JSON body or None)."""
    sent = []
    parts = list(chunks) if chunks is not None else [body]

    async def receive():
        if parts:
            part = parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(parts)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(data) if data else None


@pytest.fixture
def guarded():
    from stages.serve import app as module

    async def reached(scope, receive, send):  # stands for FastAPI: reads the whole body, answers 200
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    saved = dict(module.GUARD)
    module.GUARD.update(api_key="k", max_request_bytes=2048, max_inflight=4, inflight=0, body_timeout_s=5)
    yield module.Guard(reached), module.GUARD
    module.GUARD.clear()
    module.GUARD.update(saved)


def test_guard_checks_key_then_size_and_answers_overload_itself(guarded):
    guard, state = guarded
    key = [("Authorization", "Bearer k")]
    assert call(guard, headers=key, body=b"{}")[0] == 200
    assert call(guard, headers=[("Authorization", "bEaReR  k ")], body=b"{}")[0] == 200
    status, error = call(guard, headers=[("Authorization", "Bearer x")], body=b"x" * 10_000)
    assert status == 401 and error["error"]["code"] == "invalid_api_key"  # the key before the body
    assert call(guard, path="/health")[0] == 200 and call(guard, path="/")[0] == 200
    assert call(guard, method="GET", path="/docs")[0] == 401
    status, error = call(guard, headers=key + [("Content-Length", "4096")], body=b"x" * 4096)
    assert status == 413 and error["error"]["code"] == "request_too_large"
    assert call(guard, headers=key + [("Content-Length", "12x")])[0] == 400
    state["inflight"] = state["max_inflight"]
    status, error = call(guard, headers=key, body=b"{}")
    assert status == 429 and error["error"]["code"] == "overloaded" and "in flight" in error["error"]["message"]


def test_a_streamed_body_over_the_limit_stops_being_read(guarded):
    from fastapi import HTTPException

    guard, _ = guarded
    with pytest.raises(HTTPException) as e:  # FastAPI's handler turns it into the JSON 413
        call(guard, headers=[("Authorization", "Bearer k")], chunks=[b"x" * 1500, b"x" * 1500, b"x"])
    assert e.value.status_code == 413
