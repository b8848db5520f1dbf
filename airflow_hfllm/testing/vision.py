"""Tiny random-weight Qwen2.5-VL and Qwen3-VL models with an offline processor, for tests and demos.

``make_tiny_vision_model(path)`` (``family="qwen3_vl"`` or ``"qwen3_vl_moe"``: Qwen3-VL's 16-pixel patches
and deepstack layers, dense or MoE) writes ``config.json`` + safetensors, the tokenizer (the byte-level BPE of
:mod:`airflow_hfllm.testing.tokenizer` plus Qwen's vision tokens ``<|vision_start|>``, ``<|image_pad|>``,
``<|vision_end|>``, ``<|video_pad|>``), a Qwen2-VL image processor config and the Qwen2.5-VL chat
template, so that ``Qwen2_5_VLForConditionalGeneration`` / ``AutoModelForImageTextToText``,
``AutoTokenizer``, ``AutoImageProcessor`` and (where torchvision is installed) ``AutoProcessor`` load
it with ``HF_HUB_OFFLINE=1``. Without torchvision ``AutoProcessor`` cannot build the video processor;
:func:`airflow_hfllm.vision.processor.load_processor` then assembles the processor from these files.

Like the tiny causal LM (:mod:`airflow_hfllm.testing.weights`), the weights are drawn wide (unit-std
embeddings and lm_head, sharp attention) and lm_head keeps only " word" rows, so greedy replies are long,
varied and far from ties (batched == one at a time), and the EOS row is calibrated on image prompts so that
only a few replies stop early.
The vision tower is scaled so that the image tokens move the reply: another image, another answer; on
Qwen3-VL its deepstack features too (unit std, like the image embeddings), so that they move it as well.
"""

from __future__ import annotations

import os
import pathlib
import random

from airflow_hfllm.testing.tokenizer import EOS, PAD, corpus, tokenizer_json
from airflow_hfllm.testing.weights import STD, STD_MLP, only_words, scale_eos

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
SPECIAL = ("<|im_start|>", *VISION_TOKENS)

# Qwen2.5-VL-Instruct's template, without video: images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image processor defaults of the real Qwen2.5-VL checkpoints.
PROCESSOR_MIN_PIXELS = 56 * 56
PROCESSOR_MAX_PIXELS = 28 * 28 * 1280
# Qwen3-VL's: 16-pixel patches, 64..16384 tokens of 32x32 pixels, mean and std 0.5.
QWEN3_PROCESSOR = dict(patch_size=16, size={"shortest_edge": 64 * 32 * 32, "longest_edge": 16384 * 32 * 32},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3)
FAMILIES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
            "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration"}

_STD_VISION = 0.2  # vision blocks; the merger's last layer is scaled to unit-std image embeddings
# Qwen3's per-head q/k RMSNorms fix the scale of attention logits: at unit weights attention stays flat and
# replies loop on one word; at 2 they are about as sharp as Qwen2.5-VL's (q/k projections of std 0.3).
_QK_NORM = 2.0


def make_tokenizer():
    """The tiny BPE tokenizer with the Qwen chat and vision special tokens and the VL chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=list(SPECIAL),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=32768,
        model_input_names=["input_ids", "attention_mask"],
    )


def make_image_processor(family: str = "qwen2_5_vl"):
    """A Qwen2-VL image processor (saved as ``Qwen2VLImageProcessor``: the torchvision one loads it where
    torchvision is installed, the PIL one elsewhere); Qwen3-VL's is the same class with its settings."""
    try:  # transformers with per-backend image processors: the PIL one needs no torchvision
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # older: the numpy/PIL processor is Qwen2VLImageProcessor itself
        from transformers import Qwen2VLImageProcessor as cls

    if family.startswith("qwen3_vl"):
        return cls(**QWEN3_PROCESSOR)
    return cls(min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS)


