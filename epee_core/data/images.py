"""Reading labelled images for `image-classification`: MedMNIST `.npz` splits and image folders."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..engine.inputs import ImageExample, image_tensor
from ..engine.spec import ConfigError
from .rows import RowProblems

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# Which arrays of a MedMNIST `.npz` each use reads, first present wins: training, the dev set of training, and
# evaluate / calibrate / bench.
NPZ_SPLITS = {"train": ("train",), "dev": ("val",), "eval": ("test", "val")}


SPLITS = tuple(NPZ_SPLITS)


def _npz_images(images: np.ndarray, where: str) -> torch.Tensor:
    """MedMNIST arrays [N, H, W] (grey) or [N, H, W, 3] (RGB) as uint8 [N, C, H, W]."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise ConfigError(f"{where}: expected images of shape (N, H, W) or (N, H, W, 3), got {images.shape}")
    if images.dtype != np.uint8:
        raise ConfigError(f"{where}: expected uint8 pixels, got {images.dtype}")
    return torch.from_numpy(np.ascontiguousarray(images))


def read_npz(path: str | Path, split: str, max_samples: int | None = None) -> list[ImageExample]:
    """Examples of one split of a MedMNIST `.npz` (`{split}_images`, `{split}_labels`); labels become "0", "1"…"""
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise ValueError(f"unknown split '{split}': expected one of {', '.join(SPLITS)}")
    with np.load(path) as arrays:
        prefix = next((name for name in NPZ_SPLITS[split] if f"{name}_images" in arrays), None)
        if prefix is None:
            wanted = " or ".join(f"'{name}_images'" for name in NPZ_SPLITS[split])
            raise ConfigError(f"{path}: no {wanted} array (has: {', '.join(sorted(arrays.files))})")
        if f"{prefix}_labels" not in arrays:
            raise ConfigError(f"{path}: '{prefix}_images' has no matching '{prefix}_labels' array")
        images = arrays[f"{prefix}_images"][:max_samples]
        labels = arrays[f"{prefix}_labels"][:max_samples]
    where = f"{path} '{prefix}_images'"
    pixels = _npz_images(images, where)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != len(pixels):
        raise ConfigError(
            f"{path}: '{prefix}_labels' must hold one class id per image (shape (N,) or (N, 1)), "
            f"got {labels.shape} for {len(pixels)} images (multi-label .npz sets are not supported)"
        )
    return [ImageExample(image, str(int(label))) for image, label in zip(pixels, labels)]


def npz_prefix(path: str | Path, split: str) -> str:
    """The array prefix `read_npz` reads for `split` (`train`, `val`, `test`)."""
    with np.load(path) as arrays:
        return next((name for name in NPZ_SPLITS[split] if f"{name}_images" in arrays), NPZ_SPLITS[split][0])


def load_image(path: str | Path) -> torch.Tensor:
    """One image file as uint8 [C, H, W] (see `image_tensor`)."""
    try:
        with Image.open(path) as image:
            return image_tensor(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ConfigError(f"{path}: not a readable image ({error})") from None


def read_image_folder(
    path: str | Path, max_samples: int | None = None, problems: RowProblems | None = None
) -> list[ImageExample]:
    """Examples of a folder with one sub-folder of images per class (the sub-folder name is the label).

    Files are taken in a fixed shuffled order, so `max_samples` keeps a sample of every class. An unreadable
    image is an error naming the file, or with `problems` is recorded there and left out.
    """
    return _read_image_folder(path, max_samples, problems)[0]


def _read_image_folder(
    path: Path, max_samples: int | None, problems: RowProblems | None
) -> tuple[list[ImageExample], list[str]]:
    path = Path(path)
    files = [
        (file, class_dir.name)
        for class_dir in sorted(p for p in path.iterdir() if p.is_dir())
        for file in sorted(class_dir.iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise ConfigError(
            f"{path}: no images found (expected one sub-folder per class holding "
            f"{', '.join(IMAGE_SUFFIXES)} files)"
        )
    random.Random(0).shuffle(files)
    examples, where = [], []
    for file, label in files:
        try:
            examples.append(ImageExample(load_image(file), label))
            where.append(str(file))
        except ConfigError as error:
            if problems is None:
                raise
            problems.add(str(file), "unreadable image", str(error).removeprefix(f"{file}: "))
    return examples[:max_samples], where[:max_samples]


def read_image_examples(
    path: str | Path, split: str, max_samples: int | None = None, problems: RowProblems | None = None
) -> tuple[list[ImageExample], list[str]] | list[ImageExample]:
    """Labelled images from a MedMNIST `.npz` (the arrays of `split`) or an image folder (used whole).

    With `problems` (unreadable images are recorded there) returns the examples and where each one is
    (`FILE:ARRAY[i]` or the image file), else the examples alone."""
    path = Path(path)
    if path.is_dir():
        examples, where = _read_image_folder(path, max_samples, problems)
    elif path.is_file() and path.suffix == ".npz":
        examples = read_npz(path, split, max_samples)
        prefix = npz_prefix(path, split)
        where = [f"{path}:{prefix}_labels[{index}]" for index in range(len(examples))]
    elif path.is_file():
        raise ConfigError(f"{path}: image data must be a MedMNIST .npz file or a folder of class sub-folders")
    else:
        raise ConfigError(f"{path}: data file or folder not found")
    if not examples and problems is None:
        raise ConfigError(f"{path}: no examples")
    return (examples, where) if problems is not None else examples
