"""Image classification: MedMNIST `.npz` splits, image folders, the transform, image model directories and the
train / evaluate commands on images (docs/design.md, "Data formats")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import IMAGE_SIZE, LABELS, build_tiny_model, tiny_config
from PIL import Image
from transformers import AutoModel, ViTImageProcessor

from epee_core.cli import main
from epee_core.data.images import read_image_examples, read_image_folder, read_npz
from epee_core.engine.backbones import build_backbone
from epee_core.engine.inputs import default_image_processor, encode_images, image_transform
from epee_core.engine.model import EarlyExitModel
from epee_core.engine.spec import ConfigError, ModelSpec


def write_npz(path, splits: dict[str, int], size: int = 8, rgb: bool = False) -> str:
    """A MedMNIST-like file: split `name` has `count` images whose pixels all equal the split's code."""
    codes = {"train": 10, "val": 20, "test": 30}
    arrays = {}
    for name, count in splits.items():
        shape = (count, size, size, 3) if rgb else (count, size, size)
        arrays[f"{name}_images"] = np.full(shape, codes[name], dtype=np.uint8)
        arrays[f"{name}_labels"] = (np.arange(count) % 2).reshape(count, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(("split", "code", "count"), [("train", 10, 6), ("dev", 20, 4), ("eval", 30, 2)])
def test_npz_split_reads_its_arrays(tmp_path, split, code, count):
    path = write_npz(tmp_path / "set.npz", {"train": 6, "val": 4, "test": 2})
    examples = read_npz(path, split)
    assert len(examples) == count
    assert all(int(example.image.max()) == code for example in examples)


def test_npz_eval_falls_back_to_val_without_test_arrays(tmp_path):
    path = write_npz(tmp_path / "set.npz", {"train": 6, "val": 4})
    assert [int(example.image.max()) for example in read_npz(path, "eval")] == [20] * 4


def test_npz_labels_are_class_ids_and_images_grey_channel_first(tmp_path):
    path = write_npz(tmp_path / "set.npz", {"train": 5}, size=8)
    examples = read_npz(path, "train", max_samples=3)
    assert [example.label for example in examples] == ["0", "1", "0"]
    assert examples[0].image.shape == (1, 8, 8) and examples[0].image.dtype == torch.uint8


def test_npz_rgb_images_are_channel_first(tmp_path):
    path = write_npz(tmp_path / "set.npz", {"train": 2}, size=8, rgb=True)
    assert read_npz(path, "train")[0].image.shape == (3, 8, 8)


def test_npz_without_the_split_names_the_missing_array(tmp_path):
    path = write_npz(tmp_path / "set.npz", {"train": 2})
    with pytest.raises(ConfigError, match="'val_images'"):
        read_npz(path, "dev")


def test_multi_label_npz_is_refused(tmp_path):
    path = tmp_path / "chest.npz"
    np.savez(path, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.zeros((3, 14), np.uint8))
    with pytest.raises(ConfigError, match="multi-label"):
        read_npz(path, "train")


def test_grey_image_becomes_three_equal_normalised_channels_at_the_model_size():
    image = torch.tensor([[0, 255], [255, 0]], dtype=torch.uint8).repeat(4, 4)[None]  # 1 × 8 × 8
    transform = image_transform(default_image_processor(IMAGE_SIZE), num_channels=3)
    pixels = encode_images(transform, [image, image])["pixel_values"]
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    flat = image_transform(default_image_processor(8), 3)(torch.zeros(1, 8, 8, dtype=torch.uint8))
    assert torch.equal(flat, torch.full((3, 8, 8), -1.0))  # 0 → (0 - 0.5) / 0.5


def test_image_folder_labels_are_sub_folder_names_and_any_image_mode_loads(tmp_path):
    (tmp_path / "normal").mkdir()
    (tmp_path / "pneumonia").mkdir()
    Image.new("L", (10, 12), 40).save(tmp_path / "normal" / "a.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(tmp_path / "normal" / "b.png")
    Image.new("RGB", (30, 16), (9, 9, 9)).save(tmp_path / "pneumonia" / "c.jpg")
    Image.new("P", (8, 8)).save(tmp_path / "pneumonia" / "d.gif")
    (tmp_path / "pneumonia" / "notes.txt").write_text("not an image")
    examples = read_image_folder(tmp_path)
    assert sorted(example.label for example in examples) == ["normal", "normal", "pneumonia", "pneumonia"]
    assert sorted(example.image.shape[0] for example in examples) == [1, 3, 3, 3]
    transform = image_transform(default_image_processor(IMAGE_SIZE), num_channels=3)
    pixels = encode_images(transform, [example.image for example in examples])["pixel_values"]
    assert pixels.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_corrupt_image_in_a_folder_names_the_file(tmp_path):
    (tmp_path / "normal").mkdir()
    (tmp_path / "normal" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ConfigError, match="broken.png"):
        read_image_folder(tmp_path)


def test_image_data_must_be_npz_or_folder(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("{}\n")
    with pytest.raises(ConfigError, match=r"\.npz"):
        read_image_examples(path, "train")


def test_image_model_directory_roundtrip(tmp_path):
    model = build_tiny_model(kind="vit")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = EarlyExitModel.from_pretrained(tmp_path)
    assert (loaded.spec.image_size, loaded.spec.num_channels) == (IMAGE_SIZE, 3)
    assert loaded.tokenizer is None
    assert dict(loaded.image_processor.size) == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    pixels = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.forward_all_exits({"pixel_values": pixels}),
            model.forward_all_exits({"pixel_values": pixels}),
            atol=0,
            rtol=0,
        )


def test_image_model_directory_without_image_processor_is_refused(tmp_path):
    build_tiny_model(kind="vit").save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        EarlyExitModel.from_pretrained(tmp_path)


def image_spec(**changes) -> dict:
    spec = {
        "task": "image-classification",
        "labels": LABELS["image-classification"],
        "backbone": "vit",
        "pooling": "cls",
        "num_layers": 4,
        "hidden_size": 32,
        "image_size": IMAGE_SIZE,
        "num_channels": 3,
    }
    return {**spec, **changes}


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"image_size": None}, "image_size"),
        ({"image_size": "16"}, "image_size"),
        ({"num_channels": 2}, "num_channels"),
        ({"task": "text-classification", "pooling": "mean"}, "image_size"),
    ],
)
def test_epee_yaml_image_fields_are_validated(changes, key):
    with pytest.raises(ConfigError, match=key):
        ModelSpec.from_dict(image_spec(**changes))


