"""int8 inference on CPU for an `EarlyExitModel`: dynamic per-token int8 activations × per-channel int8 weights.

Every linear layer of the backbone becomes an `Int8Linear`: the weight is int8 with one scale per output channel
(computed once, at load), each input row (token) is quantized to int8 with its own scale at run time, and the
product accumulates in int32 before it is rescaled to float32. These are the numerics of torchao's
`Int8DynamicActivationInt8WeightConfig`, in a plain module: torchao's tensor-subclass
dispatch was slower than float32 in eager mode on CPU here, and `torch.ao.quantization.quantize_dynamic` (being
removed) quantizes activations per tensor, so a row's answer would depend on its batch-mates. Per-token scales
keep the runner's invariant: a row gets the same result whatever else shares its (sub-)batch. The measurement behind
the choice is in docs/int8.md.

Two kernels, chosen once per process (`int8_kernel`; `EPEE_INT8_KERNEL=int_mm|fbgemm` forces one):
- `int_mm`: `torch._int_mm` (oneDNN), 8-bit activations. Fast where the CPU multiplies int8 natively (AVX-512
  VNNI, AVX-VNNI, AMX, arm64); on a plain AVX2 x86 CPU oneDNN falls back to a reference loop 20-50x slower
  than float32.
- `fbgemm` (x86 without VNNI): fbgemm's dynamic int8 linear, whose AVX2 kernel needs 7-bit activations
  (`reduce_range`). Each token is scaled to integers in [-63, 63] first and one fence row holding ±63.5 pins
  fbgemm's per-tensor range to exactly scale 1, zero point 64, so the product is exact and per token: a row's
  answer still does not depend on its batch-mates. 7-bit activations round a little more than 8-bit ones, so
  int8 answers may differ slightly between CPUs of the two kinds (calibrate on the CPU kind you serve on).

Embeddings, layer norms, attention softmax, activations and the exit heads stay float32. Quantizing MiniLM takes
well under a second, so workers quantize at load (`quantize: int8` in the `epee:` section) instead of shipping
int8 weights: the model directory and the archive keep the float32 safetensors.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from torch import nn

SCHEMES = ("none", "int8")
KERNELS = ("int_mm", "fbgemm")
NATIVE_INT8_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}  # /proc/cpuinfo flags of CPUs that multiply int8
FENCE = 63.5  # see the module docstring: pins fbgemm's per-tensor range to scale 1, zero point 64


class Int8Linear(nn.Module):
    """`y = x Wᵀ + b` with W int8 per output channel and x quantized per token to int8 at run time.

    Buffers (all plain tensors, so `state_dict` / safetensors work): `weight_t` int8 [in, out] (the transposed
    weight, laid out for `torch._int_mm`), `weight_scale` float32 [out], `bias` float32 [out] or absent. The
    `fbgemm` kernel packs its own copy of the weight on first use.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.kernel = int8_kernel()
        self._packed = None  # fbgemm's packed weight and fence row, made on first use

    @classmethod
    def from_linear(cls, linear: nn.Module) -> Int8Linear:
        """From an `nn.Linear` (weight [out, in]) or a transformers `Conv1D` (GPT-2; weight [in, out])."""
        if isinstance(linear, nn.Linear):
            weight = linear.weight.detach().float()
        else:
            weight = linear.weight.detach().float().t()
        module = cls(weight.shape[1], weight.shape[0], linear.bias is not None)
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        module.weight_t.copy_(torch.round(weight / scale[:, None]).clamp_(-127, 127).t())
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.copy_(linear.bias.detach().float())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, self.in_features).float()
        # per-token scale = max |x| / levels (amax and amin: faster than abs().amax() or aminmax on CPU)
        scale = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_()).clamp_min_(1e-12)
        if self.kernel == "int_mm":
            scale.div_(127.0)  # [M, 1]
            quantized = (rows * scale.reciprocal()).round_().to(torch.int8)  # |values| <= 127
            out = torch._int_mm(quantized, self.weight_t).float().mul_(scale).mul_(self.weight_scale)
        else:
            out = self._fbgemm_product(rows, scale.div_(63.0))
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _fbgemm_product(self, rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """(rows / scale rounded to [-63, 63]) · W_int8ᵀ · weight_scale · scale, exactly, with fbgemm's kernel."""
        if self._packed is None:
            with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packed weight is not
                warnings.simplefilter("ignore", UserWarning)
                weight = torch._make_per_channel_quantized_tensor(
                    self.weight_t.t().contiguous(), self.weight_scale.double(),
                    torch.zeros(self.out_features, dtype=torch.long), 0,
                )  # fmt: skip
                packed = torch.ops.quantized.linear_prepack(weight, None)
            fence = torch.zeros(1, self.in_features)
            fence[0, 0], fence[0, -1] = -FENCE, FENCE
            self._packed = (packed, fence)
        packed, fence = self._packed
        levels = torch.cat([(rows * scale.reciprocal()).round_(), fence])
        return torch.ops.quantized.linear_dynamic(levels, packed, True)[:-1].mul_(scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"kernel={self.kernel}"
        )


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' `Conv1D` (GPT-2's linear layers, weight stored [in, out])."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D"
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    )


@functools.cache
def int8_kernel() -> str:
    """`int_mm` where the CPU multiplies int8 natively (or `EPEE_INT8_KERNEL` says so), `fbgemm` on an x86 CPU
    without VNNI (see the module docstring)."""
    forced = os.environ.get("EPEE_INT8_KERNEL", "").strip()
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"EPEE_INT8_KERNEL={forced!r}: expected one of {', '.join(KERNELS)}")
        return forced
    try:
        flags = {
            flag
            for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
            if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()
        }
    except OSError:
        return "int_mm"
    x86 = "sse2" in flags
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    return "fbgemm" if x86 and fbgemm and not flags & NATIVE_INT8_FLAGS else "int_mm"


def int8_supported() -> bool:
    """Whether this torch build runs `torch._int_mm` on CPU (checked with a tiny product)."""
    try:
        torch._int_mm(torch.ones(32, 32, dtype=torch.int8), torch.ones(32, 32, dtype=torch.int8))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@torch.no_grad()
def quantize_model(model, scheme: str = "int8"):
    """Quantize the backbone's linear layers of an `EarlyExitModel` in place (`scheme` "none" leaves it as is);
    returns the model. CPU, float32 models, inference only."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization '{scheme}': expected one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return model
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"int8 runs on CPU with a float32 model, this one is {model.dtype} on {model.device}"
        )
    if not int8_supported():
        raise RuntimeError("int8 needs torch._int_mm on this CPU (torch >= 2.2, x86-64 or arm64)")
    for name, module in list(model.backbone.named_modules()):
        if _is_linear(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, child, Int8Linear.from_linear(module))
    model.quantization = scheme
    return model.eval()
