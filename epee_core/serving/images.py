"""Serving image-classification models (docs/design.md, "HTTP contract"): raw PNG/JPEG bytes or JSON `{"image": "<base64>"}`.

An image is checked before it is decoded: PIL's lazy `Image.open` reads only the header, so a picture whose
width × height exceeds `max_image_pixels` (a decompression bomb: a few kilobytes that would inflate to gigabytes)
is refused with 413 without allocating its pixels. Corrupt, truncated or non-image bodies and bad base64 are 400.
Decoded images go through the model's own transform (`images.image_transform`), as in training and evaluation.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ..engine.inputs import encode_images, image_tensor, image_transform
from ..engine.model import EarlyExitModel
from ..engine.spec import ConfigError
from .config import ServeConfig
from .service import EarlyExitService, RequestError, ServeRequest

IMAGE_FORMATS = ("PNG", "JPEG")
IMAGE_FIELDS = ("image", "epee")
# What PIL raises on corrupt or cut-off data (UnidentifiedImageError, an OSError, is caught before these).
CORRUPT_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error)
DATA_URL_PREFIX = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """PNG or JPEG bytes as uint8 [C, H, W]; the size is checked from the header before any pixel is decoded.

    Raises RequestError: 400 for bytes that are not a PNG/JPEG or are corrupt or truncated, 413 for an image
    over `max_pixels` (width × height).
    """
    if not data:
        raise RequestError(400, "empty image")
    try:
        with warnings.catch_warnings():
            # PIL warns above Image.MAX_IMAGE_PIXELS; the check below answers that case with a clear message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise RequestError(
                        413,
                        f"image is {width}×{height} = {width * height} pixels, "
                        f"the limit is {max_pixels} (max_image_pixels)",
                    )
                image.load()  # decode now, inside the checks (Image.open only read the header)
                return image_tensor(image)
    except RequestError:
        raise
    except Image.DecompressionBombError:  # PIL's process-wide guard (left at its default) backs up the check
        raise RequestError(
            413, f"image is far over the limit of {max_pixels} pixels (max_image_pixels); decompression bomb?"
        ) from None
    except UnidentifiedImageError:
        raise RequestError(400, "body is not a PNG or JPEG image") from None
    except CORRUPT_IMAGE_ERRORS as error:
        raise RequestError(400, f"image data is corrupt or truncated ({error})") from None


def decode_base64(value: Any) -> bytes:
    """The bytes of a JSON `"image"` field: standard base64, optionally as a `data:image/...;base64,` URL."""
    if not isinstance(value, str):
        raise RequestError(400, f"'image' must be a base64 string, got {type(value).__name__}")
    text = DATA_URL_PREFIX.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'image' is not valid base64") from None


def _is_json(payload: bytes | str) -> bool:
    """A body that is a JSON object (whatever its content type); PNG and JPEG never start with '{'."""
    start = payload.lstrip()[:1]
    return start in (b"{", "{")


def _json_fields(payload: Any) -> dict[str, Any]:
    """The fields of a JSON image request: parsed by TorchServe (a dict) or sent as bytes or text."""
    if isinstance(payload, (bytes, bytearray, str)):
        if not _is_json(payload):
            raise RequestError(
                400, 'expected raw PNG/JPEG bytes or a JSON object {"image": "<base64>"}, got text'
            )
        try:
            payload = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "body starts with '{' but is not valid JSON") from None
    if not isinstance(payload, dict):
        raise RequestError(
            400, f'expected a JSON object {{"image": "<base64>"}}, got JSON {type(payload).__name__}'
        )
    return payload


class ImageService(EarlyExitService):
    """image-classification: raw PNG/JPEG bytes, or JSON `{"image": "<base64>"}` with an optional `"epee"`."""

    oip_inputs = ("image",)  # an Open Inference Protocol request: BYTES rows of base64 PNG/JPEG

    def __init__(self, model: EarlyExitModel, config: ServeConfig, **identity: Any):
        super().__init__(model, config, **identity)
        if model.image_processor is None or model.spec.num_channels is None:
            raise ConfigError(f"task '{model.spec.task}' needs an image processor in the model directory")
        self.transform = image_transform(model.image_processor, model.spec.num_channels)

    def decode(self, payload: Any, headers: Mapping[str, Any]) -> ServeRequest:
        if isinstance(payload, (bytes, bytearray)) and not _is_json(payload):
            image = decode_image(bytes(payload), self.config.max_image_pixels)
            return ServeRequest([image], self.request_policy(None, headers))
        fields = _json_fields(payload)
        self.check_fields(fields, IMAGE_FIELDS)
        return ServeRequest([self.decode_row(fields)], self.request_policy(fields.get("epee"), headers))

    def decode_row(self, fields: Mapping[str, Any]) -> torch.Tensor:
        """The image of one row: `image` as base64 (or a data URL), checked before and while decoding."""
        if "image" not in fields:
            raise RequestError(400, "missing field 'image'")
        return decode_image(decode_base64(fields["image"]), self.config.max_image_pixels)

    def encode_inputs(self, model_inputs: list[Any]) -> dict[str, torch.Tensor]:
        return encode_images(self.transform, model_inputs)