def test_image_task_refuses_a_text_backbone(tokenizer):
    text_model = build_tiny_model(tokenizer, kind="albert")
    spec = ModelSpec.from_dict(image_spec(backbone="albert"))
    with pytest.raises(ConfigError, match="image backbone"):
        EarlyExitModel(spec, text_model.backbone, image_processor=default_image_processor(IMAGE_SIZE))


def test_train_and_evaluate_an_image_model_from_npz(tmp_path, capsys):
    """`epee train` on a local ViT checkpoint (16 px) with 28 px MedMNIST-like images, then `epee evaluate`
    reads the test split."""
    checkpoint = tmp_path / "vit"
    AutoModel.from_config(tiny_config("vit", 0)).save_pretrained(checkpoint)
    data = write_npz(tmp_path / "set.npz", {"train": 24, "val": 8, "test": 6}, size=28)
    output = tmp_path / "model"
    argv = ["train", "--task", "image-classification", "--backbone", str(checkpoint), "--train", data]
    argv += ["--dev", data, "--output", str(output), "--epochs", "1", "--batch-size", "8", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["labels"] == ["0", "1"] and summary["train_samples"] == 24
    assert len(summary["history"][0]["dev_accuracy_per_exit"]) == 4

    argv = ["evaluate", "--model", str(output), "--data", data, "--policy", "full,epee", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [result["policy"] for result in report["results"]] == ["full", "epee"]
    assert all(result["num_samples"] == 6 for result in report["results"])
    assert report["results"][0]["avg_exit_layer"] == 4.0


def test_vit_checkpoint_keeps_its_own_image_processor(tmp_path):
    AutoModel.from_config(tiny_config("vit", 0)).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.3] * 3).save_pretrained(
        tmp_path
    )
    backbone, processor = build_backbone(str(tmp_path))
    assert backbone.kind == "vit" and list(processor.image_mean) == [0.3] * 3
