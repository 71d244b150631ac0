"""Encoder layers in ONNX Runtime: the same float32 layer, 1.3–2.4× faster on a CPU (docs/onnxruntime.md).

`runtime: onnxruntime` (a model YAML's `epee:` section, or `--runtime onnxruntime`) exports every layer of the
backbone with `torch.onnx.export` when the model loads, one graph per layer with the batch and the sequence
length dynamic, and runs them in ONNX Runtime's CPU provider. Everything around the layers stays in torch:
embeddings, the runner's compaction and padding trim, the exit heads and the policies. So early exit, length
buckets and the layer-level scheduler work unchanged; only the arithmetic inside a layer moves. The stock
Hugging Face forward (`stock_forward`, the `hf` row of `epee bench`) stays torch: it is what a stock handler runs.

Why a layer at a time: the runner stops rows between layers, so a whole-model graph would not do. A layer graph
also keeps each row's answer independent of its batch-mates (every operation is per row or per token; tested).

Exporting takes a few seconds a layer, so `epee package` exports once and puts the graphs in the archive
(`onnx/` in the model directory, with the hash of the weights they were made from); a worker reads them when
the hash matches and exports only when they are missing or stale.

Sessions are made per torch thread count at call time (`torch.set_num_threads` is how the CLI and the worker size
their threads), with spinning off so idle ONNX Runtime threads do not compete with torch. Float32 on the CPU
only: int8 keeps its own kernels (`quantize.py`), and training never sees these graphs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from .backbones.base import BackboneAdapter
from .spec import RUNTIMES, ConfigError, hash_files

_EXAMPLE_ROWS, _EXAMPLE_TOKENS = 2, 8  # export example shape; both axes are exported as dynamic
GRAPHS_DIR = "onnx"  # in a model directory: layer-{i}.onnx and manifest.json (`write_layer_graphs`)
_WEIGHT_FILES = ("config.json", "model.safetensors")  # what the graphs are made from

logger = logging.getLogger(__name__)


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


def weights_hash(directory: str | Path) -> str:
    """sha256 of the backbone's config and weights in a model directory: what exported graphs must match."""
    root = Path(directory)
    return hash_files([root / name for name in _WEIGHT_FILES if (root / name).is_file()], root)


def write_layer_graphs(model, directory: str | Path) -> Path:
    """Export the layers of `model`, loaded from `directory`, into `directory/onnx/` (what `epee package` does
    for a `runtime: onnxruntime` archive, so workers need not export)."""
    target = Path(directory) / GRAPHS_DIR
    target.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for index in range(model.num_layers):
            (target / f"layer-{index}.onnx").write_bytes(export_layer(model.backbone, index))
    manifest = {"weights_sha256": weights_hash(directory), "num_layers": model.num_layers}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def read_layer_graphs(directory: str | Path, num_layers: int) -> list[bytes] | None:
    """The graphs `write_layer_graphs` left in `directory`, or None when there are none or they were made from
    other weights (a notice says so)."""
    target = Path(directory) / GRAPHS_DIR
    try:
        manifest = json.loads((target / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    fresh = (
        manifest.get("weights_sha256") == weights_hash(directory) and manifest.get("num_layers") == num_layers
    )
    paths = [target / f"layer-{index}.onnx" for index in range(num_layers)]
    if not fresh or not all(path.is_file() for path in paths):
        logger.warning("epee: the layer graphs in %s do not match the weights; exporting again", target)
        return None
    logger.info("epee: %d layer graphs read from %s", num_layers, target)
    return [path.read_bytes() for path in paths]


class OnnxRuntimeLayers:
    """Runs `backbone.layer(i, ·)` through ONNX Runtime sessions built from the layer graphs (exported here
    unless `graphs` are given)."""

    def __init__(self, backbone: BackboneAdapter, graphs: list[bytes] | None = None):
        try:
            import onnxruntime
        except ImportError as error:
            raise ConfigError(f"runtime onnxruntime needs the onnxruntime package ({error})") from None
        self._onnxruntime = onnxruntime
        if graphs is None:
            with torch.no_grad():
                graphs = [export_layer(backbone, index) for index in range(backbone.num_layers)]
        self.graphs = graphs
        self._sessions: dict[int, list] = {}
        self._lock = threading.Lock()

    def sessions(self, threads: int) -> list:
        """The layer sessions for `threads` intra-op threads (made on first use; the lookup takes no lock)."""
        made = self._sessions.get(threads)
        if made is not None:
            return made
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


def use_runtime(model, runtime: str, directory: str | Path | None = None):
    """Attach `runtime` to a loaded `EarlyExitModel` (in place; returned for chaining), with the layer graphs
    `epee package` left in its model `directory` when they match its weights. "torch" changes nothing."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return model
    if model.quantization != "none":
        raise ConfigError("runtime onnxruntime runs float32 layers: it does not combine with quantize int8")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ConfigError(f"runtime onnxruntime runs float32 on the CPU, not {model.dtype} on {model.device}")
    graphs = read_layer_graphs(directory, model.num_layers) if directory is not None else None
    model.backbone.layer_runtime = OnnxRuntimeLayers(model.backbone, graphs)
    model.runtime = runtime
    return model
