"""Safety overhead: the standard batch through the fast engine alone, then checked by Llama Guard.

    python benchmarks/safety_overhead.py            # 7B generation, 512 rows: the bar is safety <= 10%
    python benchmarks/safety_overhead.py --small    # 0.5B generation, 128 rows: quick GPU smoke
    python benchmarks/safety_overhead.py --tiny     # tiny shapes on the CPU, 8 rows: smoke test anywhere

Generation is `benchmarks/throughput.py`'s standard batch (512 seeded random-token prompts of 50-300
tokens, 128 new tokens each, random-weight Qwen2 of 7B shape) through `FastEngine`, as the job runs it.
The checker is `LlamaGuardChecker` over a random-weight Llama of Llama Guard 3 1B's shape (hidden 2048,
16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256, llama3 rope scaling, tied embeddings) built
in-process, forced to answer `safe` (a hook on lm_head), so every row is generated and no row pays
for the category line, as when nearly all rows are safe. There is no Llama 3 tokenizer offline: the
checker reads with the tiny Llama Guard tokenizer of `airflow_hfllm.testing.text` (trained on the Llama Guard 3
prompt, so the template costs about what it costs in Llama 3 tokens; both counts are printed), and
each prompt / output is a text of as many one-token words as the row's prompt / output token ids, so
the checker reads exactly as many text tokens as the generator did. Prompt checks judge the prompt;
output checks judge the output with its prompt as the user turn before it (so they read both).
Times are wall-clock after a warm-up, GPU synchronized, tokenization included; safety steps run one
after the other after generation, as `TextJob` does per chunk. The checker's warm-up checks as many
other rows (other lengths, so other batch shapes), and its time (the compile, once per process) is
printed apart.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.throughput import IdsTokenizer, build, workload  # noqa: E402

GUARD_SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
               rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=4096),
}
TINY_GENERATOR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=152064, tie_word_embeddings=False)
MODES = {  # generator shape, checker shape, rows
    "standard": ("7b", "1b", 512),
    "small": ("0.5b", "1b", 128),
    "tiny": ("tiny", "tiny", 8),
}
BAR = 0.10


def sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def tiny_generator():
    """A tiny random Qwen2 on the CPU, as ``throughput.build`` makes one of its real shapes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from airflow_hfllm.engine.loading import LoadedModel
    from airflow_hfllm.config import ModelSpec

    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, **TINY_GENERATOR)
    config.eos_token_id, config.pad_token_id = None, 0  # rows run to max_new_tokens
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    return LoadedModel(ModelSpec("random-qwen2-tiny", dtype="float32"), model, IdsTokenizer(), torch.device("cpu"),
                       torch.float32, 0.0)


