"""No client input makes a 5xx (issue 27, "close the classes"): property tests of the request parser with
hypothesis, and schemathesis fuzzing of a running `catfast serve` from its own OpenAPI document
(``GET /openapi.json``), schema-valid and schema-invalid requests to every route, on the UNet demo and on the DiT
demo (``--base demo-dit``).

The invariant, checked on every answer: a 2xx, or a 4xx whose body is OpenAI's error object with a
one-line message; never a 5xx (the engine's own failure is the one allowed 5xx, and no input here may
cause it). schemathesis also checks that each answer's status, content type and body are the ones the
document declares, and that every request the document calls invalid is refused.

Bounded for CI (about 60 s together on the 2-core dev CPU); ``CATFAST_FUZZ_EXAMPLES=2000 pytest
tests/test_robust_fuzz.py`` runs that many examples per test for a longer local run."""

import json
import math
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from catfast.serve.errors import BadRequest
from catfast.serve.loadtest import copy_demo_adapters, demo_server
from catfast.serve.protocol import MAX_DEPTH, HTTPError, parse_json_body, request_fields
from catfast.serve.requests import MAX_GUIDANCE, GenerationRequest

pytestmark = pytest.mark.timeout(600)
EXAMPLES = int(os.environ.get("CATFAST_FUZZ_EXAMPLES", "0"))
FIELDS = ["model", "prompt", "n", "size", "response_format", "user", "quality", "style", "output_format", "steps"]
FIELDS += ["guidance_scale", "seed", "negative_prompt", "scheduler", "stream"]


def budget(ci_examples: int):
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


# text with what breaks parsers: lone surrogates (category Cs), controls, odd digits and the values the
# fields take
text = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=24),
    st.sampled_from(
        ["a star", "base", "striped-star", "striped-star:0.8+toy-box", "32x32", "64x64", "auto", "ddim", "b64_json"]
        + ["png", "url", "\ud800", " ", "\ufeff", "1e999", "nan", "-0", "３２x３２", "a" * 5000, "../x"]
    ),
)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-(2**70), 2**70), st.floats(), st.floats(0, 100), text
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3))
bodies = st.dictionaries(st.sampled_from(FIELDS) | text, values, max_size=8)


def nested(depth: int) -> bytes:
    return b'{"prompt": "x", "user": ' + b"[" * depth + b"]" * depth + b"}"


@budget(500)
@given(
    raw=st.one_of(
        st.binary(max_size=64), bodies.map(lambda b: json.dumps(b).encode()), st.integers(0, 3000).map(nested)
    )
)
def test_the_body_parser_answers_a_dict_or_a_400(raw):
    try:
        body = parse_json_body(raw)
    except HTTPError as e:
        assert e.status in (400, 413), e.status
        json.dumps(e.body(), ensure_ascii=False).encode("utf-8")  # the error itself is sendable
        return
    assert isinstance(body, dict)


@budget(500)
@given(body=bodies)
def test_any_body_is_a_request_or_a_4xx(body):
    """request_fields and GenerationRequest (the parser) on any JSON object: a valid request within the
    bounds, or an HTTPError / BadRequest; nothing else escapes, and the error can be sent as UTF-8."""
    try:
        fields, stream = request_fields(body, 32)
        request = GenerationRequest(**fields)
    except HTTPError as e:
        assert 400 <= e.status < 500
        json.dumps(e.body(), ensure_ascii=False).encode("utf-8")
        return
    except BadRequest as e:
        HTTPError(400, str(e)).body()["error"]["message"].encode("utf-8")
        return
    assert isinstance(stream, bool)
    request.prompt.encode("utf-8")
    assert request.prompt.strip() and 0 <= request.guidance <= MAX_GUIDANCE and (request.steps or 1) >= 1
    assert all(math.isfinite(w) and abs(w) <= 10 for w in request.adapters.values())


valid = st.fixed_dictionaries(
    {"prompt": st.text(st.characters(codec="utf-8"), min_size=1, max_size=50).filter(lambda s: s.strip())},
    optional={
        "model": st.sampled_from(["base", "striped-star", "striped-star:0.8+toy-box", " tiger-ball : -1.5 "]),
        "n": st.integers(1, 8),
        "size": st.sampled_from(["auto", "8x8", "32x32", "64x16"]),
        "steps": st.integers(1, 150),
        "guidance_scale": st.floats(0, MAX_GUIDANCE),
        "seed": st.integers(0, 2**63 - 1),
        "negative_prompt": st.text(st.characters(codec="utf-8"), max_size=20),
        "scheduler": st.sampled_from(["ddim", "euler", "dpmpp_2m"]),
        "stream": st.booleans(),
        "user": st.text(max_size=5),
    },
)


@budget(200)
@given(body=valid)
def test_valid_bodies_parse_to_what_they_say(body):
    fields, stream = request_fields(body, 32)
    request = GenerationRequest(**fields)
    assert request.prompt == body["prompt"] and stream == body.get("stream", False)
    for key, attr in (("n", "n"), ("steps", "steps"), ("guidance_scale", "guidance"), ("seed", "seed")):
        if key in body:
            assert getattr(request, attr) == body[key]
    if body.get("size", "auto") != "auto":
        assert "x".join(map(str, request.size)) == body["size"]


def test_nesting_up_to_the_bound_parses_and_past_it_is_400():
    assert parse_json_body(b'{"user": ' + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"}")
    with pytest.raises(HTTPError, match="nests deeper"):
        parse_json_body(b'{"user": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}")


# ------------------------------------------------------------------------------------- schemathesis


@pytest.fixture(scope="module", params=["demo", "demo-dit"])
def fuzzed(request, tmp_path_factory):
    """A server whose limits keep every valid request cheap (2 steps, 2 images, sizes up to 64x64), on the UNet
    demo and on the Flux-style DiT demo (a DiT server: stacked adapters as composites, per-row weights)."""
    from catfast.shipped import dit_adapters_path

    source = dit_adapters_path() if request.param == "demo-dit" else None
    folder = copy_demo_adapters(tmp_path_factory.mktemp("adapters"), source)
    with demo_server(folder, request.param, max_batch=2, max_queue=8, max_steps=2, timeout_s=120) as (engine, server):
        yield engine, server


def check_invariant(response) -> None:
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"}, error
        assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], error


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_5xx_and_the_schema_holds(fuzzed, mode):
    engine, server = fuzzed
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    generation = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    checks = CHECKS + ([negative_data_rejection] if mode == "negative" else [])
    seen: dict[int, int] = {}

    @budget(250)
    @given(case=schema.as_strategy(generation))
    def fuzz(case):
        response = case.call(base_url=server.url, timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        check_invariant(response)
        case.validate_response(response, checks=checks)

    fuzz()
    print(mode, dict(sorted(seen.items())))
    if mode == "positive":  # valid requests were served (and unknown adapters refused)
        assert any(s < 300 for s in seen) and any(400 <= s < 500 for s in seen), seen
    else:
        assert all(400 <= s < 500 for s in seen), seen
    after = case_free_request(server.url)
    assert after.status_code == 200, after.text  # and the server still serves


def case_free_request(url):
    import httpx

    return httpx.post(url + "/v1/images/generations", json={"prompt": "a star", "steps": 1}, timeout=120)
