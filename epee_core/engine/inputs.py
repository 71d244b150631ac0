"""What the model reads: labelled examples, entity-marked text, tokenized and image batches.

Text tasks tokenize with the model directory's tokenizer, right-padded; relation extraction wraps the head and
tail entities in markers first. Image tasks go through a torchvision `transforms.v2` pipeline parameterised by the
model directory's image processor (`preprocessor_config.json`), the single record of the preprocessing used in
training, evaluation and serving alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2
from transformers import ViTImageProcessor

from .spec import ConfigError

ENTITY_MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")


class InputError(ValueError):
    """Content a request or a data file carries that the model cannot take; the message names the field."""


@dataclass
class Example:
    text: str
    label: str | None = None  # single-label tasks
    labels: list[str] | None = None  # multi-label
    head: str | None = None  # relation extraction: entity strings in `text`
    tail: str | None = None


@dataclass
class ImageExample:
    image: torch.Tensor  # uint8 [C, H, W], C = 1 (grey) or 3 (RGB)
    label: str | None = None


def _find(
    text: str, entity: str, taken: tuple[int, int] | None = None, after: int = 0
) -> tuple[int, int] | None:
    """First occurrence of `entity` (exact case, else case-insensitive) from `after` on, not overlapping `taken`."""
    for haystack, needle in ((text, entity), (text.lower(), entity.lower())):
        start = haystack.find(needle, after)
        while start != -1:
            end = start + len(needle)
            if taken is None or end <= taken[0] or start >= taken[1]:
                return start, end
            start = haystack.find(needle, start + 1)
    return None


def mark_entities(text: str, head: str, tail: str) -> str:
    """Wrap the first occurrence of `head` in [E1]…[/E1] and of `tail` in [E2]…[/E2] (docs/design.md, "HTTP contract").

    The tail's occurrence is the first that does not overlap the head's, so markers never nest.
    """
    for name, entity in (("head", head), ("tail", tail)):
        if not entity.strip():
            raise InputError(f"'{name}' is empty")
    head_span = _find(text, head)
    if head_span is None:
        raise InputError(f"'head' entity {head!r} does not occur in 'text'")
    tail_span = _find(text, tail, taken=head_span)
    while tail_span is None and head_span is not None:
        # The head's first occurrence may sit inside the tail's only one ('plasmin' in 'plasminogen'): try the
        # head's later occurrences before giving up.
        head_span = _find(text, head, after=head_span[0] + 1)
        tail_span = _find(text, tail, taken=head_span) if head_span is not None else None
    if head_span is None or tail_span is None:
        raise InputError(f"'tail' entity {tail!r} does not occur in 'text' apart from the head entity")
    inserts = sorted(
        [
            (head_span[0], "[E1] "),
            (head_span[1], " [/E1]"),
            (tail_span[0], "[E2] "),
            (tail_span[1], " [/E2]"),
        ],
        key=lambda insert: insert[0],
        reverse=True,
    )
    for position, marker in inserts:
        text = text[:position] + marker + text[position:]
    return text


def model_text(example: Example, task: str) -> str:
    """The string the tokenizer sees: the text, with entity markers for relation extraction."""
    if task == "relation-extraction":
        return mark_entities(example.text, example.head or "", example.tail or "")
    return example.text


def encode_texts(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenize a batch, right-padded to its longest row and truncated to `max_length` tokens."""
    tokenizer.padding_side = "right"
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return dict(encoded)


def add_entity_markers(tokenizer) -> None:
    """Register the entity markers as special tokens so they are never split (the caller resizes embeddings)."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(ENTITY_MARKERS)})


def image_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image as uint8 [C, H, W]: grey stays 1 channel, everything else (palette, RGBA, CMYK…) → RGB."""
    return v2.functional.pil_to_tensor(image.convert("L" if image.mode in ("L", "1") else "RGB"))


def default_image_processor(image_size: int, num_channels: int = 3) -> ViTImageProcessor:
    """The processor a from-scratch ViT is saved with: resize to `image_size`, scale to [0, 1], normalise to
    [-1, 1]."""
    return ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
    )


def processor_image_size(processor) -> tuple[int, int]:
    """(height, width) the processor resizes to."""
    size = processor.size
    height, width = size["height"], size["width"]
    if not height or not width:
        raise ConfigError(f"image processor size {dict(size)} has no 'height' and 'width'")
    return int(height), int(width)


def image_transform(processor, num_channels: int) -> v2.Compose:
    """uint8 [C, H, W] → normalised float [num_channels, H', W'] as the model takes it: grey → 3 channels (or
    RGB → grey for 1-channel models), resize to the processor's size, scale, normalise."""
    steps = [
        v2.RGB() if num_channels == 3 else v2.Grayscale(num_output_channels=1),
        v2.Resize(list(processor_image_size(processor)), antialias=True),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if getattr(processor, "do_normalize", True):
        steps.append(v2.Normalize(mean=list(processor.image_mean), std=list(processor.image_std)))
    return v2.Compose(steps)


def encode_images(transform: v2.Compose, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of uint8 images (any sizes) as the model's inputs: `{"pixel_values": [B, C, H, W]}`."""
    return {"pixel_values": torch.stack([transform(image) for image in images])}
