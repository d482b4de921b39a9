"""Generated input: schemathesis against the published OpenAPI description, hypothesis on request parsing."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.apis.contract import validate_request
from gateway.errors import GatewayError
from gateway.reservation import OutputBounds, reserve
from tests.conftest import API_KEY, KEYS, FakeUpstream, GatewayProcess, simple_config, start_gateway, stop

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)

chat_like = st.fixed_dictionaries(
    {"model": st.one_of(st.text(max_size=5), st.integers()),
     "messages": st.one_of(json_values, st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system", "wizard", 3]), "content": json_values}), max_size=3))},
    optional={"stream": json_values, "max_tokens": json_values, "temperature": json_values,
              "stream_options": json_values, "n": json_values, "input": json_values,
              "max_output_tokens": json_values, "system": json_values, "tokens": json_values})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(endpoint=st.sampled_from(["chat", "completions", "embeddings", "responses", "messages", "tokenize",
                                  "detokenize"]), body=st.one_of(json_values, chat_like))
def test_parsing_either_accepts_or_names_the_problem(endpoint: str, body: object) -> None:
    try:
        req = validate_request(endpoint, body)  # type: ignore[arg-type]
    except GatewayError as e:
        assert e.status == 400 and e.message.strip()
        assert e.body()["error"]["type"] == "invalid_request_error"
        return
    assert isinstance(req.model, str) and req.model  # type: ignore[attr-defined]
    # Whatever passed validation is counted and bounded without an exception other than a named 400.
    try:
        prompt, completion = reserve(dict(body), endpoint, OutputBounds(16))  # type: ignore[arg-type]
    except GatewayError as e:
        assert e.status == 400 and e.param
        return
    assert prompt >= 0 and completion >= 0


@pytest.fixture(scope="module")
def fuzz_gateway(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("fuzz"), {**simple_config(upstream.url, keys=KEYS),
                                                         "server": {"request_log": "off"}})
    yield gw
    stop(gw.proc)


def test_schemathesis_finds_no_server_error_and_every_error_is_openai_shaped(
        fuzz_gateway: GatewayProcess, tmp_path: Path) -> None:
    """Bounded run (a few hundred generated cases): no 5xx, only documented statuses, 4xx bodies match
    the OpenAI error schema published in /openapi.json."""
    st_bin = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert st_bin, "schemathesis is part of the test extra"
    out = subprocess.run(
        [st_bin, "run", f"{fuzz_gateway.url}/openapi.json",
         "-c", "not_a_server_error,response_schema_conformance,status_code_conformance",
         "-n", "40", "--seed", "42", "--request-timeout", "10", "-H", f"Authorization: Bearer {API_KEY}",
         "--report-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:]
    assert "passed" in out.stdout
