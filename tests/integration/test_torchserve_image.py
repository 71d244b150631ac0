"""A real TorchServe (the root config.properties on free ports) serving a freshly packaged tiny ViT archive.

PNG bytes and base64 JSON are answered like the in-process engine reads the same image file; bad images get
their own 4xx while batch-mates get 200. Requests go out concurrently so that TorchServe batches them.
"""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib
from collections import Counter, defaultdict

import numpy as np
import pytest
from helpers import build_tiny_model
from PIL import Image

from epee_core.cli import main
from epee_core.data.images import load_image
from epee_core.engine.inputs import encode_images, image_transform
from epee_core.engine.model import EarlyExitModel
from epee_core.ops.torchserve import TorchServe
from epee_core.serving.config import ServeConfig

from .helpers import engine_answer, package_model, post_all, running_torchserve

pytestmark = pytest.mark.integration

MODEL = "tiny-vit"
MAX_IMAGE_PIXELS = 64 * 64
RESPONSE_KEYS = {"label", "probabilities", "exit_layer", "num_layers", "entropy", "margin", "policy"}


def random_image(seed: int) -> Image.Image:
    """Grey or RGB noise of its own size and contrast, so that images exit at different layers."""
    rng = np.random.default_rng(seed)
    height, width = 16 + 4 * (seed % 3), 20 + 4 * (seed % 4)
    shape = (height, width) if seed % 2 else (height, width, 3)
    pixels = rng.integers(0, 256, shape) * rng.uniform(0.2, 1.0) + rng.uniform(0, 60)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    """(path, PNG bytes) of 8 images; the files are what the in-process reference reads."""
    folder = tmp_path_factory.mktemp("images")
    result = []
    for seed in range(8):
        data = png(random_image(seed))
        path = folder / f"{seed}.png"
        path.write_bytes(data)
        result.append((path, data))
    return result


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny ViT → model YAML → `epee package` (image handler) → TorchServe → register; stopped afterwards."""
    work = tmp_path_factory.mktemp("torchserve-image")
    model_dir, config, store = package_model(
        work,
        build_tiny_model(kind="vit"),
        "tiny-vit-model",
        "tiny-vit.yaml",
        MODEL,
        batch_size=4,
        max_batch_delay=500,
        task="image-classification",
        policy="epee",
        max_image_pixels=MAX_IMAGE_PIXELS,
    )
    with running_torchserve(work, store) as server:
        key_file = str(work / "key_file.json")
        assert main(["deploy", "register", "--mar", f"{MODEL}.mar", "--management-url",
                     server.management_url, "--key-file", key_file]) == 0  # fmt: skip
        yield {"server": server, "model_dir": model_dir, "config": config}


@pytest.fixture(scope="module")
def engine(setup):
    """The same model and policy in-process, one image file at a time (the training reader): the reference."""
    model = EarlyExitModel.from_pretrained(setup["model_dir"])
    policy = ServeConfig.load(setup["config"]).policy
    transform = image_transform(model.image_processor, model.spec.num_channels)

    def answer(path) -> dict:
        return engine_answer(model, encode_images(transform, [load_image(path)]), policy)

    return answer


def predict_url(server: TorchServe) -> str:
    return f"{server.inference_url}/predictions/{MODEL}"


def png_call(server: TorchServe, data: bytes) -> dict:
    return {"data": data, "headers": {**server.auth(), "Content-Type": "image/png"}}


def json_call(server: TorchServe, data: bytes) -> dict:
    return {"json": {"image": base64.b64encode(data).decode()}, "headers": server.auth()}


def test_png_bytes_and_base64_json_match_the_in_process_engine(server, engine, images):
    calls = [png_call(server, data) for _, data in images] + [json_call(server, data) for _, data in images]
    responses = post_all(predict_url(server), calls)
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        body, expected = response.json(), engine(images[index % len(images)][0])
        assert set(body) == RESPONSE_KEYS and body["policy"] == "epee" and body["num_layers"] == 4
        assert (body["label"], body["exit_layer"]) == (expected["label"], expected["exit_layer"])
        assert list(body["probabilities"].values()) == pytest.approx(expected["probs"], abs=1e-4)
    assert len({response.json()["exit_layer"] for response in responses}) > 1  # rows exit at their own layers


def test_bad_images_get_their_own_4xx_and_batch_mates_are_answered(server, images):
    good = [png_call(server, data) for _, data in images[:4]]
    oversize = png(Image.new("L", (MAX_IMAGE_PIXELS // 32 + 1, 32)))
    bad = [
        (png_call(server, b"these bytes are not an image"), 400, "not a PNG or JPEG"),
        (png_call(server, images[0][1][:120]), 400, "truncated"),
        ({"json": {"image": "%% not base64 %%"}, "headers": server.auth()}, 400, "not valid base64"),
        (png_call(server, oversize), 413, "max_image_pixels"),
    ]
    calls = [good[0], bad[0][0], good[1], bad[1][0], good[2], bad[2][0], good[3], bad[3][0]]
    responses = post_all(predict_url(server), calls)
    for response, (_, status, fragment) in zip(responses[1::2], bad):
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"} and fragment in response.json()["error"]
    assert all(response.status_code == 200 and response.json()["label"] for response in responses[0::2])
    batch_statuses = defaultdict(set)
    for response in responses:
        batch_statuses[response.headers["X-EPEE-Batch-Id"]].add(response.status_code == 200)
    assert any(statuses == {True, False} for statuses in batch_statuses.values())  # bad and good in one batch


def png_declaring(width: int, height: int) -> bytes:
    """A decompression bomb's calling card: a valid PNG header declaring width × height, one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def test_a_hundred_mixed_image_requests_at_once(server, engine, images):
    """Good PNG/base64 requests and every kind of bad image, shuffled and sent concurrently."""
    bad_kinds = {
        "not an image": (png_call(server, b"these bytes are not an image"), 400, "not a PNG or JPEG"),
        "truncated PNG": (png_call(server, images[0][1][:120]), 400, "truncated"),
        "truncated JPEG": (png_call(server, jpeg(random_image(3))[:300]), 400, "truncated"),
        "bad base64": (
            {"json": {"image": "%% not base64 %%"}, "headers": server.auth()},
            400,
            "not valid base64",
        ),
        "base64 of text": (json_call(server, b"plain text, not an image"), 400, "not a PNG or JPEG"),
        "image not a string": (
            {"json": {"image": 12}, "headers": server.auth()},
            400,
            "must be a base64 string",
        ),
        "decompression bomb (PNG header 100000 x 100000)": (
            png_call(server, png_declaring(100_000, 100_000)),
            413,
            "max_image_pixels",
        ),  # fmt: skip
        "over max_image_pixels": (png_call(server, png(Image.new("L", (65, 64)))), 413, "max_image_pixels"),
    }
    rng = random.Random(1)
    plan = [("good", index) for index in range(len(images)) for _ in range(5)]
    plan += [("bad", kind) for kind in bad_kinds for _ in range(8)]
    rng.shuffle(plan)
    calls = [png_call(server, images[key][1]) if kind == "good" else bad_kinds[key][0] for kind, key in plan]
    responses = post_all(predict_url(server), calls)
    tally = Counter()
    for (kind, key), response in zip(plan, responses):
        tally[(kind, key if kind == "bad" else "PNG", response.status_code)] += 1
        if kind == "good":
            assert response.status_code == 200, response.text
            assert response.json()["exit_layer"] == engine(images[key][0])["exit_layer"]
        else:
            _, status, fragment = bad_kinds[key]
            assert response.status_code == status, (key, response.text)
            assert fragment in response.json()["error"], key
    print(f"\nimage fuzz: {len(calls)} requests at once")
    for (kind, key, status), count in sorted(tally.items()):
        print(f"  {kind:4} {key:50} -> {status} x{count}")
