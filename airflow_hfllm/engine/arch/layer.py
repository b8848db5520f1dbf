"""What one decoder layer computes, through the model's own modules, for every family of
:mod:`airflow_hfllm.engine.arch`: shared by the fast engine's prefill and decode and the Llama Guard
verdict pass. What differs between families is found on the modules themselves: a fused ``qkv_proj``
(Phi-3), per-head ``q_norm``/``k_norm`` (Qwen3, Gemma 3), a rotary table narrower than the head (partial
rotary: Phi-4-mini), norms around the MLP as well (Gemma 3's sandwich), and a mixture-of-experts block
as the MLP (Mixtral, Qwen3-MoE, gpt-oss). Masks (windows), attention sinks and soft-capping are the caller's
``attend``."""

from __future__ import annotations

from typing import Sequence

# set by engine/arch/fuse.py: (one linear module, split sizes) of the fused q/k/v and gate/up projections
QKV, GATE_UP = "fused_qkv", "fused_gate_up"
# set on each attention module when the decoder compiles (engine/compiled.py): (heads, kv_heads, head_dim),
# read there by the compiled pieces. Under torch.compile(dynamic=True) a compiled function's int arguments, and
# the ints of its closures, become symbolic (kernels generic in the head size); a module's ints stay constant
DIMS = "hfllm_dims"


def text_model(model):
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a causal LM or a vision-language model."""
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", None) or inner


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_parameters(config) -> dict:
    """The text decoder's rope parameters (transformers 5's ``rope_parameters``, older ``rope_scaling``)."""
    cfg = text_config(config)
    return getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}


def prefill_attention():
    """SDPA backends for prefill: flash, then memory-efficient, then math. Not cuDNN: torch picks it on
    H100, and it builds an execution plan for every new shape on the host (2.8 ms per call measured),
    which made host time most of a prefill whose shapes change with every group."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def padded(rows: Sequence[Sequence[int]], pad: int = 0, left: bool = False):
    """Token id rows as one [n, max(1, longest)] CPU tensor, padded after each row's end (``left``: before its
    start)."""
    return padded_with_mask(rows, pad, left)[0]


def padded_with_mask(rows: Sequence[Sequence[int]], pad: int = 0, left: bool = False):
    """:func:`padded`'s ids and the bool mask [n, width] of their real tokens. One numpy assignment, not a
    tensor per row: 512 rows took ~23 ms row by row on a CI core."""
    import itertools

    import numpy as np
    import torch

    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    width = max(1, int(lengths.max(initial=0)))
    cols = np.arange(width)
    real = cols >= width - lengths[:, None] if left else cols < lengths[:, None]
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    ids[real] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(real)


def upload(values, device):
    """``values`` (a list of ints or a CPU tensor) on ``device`` without a sync: an upload from pageable memory
    waits for the GPU's queue to drain, so the host could not prepare the next pass (or capture a graph)
    while the GPU runs this one; one from pinned memory queues behind it."""
    import torch

    cpu = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.long)
    return cpu.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else cpu.to(device)


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_qkv(attn, h, dims: tuple[int, int, int]):
    """q, k, v [n, heads, T, head_dim] of normed hidden states h [n, T, D], q/k normed per head."""
    heads, kv_heads, head_dim = dims
    n, t, _ = h.shape
    fused = getattr(attn, QKV, None)
    if fused:
        linear, sizes = fused
        q, k, v = linear(h).split(sizes, dim=-1)
    elif hasattr(attn, "qkv_proj"):
        q, k, v = attn.qkv_proj(h).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    else:
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    q, k, v = q.view(n, t, heads, head_dim), k.view(n, t, kv_heads, head_dim), v.view(n, t, kv_heads, head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def apply_rope(x, cos, sin):
    """Rotary embedding on x [n, H, T, hd] with cos/sin [n or 1, 1, T, rotary_dim]; a table narrower than
    the head rotates the first ``rotary_dim`` dims only (partial rotary)."""
    import torch

    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


def decoder_layer(layer, x, cos, sin, write, attend, dims: tuple[int, int, int], pieces=None):
    """One decoder layer through the model's own modules. x: [n, T, D], cos/sin: [n or 1, T, rotary_dim],
    dims: (heads, kv_heads, head_dim). ``write(l, k, v)`` stores this step's keys/values and
    ``attend(l, q, k, v, scale)`` returns the attention output [n, H, T, hd]. ``pieces``: what runs instead
    of ``(before_attention, after_attention)`` (the decoder's compiled ones, ``engine/compiled.py``); the
    KV write and attention between them are the caller's."""
    before, after = pieces or (before_attention, after_attention)
    attn = layer.self_attn
    q, k, v = before(layer, x, cos, sin, dims)
    write(attn.layer_idx, k, v)
    return after(layer, x, attend(attn.layer_idx, q, k, v, attn.scaling), dims)


def before_attention(layer, x, cos, sin, dims: tuple[int, int, int]):
    """The layer up to attention: input norm, q/k/v projection, per-head q/k norms, rope. q, k, v [n, H or
    KV, T, hd] of x [n, T, D]."""
    q, k, v = project_qkv(layer.self_attn, layer.input_layernorm(x), dims)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def after_attention(layer, x, o, dims: tuple[int, int, int]):
    """The layer after attention: o_proj of the attention output o [n, H, T, hd], residual, norms, MLP,
    residual; the layer's output [n, T, D]."""
    heads, _, head_dim = dims
    n, t, _ = x.shape
    o = layer.self_attn.o_proj(o.transpose(1, 2).reshape(n, t, heads * head_dim))
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma's sandwich: norms after attention and MLP too
        x = x + layer.post_attention_layernorm(o)
        return x + layer.post_feedforward_layernorm(mlp(layer, layer.pre_feedforward_layernorm(x)))
    x = x + o
    return x + mlp(layer, layer.post_attention_layernorm(x))


def mlp(layer, h):
    fused = getattr(layer.mlp, GATE_UP, None)
    if fused:
        linear, sizes = fused
        gate, up = linear(h).split(sizes, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
    out = layer.mlp(h)
    return out[0] if isinstance(out, tuple) else out  # gpt-oss's MoE block also returns its router scores
