"""Weight quantization of the decoder's linears for the torch-cuda engine, done once at build time.

Calibration-free: each output channel's scale is its weights' own absmax over the format's largest
value (int8: 127; float8 e4m3: 448), so the dequantized weight is q * scale[n]. A product
x @ W.T then equals (x @ q.T) * scale, which is how the kernels compute it: the weight is read in
8 bits and converted in registers, the scale applied once per output. `QuantLinear.forward` is the
dequantized reference (CPU, the torch ops, tests); the GPU kernels are checked against it.
The embedding and, unless asked (`quantize_head`), the LM head stay in the model's dtype (as
TensorRT-LLM's FP8 recipes keep them): the head's errors land on every logit directly."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# scheme -> (stored dtype, largest magnitude the format holds)
SCHEMES = {"fp8": (torch.float8_e4m3fn, 448.0), "int8-wo": (torch.int8, 127.0)}
PROJECTIONS = ("qkv_proj", "o", "gate_up", "down")  # a decoder layer's linears, by attribute name


def to_grid(values: torch.Tensor, dtype: torch.dtype, qmax: float) -> torch.Tensor:
    """Values in scale units -> the nearest point of the format's grid (float32): saturated at
    qmax, then rounded half to even (integers) or to the nearest float8 value."""
    y = values.float().clamp(-qmax, qmax)
    return y.to(dtype).float() if dtype.is_floating_point else y.round()


def quantize_weight(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] in the scheme's dtype, scale [N] float32), per output channel."""
    dtype, qmax = SCHEMES[scheme]
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / qmax
    return to_grid(w / scale[:, None], dtype, qmax).to(dtype), scale


def quantize_rows(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (q [M, K], scale [M, 1] float32): per-token dynamic scales, for the
    products that run in FP8 on the Tensor Cores (x ~= q * scale)."""
    qmax = torch.finfo(dtype).max
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    return (x.float() / scale).clamp(-qmax, qmax).to(dtype), scale


# schemes with static per-tensor activation scales (TensorRT Q/DQ) -> (format, largest magnitude)
STATIC = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def round_activations(x: torch.Tensor, scale: float, scheme: str) -> torch.Tensor:
    """x rounded to the scheme's 8-bit format with one static scale and read back (what a
    QuantizeLinear -> DequantizeLinear pair computes): int8 rounds half to even, fp8 to nearest
    e4m3; both saturate at the format's largest value."""
    return (to_grid(x.float() / scale, *STATIC[scheme]) * scale).to(x.dtype)


