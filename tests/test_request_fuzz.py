"""Property-based fuzzing of the request path (decode → validate → engine → encode), in process, text and images.

Invariant: every request of a batch gets exactly one answer, 2xx or 4xx, never an exception or a 5xx, and the
good requests mixed into the batch get the answers they get alone. `make test` runs the short profile; a longer
run: `pytest tests/test_request_fuzz.py --hypothesis-profile=long`.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from helpers import build_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from epee_core.engine.policies import ALL_PARAM_KEYS, POLICY_NAMES
from epee_core.serving.config import ServeConfig
from epee_core.serving.images import ImageService
from epee_core.serving.service import POLICY_HEADER, TextService

settings.register_profile(
    "short", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile("short")

GOOD_TEXT = {"text": "Rash after penicillin."}
CONTENT_TYPES = ["application/json", "text/plain", "application/octet-stream", "image/png", "", "x/\u00ff"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
# Override values near what a parameter takes, and anything else JSON can hold.
override_values = (
    st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()
    | st.sampled_from(["jsd", "kl", "last", "window_mean", "full", "1e308"])
    | json_values
)
overrides = st.dictionaries(
    st.sampled_from(sorted(ALL_PARAM_KEYS | {"policy", "unknown"})),
    st.sampled_from(POLICY_NAMES) | override_values,
    max_size=4,
)
text_bodies = st.one_of(
    json_values,
    st.binary(max_size=200),
    st.text(max_size=200),
    st.fixed_dictionaries({"text": st.text(max_size=80)}, optional={"epee": overrides | json_values}),
    st.fixed_dictionaries({"text": st.just("Rash."), "epee": overrides}),
)


def row_and_headers(body, content_type: str, policy_header: str | None):
    headers: dict = {"body": {"content-type": content_type}}
    if policy_header is not None:
        headers[POLICY_HEADER] = policy_header
    return {"body": body}, headers


@pytest.fixture(scope="module")
def text_service(tokenizer) -> TextService:
    return TextService(build_tiny_model(tokenizer), ServeConfig.from_section({}))


@pytest.fixture(scope="module")
def image_service() -> ImageService:
    return ImageService(build_tiny_model(kind="vit"), ServeConfig.from_section({"max_image_pixels": 4096}))


def check_batch(service, hostile: list[tuple], good: tuple) -> None:
    """Hostile rows with a good row in the middle: one 2xx/4xx answer each, the good one as if alone."""
    rows = [row for row, _ in hostile[:1]] + [good[0]] + [row for row, _ in hostile[1:]]
    headers = [h for _, h in hostile[:1]] + [good[1]] + [h for _, h in hostile[1:]]
    answers = service.answer(rows, headers)
    assert len(answers) == len(rows)
    for answer in answers:
        assert 200 <= answer.status < 500, answer.body
        json.dumps(answer.body)  # every answer is JSON
        assert (answer.status == 200) == ("error" not in answer.body)
    position = min(1, len(hostile))
    assert answers[position].body == service.answer([good[0]], [good[1]])[0].body


def batches(bodies, max_size: int):
    """Batches of requests: a body, a content type and maybe a policy header each."""
    request = st.tuples(bodies, st.sampled_from(CONTENT_TYPES), st.none() | st.text(max_size=20))
    return st.lists(request, min_size=1, max_size=max_size)


@given(batches(text_bodies, max_size=6))
def test_any_text_batch_gets_one_answer_each_and_good_rows_their_own(text_service, requests):
    hostile = [row_and_headers(*request) for request in requests]
    check_batch(text_service, hostile, row_and_headers(GOOD_TEXT, "application/json", None))


def png(width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color=0).save(buffer, format="PNG")
    return buffer.getvalue()


image_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(png, st.integers(1, 80), st.integers(1, 80), st.sampled_from(["L", "RGB", "RGBA", "P", "1"])),
    st.builds(lambda data, cut: data[:cut], st.just(png(32, 32, "RGB")), st.integers(0, 120)),
)
image_bodies = st.one_of(
    image_bytes,
    json_values,
    st.fixed_dictionaries(
        {"image": image_bytes.map(lambda data: base64.b64encode(data).decode()) | json_values},
        optional={"epee": overrides},
    ),
)


@given(batches(image_bodies, max_size=4))
def test_any_image_batch_gets_one_answer_each_and_good_rows_their_own(image_service, requests):
    hostile = [row_and_headers(*request) for request in requests]
    check_batch(image_service, hostile, row_and_headers(png(20, 24, "L"), "image/png", None))
