"""OpenAI parity through the official `openai` client: every supported parameter streamed and
not, with responses validated as the client's typed models; unsupported parameters and
out-of-range values refused naming the parameter; /v1/tokenize, /v1/detokenize, /metrics.

The checks are `benchmarks/openai_conformance.py`'s (one list, run here against the tiny
checkpoint on the session's Ray, and there against any endpoint)."""

import sys
from pathlib import Path

import pytest

from serve_testing import serving

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import openai_conformance as conformance  # noqa: E402

pytestmark = pytest.mark.integration

NAMES = [check.name for check in conformance.checks(None)]


@pytest.fixture(scope="module")
def checks(ray_instance, tokenizer, tmp_path_factory):
    with serving(tokenizer, tmp_path_factory.mktemp("serve")) as server:
        c = conformance.Conformance(server.url, server.api_key, server.model)
        yield {check.name: check for check in conformance.checks(c)}


@pytest.mark.parametrize("name", NAMES)
def test_openai_conformance(checks, name):
    checks[name].run()


def test_the_matrix_shows_every_parameter_once():
    results = [(check, None) for check in conformance.checks(None)]
    table = conformance.matrix(results)
    rows = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert len(rows) == len(set(rows)) and "`tools`" in rows and "`presence_penalty`" in rows
    assert "| `tools` | refused (400) |" in table and "| `logprobs` | supported |" in table
    assert "| `stream_options` | - | supported | - | supported |" in table  # its range checks are no cells
    bad = [(check, "AssertionError" if check.name == "stream_options/bad stream_options [chat]" else None)
           for check, _ in results]
    assert "| `stream_options` | FAIL | supported | - | supported |" in conformance.matrix(bad)
    assert conformance.summary(results, "u") == {
        "benchmark": "openai_conformance", "url": "u", "checkpoint": None, "checked": len(results),
        "passed": len(results), "failed": 0,
        "failed_checks": [], "json_schema_valid_rate": None, "json_schema_answers": 0, "tool_call_valid_rate": None,
        "tool_call_answers": 0, "note": conformance.NO_TOOLS}
    assert conformance.summary(results, "u", schema_answers=[True, True, False, True])["json_schema_valid_rate"] == 0.75
    assert "| `response_format` | supported | supported | supported | supported |" in table
