"""Image augmentation for training (torchvision `transforms.v2` on uint8 [C, H, W] images, before the model's own
resize and normalisation). Evaluation and serving never augment."""

from __future__ import annotations

from torchvision.transforms import v2

from ..engine.spec import ConfigError
from .recipes import AUGMENTATIONS


def augmentation(name: str | None) -> v2.Compose | None:
    """`mild`: small random rotation (±10°), shift (±6 %), zoom (0.9–1.1×) and brightness / contrast (±20 %), no
    flips: for images whose left and right differ, such as chest X-rays (the heart sits on the left; a flipped
    film is not one the model will ever be shown). `flip`: `mild` plus horizontal flips, for images without a
    side (skin lesions, tissue patches). `none` / None: no augmentation."""
    if name in (None, "none"):
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(f"--augment {name!r}: expected one of {', '.join(AUGMENTATIONS)}")
    steps = [
        v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.2, contrast=0.2),
    ]
    if name == "flip":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)
