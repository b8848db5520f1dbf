"""FP8 weights for the decoder's linear layers (``quantization="fp8"``).

:class:`Fp8Linear` holds its weight in ``float8_e4m3fn`` with one fp32 scale per output channel (the
row's absmax / 448, e4m3's largest value) and quantizes its input per token on the fly, then runs
``torch._scaled_mm`` with both scales ("rowwise" scaling: FP8 tensor cores on a GPU of compute capability
8.9 or newer, a reference kernel on the CPU). Per-channel and per-token scales keep an outlier channel of
the weight, or an outlier token, from flattening everything else to zero. Nothing syncs with the host, so
the fast engine's CUDA graph captures it; the fast engine calls the model's own modules, so swapping the
modules is all it takes.

:func:`quantize_model` swaps the ``nn.Linear`` layers of the decoder layers (attention and MLP projections)
and keeps the rest in the load dtype: ``lm_head`` and the embeddings (the logits' precision, a small share
of the FLOPs), norms, MoE routers (a small matrix whose rounding would change which experts run) and
vision towers. MoE expert weights are fused 3-D parameters in transformers 5, not ``nn.Linear``: they
stay in the load dtype too, so a MoE model saves only its attention weights.

Pre-quantized fine-grained FP8 checkpoints (``quant_method: fp8``, block scales) load into transformers'
``FP8Linear``, whose matmul is a Triton kernel fetched from the hub; :func:`adopt` turns those into
:class:`Fp8Linear` (see ``engine/loading.py``).

Torch is imported inside functions (the package keeps torch out of import time): :class:`Fp8Linear` is
built on first use and reached as ``fp8.Fp8Linear``.
"""

from __future__ import annotations

import functools

FP8_MAX = 448.0  # largest float8_e4m3fn value
MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores
ROUTERS = ("gate", "router", "shared_expert_gate")  # MoE routing layers: kept in the load dtype


def __getattr__(name: str):
    if name == "Fp8Linear":
        return _linear_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _quantize(weight):
    """(e4m3 weight [out, in], fp32 scale [out]) of a weight, row by row."""
    import torch

    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@functools.cache
def _linear_class():
    import torch

    class Fp8Linear(torch.nn.Module):
        """``y = x W^T + b`` with W in e4m3 and a per-output-channel scale; x quantized per token.

        ``_scaled_mm`` on CUDA wants the first operand row-major, the second column-major (``weight.t()``
        of a contiguous [out, in] weight) and both ``in_features`` and ``out_features`` multiples of 16;
        other shapes take a dequantized matmul (no real checkpoint has them).
        """

        def __init__(self, weight, scale, bias=None):
            super().__init__()
            self.out_features, self.in_features = weight.shape
            self.weight = torch.nn.Parameter(weight.contiguous(), requires_grad=False)
            self.weight_scale = torch.nn.Parameter(scale.float().reshape(-1).contiguous(), requires_grad=False)
            self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
            self.scaled_mm = self.in_features % 16 == 0 and self.out_features % 16 == 0

        @classmethod
        def from_linear(cls, linear):
            weight, scale = _quantize(linear.weight)
            return cls(weight, scale, linear.bias)

        def forward(self, x):
            if not self.scaled_mm:
                w = (self.weight.to(torch.float32) * self.weight_scale[:, None]).to(x.dtype)
                return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
            # Few passes over x: quantizing it cost a third of the GEMM's time on an H200 (70B shapes, 336 rows)
            rows = x.reshape(-1, self.in_features)
            absmax = torch.linalg.vector_norm(rows, float("inf"), dim=1, keepdim=True, dtype=torch.float32)
            scale = absmax.clamp_(min=1e-12).div_(FP8_MAX)
            # in x's dtype (bf16: a rounding far below e4m3's); no clamp: |x| / scale exceeds 448 by a
            # rounding at most, which rounds to 448
            xq = (rows * scale.reciprocal().to(rows.dtype)).to(torch.float8_e4m3fn)
            # rowwise scaling writes bf16 on CUDA: other activation dtypes (fp32 tests) round-trip through it
            out = torch.bfloat16 if x.is_cuda else x.dtype
            bias = None if self.bias is None else self.bias.to(out)
            # fast accumulation: 10-25% faster GEMMs at 70B shapes, 0.3% error against e4m3's 3%
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale[None], bias=bias,
                                 out_dtype=out, use_fast_accum=x.is_cuda)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

        def extra_repr(self):
            return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    Fp8Linear.__qualname__ = "Fp8Linear"  # pickles as airflow_hfllm.engine.fp8.Fp8Linear (module __getattr__)
    Fp8Linear.__module__ = __name__
    return Fp8Linear