def guard_checker(shape: str, device, dtype, prefix_tokens: int = 0, **options):
    """A ``LlamaGuardChecker`` over a random Llama of ``shape`` placed in the model cache under its
    spec (so ``load()`` finds it there), answering ``safe`` whatever it reads. ``prefix_tokens`` pads
    the category list (as longer category descriptions would) until the shared prefix is that long."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from airflow_hfllm.engine.cache import MODEL_CACHE
    from airflow_hfllm.engine.loading import LoadedModel
    from airflow_hfllm.safety.llama_guard import LlamaGuardChecker
    from airflow_hfllm.testing.text import tokenizer

    tok = tokenizer("llama-guard")
    if prefix_tokens:
        probe = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
        have = len(tok(probe[:probe.index("<BEGIN CONVERSATION>")], add_special_tokens=False)["input_ids"])
        notes = word_texts(tok, [list(range(max(0, prefix_tokens - have)))])[0]
        end = "{{- '<END UNSAFE CONTENT CATEGORIES>"
        assert tok.chat_template.count(end) == 1
        tok.chat_template = tok.chat_template.replace(end, "{{- 'Notes: " + notes + ".\\n' }}" + end)
    started = time.monotonic()
    torch.manual_seed(1)
    config = LlamaConfig(bos_token_id=tok.convert_tokens_to_ids("<|begin_of_text|>"), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, **GUARD_SHAPES[shape])
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    safe_id = tok.convert_tokens_to_ids("safe")

    def answer_safe(module, args, logits):
        logits[..., safe_id] = 1e4
        return logits

    model.lm_head.register_forward_hook(answer_safe)
    checker = LlamaGuardChecker(f"random-llama-guard-3-{shape}", **options)
    MODEL_CACHE.get(checker.spec, lambda: LoadedModel(checker.spec, model, tok, torch.device(device), dtype,
                                                      time.monotonic() - started))
    return checker


def word_texts(tok, rows: list[list[int]]) -> list[str]:
    """One text per row of token ids: as many words as ids, each word one token of ``tok``."""
    vocab = tok.get_vocab()
    candidates = (tok.convert_tokens_to_string([t]) for t in vocab if t.startswith("\u0120") and t[1:].isalpha())
    words = sorted(w for w in candidates if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    return ["".join(words[i % len(words)] for i in ids).strip() for ids in rows]


def run(mode: str, rows: int | None, batch_size: int, token_budget: int, prefix_tokens: int,
        profile: str | None = None, compile: bool | None = None, fast: bool = True) -> dict:
    import torch

    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.config import GenerationParams

    gen_shape, guard_shape, n = MODES[mode]
    n = rows or n
    cuda = torch.cuda.is_available() and mode != "tiny"
    if not cuda and mode != "tiny":
        raise SystemExit("no GPU: use --tiny for the CPU smoke test")
    loaded = build(gen_shape) if gen_shape != "tiny" else tiny_generator()
    dtype = torch.bfloat16 if cuda else torch.float32
    checker = guard_checker(guard_shape, "cuda" if cuda else "cpu", dtype, prefix_tokens, batch_size=batch_size,
                            token_budget=token_budget, compile=compile, fast=fast)
    guard = checker.load()  # computes the two shared prefixes' KV caches once
    tok = guard.tokenizer

    requests = workload("standard", n)
    params = GenerationParams(max_new_tokens=128, do_sample=False)
    engine = FastEngine(loaded, params)
    longest = max(requests, key=lambda r: len(r.input_ids) + r.max_new_tokens)
    engine.generate(requests[:63] + [longest])  # warm-up: allocates the KV cache, captures the graph
    prompts = word_texts(tok, [r.input_ids for r in requests])
    # Warm-up on other rows of the same size (other lengths, so other batch shapes than the timed
    # checks): the compile, and whatever the first passes of full-size batches pay once per process.
    sync()
    t0 = time.perf_counter()
    other = word_texts(tok, [r.input_ids for r in workload("mixed", n)])
    rng = random.Random(0)
    checker.check(other, "prompt")
    checker.check(word_texts(tok, [[rng.randrange(1, 50_000) for _ in range(128)] for _ in other]), "output",
                  context=other)
    sync()
    warmup_s = time.perf_counter() - t0
    checker.stats.clear()

    sync()
    t0 = time.perf_counter()
    completions = engine.generate(requests)
    sync()
    gen_s = time.perf_counter() - t0
    out_ids = [list(map(int, c.text.split())) for c in completions]  # IdsTokenizer: ids as text
    outputs = word_texts(tok, out_ids)

    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        profiler = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        profiler.__enter__()
    t0 = time.perf_counter()
    prompt_verdicts = checker.check(prompts, "prompt")
    sync()
    prompt_s = time.perf_counter() - t0
    prompt_stats = dict(checker.stats)
    checker.stats.clear()
    t0 = time.perf_counter()
    output_verdicts = checker.check(outputs, "output", context=prompts)
    sync()
    output_s = time.perf_counter() - t0
    output_stats = dict(checker.stats)
    if profiler is not None:  # the two checking steps only
        profiler.__exit__(None, None, None)
        with open(profile, "w") as f:
            for key in ("self_cuda_time_total", "self_cpu_time_total"):
                f.write(profiler.key_averages().table(sort_by=key, row_limit=30) + "\n")

    verdicts = prompt_verdicts + output_verdicts
    if not all(v.safe for v in verdicts):
        raise RuntimeError("the checker was forced to answer safe but flagged rows: the measurement is off")
    return dict(
        mode=mode, generator=gen_shape, checker=guard_shape, rows=n,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        prompt_tokens=sum(len(r.input_ids) for r in requests), output_tokens=sum(c.output_tokens for c in completions),
        generation_s=round(gen_s, 3), safety_prompts_s=round(prompt_s, 3), safety_outputs_s=round(output_s, 3),
        checked_tokens_prompts=prompt_stats["tokens"], checked_tokens_outputs=output_stats["tokens"],
        checked_rows=prompt_stats["rows"] + output_stats["rows"],
        prefix_tokens={k: len(v) for k, v in checker._prefix_ids.items()},
        template_tokens_per_row=round((prompt_stats["tokens"] - sum(len(t) for t in
                                       tok(prompts, add_special_tokens=False)["input_ids"])) / n, 1),
        overhead=round((prompt_s + output_s) / gen_s, 4), checker_warmup_s=round(warmup_s, 1), batch_size=batch_size, token_budget=token_budget,
        checker_compiled=checker.compiled, checker_pass="lean" if checker._pass is not None else "transformers",
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
    )


def table(r: dict) -> str:
    gen, ps, os_ = r["generation_s"], r["safety_prompts_s"], r["safety_outputs_s"]
    n, total = r["rows"], ps + os_
    lines = [
        f"{r['device']}: generation {r['generator']} (FastEngine), checker Llama Guard 3 {r['checker']} shape "
        f"(random weights, forced safe); {n} rows",
        f"checker prefix {r['prefix_tokens']['prompt']}/{r['prefix_tokens']['output']} tokens (prompt/output "
        f"checks; KV cached once), {r['template_tokens_per_row']} template tokens per row after the text; "
        f"token budget {r['token_budget']}, batch <= {r['batch_size']}, "
        f"checker {'compiled' if r.get('checker_compiled') else 'eager'}, {r.get('checker_pass', 'transformers')} pass"
        + (f"; peak {r['peak_gib']} GiB" if r["peak_gib"] else "")
        + f"; checker warm-up (compile) {r.get('checker_warmup_s')} s",
        "",
        "| step | what is read / written | seconds | rows/s | % of generation |",
        "|---|---|---|---|---|",
        f"| generation | {r['prompt_tokens']:,} prompt tokens in, {r['output_tokens']:,} tokens out | {gen:.2f} | "
        f"{n / gen:,.1f} | 100% |",
        f"| safety: prompts | {r['checked_tokens_prompts']:,} tokens (prompt + template) | {ps:.2f} | {n / ps:,.1f} | "
        f"{100 * ps / gen:.1f}% |",
        f"| safety: outputs | {r['checked_tokens_outputs']:,} tokens (prompt as context + output + template) | "
        f"{os_:.2f} | {n / os_:,.1f} | {100 * os_ / gen:.1f}% |",
        f"| safety total | {r['checked_rows']} checks | {total:.2f} | {n / total:,.1f} | "
        f"**{100 * total / gen:.1f}%** |",
        f"| generation + safety | | {gen + total:.2f} | {n / (gen + total):,.1f} | {100 * (gen + total) / gen:.1f}% |",
        "",
        f"bar: safety <= {BAR:.0%} of generation time: {'met' if total / gen <= BAR else 'NOT met'}"
        + ("" if r["mode"] == "standard" else " (only the standard mode is measured against the bar)"),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="0.5B generator, 128 rows")
    size.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, 8 rows")
    parser.add_argument("--rows", type=int, default=None, help="rows instead of the mode's")
    parser.add_argument("--batch-size", type=int, default=128, help="checker rows per forward pass")
    parser.add_argument("--token-budget", type=int, default=32_768, help="checker rows x longest row per pass")
    parser.add_argument("--prefix-tokens", type=int, default=0,
                        help="pad the template's category list until the shared prefix has this many tokens "
                             "(default: Llama Guard 3's own template)")
    parser.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    parser.add_argument("--profile", default=None, help="write torch.profiler tables of the checks to this file")
    parser.add_argument("--eager-checker", action="store_true", help="no torch.compile for the checker")
    parser.add_argument("--transformers-forward", action="store_true",
                        help="checker verdicts through transformers' forward, not the lean pass")
    args = parser.parse_args()
    mode = "small" if args.small else "tiny" if args.tiny else "standard"
    result = run(mode, args.rows, args.batch_size, args.token_budget, args.prefix_tokens, args.profile,
                 compile=False if args.eager_checker else None, fast=not args.transformers_forward)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
