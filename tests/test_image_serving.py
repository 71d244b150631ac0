"""Image requests of epee_core.image_serving, without a server: decoding, limits, batches (docs/design.md, "HTTP contract")."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from helpers import build_tiny_model
from PIL import Image

from epee_core.data.images import load_image
from epee_core.engine.inputs import encode_images
from epee_core.engine.runner import run_early_exit
from epee_core.engine.spec import ConfigError
from epee_core.ops.packaging import HANDLER_FOR_TASK, check_inputs
from epee_core.serving.config import ServeConfig
from epee_core.serving.images import ImageService, decode_base64, decode_image
from epee_core.serving.service import RequestError, request_payload

JSON = {"body": {"content-type": "application/json"}}
PNG_TYPE = {"body": {"content-type": "image/png"}}
RESPONSE_KEYS = {"label", "probabilities", "exit_layer", "num_layers", "entropy", "margin", "policy"}


def image_bytes(
    fmt: str = "PNG", size: tuple[int, int] = (24, 20), mode: str = "RGB", seed: int = 0
) -> bytes:
    """A random image of `size` (width, height) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A decompression bomb's shape: a valid PNG header declaring a huge image, with a few bytes of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000)))


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(kind="vit")


def service(model, **section) -> ImageService:
    return ImageService(model, ServeConfig.from_section(section))


def decode_error(svc: ImageService, body, headers=PNG_TYPE) -> RequestError:
    with pytest.raises(RequestError) as caught:
        svc.decode(request_payload({"body": body}, headers, svc.config.max_body_bytes), headers)
    return caught.value


# --- decoding --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "channels"), [("PNG", "RGB", 3), ("PNG", "L", 1), ("JPEG", "RGB", 3)]
)
def test_png_and_jpeg_decode_like_an_image_file(tmp_path, fmt, mode, channels):
    data = image_bytes(fmt, mode=mode)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    decoded = decode_image(data, max_pixels=10_000)
    assert decoded.shape == (channels, 20, 24)
    assert decoded.equal(load_image(path))  # the same pixels training reads from an image folder


def test_base64_and_data_url_decode_to_the_same_bytes():
    data = image_bytes()
    encoded = base64.b64encode(data).decode()
    assert decode_base64(encoded) == data
    assert decode_base64(f"data:image/png;base64,{encoded}") == data


@pytest.mark.parametrize("value", ["not base64!", "abc", 42])
def test_bad_base64_is_400(value):
    with pytest.raises(RequestError) as caught:
        decode_base64(value)
    assert caught.value.status == 400 and "'image'" in caught.value.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"hello, not an image", "not a PNG or JPEG"),
        (image_bytes("GIF"), "not a PNG or JPEG"),
        (b"", "empty image"),
        (image_bytes("PNG")[:300], "truncated"),
        (image_bytes("JPEG")[:400], "truncated"),
        (image_bytes("PNG")[:60] + bytes(200) + image_bytes("PNG")[260:], "corrupt"),
    ],
    ids=["text", "gif", "empty", "truncated-png", "truncated-jpeg", "corrupt-png"],
)
def test_corrupt_truncated_or_non_image_bytes_are_400(data, fragment):
    with pytest.raises(RequestError) as caught:
        decode_image(data, max_pixels=10_000)
    assert caught.value.status == 400 and fragment in caught.value.message


def test_image_over_max_pixels_is_413_before_decoding(monkeypatch):
    data = image_bytes(size=(30, 20))
    monkeypatch.setattr(Image.Image, "load", lambda image: pytest.fail("decoded an oversize image"))
    with pytest.raises(RequestError) as caught:
        decode_image(data, max_pixels=599)
    assert caught.value.status == 413 and "30×20 = 600 pixels" in caught.value.message
    assert "max_image_pixels" in caught.value.message


def test_decompression_bomb_header_is_413_without_allocating_pixels(monkeypatch):
    monkeypatch.setattr(Image.Image, "load", lambda image: pytest.fail("decoded a decompression bomb"))
    with pytest.raises(RequestError) as caught:
        decode_image(png_header_only(100_000, 100_000), max_pixels=10_000)
    assert caught.value.status == 413 and "max_image_pixels" in caught.value.message


