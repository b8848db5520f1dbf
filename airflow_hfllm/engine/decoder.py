"""The decoder stack of a model of one of :mod:`airflow_hfllm.engine.arch`'s families through its own
modules, over the fast engine's KV cache, and which models it can run (:func:`unsupported_reason`)."""

from __future__ import annotations

import inspect

from airflow_hfllm.engine.arch import ROPE_TYPES, family_reason
from airflow_hfllm.engine.arch.fuse import fuse_projections
from airflow_hfllm.engine.arch.layer import decoder_layer, rope_parameters, text_config, text_model
from airflow_hfllm.engine.arch.longrope import LongRope
from airflow_hfllm.engine.compiled import Compiler, compile_by_default, layer_pieces
from airflow_hfllm.engine.kv_cache import dense, prompt_write, step_write
from airflow_hfllm.engine.loading import LoadedModel, quant_method


def unsupported_reason(loaded: LoadedModel, vision: bool = False) -> str | None:
    """Why the fast engine (``vision``: :class:`~airflow_hfllm.vision.fast.VisionFastEngine`) cannot
    run this model, or ``None`` when it can."""
    model = loaded.model
    reason = family_reason(model.config.model_type, vision)
    if reason:
        return reason
    cfg = text_config(model.config)
    method = quant_method(model.config) or quant_method(cfg)
    if method and method not in FAST_QUANT:
        return f"quantized weights ({getattr(method, 'value', method)})"
    if type(model).__name__.startswith("Peft"):
        return "unmerged PEFT adapter"
    rope = rope_parameters(cfg)
    for params in (rope.values() if all(isinstance(v, dict) for v in rope.values()) and rope else [rope]):
        kind = params.get("rope_type", params.get("type", "default"))
        # longrope as Phi-3's generate() runs it (engine/arch/longrope.py); other models' keep their KV cache
        if kind not in ROPE_TYPES or (kind == "longrope" and cfg.model_type != "phi3"):
            return f"rope type {kind!r}" + (f" in {cfg.model_type}" if kind in ROPE_TYPES else "")
    base = text_model(model)
    if base is None or not all(hasattr(base, a) for a in ("layers", "rotary_emb", "embed_tokens", "norm")) \
            or not hasattr(model, "lm_head"):
        return "unexpected module layout"
    return None


# e4m3's largest value: a cast past it gives NaN, not the largest value
FP8_MAX = 448.0


def kv_dtype(name: str, device, dtype):
    """The KV cache's torch dtype for ``kv_cache_dtype`` ``name`` on ``device`` (``dtype``: the model's)."""
    import torch

    if name == "auto":
        return dtype
    if name != "fp8":
        raise ValueError(f"kv_cache_dtype must be 'auto' or 'fp8', got {name!r}")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if capability and capability < (8, 9):  # the decode kernel converts FP8 in registers: Ada, Hopper and newer
        raise ValueError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer; "
                         f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}")
    return torch.float8_e4m3fn


def stored(x, cache):
    """Keys or values ``x`` as ``cache`` holds them: the model's dtype, or FP8 (e4m3, scale 1, as vLLM's
    ``kv_cache_dtype="fp8"`` without calibrated scales; saturating at :data:`FP8_MAX`)."""
    if x.dtype == cache.dtype:
        return x
    return x.clamp(-FP8_MAX, FP8_MAX).to(cache.dtype)


# the model's own modules, which the layer code calls: bitsandbytes' Linear4bit / Linear8bitLt, and FP8
# checkpoints or load-time FP8 as the loader's Fp8Linear (engine/fp8.py)
FAST_QUANT = ("bitsandbytes", "fp8")


def window_of(cfg, attn) -> int | None:
    """The layer's sliding window (keys older than this many positions are masked), or ``None``."""
    if hasattr(attn, "sliding_window"):  # set per layer from layer_types (None on global layers)
        return attn.sliding_window
    return getattr(cfg, "sliding_window", None)  # Mistral: every layer


def decode_kernel(device) -> object | None:
    """The Triton decode attention (:mod:`airflow_hfllm.engine.decode_kernel`) where it runs: CUDA with
    Triton installed, on an Ampere GPU or newer (its bf16 ``tl.dot``); else ``None`` (SDPA over the masked
    cache)."""
    import torch

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return None
    try:
        from airflow_hfllm.engine.decode_kernel import decode_attention
    except ImportError:
        return None
    return decode_attention


