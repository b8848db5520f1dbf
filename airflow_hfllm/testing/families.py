"""Tiny random models of each family the fast engine runs (:data:`airflow_hfllm.engine.arch.FAMILIES`),
built offline with the tiny tokenizer and the same wide weights and EOS calibration as the ``causal-lm``
kind, so that greedy replies are long and differ from row to row. Windowed configs use a window of
:data:`WINDOW` tokens, so test sequences of 50+ tokens cross it several times."""

from __future__ import annotations

import os
import pathlib

WINDOW = 16
LONGROPE_CONTEXT = 128  # the longrope config's original_max_position_embeddings
# name -> (model_type, config arguments); every config: 2-4 layers, hidden 64, 4 heads over 2 KV heads.
FAMILY_CONFIGS = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", {"sliding_window": WINDOW}),
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "qwen3-moe": ("qwen3_moe", {"head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 32, "norm_topk_prob": True}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "gemma3-text": ("gemma3_text", {"head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 4,
                                    "layer_types": ["sliding_attention", "full_attention"] * 2,
                                    "query_pre_attn_scalar": 16, "rope_local_base_freq": 10_000.0,
                                    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}),
    # Gemma 3 4B-27B: the text decoder inside Gemma3ForConditionalGeneration (a tiny SigLIP tower beside it)
    "gemma3": ("gemma3", {"text_config": {"head_dim": 16, "sliding_window": WINDOW, "num_hidden_layers": 4,
                                          "layer_types": ["sliding_attention", "full_attention"] * 2,
                                          "query_pre_attn_scalar": 16, "final_logit_softcapping": 30.0,
                                          "attn_logit_softcapping": 50.0},
                          "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
                          "mm_tokens_per_image": 4, "tie_word_embeddings": False}),
    "phi3": ("phi3", {"partial_rotary_factor": 0.5}),
    # Phi-4-mini's rope: longrope, partial rotary 0.75 (12 of 16 dims: 6 factors each); test rows start below
    # and above the original context of 128 tokens, and cross it while decoding
    "phi3-longrope": ("phi3", {"original_max_position_embeddings": LONGROPE_CONTEXT, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": LONGROPE_CONTEXT, "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
        "long_factor": [1.5, 2.5, 4.0, 6.5, 10.0, 16.0]}}),
    "gpt-oss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": WINDOW,
                            "layer_types": ["sliding_attention", "full_attention"], "quantization_config": None,
                            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150_000.0, "factor": 32.0,
                                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                "original_max_position_embeddings": 64}}),
}


def window(family: str) -> int | None:
    """The sliding window of ``family``'s tiny config, if it has one."""
    extra = FAMILY_CONFIGS[family][1]
    return extra.get("sliding_window") or extra.get("text_config", {}).get("sliding_window")


def reference_params(family: str, params):
    """The ``generate()`` parameters of ``family``'s reference run. LongRoPE's runs without a KV cache: each
    step past the original context runs the whole sequence on the long factors, which is what Phi-3's cache
    recompute amounts to (transformers 5.17 drops the cache at the crossing but feeds that step its last token
    alone, and gets other tokens after it)."""
    import dataclasses

    return dataclasses.replace(params, use_cache=False) if family == "phi3-longrope" else params


