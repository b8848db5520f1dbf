"""Fused projections: q/k/v as one matrix and gate/up as one, so a decode step runs one GEMM where it ran
three (or two). At a decode step's few hundred rows the k and v projections are narrow GEMMs that reach a
fraction of the GPU's rate; one wide GEMM reaches more (measured in docs/benchmarks.md).

The fused matrix is the only copy: the model's own ``q_proj``/``k_proj``/``v_proj`` (``gate_proj``/``up_proj``)
keep working, their weights now views into it, so ``generate()`` on the same cached model is unchanged and
no memory is added. Only plain ``nn.Linear`` projections are fused (not quantized ones, not MoE experts).
"""

from __future__ import annotations

from airflow_hfllm.engine.arch.layer import GATE_UP, QKV, text_model


def fuse_projections(model) -> int:
    """Fuses each decoder layer's q/k/v and gate/up projections in place; returns how many were fused."""
    count = 0
    for layer in text_model(model).layers:
        attn, mlp = layer.self_attn, layer.mlp
        count += _fuse(attn, QKV, [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")])
        if hasattr(mlp, "down_proj") and hasattr(mlp, "act_fn"):  # down(act(gate(x)) * up(x))
            count += _fuse(mlp, GATE_UP, [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")])
    return count


def _fuse(module, name: str, linears: list) -> int:
    import torch
    from torch import nn

    if hasattr(module, name) or not all(type(lin) is nn.Linear for lin in linears):
        return 0
    biased = [lin.bias is not None for lin in linears]
    if any(biased) and not all(biased):
        return 0
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if all(biased) else None
    sizes, start = [], 0
    for lin in linears:  # the model's own modules now read the fused copy
        size = lin.out_features
        lin.weight = nn.Parameter(weight[start:start + size], requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[start:start + size], requires_grad=False)
        sizes.append(size)
        start += size
    object.__setattr__(module, name, (weight, bias, sizes))  # not a submodule: parameters are not counted twice
    return 1