class Decoder:
    """The decoder stack of ``model`` through its own modules, over the fast engine's KV cache
    (``k_cache``, ``v_cache``: one tensor per layer, static or paged: ``engine/kv_cache.py``).

    :param kernel: decode attention through the Triton kernel (default: where it runs, see
        :func:`decode_kernel`); ``False`` uses SDPA over the masked cache, as on the CPU.
    :param compile: ``torch.compile`` each layer's work before and after attention, the rope tables and the
        final norm + ``lm_head`` (:mod:`airflow_hfllm.engine.compiled`); attention and the KV write stay
        eager. Default: :func:`~airflow_hfllm.engine.compiled.compile_by_default`. ``True`` compiles on any
        device (the CPU through inductor's C++ backend: how CI tests it).
    """

    def __init__(self, model, kernel: bool | None = None, compile: bool | None = None):
        cfg = text_config(model.config)
        self.model, self.base = model, text_model(model)
        self.layers = list(self.base.layers)
        self.mrope_section = rope_parameters(cfg).get("mrope_section")
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.windows = [window_of(cfg, layer.self_attn) for layer in self.layers]
        # Gemma 3: one rotary module, a table per layer type (local layers have their own base)
        takes_type = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        self.layer_types = list(cfg.layer_types) if takes_type else None
        self.attn_softcap = getattr(cfg, "attn_logit_softcapping", None)
        self.sinks = [getattr(layer.self_attn, "sinks", None) for layer in self.layers]  # gpt-oss
        self.half_tables = cfg.model_type == "gpt_oss"
        self.longrope = LongRope.of(self.base.rotary_emb)  # Phi-3.5, Phi-4-mini: each row on its own factors
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        weight = next(model.parameters())
        self.kernel = decode_kernel(weight.device) if kernel is not False else None
        if weight.is_cuda:  # on the CPU the unfused GEMMs keep greedy tokens bit-equal to generate()'s
            fuse_projections(model)
        if kernel and self.kernel is None:
            raise ValueError(f"the Triton decode attention needs CUDA and triton (model on {weight.device})")
        if experts and weight.is_cuda and hasattr(model, "set_experts_implementation"):
            # MoE inside the CUDA graph needs fixed shapes and no host sync: grouped GEMMs (offsets by
            # histc) in bf16/fp16; torch's fp32 grouped_mm copies to the host, so fp32 (tests) gathers
            # each row's expert weights instead (batched_mm)
            import torch

            model.set_experts_implementation("batched_mm" if weight.dtype == torch.float32 else "grouped_mm")
        self.compiler = Compiler(f"fast engine ({type(model).__name__})",
                                 compile_by_default(weight.device) if compile is None else compile)
        self.pieces = layer_pieces(self.compiler, self.layers, (self.heads, self.kv_heads, self.head_dim)) \
            if self.compiler.enabled else None
        self.tables, self.logits = self.compiler(self._tables), self.compiler(self._logits)

    def rope(self, x, positions, layer_type: str | None = None, lengths=None):
        """cos, sin [n, T, rotary_dim] for ``positions`` [n, T] (or [3, n, T] for multimodal rope); ``lengths``
        [n]: a right-padded prefill's row lengths."""
        import torch

        if self.longrope:
            return self.longrope(x, positions, lengths)
        if self.mrope_section and positions.dim() == 2:  # the same position on the t, h and w axes
            positions = positions[None].expand(3, -1, -1)
        if layer_type is not None:
            return self.base.rotary_emb(x, positions, layer_type)
        cos, sin = self.base.rotary_emb(x, positions)
        if cos.dim() == 4:  # older multimodal rope returns the three (t, h, w) tables; pick their sections
            sections = list(self.mrope_section) * 2
            cos, sin = (torch.cat([m[i % 3] for i, m in enumerate(c.split(sections, dim=-1))], dim=-1)
                        for c in (cos, sin))
        if self.half_tables:  # gpt-oss rotates halves with one half-width table: the same as rotate_half's
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        return cos, sin

    def stepping(self, done, positions):
        """[slots] bool: the rows a decode step at ``positions`` advances: those not ``done``, except LongRoPE
        rows about to pass the original context (:func:`~airflow_hfllm.engine.arch.longrope.recompute`)."""
        return ~done & ~self.longrope.waits(positions) if self.longrope else ~done

    def _tables(self, x, positions, lengths=None):
        """(cos, sin) of :meth:`rope` for each layer type (Gemma 3), or the one pair, in one call."""
        return [self.rope(x, positions, t, lengths) for t in dict.fromkeys(self.layer_types or [None])]

    def _layers(self, x, positions, write, attend, deepstack=None, lengths=None):
        tables = self.tables(x, positions, lengths)
        if self.layer_types is None:
            tables = tables * len(self.layers)
        else:
            by_type = dict(zip(dict.fromkeys(self.layer_types), tables))
            tables = [by_type[t] for t in self.layer_types]
        mask, features = deepstack or (None, ())
        for l, (layer, (cos, sin)) in enumerate(zip(self.layers, tables)):
            x = decoder_layer(layer, x, cos, sin, write, attend, (self.heads, self.kv_heads, self.head_dim),
                              self.pieces)
            if l < len(features):  # on the layer's output, as Qwen3-VL's _deepstack_process
                x[mask] += features[l]
        return x

    def _logits(self, x):
        logits = self.model.lm_head(self.base.norm(x)).float()
        if self.final_softcap:
            logits = (logits / self.final_softcap).tanh() * self.final_softcap
        return logits

    def _attention(self, q, k, v, mask, scale, causal: bool = False, sinks=None):
        import torch
        import torch.nn.functional as F

        if not self.attn_softcap and sinks is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                  scale=scale, enable_gqa=self.kv_heads != self.heads)
        # SDPA has neither soft-capping nor sinks: scores capped before the mask, as the model does; a sink
        # is a per-head logit that takes part in the softmax and is then dropped
        group = self.heads // self.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if hasattr(mask, "_materialize"):  # causal_lower_right
            mask = mask._materialize(q.device)
        scores = (q @ k.transpose(-1, -2)) * scale
        if self.attn_softcap:
            scores = (scores / self.attn_softcap).tanh() * self.attn_softcap
        if mask is None and causal:
            t = q.shape[-2]
            mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf")) if mask is not None else scores
        if sinks is None:
            return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
        sink = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1, dtype=torch.float32)[..., :-1]
        return probs.to(q.dtype) @ v

    def prefill(self, k_cache, v_cache, x, positions, lengths, slot_idx, deepstack=None, prefix=None, table=None):
        """Embedded prompts x [n, T, D], right-padded, into slots ``slot_idx``; returns last-position
        logits [n, V]. ``deepstack`` (Qwen3-VL): ``(mask [n, T], features)``, features[l] [mask.sum(), D]
        added to the output of layer l at the mask's positions (the image tokens), for the first
        ``len(features)`` layers; decode steps hold no image tokens, so they need none. ``prefix``: the
        keys and values (per layer [kv_heads, P, head_dim]) of P tokens before every row's x, which are
        copied into the slots and attended to (``engine/prefix.py``); x and positions then start at P.
        ``table``: the slots' blocks of a paged cache (``engine/kv_cache.py``)."""
        import torch

        from torch.nn.attention.bias import causal_lower_right

        n, t, _ = x.shape
        p = prefix[0][0].shape[1] if prefix else 0
        # after a prefix, causal means aligned to the last key: SDPA runs that in its flash kernel
        masks = {None: causal_lower_right(t, p + t)} if p else {}
        # a window as wide as the prompt masks no more than causality does: no mask, SDPA's flash kernel
        for window in {w for w in self.windows if w and w < p + t}:
            rows, cols = torch.arange(p, p + t, device=x.device)[:, None], torch.arange(p + t, device=x.device)[None, :]
            masks[window] = (cols <= rows) & (cols > rows - window)

        def write(l, k, v):
            prompt_write(k_cache[l], k, slot_idx, p, table)
            prompt_write(v_cache[l], v, slot_idx, p, table)
            if p:
                prompt_write(k_cache[l], prefix[0][l].expand(n, -1, -1, -1), slot_idx, 0, table)
                prompt_write(v_cache[l], prefix[1][l].expand(n, -1, -1, -1), slot_idx, 0, table)

        def attend(l, q, k, v, scale):
            # Causal attention over the prompt itself; padding sits after each row's last token.
            if p:
                k = torch.cat((prefix[0][l].expand(n, -1, -1, -1), k), dim=2)
                v = torch.cat((prefix[1][l].expand(n, -1, -1, -1), v), dim=2)
            mask = masks.get(self.windows[l], masks.get(None))
            return self._attention(q, k, v, mask, scale, causal=True, sinks=self.sinks[l])

        x = self._layers(x, positions, write, attend, deepstack, lengths)
        return self.logits(x[torch.arange(n, device=x.device), lengths - 1])

    def decode(self, k_cache, v_cache, tokens, pos, rope_offset, slots, columns, table=None):
        """Logits [slots, V] after ``tokens`` [slots] at KV index ``pos`` (rope position ``pos + rope_offset``);
        ``slots`` and ``columns`` are aranges over the slots and their width; ``table`` as for :meth:`prefill`."""
        x = self.base.embed_tokens(tokens[:, None])

        def write(l, k, v):
            step_write(k_cache[l], k[:, :, 0], slots, pos, table)
            step_write(v_cache[l], v[:, :, 0], slots, pos, table)

        if self.kernel:
            def attend(l, q, k, v, scale):
                return self.kernel(q[:, :, 0], k_cache[l], v_cache[l], pos, scale, self.windows[l], self.sinks[l],
                                   self.attn_softcap, table=table)[:, :, None]
        else:
            seen = columns[None, :] <= pos[:, None]
            masks = {window: (seen & (columns[None, :] > pos[:, None] - window) if window else seen)[:, None, None, :]
                     for window in set(self.windows)}

            def attend(l, q, k, v, scale):  # an FP8 cache read whole in the query's dtype: the CPU's path
                k, v = dense(k_cache[l], table).to(q.dtype), dense(v_cache[l], table).to(q.dtype)
                return self._attention(q, k, v, masks[self.windows[l]], scale, sinks=self.sinks[l])

        x = self._layers(x, (pos + rope_offset)[:, None], write, attend)
        return self.logits(x[:, 0])
