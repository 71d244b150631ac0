"""Training recipes: the defaults `epee train` uses for each named backbone (docs/training.md, "Recipes").

A flag given on the command line overrides its recipe value; everything else comes from the recipe, and the
recipe used is printed and recorded in the model directory's `epee.yaml`. A local checkpoint directory gets the
recipe of a pretrained text or image model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

AUGMENTATIONS = ("none", "mild", "flip")
CLASS_BALANCE = ("none", "weights", "sampler")


@dataclass(frozen=True)
class Recipe:
    epochs: int
    learning_rate: float  # backbone
    head_learning_rate: float  # exit heads
    batch_size: int
    max_length: int | None = 128  # text: tokens per input
    augment: str | None = None  # images: none, mild, flip
    class_balance: str = "weights"
    balance_power: float = 0.5  # class weights ∝ (1 / n_c)^power: 1 = balanced, 0.5 = half-way
    distill_weight: float = 0.0  # α of self-distillation from the final exit (0: off)

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


# Measured in docs/training.md. MiniLM is pretrained: a few epochs at a small learning rate. The *-small text
# models start from random weights: a larger learning rate and more epochs. Text sets are skewed (DDI 80 %
# `None`), so rare classes weigh more (power 0.5). vit-small reads 28×28 grey X-rays: augmentation without
# flips (a chest X-ray has a left and a right), many short epochs, and class-balanced draws: PneumoniaMNIST's
# training split is 90 % pneumonia, val 74 %, the held-back test 62.5 %, and a classifier for balanced classes
# is the one a changed class prior hurts least. MiniLM distils its early exits from the final one (α 0.5): on the
# whole ADE training split that took the certified policy from 5.21 to 2.77 layers (docs/training.md, "Exit
# study"); the from-scratch backbones keep it off until measured.
RECIPES: dict[str, Recipe] = {
    "minilm": Recipe(
        epochs=3, learning_rate=5e-5, head_learning_rate=1e-3, batch_size=16, distill_weight=0.5
    ),
    "bert-small": Recipe(epochs=6, learning_rate=5e-4, head_learning_rate=1e-3, batch_size=32),
    "albert-small": Recipe(epochs=6, learning_rate=5e-4, head_learning_rate=1e-3, batch_size=32),
    "gpt2-small": Recipe(epochs=6, learning_rate=5e-4, head_learning_rate=1e-3, batch_size=32),
    "vit-small": Recipe(
        epochs=20,
        learning_rate=3e-4,
        head_learning_rate=1e-3,
        batch_size=64,
        max_length=None,
        augment="mild",
        class_balance="sampler",
        balance_power=1.0,
    ),
}
# A local Hugging Face checkpoint directory: assumed pretrained.
CHECKPOINT_RECIPES: dict[str, Recipe] = {
    "text": RECIPES["minilm"],
    "image": Recipe(
        epochs=10, learning_rate=1e-4, head_learning_rate=1e-3, batch_size=32, max_length=None, augment="mild"
    ),
}


def recipe_for(backbone: str, task: str) -> tuple[str, Recipe]:
    """The recipe's name and the recipe for `--backbone` (a named backbone, else a checkpoint directory)."""
    if backbone in RECIPES:
        return backbone, RECIPES[backbone]
    modality = "image" if task == "image-classification" else "text"
    return f"{modality} checkpoint", CHECKPOINT_RECIPES[modality]
