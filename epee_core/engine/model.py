"""The early-exit model: a backbone adapter plus one exit head per layer, saved as a model directory
(docs/design.md, "Model directory").

model_dir/
  config.json, model.safetensors   the backbone (`save_pretrained`)
  tokenizer files                  (text tasks)
  preprocessor_config.json         the image processor (image-classification)
  exits.safetensors                every exit head
  gate.safetensors                 the learned exit gate (optional: `epee train-gate`)
  epee.yaml                        task, labels, backbone kind, head shape, training record
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer

from .backbones import BackboneAdapter, load_pretrained_backbone
from .gate import ExitGate
from .heads import ExitHeads, pool
from .inputs import (
    Example,
    ImageExample,
    encode_images,
    encode_texts,
    image_transform,
    model_text,
    processor_image_size,
)
from .onnx_layers import use_runtime
from .quantize import quantize_model
from .spec import ConfigError, ModelSpec

EXITS_FILE = "exits.safetensors"
SPEC_FILE = "epee.yaml"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


def _check_image_model(spec: ModelSpec, backbone: BackboneAdapter, image_processor) -> None:
    """An image model's backbone, image processor and epee.yaml must agree on the input size and channels."""
    if backbone.modality != "image":
        raise ConfigError(f"task image-classification needs an image backbone (vit), got '{backbone.kind}'")
    if image_processor is None:
        raise ConfigError("task image-classification needs an image processor")
    expected = (backbone.image_size, backbone.num_channels)
    if (spec.image_size, spec.num_channels) != expected:
        raise ConfigError(
            f"epee.yaml says image_size {spec.image_size}, num_channels {spec.num_channels}; the backbone takes "
            f"{expected[0]}×{expected[0]} images with {expected[1]} channels"
        )
    if processor_image_size(image_processor) != (backbone.image_size, backbone.image_size):
        raise ConfigError(
            f"the image processor resizes to {processor_image_size(image_processor)}, the backbone takes "
            f"{backbone.image_size}×{backbone.image_size}"
        )


def read_model_spec(directory: Path) -> ModelSpec:
    """The `epee.yaml` of a model directory, after checking the directory holds what a model needs."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: model directory not found")
    for required in (SPEC_FILE, EXITS_FILE, "config.json"):
        if not (directory / required).is_file():
            raise ConfigError(f"{directory}: not an epee model directory (missing {required})")
    return ModelSpec.load(directory / SPEC_FILE)


class EarlyExitModel(nn.Module):
    """Backbone adapter + exit heads + the spec that describes them, and the preprocessor: the tokenizer for text
    tasks, the image processor for image-classification."""

    def __init__(self, spec: ModelSpec, backbone: BackboneAdapter, tokenizer=None, image_processor=None):
        super().__init__()
        if backbone.num_layers != spec.num_layers or backbone.hidden_size != spec.hidden_size:
            raise ConfigError(
                f"epee.yaml says {spec.num_layers} layers × {spec.hidden_size} hidden, the backbone has "
                f"{backbone.num_layers} × {backbone.hidden_size}"
            )
        if spec.task == "image-classification":
            _check_image_model(spec, backbone, image_processor)
        elif backbone.modality != "text":
            raise ConfigError(f"task {spec.task} needs a text backbone, '{backbone.kind}' takes images")
        self.spec = spec
        self.backbone = backbone
        self.exits = ExitHeads(
            spec.num_layers,
            spec.hidden_size,
            len(spec.labels),
            spec.pooling,
            spec.head_dropout,
            read_hidden=backbone.exit_hidden,
        )
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.quantization = "none"  # set by `quantize.quantize_model`
        self.runtime = "torch"  # set by `onnx_layers.use_runtime`
        self.exit_gate: ExitGate | None = None  # the `gate` policy's classifier, when the directory has one

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def multi_label(self) -> bool:
        return self.spec.multi_label

    @property
    def device(self) -> torch.device:
        """The device the weights live on; the runner allocates everything it makes there too."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the weights (float32 unless loaded with another `dtype`)."""
        return next(self.parameters()).dtype

    def encode_examples(self, examples: list[Example] | list[ImageExample]) -> dict[str, torch.Tensor]:
        """Model inputs for a batch: right-padded tokens for text tasks, `pixel_values` for images."""
        if self.spec.task == "image-classification":
            transform = image_transform(self.image_processor, self.spec.num_channels)
            return encode_images(transform, [example.image for example in examples])
        texts = [model_text(example, self.spec.task) for example in examples]
        return encode_texts(self.tokenizer, texts, self.spec.max_length)

    def forward_all_exits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of every exit [L, B, C] with no early exit (training and calibration caches)."""
        hidden, mask = self.backbone.embed(inputs)
        bias = self.backbone.attention_bias(mask, hidden.dtype)
        all_logits = []
        for index in range(self.num_layers):
            hidden = self.backbone.run_layer(index, hidden, bias)
            all_logits.append(self.exits(index, hidden, mask))
        return torch.stack(all_logits)

    @torch.inference_mode()
    def stock_logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The last exit's logits [B, C] from the plain Hugging Face forward over the padded batch (no early exit,
        no length bucketing): the stock-handler baseline. Equals the `full` policy's logits."""
        hidden, mask = self.backbone.stock_forward(inputs)
        return self.exits.heads[-1](pool(hidden, mask, self.exits.pooling))

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(directory))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))
        if self.image_processor is not None:
            self.image_processor.save_pretrained(str(directory))
        state = {name: tensor.detach().contiguous() for name, tensor in self.exits.state_dict().items()}
        save_file(state, str(directory / EXITS_FILE))
        self.spec.save(directory / SPEC_FILE)
        if self.exit_gate is not None:
            self.exit_gate.save(directory)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        quantize: str = "none",
        runtime: str = "torch",
    ) -> EarlyExitModel:
        """Load a model directory written by `save_pretrained`, on `device` (weights in `dtype`, default as
        saved: float32), then quantized (`quantize="int8"`: CPU only, see `quantize.py`) or its layers moved to
        ONNX Runtime (`runtime="onnxruntime"`: float32 CPU, see `onnx_layers.py`); errors name the missing or
        bad file."""
        directory = Path(directory)
        spec = read_model_spec(directory)
        backbone = load_pretrained_backbone(directory)
        if backbone.kind != spec.backbone:
            raise ConfigError(
                f"{directory / SPEC_FILE}: backbone '{spec.backbone}' but config.json is '{backbone.kind}'"
            )
        tokenizer = image_processor = None
        if spec.task == "image-classification":
            if not (directory / IMAGE_PROCESSOR_FILE).is_file():
                raise ConfigError(f"{directory}: image model directory without {IMAGE_PROCESSOR_FILE}")
            image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = cls(spec, backbone, tokenizer, image_processor)
        try:
            model.exits.load_state_dict(load_file(str(directory / EXITS_FILE)))
        except RuntimeError as error:
            raise ConfigError(
                f"{directory / EXITS_FILE}: exit heads do not fit epee.yaml ({error})"
            ) from None
        model.exit_gate = ExitGate.load(directory)
        model = quantize_model(model.to(device=device, dtype=dtype).eval(), quantize)
        return use_runtime(model, runtime, directory)
