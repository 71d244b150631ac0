"""Encoder layers in ONNX Runtime: the same float32 layer, 1.3–2.4× faster on a CPU (docs/onnxruntime.md).

`runtime: onnxruntime` (a model YAML's `epee:` section, or `--runtime onnxruntime`) exports every layer of the
backbone with `torch.onnx.export` when the model loads, one graph per layer with the batch and the sequence
length dynamic, and runs them in ONNX Runtime's CPU provider. Everything around the layers stays in torch:
embeddings, the runner's compaction and padding trim, the exit heads and the policies. So early exit, length
buckets and the layer-level scheduler work unchanged; only the arithmetic inside a layer moves. The stock
Hugging Face forward (`stock_forward`, the `hf` row of `epee bench`) stays torch: it is what a stock handler runs.

Why a layer at a time: the runner stops rows between layers, so a whole-model graph would not do. A layer graph
also keeps each row's answer independent of its batch-mates (every operation is per row or per token; tested).

Sessions are made per torch thread count at call time (`torch.set_num_threads` is how the CLI and the worker size
their threads), with spinning off so idle ONNX Runtime threads do not compete with torch. Float32 on the CPU
only: int8 keeps its own kernels (`quantize.py`), and training never sees these graphs.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings

import torch
from torch import nn

from .backbones.base import BackboneAdapter
from .spec import RUNTIMES, ConfigError

_EXAMPLE_ROWS, _EXAMPLE_TOKENS = 2, 8  # export example shape; both axes are exported as dynamic


class _Layer(nn.Module):
    """One backbone layer as a module of (hidden, attention bias), the signature the export traces."""

    def __init__(self, backbone: BackboneAdapter, index: int):
        super().__init__()
        self.backbone, self.index = backbone, index

    def forward(self, hidden: torch.Tensor, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone.layer(self.index, hidden, attention_bias)


def _dynamic_axes(shape: torch.Size, batch: torch.export.Dim, tokens: torch.export.Dim) -> dict[int, object]:
    """Which axes of an example input are the batch and the sequence (by their example sizes)."""
    sizes = {_EXAMPLE_ROWS: batch, _EXAMPLE_TOKENS: tokens}
    return {axis: sizes[size] for axis, size in enumerate(shape) if size in sizes}


def export_layer(backbone: BackboneAdapter, index: int) -> bytes:
    """Layer `index` of `backbone` as a serialized ONNX model with inputs `hidden` (and `attention_bias` when
    the backbone masks attention), batch and sequence length dynamic."""
    mask = torch.ones(_EXAMPLE_ROWS, _EXAMPLE_TOKENS, dtype=torch.long)
    hidden = torch.zeros(_EXAMPLE_ROWS, _EXAMPLE_TOKENS, backbone.hidden_size)
    bias = backbone.attention_bias(mask, torch.float32) if backbone.modality == "text" else None
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens")
    inputs = {"hidden": hidden} if bias is None else {"hidden": hidden, "attention_bias": bias}
    shapes = {name: _dynamic_axes(value.shape, batch, tokens) for name, value in inputs.items()}
    with warnings.catch_warnings():  # the exporter's progress notes and axis-name remarks
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Layer(backbone, index).eval(),
            tuple(inputs.values()),
            input_names=list(inputs),
            output_names=["output"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    return program.model_proto.SerializeToString()


class OnnxRuntimeLayers:
    """Runs `backbone.layer(i, ·)` through ONNX Runtime sessions built from the exported layer graphs."""

    def __init__(self, backbone: BackboneAdapter):
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(f"runtime onnxruntime needs the onnxruntime package ({error})") from None
        self._onnxruntime = onnxruntime
        with torch.no_grad():
            self.graphs = [export_layer(backbone, index) for index in range(backbone.num_layers)]
        self._sessions: dict[int, list] = {}
        self._lock = threading.Lock()

    def sessions(self, threads: int) -> list:
        """The layer sessions for `threads` intra-op threads (made on first use)."""
        with self._lock:
            if threads not in self._sessions:
                options = self._onnxruntime.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._sessions[threads] = [
                    self._onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
                    for graph in self.graphs
                ]
            return self._sessions[threads]

    def __call__(self, index: int, hidden: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        session = self.sessions(torch.get_num_threads())[index]
        feed = {"hidden": hidden.detach().contiguous().numpy()}
        if attention_bias is not None:
            feed["attention_bias"] = attention_bias.detach().contiguous().numpy()
        return torch.from_numpy(session.run(None, feed)[0])


def resolve_runtime(requested: str, quantize: str) -> str:
    """`epee calibrate --runtime auto`: onnxruntime for float32 when it is installed, else torch (int8 keeps its
    own kernels, `quantize.py`)."""
    if requested != "auto":
        return requested
    return "onnxruntime" if quantize == "none" and importlib.util.find_spec("onnxruntime") else "torch"


def use_runtime(model, runtime: str):
    """Attach `runtime` to a loaded `EarlyExitModel` (in place; returned for chaining). "torch" changes nothing."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return model
    if model.quantization != "none":
        raise ConfigError("runtime onnxruntime runs float32 layers: it does not combine with quantize int8")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ConfigError(f"runtime onnxruntime runs float32 on the CPU, not {model.dtype} on {model.device}")
    model.backbone.layer_runtime = OnnxRuntimeLayers(model.backbone)
    model.runtime = runtime
    return model
