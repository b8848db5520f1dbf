"""Output tokens/s of four generation paths, side by side, one process per path.

    python benchmarks/throughput.py --models 0.5b,7b --batches standard,mixed

Random-weight Qwen2 models of real shape are built in-process (no hub). The standard batch is 512
seeded random-token prompts of 50-300 tokens with 128 new tokens each (EOS never ends a row: greedy on
random weights, fixed length); the mixed batch is the same prompts with per-row max_new_tokens uniform
in 16-512. tok/s is end to end over the batch (token ids in, token ids out, prefill included) after a
warm-up; compile/capture time is reported in its own column. Each path runs in its own process so one
path's memory does not skew another's. The one-prompt-per-call loop runs on a subset and is
extrapolated (labelled so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
PADDED_BATCH = {"0.5b": 256, "7b": 128}
HBM_GBPS = {"H100": 3350, "H200": 4800}


def build(shape: str, dtype: str = "bfloat16"):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from airflow_hfllm.engine.loading import LoadedModel
    from airflow_hfllm.engine.spec import ModelSpec

    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, rope_theta=1_000_000.0, **SHAPES[shape])
    config.eos_token_id = None  # rows run to max_new_tokens
    config.pad_token_id = 0
    started = time.monotonic()
    torch_dtype = getattr(torch, dtype)
    torch.set_default_dtype(torch_dtype)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    torch.cuda.synchronize()
    loaded = LoadedModel(ModelSpec(f"random-qwen2-{shape}", dtype=dtype), model, IdsTokenizer(),
                         torch.device("cuda"), torch_dtype, time.monotonic() - started)
    return loaded


class IdsTokenizer:
    """Token ids in, token ids out: the benchmark measures generation, not text decoding."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def workload(batch: str, n: int = 512):
    import random

    from airflow_hfllm.engine.generate import Request

    rng = random.Random(1234)
    requests = []
    for _ in range(n):
        length = rng.randint(50, 300)
        ids = [rng.randrange(1, 150_000) for _ in range(length)]
        new = 128 if batch == "standard" else rng.randint(16, 512)
        requests.append(Request(ids, new))
    return requests


def run_path(path: str, shape: str, batch: str, dtype: str) -> dict:
    import torch

    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.generate import BatchedGenerator
    from airflow_hfllm.engine.spec import GenerationParams

    loaded = build(shape, dtype)
    requests = workload(batch)
    params = GenerationParams(max_new_tokens=max(r.max_new_tokens for r in requests), do_sample=False)
    note, compile_s, tokens, steps = "", 0.0, 0, None

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
        gen = BatchedGenerator(loaded, params, max_batch_size=PADDED_BATCH[shape], token_budget=10**9)
        gen.generate(requests[:8])
        torch.cuda.synchronize()
        t0 = time.monotonic()
        out = gen.generate(requests)
        torch.cuda.synchronize()
        seconds = time.monotonic() - t0
        tokens = sum(c.output_tokens for c in out)
        note = f"batch {PADDED_BATCH[shape]}"
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
    elif path == "ours":
        engine = FastEngine(loaded, params)
        longest = max(requests, key=lambda r: len(r.input_ids) + r.max_new_tokens)
        engine.generate(requests[:63] + [longest])  # warm-up: allocates the cache, captures the graph
        compile_s = engine.capture_seconds
        steps_before, engine.prefill_seconds = engine.steps, 0.0
        torch.cuda.synchronize()
        t0 = time.monotonic()
        out = engine.generate(requests)
        torch.cuda.synchronize()
        seconds = time.monotonic() - t0
        tokens = sum(c.output_tokens for c in out)
        steps = engine.steps - steps_before
        note = f"{engine._shape[0]} slots x {engine._shape[1]} tokens, prefill {engine.prefill_seconds:.1f} s"
    else:
        raise ValueError(path)

    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    result = dict(path=path, model=shape, batch=batch, dtype=dtype, tokens=tokens, seconds=round(seconds, 2),
                  tok_s=round(tokens / seconds, 1), load_s=round(loaded.load_seconds, 1),
                  compile_s=round(compile_s, 1), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                  weights_gib=round(weights / 2**30, 2), note=note, device=torch.cuda.get_device_name())
    if steps:
        result["decode_steps"] = steps
        result["weight_gbps"] = round(steps * weights / seconds / 1e9)
    return result


def table(results: list[dict]) -> str:
    lines = ["| model | batch | path | tok/s | x one-prompt | x padded | x generate_batch | weight-read GB/s "
             "| peak GiB | load s | compile s | note |", "|" + "---|" * 12]
    for r in results:
        base = {b["path"]: b["tok_s"] for b in results if b["model"] == r["model"] and b["batch"] == r["batch"]}
        ratio = lambda p: f"{r['tok_s'] / base[p]:.1f}x" if base.get(p) else "-"  # noqa: E731
        lines.append(f"| {r['model']} | {r['batch']} | {r['path']} | {r['tok_s']:,.0f} | {ratio('one-prompt')} | "
                     f"{ratio('padded')} | {ratio('generate_batch')} | {r.get('weight_gbps', '-')} | "
                     f"{r['peak_gib']} | {r['load_s']} | {r['compile_s']} | {r['note']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", default="0.5b,7b")
    parser.add_argument("--batches", default="standard,mixed")
    parser.add_argument("--paths", default="one-prompt,padded,generate_batch,ours")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--path-timeout", type=float, default=600, help="seconds one path may take")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    parser.add_argument("--one", nargs=3, metavar=("PATH", "MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_path(*args.one, args.dtype)), flush=True)
        return 0
    results = []
    for shape in args.models.split(","):
        for batch in args.batches.split(","):
            for path in args.paths.split(","):
                if path == "one-prompt" and batch != "standard":
                    continue
                try:
                    done = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--one", path, shape, batch],
                                          capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                          timeout=args.path_timeout)
                except subprocess.TimeoutExpired:
                    print(f"{path} {shape} {batch}: no result within {args.path_timeout:.0f} s", flush=True)
                    continue
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is None:
                    print(f"{path} {shape} {batch} failed:\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
                    continue
                results.append(json.loads(line[7:]))
                print(json.dumps(results[-1]), flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(results[-1]) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