class StaticInput(nn.Module):
    """A projection whose input is divided by a per-channel SmoothQuant divisor and rounded to an
    8-bit format with one static scale first: what a calibrated Q/DQ graph's Div -> QuantizeLinear
    -> DequantizeLinear computes, the torch reference those graphs are checked against."""

    def __init__(self, linear: nn.Module, scale: float, divisor: torch.Tensor, scheme: str):
        super().__init__()
        self.linear, self.scale, self.scheme = linear, scale, scheme
        self.register_buffer("divisor", divisor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(round_activations(x / self.divisor, self.scale, self.scheme))


def static_reference(model: nn.Module, inputs: list[tuple[float, Any] | None], scheme: str) -> nn.Module:
    """`model` (unquantized, in place) as a calibrated Q/DQ graph of `scheme` ("int8" / "fp8")
    computes it: each projection's weight columns multiplied by its divisor, quantized per output
    channel, its input divided and rounded. `inputs`: (scale, divisor) per projection, layer by
    layer, None for a projection whose input is not quantized (`qdq_export.activation_scales`)."""
    kinds = [(layer, kind) for layer in model.layers for kind in PROJECTIONS]
    if len(inputs) != len(kinds):
        raise ValueError(f"{len(inputs)} calibrated inputs for {len(kinds)} projections: not this model's graph")
    divisors = [None if found is None else torch.tensor(found[1], dtype=torch.float32) for found in inputs]
    for (layer, kind), divisor in zip(kinds, divisors):
        if divisor is not None:
            getattr(layer, kind).weight.data *= divisor[None, :]
    quantize_model(model, "fp8" if scheme == "fp8" else "int8-wo")
    for (layer, kind), found, divisor in zip(kinds, inputs, divisors):
        if found is not None:
            setattr(layer, kind, StaticInput(getattr(layer, kind), found[0], divisor, scheme))
    return model


class QuantLinear(nn.Module):
    """A linear whose weight is stored quantized (`qweight` [N, K], `scale` [N]); the bias, if any,
    stays in the activations' dtype."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, scheme: str):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.scheme = scheme
        self.out_features, self.in_features = qweight.shape

    @classmethod
    def of(cls, linear: nn.Linear, scheme: str) -> QuantLinear:
        q, scale = quantize_weight(linear.weight, scheme)
        return cls(q, scale, linear.bias, scheme)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized(x.dtype), self.bias)


def operands(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(weight as stored, bias, per-channel scale or None): what a product kernel reads."""
    if isinstance(linear, QuantLinear):
        return linear.qweight, linear.bias, linear.scale
    return linear.weight, linear.bias, None


def quantize_model(model: nn.Module, scheme: str, hessians: dict | None = None) -> dict:
    """Replace every decoder layer's projections by QuantLinear (in place); returns what changed.
    `hessians` ((layer, projection) -> X^T X, `gptq.input_hessians`) choose GPTQ's rounding
    instead of the nearest value."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization {scheme!r} is not a torch-cuda scheme: use one of {', '.join(SCHEMES)}")
    from .gptq import gptq_weight

    before = after = 0
    for i, layer in enumerate(model.layers):
        for kind in PROJECTIONS:
            linear = getattr(layer, kind)
            if hessians is None:
                quantized = QuantLinear.of(linear, scheme)
            else:
                quantized = QuantLinear(*gptq_weight(linear.weight, hessians[(i, kind)], scheme), linear.bias, scheme)
            before += linear.weight.numel() * linear.weight.element_size()
            after += quantized.qweight.numel() * quantized.qweight.element_size() + quantized.scale.numel() * 4
            setattr(layer, kind, quantized)
    rounding = "none (absmax, nearest)" if hessians is None else "GPTQ rounding (absmax scales)"
    return {"scheme": scheme, "projection_bytes": before, "quantized_bytes": after, "calibration": rounding}


HEAD_SCHEME = "int8-wo"  # the LM head's format under --quantize-lm-head, whatever the projections' scheme


def quantize_head(model: nn.Module) -> dict:
    """The model's LM head quantized to int8 with a scale per vocabulary row, in place:
    `model.quant_head` holds it and the unquantized head is dropped. int8 under fp8 projections
    too: on SmolLM2 an e4m3 head cost +0.65 points of perplexity and an int8 one +0.04
    (docs/benchmarks.md), for the same bytes. Off by default: the head's errors land on every logit."""
    before = model.lm_head.numel() * model.lm_head.element_size()
    q, scale = quantize_weight(model.lm_head, HEAD_SCHEME)
    model.quant_head = QuantLinear(q, scale, None, HEAD_SCHEME)
    model.lm_head = None
    return {"lm_head": HEAD_SCHEME, "lm_head_bytes": before, "quantized_lm_head_bytes": q.numel() * q.element_size()}


FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 Tensor Cores


def check_device_support(scheme: str, device: torch.device | None, runtime: str) -> None:
    """Refuse fp8 on a GPU without FP8 Tensor Cores (`device` None: the build host's GPU, if any;
    a CPU-only build host leaves the check to the engine's start-up, or TensorRT's builder, on its
    GPU)."""
    if scheme != "fp8" or not torch.cuda.is_available():
        return
    if device is not None and device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < FP8_CAPABILITY:
        raise ValueError(
            f"quantization 'fp8' on runtime {runtime} needs FP8 Tensor Cores (compute capability >= 8.9); "
            f"this GPU has {cap[0]}.{cap[1]}: build with --quantization int8-wo instead"
        )


def place(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """model.to(device, dtype), except that quantized weights and their float32 scales keep their
    formats (a plain `.to(dtype)` would widen float8 weights and round the scales)."""
    model.to(device)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            continue
        for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model


def scheme_of(model: nn.Module) -> str:
    """The scheme a loaded engine model was built with ("none" for plain weights)."""
    linear = getattr(model.layers[0], PROJECTIONS[0])
    return linear.scheme if isinstance(linear, QuantLinear) else "none"
