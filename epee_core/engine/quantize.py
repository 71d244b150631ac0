"""int8 inference on CPU for an `EarlyExitModel`: dynamic per-token int8 activations × per-channel int8 weights.

Every linear layer of the backbone becomes an `Int8Linear`: the weight is int8 with one scale per output channel
(computed once, at load), each input row (token) is quantized to int8 with its own scale at run time, and the
product accumulates in int32 (`torch._int_mm`, oneDNN on x86) before it is rescaled to float32. These are the
numerics of torchao's `Int8DynamicActivationInt8WeightConfig`, in a plain module: torchao's tensor-subclass
dispatch was slower than float32 in eager mode on CPU here, and `torch.ao.quantization.quantize_dynamic` (being
removed) quantizes activations per tensor, so a row's answer would depend on its batch-mates. Per-token scales
keep the runner's invariant: a row gets the same result whatever else shares its (sub-)batch. The measurement behind
the choice is in docs/int8.md.

Embeddings, layer norms, attention softmax, activations and the exit heads stay float32. Quantizing MiniLM takes
well under a second, so workers quantize at load (`quantize: int8` in the `epee:` section) instead of shipping
int8 weights: the model directory and the archive keep the float32 safetensors.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("none", "int8")


class Int8Linear(nn.Module):
    """`y = x Wᵀ + b` with W int8 per output channel and x quantized per token to int8 at run time.

    Buffers (all plain tensors, so `state_dict` / safetensors work): `weight_t` int8 [in, out] (the transposed
    weight, laid out for `torch._int_mm`), `weight_scale` float32 [out], `bias` float32 [out] or absent.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_t", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

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
        # per-token scale = max |x| / 127 (amax and amin: faster than abs().amax() or aminmax on CPU)
        scale = torch.maximum(rows.amax(1, keepdim=True), rows.amin(1, keepdim=True).neg_())
        scale = scale.clamp_min_(1e-12).div_(127.0)  # [M, 1]
        quantized = (rows * scale.reciprocal()).round_().to(torch.int8)  # |values| <= 127
        out = torch._int_mm(quantized, self.weight_t).float().mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' `Conv1D` (GPT-2's linear layers, weight stored [in, out])."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D"
        and getattr(module, "weight", None) is not None
        and module.weight.dim() == 2
    )


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
