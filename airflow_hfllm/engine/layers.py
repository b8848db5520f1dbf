"""What one decoder layer of a Llama/Qwen2/Mistral-style model computes, through the model's own
modules: shared by the fast engine's prefill and decode and the Llama Guard verdict pass."""

from __future__ import annotations

from typing import Sequence


def text_model(model):
    """The decoder stack (embed_tokens, layers, norm, rotary_emb) of a causal LM or a vision-language model."""
    inner = getattr(model, "model", None)
    return getattr(inner, "language_model", None) or inner


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def prefill_attention():
    """SDPA backends for prefill: flash, then memory-efficient, then math. Not cuDNN: torch picks it on
    H100, and it builds an execution plan for every new shape on the host (2.8 ms per call measured),
    which made host time most of a prefill whose shapes change with every group."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def right_padded(rows: Sequence[Sequence[int]], pad: int = 0):
    """Token id rows as one [n, longest] CPU tensor, padded after each row's end."""
    import torch

    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
    return ids


def rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer(layer, x, cos, sin, write, attend, dims: tuple[int, int, int]):
    """One decoder layer through the model's own modules. x: [n, T, D], cos/sin: [n or 1, T, head_dim],
    dims: (heads, kv_heads, head_dim). ``write(l, k, v)`` stores this step's keys/values and
    ``attend(l, q, k, v, scale)`` returns the attention output [n, H, T, hd]."""
    heads, kv_heads, head_dim = dims
    n, t, _ = x.shape
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(n, t, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(n, t, kv_heads, head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(n, t, kv_heads, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    write(attn.layer_idx, k, v)
    o = attend(attn.layer_idx, q, k, v, attn.scaling)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(n, t, heads * head_dim))
    return x + layer.mlp(layer.post_attention_layernorm(x))
