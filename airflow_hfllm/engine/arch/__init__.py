"""The model families the fast engine runs, and what each needs of the layer code.

One generic decoder layer (:mod:`airflow_hfllm.engine.arch.layer`) goes through each model's own modules
and finds the family's differences on them; the attention masks (sliding windows per layer), per-layer
rotary tables and soft-capping are the decoder's (:mod:`airflow_hfllm.engine.decoder`). This table is
the coverage the docs show: a family not in it, or in it with ``fast=False``, runs on batched
``generate()``, and the task log says why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str
    fast: bool
    what: str  # what the layer code does for it, or why it is not on the fast path
    test: str = "tests/unit/test_families.py"


FAMILIES = {f.model_type: f for f in (
    Family("llama", True, "the reference layer: q/k/v projections, rope (default, linear, llama3, yarn)"),
    Family("mistral", True, "as llama; with `sliding_window` set, every layer masks keys older than the window"),
    Family("qwen2", True, "as llama with q/k/v biases; a window only where `use_sliding_window` is true (Qwen2.5 "
                          "configs set a window but turn it off), on the layers `layer_types` names"),
    Family("qwen3", True, "per-head q/k RMSNorm before rope; windows per `layer_types`"),
    Family("qwen3_moe", True, "as qwen3, with the model's sparse MoE block as the MLP (grouped GEMMs over fixed "
                              "shapes on a GPU: `experts_implementation='grouped_mm'`, no host sync per step)"),
    Family("mixtral", True, "as mistral, with the model's sparse MoE block as the MLP (grouped GEMMs on a GPU)"),
    Family("gemma3_text", True, "scaled embeddings, per-head q/k norms, norms before and after attention and MLP, "
                                "interleaved sliding-window and global layers with their own rope bases; logit "
                                "soft-capping where the config sets it"),
    Family("gemma3", True, "the text decoder of Gemma 3 4B-27B on text rows (as gemma3_text)"),
    Family("phi3", True, "fused qkv and gate/up projections, partial rotary (Phi-4-mini); `longrope` (Phi-3.5, "
                         "Phi-4-mini) per row: short or long factors by the row's length, and at the step that "
                         "passes the original context the row's KV cache is recomputed on the long factors, as "
                         "generate() does"),
    Family("gpt_oss", True, "attention sinks (a per-head logit in the softmax), alternating sliding and global "
                            "layers, MoE with biased experts and a clamped SwiGLU (the model's own); MXFP4 checkpoints "
                            "dequantized at load"),
)}
# Decoders with multimodal rope, run by VisionFastEngine (tests/unit/test_vision.py, test_qwen3_vl.py).
VISION = {f.model_type: f for f in (
    Family("qwen2_vl", True, "as qwen2, with multimodal rope: the model's get_rope_index positions (t, h, w) "
                             "in prefill, plain rope at KV index + offset in decode", "tests/unit/test_vision.py"),
    Family("qwen2_5_vl", True, "as qwen2_vl; the vision tower's window attention packed by length",
           "tests/unit/test_vision.py"),
    Family("qwen3_vl", True, "as qwen3, with interleaved multimodal rope (the model's rotary module); 16-pixel "
                             "patches merged 2x2 (one image token per 32x32 pixels); deepstack: features of "
                             "early vision blocks added to the first decoder layers' outputs at the image tokens",
           "tests/unit/test_qwen3_vl.py"),
    Family("qwen3_vl_moe", True, "as qwen3_vl, with the model's sparse MoE block as the MLP (as qwen3_moe)",
           "tests/unit/test_qwen3_vl.py"),
)}
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "mrope", "longrope")


def family_reason(model_type: str, vision: bool = False) -> str | None:
    """Why the fast engine has no layer code for ``model_type``, or ``None`` when it has."""
    if vision:
        return None if model_type in VISION else f"architecture {model_type!r} is not one of {tuple(VISION)}"
    family = FAMILIES.get(model_type)
    if family is None:
        return (f"architecture {model_type!r} is not one of the fast engine's families "
                f"({', '.join(f for f, v in FAMILIES.items() if v.fast)}; see docs/design.md, 'Model families')")
    return None if family.fast else f"{model_type}: {family.what} (see docs/design.md, 'Model families')"