def _token_ids(tok) -> dict:
    return {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"))}


def config(tok, text: dict | None = None, vision: dict | None = None, tie_word_embeddings: bool = False):
    """A ``Qwen2_5_VLConfig`` whose special token ids are ``tok``'s: tiny by default; ``text`` and
    ``vision`` override sizes (real shapes for benchmarks)."""
    from transformers import Qwen2_5_VLConfig

    ids = _token_ids(tok)
    text_config = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1_000_000.0},
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id)
    text_config.update(text or {})
    vision_config = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                         out_hidden_size=text_config["hidden_size"], fullatt_block_indexes=[1], window_size=112,
                         tokens_per_second=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    vision_config.update(vision or {})
    head_dim = text_config["hidden_size"] // text_config["num_attention_heads"]
    if sum(text_config["rope_parameters"]["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"mrope_section must sum to head_dim/2 = {head_dim // 2}")
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config,
                            tie_word_embeddings=tie_word_embeddings, **ids)


def qwen3_config(tok, moe: bool = False):
    """A tiny ``Qwen3VLConfig`` (``Qwen3VLMoeConfig``): 3 text layers, the first 2 getting deepstack
    features from vision blocks 0 and 1 of 3; interleaved multimodal rope over head_dim 16."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    text_config = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=32768,
                       rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                        "rope_theta": 5_000_000.0},
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.pad_token_id)
    if moe:
        text_config.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision_config = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                         patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                         deepstack_visual_indexes=[0, 1])
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text_config, vision_config=vision_config, tie_word_embeddings=False, **_token_ids(tok))


def make_tiny_vision_model(path: str | os.PathLike, seed: int = 0, family: str = "qwen2_5_vl") -> pathlib.Path:
    """Write a tiny random model of ``family`` (one of :data:`FAMILIES`), its tokenizer, image processor
    and chat template to ``path``."""
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown vision family {family!r}; allowed: {', '.join(FAMILIES)}")
    path = pathlib.Path(path)
    tok = make_tokenizer()
    image_processor = make_image_processor(family)
    cfg = config(tok) if family == "qwen2_5_vl" else qwen3_config(tok, moe=family == "qwen3_vl_moe")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, FAMILIES[family])(cfg)
        init_weights(model, tok)
        ids = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.pad_token_id}
        model.generation_config = transformers.GenerationConfig(**ids)
        model.eval()
        with torch.no_grad():
            calibrate_eos(model, tok, image_processor, seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    image_processor.save_pretrained(path)
    return path


def init_weights(model, tok) -> None:
    """Wide random weights (see the module docstring); lm_head keeps " word" rows and EOS only."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.fill_(_QK_NORM)
            if p.dim() < 2:
                continue
            leaf = name.split(".")[-2]
            if ".visual." in f".{name}":
                p.normal_(0, _STD_VISION)
            else:
                p.normal_(0, STD.get(leaf, STD_MLP))
        # Image embeddings at the scale of token embeddings (unit std), so images steer the reply.
        if hasattr(model.model.visual, "deepstack_merger_list"):
            _unit_visual_outputs(model)
        else:
            last = model.model.visual.merger.mlp[-1]
            last.weight.mul_(1.0 / (last.weight.std() * last.weight.shape[1] ** 0.5 * _merger_scale(model)))
        only_words(model.lm_head.weight, tok, keep=[tok.eos_token_id])


def _unit_visual_outputs(model) -> None:
    """Qwen3-VL: scale the last layer of the merger and of each deepstack merger so that the image
    embeddings and the deepstack features have unit std on a random image."""
    import torch

    visual = model.model.visual
    cfg = model.config.vision_config
    pixels = torch.randn(64, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2)
    out = visual(pixels, grid_thw=torch.tensor([[1, 8, 8]]))
    for merger, features in zip([visual.merger, *visual.deepstack_merger_list],
                                [out.pooler_output, *out.deepstack_features]):
        scale = 1.0 / float(features.std())
        merger.linear_fc2.weight.mul_(scale)
        merger.linear_fc2.bias.mul_(scale)


def _merger_scale(model) -> float:
    """Rough std of the merger's hidden activations on a random image, to normalise its output."""
    import torch

    cfg = model.config.vision_config
    grid = torch.tensor([[1, 8, 8]])
    pixels = torch.randn(64, cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2)
    visual = model.model.visual
    with torch.no_grad():
        hidden = visual(pixels, grid_thw=grid).last_hidden_state
        merged = visual.merger.ln_q(hidden).view(-1, visual.merger.hidden_size)
        inner = visual.merger.mlp[1](visual.merger.mlp[0](merged))
    return float(inner.pow(2).mean().sqrt())


def _sample_images(rng: random.Random, n: int):
    """Random-noise and striped RGB images of mixed sizes (small, for a fast calibration)."""
    import numpy as np
    from PIL import Image

    images = []
    for k in range(n):
        w, h = rng.randrange(56, 170), rng.randrange(56, 170)
        rs = np.random.RandomState(rng.randrange(2**31))
        if k % 2:
            array = rs.randint(0, 256, (h, w, 3), dtype=np.uint8)
        else:
            array = np.zeros((h, w, 3), np.uint8)
            array[:, :, rs.randint(3)] = (np.arange(w) * rs.randint(1, 9) % 256)[None, :]
        images.append(Image.fromarray(array))
    return images


def calibrate_eos(model, tok, image_processor, seed: int = 0) -> None:
    """Scale the EOS row of lm_head so that only a few greedy image replies stop early (:func:`scale_eos`,
    as for text)."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    from airflow_hfllm.vision.processor import images_only_processor

    rng = random.Random(1000 + seed)
    lines = corpus()
    images = _sample_images(rng, 24)
    texts, flat = [], []
    for k, image in enumerate(images):
        n = 1 + (k % 3 == 2)
        content = [{"type": "image"}] * n + [{"type": "text", "text": " ".join(rng.sample(lines, 1 + k % 4))}]
        texts.append(tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True))
        flat += [image] * n
    processor_class = getattr(transformers, PROCESSOR_MAPPING_NAMES[model.config.model_type])
    processor = images_only_processor(processor_class, image_processor, tok, CHAT_TEMPLATE)
    side = image_processor.patch_size * image_processor.merge_size  # 8..32 image tokens each
    inputs = processor(text=texts, images=flat, padding=True, return_tensors="pt",
                       size={"shortest_edge": 8 * side * side, "longest_edge": 32 * side * side})
    eos = tok.eos_token_id
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, suppress_tokens=[eos], output_logits=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    scale_eos(model, out.logits, eos)