def capable(device) -> bool:
    """Whether ``device`` is a GPU with FP8 matmuls."""
    import torch

    device = torch.device(device)
    return device.type == "cuda" and tuple(torch.cuda.get_device_capability(device)) >= MIN_CAPABILITY


def check_device(device) -> None:
    """Run one small FP8 layer on ``device`` now, so that a GPU without FP8 matmuls (compute capability
    below 8.9) or a torch build without rowwise ``_scaled_mm`` fails before the model loads.

    :raises RuntimeError: naming the GPU and its compute capability, or what the trial layer raised.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < MIN_CAPABILITY:
            raise RuntimeError(
                f"quantization='fp8' needs FP8 matmuls, on GPUs of compute capability "
                f"{'.'.join(map(str, MIN_CAPABILITY))} or newer (Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: use bf16 "
                f"(quantization=None) or bitsandbytes (8bit, 4bit) on it")
    try:
        linear = torch.nn.Linear(32, 32, device=device)
        _linear_class().from_linear(linear)(torch.ones(2, 32, device=device))
    except Exception as exc:
        raise RuntimeError(f"torch {torch.__version__} cannot run FP8 matmuls on {device}: "
                           f"{type(exc).__name__}: {exc}") from exc


def quantize_model(model) -> int:
    """Replace the decoder layers' ``nn.Linear`` modules of ``model`` by :class:`Fp8Linear`, in place, layer by
    layer (:func:`quantize_layer`); the number replaced.

    :raises RuntimeError: the model's device cannot run FP8 matmuls (:func:`check_device`).
    """
    from airflow_hfllm.engine.arch.layer import text_model

    check_device(next(model.parameters()).device)
    count = sum(quantize_layer(layer) for layer in text_model(model).layers)
    _release()
    return count


def quantize_layer(layer) -> int:
    """Replace one decoder layer's ``nn.Linear`` modules (routers aside) by :class:`Fp8Linear`; each
    load-dtype weight is freed with its module, so quantizing layer by layer peaks at one layer above the
    FP8 model. The number replaced."""
    import torch

    cls = _linear_class()
    return _swap(layer, lambda name, m: cls.from_linear(m) if type(m) is torch.nn.Linear and name not in ROUTERS
                 else None)


def adopt(model) -> int:
    """Replace transformers' ``FP8Linear`` modules (a pre-quantized fine-grained FP8 checkpoint) by
    :class:`Fp8Linear` (:func:`from_fine_grained`), one module at a time; the number replaced."""
    from airflow_hfllm.engine.arch.layer import text_model

    dtype = model.get_input_embeddings().weight.dtype
    count = sum(_swap(layer, lambda name, m: from_fine_grained(m, dtype) if type(m).__name__ == "FP8Linear"
                      else None) for layer in text_model(model).layers)
    _release()
    return count


def from_fine_grained(m, dtype):
    """An :class:`Fp8Linear` of a transformers ``FP8Linear``: its e4m3 weight times its tile's (or the
    tensor's) scale, quantized again per output channel (one more rounding: the tiles' scales have no
    rowwise kernel). A static activation scale is dropped (activations are scaled per token); the bias
    goes to ``dtype``, the model's."""
    w, scale = m.weight.float(), m.weight_scale_inv.float()
    if scale.numel() == 1:
        w = w * scale.reshape(())
    else:
        rows, cols = m.block_size
        n, k = w.shape
        w = w * scale.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
    weight, row_scale = _quantize(w)
    return _linear_class()(weight, row_scale, None if m.bias is None else m.bias.to(dtype))


def _swap(layer, replace) -> int:
    """``replace(name, module)`` (a new module, or ``None`` to keep it) over ``layer``'s modules; the number
    replaced."""
    count = 0
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            new = replace(name, child)
            if new is not None:
                setattr(parent, name, new)  # the old module and its weight go with their last reference
                count += 1
    return count


def _release() -> None:
    """Hand the freed load-dtype weights back to the driver, where the KV cache is sized from free memory."""
    from airflow_hfllm.engine.cache import free_memory

    free_memory()