def make_family_model(path: str | os.PathLike, family: str, *, seed: int = 0) -> pathlib.Path:
    """Write a tiny random model of ``family`` (a key of :data:`FAMILY_CONFIGS`) and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from airflow_hfllm.testing.text import _calibrate_eos, _ids, _init_wide, _make_tokenizer
    from airflow_hfllm.testing.weights import only_words

    model_type, extra = FAMILY_CONFIGS[family]
    tok = _make_tokenizer("causal-lm")
    if "text_config" in extra:  # an image placeholder no prompt holds and lm_head never picks
        tok.add_tokens(["<image_soft_token>"], special_tokens=True)
    arguments = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     tie_word_embeddings=False, **_ids(tok))
    if "text_config" in extra:  # a multimodal model: the tiny text arguments go to its text decoder
        extra = {**extra, "text_config": {**arguments, **extra["text_config"]},
                 "image_token_index": tok.convert_tokens_to_ids("<image_soft_token>")}
        cfg = AutoConfig.for_model(model_type, **extra)
    else:
        cfg = AutoConfig.for_model(model_type, **{**arguments, **extra})
    cfg.dtype = "float32"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            _init_wide(model)
            only_words(model.lm_head.weight, tok, keep=[tok.eos_token_id])
        model.generation_config = GenerationConfig(**_ids(tok))
        model.eval()
        with torch.no_grad():
            _calibrate_eos(model, tok)
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


THINKING_TEMPLATE = (  # Qwen3's switch: enable_thinking=false opens and closes an empty block in the prompt
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def make_thinking_model(path: str | os.PathLike, *, seed: int = 0) -> tuple[pathlib.Path, str, str]:
    """A tiny Qwen2 model with ``<think>``/``</think>`` tokens and Qwen3's ``enable_thinking`` template
    switch that answers ``<think> a b </think> c d`` (four words of its vocabulary) after any prompt.
    Returns the folder, the reasoning ("a b") and the answer ("c d")."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from airflow_hfllm.testing.text import _force_answer, _ids, _make_tokenizer

    tok = _make_tokenizer("causal-lm")
    tok.add_tokens(["<think>", "</think>"])
    tok.chat_template = THINKING_TEMPLATE
    words = sorted(t for t in tok.get_vocab() if t[:1] == "\u0120" and t[1:].isascii() and t[1:].isalpha())[:4]
    answer = [tok.convert_tokens_to_ids(t) for t in ["<think>", *words[:2], "</think>", *words[2:]]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=False, dtype="float32", **_ids(tok))
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            _force_answer(model, [*answer, tok.eos_token_id])
    model.generation_config = GenerationConfig(**_ids(tok))
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    text = lambda ts: " ".join(t[1:] for t in ts)  # noqa: E731
    return path, text(words[:2]), text(words[2:])


def to_mxfp4(path: str | os.PathLike) -> None:
    """Rewrite a tiny gpt-oss folder's expert weights as an MXFP4 checkpoint, the format gpt-oss ships in:
    per 32 values one power-of-two scale (``*_scales``, biased by 127) and 4-bit e2m1 codes, two a byte
    (``*_blocks``), plus the config's ``quantization_config``. Lossy, as real MXFP4 is."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    codes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    path = pathlib.Path(path)
    (weights,) = path.glob("*.safetensors")
    tensors = load_file(weights)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        values = tensors.pop(name).float().transpose(1, 2).contiguous()  # the checkpoint's [E, out, in]
        groups = values.reshape(*values.shape[:-1], -1, 32)
        exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2**-126) / 6.0))
        scaled = groups / torch.exp2(exponent)[..., None]
        index = (scaled.abs()[..., None] - codes).abs().argmin(-1) + 8 * (scaled < 0)
        packed = (index[..., 0::2] | (index[..., 1::2] << 4)).to(torch.uint8)
        tensors[f"{name}_blocks"] = packed
        tensors[f"{name}_scales"] = (exponent + 127).to(torch.uint8)
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def to_fine_grained_fp8(path: str | os.PathLike, block: int = 32) -> None:
    """Rewrite a tiny folder's decoder projections as a fine-grained FP8 checkpoint (``quant_method: fp8``,
    as DeepSeek-V3 and the Qwen3 ``-FP8`` models ship): e4m3 weights with one fp32 scale per ``block`` x
    ``block`` tile (``*.weight_scale_inv``, by which the e4m3 values are multiplied back). Real checkpoints
    use 128 x 128 tiles; the tiny matrices take smaller ones. Lossy, as real FP8 is."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    path = pathlib.Path(path)
    (weights,) = path.glob("*.safetensors")
    tensors = load_file(weights)
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        w = tensors[name].float()
        tiles = w.unflatten(0, (-1, block)).unflatten(2, (-1, block))  # [rows/b, b, cols/b, b]
        scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        tensors[name] = (tiles / scale[:, None, :, None]).flatten(2).flatten(0, 1).to(torch.float8_e4m3fn)
        tensors[name.replace(".weight", ".weight_scale_inv")] = scale
    save_file(tensors, weights, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