def test_service_leaves_pils_process_wide_guard_alone(model):
    before = Image.MAX_IMAGE_PIXELS
    service(model, max_image_pixels=5000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_pils_own_bomb_guard_backs_up_a_laxer_limit_with_413():
    with pytest.raises(
        RequestError
    ) as caught:  # PIL refuses above twice its default, even with a laxer check
        decode_image(png_header_only(20_000, 20_000), max_pixels=10**12)
    assert caught.value.status == 413


def test_max_image_pixels_must_be_positive():
    with pytest.raises(ConfigError, match="max_image_pixels"):
        ServeConfig.from_section({"max_image_pixels": 0})


def test_text_model_is_refused(tokenizer):
    from helpers import build_tiny_model

    with pytest.raises(ConfigError, match="image processor"):
        ImageService(build_tiny_model(tokenizer), ServeConfig())


# --- requests --------------------------------------------------------------------------------------------------


def test_raw_bytes_and_base64_json_give_the_same_image(model):
    svc, data = service(model), image_bytes()
    raw = svc.decode(data, PNG_TYPE)
    as_json = svc.decode({"image": base64.b64encode(data).decode()}, JSON)
    json_as_bytes = svc.decode(b'{"image": "%s"}' % base64.b64encode(data), {})
    assert raw.model_input.equal(as_json.model_input) and raw.model_input.equal(json_as_bytes.model_input)
    assert raw.policy.name == as_json.policy.name == "epee"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"img": "x"}, "unknown field 'img'"),
        ({"epee": {"policy": "full"}}, "missing field 'image'"),
        ({"image": 7}, "'image' must be a base64 string"),
        ({"image": "%%%"}, "not valid base64"),
        ({"image": base64.b64encode(b"plain text").decode()}, "not a PNG or JPEG"),
        (["a list"], "got JSON list"),
        ("a caption, not an image", "expected raw PNG/JPEG bytes"),
        (b'{"image": ', "not valid JSON"),
    ],
)
def test_malformed_image_requests_are_400_naming_the_problem(model, body, fragment):
    error = decode_error(service(model), body, JSON if isinstance(body, (dict, list)) else PNG_TYPE)
    assert error.status == 400 and fragment in error.message


def test_oversize_image_request_is_413(model):
    error = decode_error(service(model, max_image_pixels=100), image_bytes(size=(11, 10)))
    assert error.status == 413


def test_policy_override_works_for_images(model):
    svc = service(model)
    assert svc.decode(image_bytes(), {**PNG_TYPE, "X-EPEE-Policy": "full"}).policy.name == "full"
    encoded = base64.b64encode(image_bytes()).decode()
    assert svc.decode({"image": encoded, "epee": {"policy": "patience"}}, JSON).policy.name == "patience"


def test_batch_answers_match_the_engine_and_bad_rows_get_their_own_error(model):
    svc = service(model)
    images = [
        image_bytes(size=(16 + 4 * seed, 16), mode="L" if seed % 2 else "RGB", seed=seed) for seed in range(4)
    ]
    rows = [
        {"body": images[0]},
        {"body": b"garbage"},
        {"body": {"image": base64.b64encode(images[1]).decode()}},
        {"body": images[2][:100]},
        {"body": images[3]},
    ]
    answers = svc.answer(rows, [PNG_TYPE, PNG_TYPE, JSON, PNG_TYPE, PNG_TYPE])
    assert [answer.status for answer in answers] == [200, 400, 200, 400, 200]
    assert set(answers[1].body) == {"error"} and answers[1].exit_layer is None
    for answer, data in zip([answers[0], answers[2], answers[4]], [images[0], images[1], images[3]]):
        alone = run_early_exit(
            model, encode_images(svc.transform, [decode_image(data, 10_000)]), svc.config.policy
        )
        assert set(answer.body) == RESPONSE_KEYS
        assert answer.body["exit_layer"] == int(alone.exit_layer[0])
        assert answer.body["label"] == model.spec.labels[int(alone.probs[0].argmax())]


def test_epee_package_accepts_an_image_model_and_picks_the_image_handler(model, tmp_path):
    model.save_pretrained(tmp_path / "vit")
    config = tmp_path / "vit.yaml"
    config.write_text("epee:\n  task: image-classification\n  policy: epee\n", encoding="utf-8")
    spec, _ = check_inputs(tmp_path / "vit", config, "tiny-vit")
    assert HANDLER_FOR_TASK[spec.task] == "image_handler.py"
