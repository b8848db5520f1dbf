"""The decoder stack of a Llama/Qwen2/Mistral-style model through its own modules, over the fast engine's
static KV cache, and which models it can run (:func:`unsupported_reason`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow_hfllm.engine.layers import decoder_layer, text_config, text_model

if TYPE_CHECKING:
    from airflow_hfllm.engine.loading import LoadedModel

ARCHITECTURES = ("llama", "qwen2", "mistral")
VISION_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")  # decoders with multimodal rope: VisionFastEngine
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "mrope")


def unsupported_reason(loaded: LoadedModel, vision: bool = False) -> str | None:
    """Why the fast engine (``vision``: :class:`~airflow_hfllm.vision.fast.VisionFastEngine`) cannot
    run this model, or ``None`` when it can."""
    model = loaded.model
    archs = VISION_ARCHITECTURES if vision else ARCHITECTURES
    if model.config.model_type not in archs:
        return f"architecture {model.config.model_type!r} is not one of {archs}"
    cfg = text_config(model.config)
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False) or \
            getattr(cfg, "quantization_config", None):
        return "quantized weights"
    if type(model).__name__.startswith("Peft"):
        return "unmerged PEFT adapter"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ROPE_TYPES:
        return f"rope type {rope.get('rope_type')!r}"
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    base = text_model(model)
    if base is None or not all(hasattr(base, a) for a in ("layers", "rotary_emb", "embed_tokens", "norm")) \
            or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    return None


class Decoder:
    """The decoder stack of ``model`` through its own modules, over the fast engine's static KV cache
    (``k_cache``, ``v_cache``: one [slots, kv_heads, max_len, head_dim] tensor per layer)."""

    def __init__(self, model):
        cfg = text_config(model.config)
        self.model, self.base = model, text_model(model)
        self.layers = list(self.base.layers)
        self.mrope_section = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                              or {}).get("mrope_section")
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads

    def rope(self, x, positions):
        """cos, sin [n, T, head_dim] for ``positions`` [n, T] (or [3, n, T] for multimodal rope)."""
        import torch

        if self.mrope_section and positions.dim() == 2:  # the same position on the t, h and w axes
            positions = positions[None].expand(3, -1, -1)
        cos, sin = self.base.rotary_emb(x, positions)
        if cos.dim() == 4:  # older multimodal rope returns the three (t, h, w) tables; pick their sections
            sections = list(self.mrope_section) * 2
            cos, sin = (torch.cat([m[i % 3] for i, m in enumerate(c.split(sections, dim=-1))], dim=-1)
                        for c in (cos, sin))
        return cos, sin

    def _layers(self, x, positions, write, attend):
        cos, sin = self.rope(x, positions)
        for layer in self.layers:
            x = decoder_layer(layer, x, cos, sin, write, attend, (self.heads, self.kv_heads, self.head_dim))
        return x

    def prefill(self, k_cache, v_cache, x, positions, lengths, slot_idx):
        """Embedded prompts x [n, T, D], right-padded, into slots ``slot_idx``; returns last-position
        logits [n, V]."""
        import torch
        import torch.nn.functional as F

        n, t, _ = x.shape

        def write(l, k, v):
            k_cache[l][slot_idx, :, :t] = k
            v_cache[l][slot_idx, :, :t] = v

        def attend(l, q, k, v, scale):
            # Causal attention over the prompt itself; padding sits after each row's last token.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                  enable_gqa=self.kv_heads != self.heads)

        x = self._layers(x, positions, write, attend)
        last = x[torch.arange(n, device=x.device), lengths - 1]
        return self.model.lm_head(self.base.norm(last)).float()

    def decode(self, k_cache, v_cache, tokens, pos, rope_offset, slots, columns):
        """Logits [slots, V] after ``tokens`` [slots] at KV index ``pos`` (rope position ``pos + rope_offset``);
        ``slots`` and ``columns`` are aranges over the cache's first and third axes."""
        import torch.nn.functional as F

        x = self.base.embed_tokens(tokens[:, None])
        mask = (columns[None, :] <= pos[:, None])[:, None, None, :]

        def write(l, k, v):
            k_cache[l][slots, :, pos] = k[:, :, 0]
            v_cache[l][slots, :, pos] = v[:, :, 0]

        def attend(l, q, k, v, scale):
            return F.scaled_dot_product_attention(q, k_cache[l], v_cache[l], attn_mask=mask, scale=scale,
                                                  enable_gqa=self.kv_heads != self.heads)

        x = self._layers(x, (pos + rope_offset)[:, None], write, attend)
        return self.model.lm_head(self.base.norm(x[:, 0])).float()
