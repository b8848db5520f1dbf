"""Output tokens/s of four generation paths, side by side, one process per path.

    python benchmarks/throughput.py --models 0.5b,7b --batches standard,mixed
    python benchmarks/throughput.py --models 7b --batches standard --paths padded,ours --quantization none,8bit,4bit
    python benchmarks/throughput.py --models 70b --batches standard --paths ours --quantization fp8
    python benchmarks/throughput.py --models 7b --batches prefix --paths ours,ours-noprefix
    python benchmarks/throughput.py --models 7b --batches standard --paths ours,ours-serial --constraint none,json
    python benchmarks/throughput.py --models 7b --batches standard,mixed --paths ours,ours-compiled

Random-weight Qwen2 models of real shape are built in-process (no hub). The standard batch is 512
seeded random-token prompts of 50-300 tokens with 128 new tokens each (EOS never ends a row: greedy on
random weights, fixed length); the mixed batch is the same prompts with per-row max_new_tokens uniform
in 16-512; the prefix batch (issue 18) is 512 rows of one shared 1,000-token prefix and 100 tokens of
their own, 64 new tokens each, for ``ours`` (shared-prefix reuse, ``engine/prefix.py``) against
``ours-noprefix``. tok/s is end to end over the batch (token ids in, token ids out, prefill included) after a
warm-up; compile/capture time is reported in its own column. Each path runs in its own process so one
path's memory does not skew another's. The one-prompt-per-call loop runs on a subset and is
extrapolated (labelled so). ``ours-compiled`` is ``ours`` with ``compile=True`` (``engine/compiled.py``: the
layers' elementwise work fused by torch.compile around attention): its warm-up compiles too (a one-row
prefill group included), its compile seconds are torch.compile's plus the capture's, and its note says if
anything compiled during the timed run. ``ours-fp8kv`` and ``ours-compiled-fp8kv`` are those two with an FP8
(e4m3) KV cache (``kv_cache_dtype="fp8"``): half the cache's memory (slots sized from free memory double)
and half the keys and values read per decode step. ``ours-paged`` and ``ours-compiled-paged`` take a paged KV
cache (``FastEngine(paged=True)``, ``engine/kv_cache.py``): each row holds blocks for its own length, so the
mixed batch fits more rows in the same memory; ``ours-static`` and ``ours-compiled-static`` a static one. The
other paths take the engine's choice (paged where memory holds fewer static slots than the most it takes).

``--quantization 8bit,4bit`` runs the padded path (and ``ours``, which refuses quantized weights and is
then skipped with a note) on bitsandbytes models. bitsandbytes quantizes while loading, so the random
model is saved once (bf16, ~15 GB for 7b, under ``--checkpoint-dir``) and loaded back with
``from_pretrained(quantization_config=...)`` as the operator would load it: the loader's own
``BitsAndBytesConfig`` (4bit: nf4, double quantization) and its ``dtype="auto"`` (fp16 for 8bit, bf16
for 4bit). Weights GiB is ``model.get_memory_footprint()``; peak GiB is counted from after loading.

``--quantization fp8`` quantizes the random bf16 model in process (``engine/fp8.py``: e4m3 weights with
per-channel scales, activations per token) before the paths run. The ``70b`` shape does not fit on one
GPU in bf16 (141 GB): its fp8 model is built in place (:func:`build_in_place`), layer by layer on the GPU,
about 70 GB; it runs with ``--quantization fp8`` only.

``--constraint json`` decodes under :data:`JSON_SCHEMA` (nested objects, enums, bounded strings and
integers, an array of objects) through llguidance, which needs each token's bytes: the ids tokenizer gives
way to :func:`grammar_tokenizer`, a byte-level vocabulary of the model's size (words, numbers, JSON
punctuation) built in process. The array's ``minItems`` (1000 objects) keeps every row's grammar incomplete,
so lengths stay fixed and EOS (allowed only once a grammar accepts) never comes: each row is cut at its
``max_new_tokens`` as a valid prefix (a row the grammar rejected is counted, and should not exist). Path
``ours`` overlaps each step's mask work with its forward pass (the GPU's default, ``engine/steps.py``),
``ours-serial`` does it after the step; both report the host's seconds of mask work and of waiting on the
GPU (``grammar_mask_s``, ``grammar_wait_s``). ``one-prompt`` and ``generate_batch`` take no constraint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

SHAPES = {  # name -> (model_type, config): real shapes, random weights
    "0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                           intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                           rope_theta=1_000_000.0)),
    "7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                         intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1_000_000.0)),
    "qwen3-8b": ("qwen3", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
                               rope_theta=1_000_000.0)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                                        moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                        norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False,
                                        rope_theta=1_000_000.0)),
    "gemma3-12b": ("gemma3_text", dict(hidden_size=3840, num_hidden_layers=48, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=256, intermediate_size=15360,
                                       vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
                                       layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8,
                                       rope_local_base_freq=10_000.0, rope_theta=1_000_000.0)),
    "gpt-oss-20b": ("gpt_oss", dict(hidden_size=2880, num_hidden_layers=24, num_attention_heads=64,
                                    num_key_value_heads=8, head_dim=64, intermediate_size=2880, num_local_experts=32,
                                    num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
                                    layer_types=["sliding_attention", "full_attention"] * 12, quantization_config=None,
                                    tie_word_embeddings=False)),
    "phi4-14b": ("phi3", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                              intermediate_size=17920, vocab_size=100352, tie_word_embeddings=False,
                              rope_theta=250_000.0)),
    # longrope (Phi-4-mini, Phi-3.5): not on the fast path (docs/design.md, Model families); padded only
    "phi4-mini": ("phi3", dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                               intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True,
                               partial_rotary_factor=0.75, max_position_embeddings=131072,
                               original_max_position_embeddings=4096,
                               rope_parameters=dict(rope_type="longrope", rope_theta=10_000.0,
                                                    short_factor=[1.0] * 48, long_factor=[1.0 + i / 2 for i in range(48)],
                                                    original_max_position_embeddings=4096))),
    "70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False, rope_theta=500_000.0)),
}
IN_PLACE = ("70b",)  # too big for one GPU in bf16: fp8 only, built layer by layer
PADDED_BATCH = {"0.5b": 256}  # 128 for the others
HBM_GBPS = {"H100": 3350, "H200": 4800}
# the paths that take --quantization; "-fp8kv": the fast engine with kv_cache_dtype="fp8"
QUANT_PATHS = ("padded", "ours", "ours-sdpa", "ours-compiled", "ours-fp8kv", "ours-compiled-fp8kv")
CHECKPOINT_DIR = os.environ.get("HFLLM_BENCH_DIR", "/tmp/hfllm-bench")
CONSTRAINED_PATHS = ("padded", "ours", "ours-sdpa", "ours-serial")  # the paths that take --constraint
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "kind": {"enum": ["invoice", "receipt", "order", "refund"]},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24}, "vip": {"type": "boolean"},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False}},
            "required": ["name", "vip", "address"], "additionalProperties": False},
        "lines": {"type": "array", "minItems": 1000, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "maxLength": 12}, "qty": {"type": "integer", "minimum": 1, "maximum": 999},
            "unit": {"enum": ["each", "kg", "box"]}, "note": {"type": "string", "maxLength": 40}},
            "required": ["sku", "qty", "unit", "note"], "additionalProperties": False}},
    },
    "required": ["id", "kind", "customer", "lines"], "additionalProperties": False,
}


def build(shape: str, dtype: str = "bfloat16", quantization: str | None = None, checkpoint_dir: str = CHECKPOINT_DIR,
          device: str = "cuda"):
    """A random-weight model of ``shape`` on ``device``, as a ``LoadedModel`` with an ids tokenizer.

    :param shape: a key of ``SHAPES``.
    :param dtype: weights dtype when not quantized.
    :param quantization: ``None``/``"none"``, ``"8bit"`` or ``"4bit"`` (see :func:`build_quantized`), or
        ``"fp8"`` (the bf16 model quantized in process; in place for the shapes of ``IN_PLACE``).
    :param checkpoint_dir: where the quantized path keeps the random checkpoint it loads back.
    :param device: ``"cpu"`` for tiny shapes on machines without a GPU (unquantized only).
    """
    if quantization == "fp8" and shape in IN_PLACE:
        return build_in_place(shape)
    if quantization == "fp8":
        return quantized_in_process(build(shape, dtype))
    if quantization not in (None, "none"):
        return build_quantized(shape, quantization, checkpoint_dir)
    if shape in IN_PLACE:
        raise ValueError(f"{shape} does not fit on one GPU in {dtype}: run it with --quantization fp8")
    import torch
    from transformers import AutoModelForCausalLM

    from airflow_hfllm.engine.loading import LoadedModel
    from airflow_hfllm.config import ModelSpec

    torch.manual_seed(0)
    config = shape_config(shape)
    started = time.monotonic()
    torch_dtype = getattr(torch, dtype)
    torch.set_default_dtype(torch_dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if device == "cuda":
        torch.cuda.synchronize()
    loaded = LoadedModel(ModelSpec(f"random-{shape}", dtype=dtype), model, IdsTokenizer(),
                         torch.device(device), torch_dtype, time.monotonic() - started)
    return loaded


def shape_config(shape: str):
    from transformers import AutoConfig

    model_type, arguments = SHAPES[shape]
    config = AutoConfig.for_model(model_type, **{"max_position_embeddings": 4096, **arguments})
    config.eos_token_id = None  # rows run to max_new_tokens
    config.pad_token_id = 0
    return config


def quantized_in_process(loaded):
    """``loaded`` with its decoder layers quantized to FP8 (``engine/fp8.py``), as the loader does for
    ``quantization="fp8"``."""
    import dataclasses

    import torch

    from airflow_hfllm.engine.fp8 import quantize_model

    started = time.monotonic()
    quantize_model(loaded.model)
    torch.cuda.synchronize()
    return dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, quantization="fp8"),
                               load_seconds=loaded.load_seconds + time.monotonic() - started)


def build_in_place(shape: str, device: str = "cuda"):
    """The random model of ``shape`` with FP8 decoder layers, never whole in bf16: built on the meta device,
    then the embeddings, norm, rotary tables and lm_head made on ``device`` in bf16, and each decoder layer
    made in bf16, given the model's own random init and quantized (``engine/fp8.py``) before the next. The
    peak is the FP8 model plus one bf16 layer: ~70 GB for ``70b``, where bf16 would need 141 GB."""
    import torch
    from transformers import AutoModelForCausalLM

    from airflow_hfllm.config import ModelSpec
    from airflow_hfllm.engine.arch.layer import text_model
    from airflow_hfllm.engine.fp8 import check_device, quantize_layer
    from airflow_hfllm.engine.loading import LoadedModel

    check_device(device)
    torch.manual_seed(0)
    started = time.monotonic()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=torch.bfloat16)
    layers = list(text_model(model).layers)
    in_layers = {id(m) for layer in layers for m in layer.modules()}

    def materialise(module, recurse: bool):
        module.to_empty(device=device, recurse=recurse)
        for m in module.modules() if recurse else [module]:
            model._init_weights(m)

    with torch.no_grad():
        for module in model.modules():
            if id(module) not in in_layers:
                materialise(module, recurse=False)
        model.tie_weights()  # a tied lm_head again shares the embeddings' new weight
        for layer in layers:
            materialise(layer, recurse=True)
            quantize_layer(layer)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if device == "cuda":
        torch.cuda.synchronize()
    return LoadedModel(ModelSpec(f"random-{shape}", dtype="bfloat16", quantization="fp8"), model, IdsTokenizer(),
                       torch.device(device), torch.bfloat16, time.monotonic() - started)


def random_checkpoint(shape: str, checkpoint_dir: str) -> str:
    """A folder holding the random bf16 model of ``shape`` (built and saved on first use; seeded, so every
    process gets the same weights)."""
    import gc
    import shutil

    import torch

    folder = os.path.join(checkpoint_dir, f"random-qwen2-{shape}-bfloat16")
    if not os.path.exists(os.path.join(folder, "config.json")):
        started = time.monotonic()
        loaded = build(shape, "bfloat16")
        partial = f"{folder}.partial-{os.getpid()}"  # renamed when complete: a killed save is never reused
        loaded.model.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(partial, folder)
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
        print(f"saved random {shape} checkpoint to {folder} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return folder


def build_quantized(shape: str, quantization: str, checkpoint_dir: str = CHECKPOINT_DIR):
    """The random model of ``shape`` loaded back from its checkpoint through bitsandbytes, with the
    operator's loader settings (:func:`airflow_hfllm.engine.loading.quantization_config`)."""
    import torch
    from transformers import Qwen2ForCausalLM

    from airflow_hfllm.engine.loading import LoadedModel, device_and_dtype, quantization_config
    from airflow_hfllm.config import ModelSpec

    folder = random_checkpoint(shape, checkpoint_dir)
    spec = ModelSpec(f"random-qwen2-{shape}", quantization=quantization)
    device, dtype = device_and_dtype(spec)
    started = time.monotonic()
    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": 0},
                                             quantization_config=quantization_config(spec, device, dtype))
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # rows run to max_new_tokens
    model.generation_config.pad_token_id = 0
    torch.cuda.synchronize()
    seconds = time.monotonic() - started
    torch.cuda.reset_peak_memory_stats()  # count generation, not loading's transient copies
    return LoadedModel(spec, model, IdsTokenizer(), device, dtype, seconds)


