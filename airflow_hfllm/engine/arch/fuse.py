"""Fused projections: q/k/v as one matrix and gate/up as one, so a decode step runs one GEMM where it ran
three (or two). At a decode step's few hundred rows the k and v projections are narrow GEMMs that reach a
fraction of the GPU's rate; one wide GEMM reaches more (measured in docs/benchmarks.md).

The fused matrix is the only copy: the model's own ``q_proj``/``k_proj``/``v_proj`` (``gate_proj``/``up_proj``)
keep working, their weights now views into it, so ``generate()`` on the same cached model is unchanged and
no memory is added. Plain ``nn.Linear`` and FP8 (``engine/fp8.py``) projections are fused; bitsandbytes'
and MoE experts are not.
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

    kinds = {type(lin).__name__ if isinstance(lin, nn.Module) else None for lin in linears}
    if hasattr(module, name) or kinds not in ({"Linear"}, {"Fp8Linear"}) or \
            (kinds == {"Linear"} and not all(type(lin) is nn.Linear for lin in linears)):  # not bitsandbytes'
        return 0
    biased = [lin.bias is not None for lin in linears]
    if any(biased) and not all(biased):
        return 0
    # FP8 (engine/fp8.py): per-output-channel scales stack like the rows, and the input's per-token scale is
    # the same for all three, so the fused layer computes exactly what the separate ones did
    params = ["weight", "bias"] + (["weight_scale"] if kinds == {"Fp8Linear"} else [])
    with torch.no_grad():
        cat = {p: torch.cat([getattr(lin, p) for lin in linears]) for p in params if getattr(linears[0], p) is not None}
    sizes = [lin.out_features for lin in linears]
    if kinds == {"Fp8Linear"}:
        fused = type(linears[0])(cat["weight"], cat["weight_scale"], cat.get("bias"))
    else:
        fused = nn.Linear(linears[0].in_features, sum(sizes), bias=all(biased), device="meta")
        fused.weight = nn.Parameter(cat["weight"], requires_grad=False)
        if all(biased):
            fused.bias = nn.Parameter(cat["bias"], requires_grad=False)
    start = 0
    for lin, size in zip(linears, sizes):  # the model's own modules now read the fused copy
        for p, whole in cat.items():
            setattr(lin, p, nn.Parameter(getattr(fused, p)[start:start + size], requires_grad=False))
        start += size
    object.__setattr__(module, name, (fused, sizes))  # not a submodule: parameters are not counted twice
    return 1