class IdsTokenizer:
    """Token ids in, token ids out: the benchmark measures generation, not text decoding."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def grammar_tokenizer(vocab: int, seed: int = 0):
    """A fast byte-level BPE tokenizer of ``vocab`` tokens (the last one EOS) for constrained runs, with no
    merges: it decodes, and llguidance reads its tokens' bytes; the benchmark encodes nothing. Besides the
    256 bytes: JSON punctuation runs, numbers, and random lowercase words (some capitalised, half with a
    leading space), about as a real vocabulary of this size mixes them."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    punctuation = ['"', '":', '":"', '","', '",', '"}', '"]', '},', '}]', '],', '{"', '["', '":[', '":{"', '":[{"',
                   ',"', "}", "{", "[", "]", ":", ",", ".", "'s", "-", "_", "/", "(", ")"]
    tokens = dict.fromkeys([*sorted(pre_tokenizers.ByteLevel.alphabet()), *punctuation])
    while len(tokens) < vocab - 1:
        kind = rng.random()
        if kind < 0.1:
            token = str(rng.randrange(1000))
        elif kind < 0.15:
            token = rng.choice(punctuation) + "".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
        else:
            token = "".join(rng.choice(letters) for _ in range(rng.randint(1, 10)))
            token = token.capitalize() if rng.random() < 0.2 else token
            token = "\u0120" + token if rng.random() < 0.5 else token  # byte-level's space
        tokens[token] = None
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def workload(batch: str, n: int = 512, vocab: int = 150_000):
    import random

    from airflow_hfllm.engine.generate import Request

    rng = random.Random(1234)
    requests = []
    if batch == "prefix":  # issue 18: one shared 1,000-token prefix, then 100 tokens of each row's own
        prefix = [rng.randrange(1, vocab) for _ in range(1000)]
        return [Request(prefix + [rng.randrange(1, vocab) for _ in range(100)], 64) for _ in range(n)]
    for _ in range(n):
        length = rng.randint(50, 300)
        ids = [rng.randrange(1, 150_000) % vocab for _ in range(length)]  # the same prompts where vocab allows
        new = 128 if batch == "standard" else rng.randint(16, 512)
        requests.append(Request(ids, new))
    return requests


def run_path(path: str, shape: str, batch: str, dtype: str, quantization: str = "none",
             checkpoint_dir: str = CHECKPOINT_DIR, slots: int | None = None, profile: bool = False,
             constraint: str = "none", padded_rows: int | None = None) -> dict:
    import dataclasses

    import torch

    from airflow_hfllm.engine.fast import FastEngine, unsupported_reason
    from airflow_hfllm.engine.generate import BatchedGenerator
    from airflow_hfllm.config import GenerationParams

    loaded = build(shape, dtype, quantization, checkpoint_dir)
    dtype = str(loaded.dtype).removeprefix("torch.")
    fast_refuses = unsupported_reason(loaded)
    vocab = loaded.model.config.get_text_config().vocab_size
    requests = workload(batch, vocab=vocab)
    grammar = {}
    if constraint == "json":
        loaded = dataclasses.replace(loaded, tokenizer=grammar_tokenizer(vocab))
        grammar = dict(json_schema=JSON_SCHEMA)
    elif constraint != "none":
        raise ValueError(f"--constraint {constraint}: none or json")
    params = GenerationParams(max_new_tokens=max(r.max_new_tokens for r in requests), do_sample=False, **grammar)
    note, compile_s, tokens, steps, out = "", 0.0, 0, None, None

    if path == "one-prompt":
        subset = requests[:16]
        gen = BatchedGenerator(loaded, params, max_batch_size=1)
        gen.generate(subset[:1])  # warm-up
        torch.cuda.synchronize()
        t0 = time.monotonic()
        out = gen.generate(subset)
        torch.cuda.synchronize()
        seconds = (time.monotonic() - t0) * len(requests) / len(subset)
        tokens = sum(c.output_tokens for c in out) * len(requests) // len(subset)
        note = f"extrapolated from {len(subset)} prompts"
    elif path == "padded":
        gen = BatchedGenerator(loaded, params, max_batch_size=PADDED_BATCH.get(shape, 128), token_budget=10**9)
        gen.generate(requests[:8])
        torch.cuda.synchronize()
        # a subset as the full run batches it: rows sorted by length, the N around the median length
        ranked = sorted(requests, key=lambda r: len(r.input_ids))
        mid = max(0, (len(ranked) - (padded_rows or len(ranked))) // 2)
        timed = ranked[mid:mid + padded_rows] if padded_rows else requests
        t0 = time.monotonic()
        out = gen.generate(timed)
        torch.cuda.synchronize()
        seconds = time.monotonic() - t0
        tokens = sum(c.output_tokens for c in out)
        note = f"batch {PADDED_BATCH.get(shape, 128)}" + (
            f", {len(timed)} rows around the median prompt length" if padded_rows else "")
        requests = timed  # the FLOPs below count the rows timed
    elif path == "generate_batch":
        from transformers import GenerationConfig

        model = loaded.model
        config = GenerationConfig(max_new_tokens=128, do_sample=False, eos_token_id=None, pad_token_id=0)
        model.generate_batch([r.input_ids for r in requests[:8]], generation_config=config)
        torch.cuda.synchronize()
        t0 = time.monotonic()
        if batch == "standard":
            results = model.generate_batch([r.input_ids for r in requests], generation_config=config)
            got = list(results.values())
        else:  # generate_batch takes one max_new_tokens per call: its manager takes one per request
            config.max_new_tokens = max(r.max_new_tokens for r in requests)
            manager = model.init_continuous_batching(generation_config=config)
            manager.start()
            for i, r in enumerate(requests):
                manager.add_request(r.input_ids, request_id=f"r{i}", max_new_tokens=r.max_new_tokens)
            got = []
            while len(got) < len(requests):
                result = manager.get_result(timeout=300)
                if result is None:
                    break
                got.append(result)
            manager.stop(block=True)
            note = "continuous batching manager, per-request max_new_tokens"
        torch.cuda.synchronize()
        seconds = time.monotonic() - t0
        tokens = sum(len(g.generated_tokens) for g in got)
        if len(got) != len(requests):
            note += f" {len(requests) - len(got)} requests missing from the result"
    elif path in ("ours", "ours-sdpa", "ours-noprefix", "ours-serial", "ours-compiled", "ours-fp8kv",
                  "ours-compiled-fp8kv", "ours-paged", "ours-compiled-paged", "ours-static",
                  "ours-compiled-static"):
        if fast_refuses:
            return dict(skipped=fast_refuses)
        # ours-sdpa: the same engine with decode attention through SDPA over the masked cache (the CPU's
        # path) instead of the Triton kernel, for comparison; ours-serial: a grammar's mask work after each
        # step instead of during its forward pass; ours-noprefix: without shared-prefix reuse (engine/prefix.py);
        # ours-compiled: with torch.compile around attention; -fp8kv: an e4m3 KV cache; -paged, -static: that
        # KV layout, where the others take the engine's choice (engine/kv_cache.py plan)
        engine = FastEngine(loaded, params, slots=slots, decode_kernel=path != "ours-sdpa",
                            grammar_overlap=path != "ours-serial", prefix_reuse=path != "ours-noprefix",
                            compile=path.startswith("ours-compiled"),
                            kv_cache_dtype="fp8" if path.endswith("-fp8kv") else "auto",
                            paged={"paged": True, "static": False}.get(path.rsplit("-", 1)[-1]))
        longest = max(requests, key=lambda r: len(r.input_ids) + r.max_new_tokens)
        engine.generate(requests[:63] + [longest])  # warm-up: allocates the cache, captures the graph, compiles
        engine.generate(requests[64:65])  # a prefill group of one row: its own compiled shape class
        compiled_s = engine.decoder.compiler.seconds
        compile_s = engine.capture_seconds + compiled_s
        engine.prefix.entries.clear()  # the timed run computes its prefix itself
        before = engine.stats()
        steps_before, engine.prefill_seconds, engine.prefill_gpu_seconds = engine.steps, 0.0, 0.0
        torch.cuda.synchronize()
        t0 = time.monotonic()
        out = engine.generate(requests)
        torch.cuda.synchronize()
        seconds = time.monotonic() - t0
        tokens = sum(c.output_tokens for c in out)
        steps = engine.steps - steps_before
        after = engine.stats()
        prefill_s = after["prefill_gpu_seconds"]
        note = f"{engine._shape[0]} slots x {engine._shape[1]} tokens" + (
            f" (paged: {engine._shape[2]} blocks)" if engine.paged else "") + f", prefill {prefill_s:.2f} s on the GPU"
        if after["prefixes_computed"]:
            note += f", {after['prefix_tokens_saved']} prompt tokens' prefill saved by prefix reuse"
        if grammar:
            grammar_s = {k: round(after[f"grammar_{k}_seconds"] - before[f"grammar_{k}_seconds"], 2)
                         for k in ("mask", "consume", "wait")}
            note += (f"; grammar: {grammar_s['mask']} s host mask work ({grammar_s['consume']} s of it consuming "
                     f"tokens), {grammar_s['wait']} s host waiting on the GPU")
        if path.startswith("ours-compiled"):
            late = engine.decoder.compiler.seconds - compiled_s  # a shape class the warm-up missed
            note += (f", torch.compile {compiled_s:.1f} s + capture {engine.capture_seconds:.1f} s"
                     + (f", {late:.1f} s more compiling in the timed run" if late else "")
                     + ("" if engine.decoder.compiler.enabled else ", COMPILE FAILED: ran eager"))
        kernels = top_kernels(engine, requests[:128]) if profile else None
    else:
        raise ValueError(path)

    weights = loaded.model.get_memory_footprint()
    result = dict(path=path, model=shape, quant=quantization, batch=batch, constraint=constraint, dtype=dtype,
                  tokens=tokens,
                  seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1), load_s=round(loaded.load_seconds, 1),
                  compile_s=round(compile_s, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                  weights_gib=round(weights / 2**30, 2), note=note, device=torch.cuda.get_device_name(),
                  fast_engine=fast_refuses or "runs")
    if grammar and out is not None:
        from airflow_hfllm.engine.grammar import REJECTED

        result["rejected_rows"] = sum(c.error == REJECTED for c in out)  # 0: the masks held
        result["cut_rows"] = sum(c.finish_reason == "length" for c in out)  # all: fixed lengths
        if path.startswith("ours"):
            result.update({f"grammar_{k}_s": v for k, v in grammar_s.items()})
    if steps:
        result["decode_steps"] = steps
        result["weight_gbps"] = round(steps * weights / seconds / 1e9)
    prompt_tokens = sum(len(r.input_ids) for r in requests)
    flops, prefill_flops = matmul_flops(loaded.model, prompt_tokens, tokens, rows=len(requests))
    result["tflops"] = round(flops / seconds / 1e12, 1)
    if path.startswith("ours"):
        # prefill and decode apart: prefill's GPU time from the engine's events, decode the rest
        result["matmul_tflops"] = round(matmul_rate(loaded.model, rows=engine._shape[0]), 1)
        result["prefill_s"] = round(prefill_s, 2)
        result["prefill_tflops"] = round(prefill_flops / prefill_s / 1e12, 1)
        result["prefill_matmul_tflops"] = round(matmul_rate(loaded.model, rows=4096), 1)
        result["decode_tflops"] = round((flops - prefill_flops) / (seconds - prefill_s) / 1e12, 1)
        result["decode_step_ms"] = round((seconds - prefill_s) / steps * 1000, 2)
        if kernels:
            result["kernels"] = kernels
    return result


def top_kernels(engine, requests, top: int = 12) -> str:
    """The GPU kernels that took the most time over one more run of ``requests`` (torch.profiler), as lines."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(requests)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return "\n".join(f"  {e.self_device_time_total / total:6.1%} {e.count:7d}x  {e.key[:110]}" for e in events[:top])


def logical_shape(p) -> tuple:
    """A weight's shape as the model multiplies by it: bitsandbytes packs a 4-bit [out, in] matrix into a
    [out * in / 2, 1] byte column and keeps the real shape in its quant state."""
    state = getattr(p, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(p.shape)


def matmul_flops(model, prompt_tokens: int, output_tokens: int, rows: int) -> tuple[int, int]:
    """(all, prefill's) matmul FLOPs of a batch: the layers run on every prompt token and every output token
    but each row's last; lm_head on each output token only (prefill takes logits at each row's last
    position), tied to the embedding or not. The attention's own score and value FLOPs are left out."""
    body = 2 * active_params(model)
    head = 2 * math.prod(logical_shape(model.get_output_embeddings().weight))
    prefill = body * prompt_tokens + head * rows
    return prefill + (body + head) * (output_tokens - rows), prefill


def active_params(model) -> int:
    """Weights one token multiplies by in the layers: every matrix but the embedding and lm_head, experts
    at top-k / experts."""
    cfg = model.config.get_text_config()
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    share = cfg.num_experts_per_tok / experts if experts else 1.0
    total = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "embed_tokens" in name or name.startswith("lm_head"):
            continue
        total += math.prod(logical_shape(p)) * (share if ".experts." in name else 1.0)
    return int(total)


def matmul_rate(model, rows: int) -> float:
    """cuBLAS bf16 TFLOP/s over the model's own dense GEMM shapes (one layer's matrices and lm_head) at
    ``rows`` rows, each shape weighted by how often the model has it: the rate a decode step could reach."""
    import torch

    shapes: dict[tuple, int] = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed_tokens" not in name and ".experts." not in name and "router" not in name \
                and not name.endswith("gate.weight"):
            shapes[logical_shape(p)] = shapes.get(logical_shape(p), 0) + 1
    flops = seconds = 0.0
    for (out, inp), count in shapes.items():
        a = torch.randn(rows, inp, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(out, inp, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ w.T
        torch.cuda.synchronize()
        t0 = time.monotonic()
        for _ in range(20):
            a @ w.T
        torch.cuda.synchronize()
        seconds += (time.monotonic() - t0) / 20 * count
        flops += 2 * rows * inp * out * count
    return flops / seconds / 1e12


def table(results: list[dict]) -> str:
    """Markdown rows; the x columns compare with the unquantized paths of the same model and batch."""
    lines = ["| model | quant | batch | path | tok/s | x one-prompt | x padded | x generate_batch | TFLOP/s "
             "(of cuBLAS at its shapes) | prefill TFLOP/s (of cuBLAS) | decode TFLOP/s (of cuBLAS) | decode step ms | "
             "weight-read GB/s | weights GiB | peak GiB | load s | compile s | note |",
             "|" + "---|" * 18]
    for r in results:
        base = {b["path"]: b["tok_s"] for b in results if b["model"] == r["model"] and b["batch"] == r["batch"]
                and b.get("quant", "none") == "none" and b.get("constraint", "none") == r.get("constraint", "none")}
        batch = r["batch"] + ("" if r.get("constraint", "none") == "none" else f"+{r['constraint']}")
        ratio = lambda p: f"{r['tok_s'] / base[p]:.1f}x" if base.get(p) else "-"  # noqa: E731
        floor = lambda r: f" ({r['matmul_tflops']}, {r['tflops'] / r['matmul_tflops']:.0%})" \
            if r.get("matmul_tflops") else ""  # noqa: E731
        lines.append(f"| {r['model']} | {r.get('quant', 'none')} | {batch} | {r['path']} | {r['tok_s']:,.0f} | "
                     f"{ratio('one-prompt')} | {ratio('padded')} | {ratio('generate_batch')} | "
                     f"{r.get('tflops', '-')}{floor(r)} | {share(r, 'prefill_tflops', 'prefill_matmul_tflops')} | "
                     f"{share(r, 'decode_tflops', 'matmul_tflops')} | {r.get('decode_step_ms', '-')} | "
                     f"{r.get('weight_gbps', '-')} | {r['weights_gib']} | {r['peak_gib']} | {r['load_s']} | "
                     f"{r['compile_s']} | {r['note']} |")
    return "\n".join(lines)


def share(r: dict, rate: str, floor: str) -> str:
    return f"{r[rate]} ({r[rate] / r[floor]:.0%})" if r.get(rate) and r.get(floor) else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", default="0.5b,7b")
    parser.add_argument("--batches", default="standard,mixed")
    parser.add_argument("--paths", default="one-prompt,padded,generate_batch,ours")
    parser.add_argument("--quantization", default="none",
                        help="comma list of none, 8bit, 4bit, fp8; quantized runs take the padded and ours paths "
                             "only")
    parser.add_argument("--constraint", default="none",
                        help="comma list of none, json: json decodes under JSON_SCHEMA (see above); constrained runs "
                             f"take the {', '.join(CONSTRAINED_PATHS)} paths only")
    parser.add_argument("--checkpoint-dir", default=CHECKPOINT_DIR,
                        help="where quantized runs save the random bf16 checkpoint they load back (~15 GB for 7b)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--path-timeout", type=float, default=600, help="seconds one path may take")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    parser.add_argument("--slots", type=int, default=None, help="fast engine slots (default: from free memory)")
    parser.add_argument("--profile", action="store_true",
                        help="the fast engine's paths also print the GPU kernels that took most time (torch.profiler)")
    parser.add_argument("--padded-rows", type=int, default=None,
                        help="the padded path times only the N rows around the median prompt length (a batch as the "
                             "full run forms it; for models whose 512 rows take minutes)")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_path(*args.one, args.dtype, args.quantization, args.checkpoint_dir, args.slots, args.profile,
                          args.constraint, args.padded_rows)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results, notes = [], []
    refused = {}  # (model, quant, batch) -> why the fast engine refused that model, as a run found out
    runs = [(shape, batch, quant, constraint, path) for shape in args.models.split(",")
            for batch in args.batches.split(",") for quant in args.quantization.split(",")
            for constraint in args.constraint.split(",") for path in args.paths.split(",")]
    for shape, batch, quant, constraint, path in runs:
        name = f"{path} {shape} {quant} {batch}" + ("" if constraint == "none" else f" {constraint}")
        if path == "one-prompt" and batch != "standard":
            continue
        if quant != "none" and path not in QUANT_PATHS:
            notes.append(f"{name}: not run (quantized runs take {', '.join(QUANT_PATHS)})")
            continue
        if constraint != "none" and path not in CONSTRAINED_PATHS:
            notes.append(f"{name}: not run (constrained runs take {', '.join(CONSTRAINED_PATHS)})")
            continue
        if constraint == "none" and path == "ours-serial":
            continue  # the same as ours without a grammar
        # Skip a 7b load that only ends in the refusal an earlier run of the same model already saw.
        result = dict(skipped=refused[shape, quant, batch]) if path == "ours" and (shape, quant, batch) in refused \
            else _run_one(args, path, shape, batch, quant, constraint)
        if result is None:
            continue
        if "skipped" in result:
            notes.append(f"{name}: skipped, the fast engine refuses {result['skipped']} (a job falls back to "
                         f"batched generate())")
            continue
        if result["fast_engine"] != "runs":
            refused[shape, quant, batch] = result["fast_engine"]
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    print(table(results))
    for r in results:
        if r.get("kernels"):
            print(f"\ntop GPU kernels, {r['path']} {r['model']} {r.get('quant', 'none')} {r['batch']} (share of "
                  f"kernel time, calls, name):\n{r['kernels']}")
    for note in notes:
        print(f"- {note}")
    return 0


def _run_one(args, path: str, shape: str, batch: str, quant: str, constraint: str = "none") -> dict | None:
    """One path in its own process; ``None`` (and a line saying why) when it gave no result."""
    cmd = [sys.executable, __file__, "--dtype", args.dtype, "--quantization", quant, "--checkpoint-dir",
           args.checkpoint_dir, "--constraint", constraint, *(["--slots", str(args.slots)] if args.slots else []),
           *(["--profile"] if args.profile else []),
           *(["--padded-rows", str(args.padded_rows)] if args.padded_rows else []), "--one", path, shape, batch]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                              timeout=args.path_timeout)
    except subprocess.TimeoutExpired:
        print(f"{path} {shape} {quant} {batch}: no result within {args.path_timeout:.0f} s", flush=True)
        return None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{path} {shape} {quant} {batch} failed:\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads(line[7:])


if __name__ == "__main__":
    sys.exit(main())
