"""Safety overhead: the standard batch through the fast engine alone, then checked by each safety checker.

    python benchmarks/safety_overhead.py            # 7B generation, 512 rows: the bar is safety <= 10%
    python benchmarks/safety_overhead.py --small    # 0.5B generation, 128 rows: quick GPU smoke
    python benchmarks/safety_overhead.py --tiny     # tiny shapes on the CPU, 8 rows: smoke test anywhere
    python benchmarks/safety_overhead.py --checkers llama-guard,llama-guard-fp8,classifier   # issue 17

Generation is `benchmarks/throughput.py`'s standard batch (512 seeded random-token prompts of 50-300
tokens, 128 new tokens each, random-weight Qwen2 of 7B shape) through `FastEngine`, as the job runs it.
`--checkers` (default `llama-guard`) names the checkers, each timed over the same texts after the same
generation run, one after the other:

- `llama-guard`: `LlamaGuardChecker` over a random-weight Llama of Llama Guard 3 1B's shape (hidden 2048,
  16 layers, 32 heads, 8 KV heads, MLP 8192, vocab 128256, llama3 rope scaling, tied embeddings) built
  in-process in bf16, forced to answer `safe` (a hook on lm_head), so every row is generated and no row
  pays for the category line, as when nearly all rows are safe.
- `llama-guard-fp8`: the same model with its decoder's linear layers in FP8 (`quantization="fp8"`,
  `engine/fp8.py`, as the loader quantizes them).
- `classifier`: `ClassifierChecker` over a random-weight `DebertaV2ForSequenceClassification` of
  deberta-v3-base's shape (hidden 768, 12 layers, 12 heads, MLP 3072, 256 relative-position buckets,
  c2p+p2c attention): the ~86M-parameter backbone of Llama Prompt Guard 2 86M, which is mDeBERTa-v3-base
  with a 251,000-token vocabulary; here deberta-v3-base's 128,100 (an embedding lookup: the compute is
  the same). Labels {0: benign, 1: malicious}, biased to answer benign. It is saved
  (`save_pretrained`, safetensors) into a temporary folder next to its tokenizer and loaded back through
  the package's loader (bf16 on a GPU), as a job loads `classifier:FOLDER`. Its attention runs through
  SDPA (`safety/deberta.py`, the checker's default `fast=True`).
  The forward pass is compiled (`torch.compile`, dynamic shapes; the checker's default on CUDA when the
  caller says nothing of the run's size), its compile in the warm-up.
- `classifier-sdpa`: the same, not compiled (`compile=False`).
- `classifier-eager`: the same model through transformers' own (eager) DeBERTa attention (`fast=False`),
  not compiled.

There is no Llama 3 (or DeBERTa sentencepiece) tokenizer offline: the checkers read with the tiny Llama
Guard tokenizer of `airflow_hfllm.testing.text` (trained on the Llama Guard 3 prompt, so the template
costs about what it costs in Llama 3 tokens; both counts are printed); the classifier's copy adds a
first and a last special token to each text, as DeBERTa's [CLS] and [SEP]. Each prompt / output is a
text of as many one-token words as the row's prompt / output token ids, so a checker reads exactly as
many text tokens as the generator did (the classifier: 52-302 per prompt, 130 per output, all under
its 512). Prompt checks judge the prompt; output checks judge the output (Llama Guard: with its prompt
as the user turn before it, so it reads both; the classifier reads the output alone).
Times are wall-clock after a warm-up, GPU synchronized, tokenization included; safety steps run one
after the other after generation, as `TextJob` does per chunk. Each checker's warm-up checks as many
other rows (other lengths, so other batch shapes), and its time (a compile, once per process) is
printed apart. The classifier's TFLOP/s counts its matmuls over real tokens (not the padding):
projections and MLP, QK and AV, and the c2p / p2c products with the 512 relative-position embeddings.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
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
DEBERTA_V3 = dict(vocab_size=128100, max_position_embeddings=512, relative_attention=True, position_buckets=256,
                  max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                  position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu")
CLASSIFIER_SHAPES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}
CLASSIFIER_LABELS = {0: "benign", 1: "malicious"}
TINY_GENERATOR = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=152064, tie_word_embeddings=False)
MODES = {  # generator shape, Llama Guard shape, classifier shape, rows
    "standard": ("7b", "1b", "base", 512),
    "small": ("0.5b", "1b", "base", 128),
    "tiny": ("tiny", "tiny", "tiny", 8),
}
CHECKERS = ("llama-guard", "llama-guard-fp8", "classifier", "classifier-sdpa", "classifier-eager")
BAR = 0.10
TARGETS = {"llama-guard-fp8": 0.75, "classifier": 0.15}  # issue 17: seconds of checks of the standard batch


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
    the category list (as longer category descriptions would) until the shared prefix is that long.
    ``quantization="fp8"`` (an option of the checker) quantizes the decoder's linear layers as the loader
    would (``engine/fp8.py``)."""
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
    if options.get("quantization") == "fp8":
        from airflow_hfllm.engine.fp8 import quantize_model

        quantize_model(model)
    elif options.get("quantization"):
        raise ValueError(f"quantization {options['quantization']!r}: only fp8 is built in process")
    safe_id = tok.convert_tokens_to_ids("safe")

    def answer_safe(module, args, logits):
        logits[..., safe_id] = 1e4
        return logits

    model.lm_head.register_forward_hook(answer_safe)
    fp8 = "-fp8" if options.get("quantization") == "fp8" else ""
    checker = LlamaGuardChecker(f"random-llama-guard-3-{shape}{fp8}", **options)
    MODEL_CACHE.get(checker.spec, lambda: LoadedModel(checker.spec, model, tok, torch.device(device), dtype,
                                                      time.monotonic() - started))
    return checker


def word_texts(tok, rows: list[list[int]]) -> list[str]:
    """One text per row of token ids: as many words as ids, each word one token of ``tok``."""
    vocab = tok.get_vocab()
    candidates = (tok.convert_tokens_to_string([t]) for t in vocab if t.startswith("\u0120") and t[1:].isalpha())
    words = sorted(w for w in candidates if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    return ["".join(words[i % len(words)] for i in ids).strip() for ids in rows]




def classifier_tokenizer():
    """The tiny Llama Guard tokenizer as a classifier's: right padding, 512 tokens, and a first and a
    last special token around each text (as DeBERTa's [CLS] ... [SEP]), so word counts stay token counts."""
    from tokenizers.processors import TemplateProcessing

    from airflow_hfllm.testing.text import tokenizer

    tok = tokenizer("llama-guard")
    first, last = "<|begin_of_text|>", "<|eot_id|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{first} $A {last}", pair=f"{first} $A {last} $B:1 {last}:1",
        special_tokens=[(t, tok.convert_tokens_to_ids(t)) for t in (first, last)])
    tok.padding_side, tok.model_max_length, tok.chat_template = "right", 512, None
    return tok


def classifier_checker(shape: str, device, dtype, folder: str, **options):
    """A ``ClassifierChecker`` over a random ``DebertaV2ForSequenceClassification`` of ``shape`` (deberta-v3
    layout), saved into ``folder`` with its tokenizer and loaded back through the package's loader;
    biased to answer ``benign`` whatever it reads. A second call with the same ``folder`` reuses the model
    (one copy in the model cache)."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from airflow_hfllm.safety.classifier import ClassifierChecker

    checker = ClassifierChecker(folder, **{k: v for k, v in options.items() if v is not None})
    checker.name = f"classifier:random-deberta-v3-{shape}"
    if (Path(folder) / "config.json").exists():
        return checker
    tok = classifier_tokenizer()
    config = DebertaV2Config(pad_token_id=tok.pad_token_id, id2label=CLASSIFIER_LABELS,
                             label2id={v: k for k, v in CLASSIFIER_LABELS.items()}, **DEBERTA_V3,
                             **CLASSIFIER_SHAPES[shape])
    torch.manual_seed(2)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = DebertaV2ForSequenceClassification(config)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([20.0, -20.0]))  # logits of random weights are << 20
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    del model
    return checker


def classifier_flops(config, lengths: list[int]) -> float:
    """Matmul FLOPs of a deberta-v3 encoder over rows of ``lengths`` tokens (no padding): per layer and
    token the projections and MLP; per layer and row QK^T and AV (L x L) and c2p / p2c (L x 2 buckets)."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    span = 2 * (config.position_buckets if config.position_buckets > 0 else config.max_position_embeddings)
    per_row = sum(2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d + 4 * n * span * d for n in lengths)
    return float(layers * per_row)


def bench_checker(name: str, shapes: tuple[str, str], device, dtype, folder: str, args) -> object:
    if name in ("llama-guard", "llama-guard-fp8"):
        return guard_checker(shapes[0], device, dtype, args.prefix_tokens, batch_size=args.batch_size,
                             token_budget=args.token_budget, fast=not args.transformers_forward,
                             compile=False if args.eager_checker else None,
                             quantization="fp8" if name.endswith("fp8") else None)
    return classifier_checker(shapes[1], device, dtype, folder, batch_size=args.classifier_batch_size,
                              token_budget=args.classifier_token_budget, fast=name != "classifier-eager",
                              compile=None if name == "classifier" and not args.eager_checker else False)


def describe(name: str, checker, loaded) -> dict:
    """What a result says of a checker's setup."""
    if name.startswith("llama-guard"):
        return dict(prefix_tokens={k: len(v) for k, v in checker._prefix_ids.items()}, batch_size=checker.batch_size,
                    token_budget=checker.token_budget, compiled=checker.compiled, dtype=str(loaded.dtype)[6:],
                    checker_pass="lean" if checker._pass is not None else "transformers")
    model = loaded.model
    backbone = sum(p.numel() for n, p in model.named_parameters() if "word_embeddings" not in n)
    return dict(batch_size=checker.batch_size, token_budget=checker.token_budget, dtype=str(loaded.dtype)[6:],
                compiled=checker.compiled, attention="SDPA (safety/deberta.py)" if checker.lean
                else f"transformers' {model.config._attn_implementation}",
                backbone_params=backbone)


def time_checks(name: str, checker, prompts: list[str], outputs: list[str], profile: str | None) -> dict:
    """Prompt checks then output checks of the same texts, timed apart (and profiled into ``profile``)."""
    profiler = None
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        profiler = torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        profiler.__enter__()
    checker.stats.clear()
    sync()
    t0 = time.perf_counter()
    verdicts = checker.check(prompts, "prompt")
    sync()
    prompt_s = time.perf_counter() - t0
    prompt_stats = dict(checker.stats)
    checker.stats.clear()
    t0 = time.perf_counter()
    verdicts += checker.check(outputs, "output", context=prompts)
    sync()
    output_s = time.perf_counter() - t0
    output_stats = dict(checker.stats)
    if profiler is not None:  # the two checking steps only
        profiler.__exit__(None, None, None)
        with open(profile, "a") as f:
            f.write(f"## {name}\n")
            for key in ("self_cuda_time_total", "self_cpu_time_total"):
                f.write(profiler.key_averages().table(sort_by=key, row_limit=30) + "\n")
    if not all(v.safe for v in verdicts):
        raise RuntimeError(f"{name} was forced to answer safe but flagged rows: the measurement is off")
    return dict(checker=name, safety_prompts_s=round(prompt_s, 3), safety_outputs_s=round(output_s, 3),
                checked_tokens_prompts=prompt_stats["tokens"], checked_tokens_outputs=output_stats["tokens"],
                checked_rows=prompt_stats["rows"] + output_stats["rows"])


def run(mode: str, args) -> dict:
    import torch

    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.config import GenerationParams
    from airflow_hfllm.testing.text import tokenizer

    gen_shape, guard_shape, classifier_shape, n = MODES[mode]
    n = args.rows or n
    cuda = torch.cuda.is_available() and mode != "tiny"
    if not cuda and mode != "tiny":
        raise SystemExit("no GPU: use --tiny for the CPU smoke test")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    loaded = build(gen_shape) if gen_shape != "tiny" else tiny_generator()
    folder = tempfile.TemporaryDirectory(prefix="hfllm-safety-classifier-")
    # Every checker loaded before the engine sizes its KV cache from the free memory.
    checkers = {name: bench_checker(name, (guard_shape, classifier_shape), device, dtype, folder.name, args)
                for name in args.checkers}
    models = {name: checker.load() for name, checker in checkers.items()}  # Llama Guard: the prefixes' KV caches
    tok = tokenizer("llama-guard")  # every checker's words

    requests = workload("standard", n)
    params = GenerationParams(max_new_tokens=128, do_sample=False)
    engine = FastEngine(loaded, params)
    longest = max(requests, key=lambda r: len(r.input_ids) + r.max_new_tokens)
    engine.generate(requests[:63] + [longest])  # warm-up: allocates the KV cache, captures the graph
    prompts = word_texts(tok, [r.input_ids for r in requests])
    # Warm-up on other rows of the same size (other lengths, so other batch shapes than the timed
    # checks): a compile, and whatever the first passes of full-size batches pay once per process.
    other = word_texts(tok, [r.input_ids for r in workload("mixed", n)])
    rng = random.Random(0)
    other_outputs = word_texts(tok, [[rng.randrange(1, 50_000) for _ in range(128)] for _ in other])
    warmup = {}
    for name, checker in checkers.items():
        sync()
        t0 = time.perf_counter()
        checker.check(other, "prompt")
        checker.check(other_outputs, "output", context=other)
        sync()
        warmup[name] = round(time.perf_counter() - t0, 1)

    sync()
    t0 = time.perf_counter()
    completions = engine.generate(requests)
    sync()
    gen_s = time.perf_counter() - t0
    outputs = word_texts(tok, [list(map(int, c.text.split())) for c in completions])  # IdsTokenizer: ids as text

    results = []
    for name, checker in checkers.items():
        r = time_checks(name, checker, prompts, outputs, args.profile)
        r.update(describe(name, checker, models[name]), warmup_s=warmup[name])
        total = r["safety_prompts_s"] + r["safety_outputs_s"]
        tokens = r["checked_tokens_prompts"] + r["checked_tokens_outputs"]
        r.update(safety_s=round(total, 3), overhead=round(total / gen_s, 4), tokens_per_s=round(tokens / total))
        if name.startswith("llama-guard"):
            text_tokens = sum(len(t) for t in tok(prompts, add_special_tokens=False)["input_ids"])
            r["template_tokens_per_row"] = round((r["checked_tokens_prompts"] - text_tokens) / n, 1)
        else:
            ctok = models[name].tokenizer
            lengths = [len(ids) for ids in ctok(prompts + outputs)["input_ids"]]
            if sum(lengths) != tokens:
                raise RuntimeError(f"{name} read {tokens} tokens, its tokenizer gives {sum(lengths)}: windows?")
            r["tflops"] = round(classifier_flops(models[name].model.config, lengths) / total / 1e12, 3)
        results.append(r)
    folder.cleanup()
    return dict(
        mode=mode, generator=gen_shape, guard_shape=guard_shape, classifier_shape=classifier_shape, rows=n,
        device=torch.cuda.get_device_name() if cuda else "cpu",
        prompt_tokens=sum(len(r.input_ids) for r in requests), output_tokens=sum(c.output_tokens for c in completions),
        generation_s=round(gen_s, 3), checkers=results,
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
    )


def table(r: dict) -> str:
    gen, n = r["generation_s"], r["rows"]
    lines = [f"{r['device']}: generation {r['generator']} (FastEngine), {n} rows; checkers with random weights, "
             f"forced safe, each over the same texts" + (f"; peak {r['peak_gib']} GiB" if r["peak_gib"] else "")]
    for c in r["checkers"]:
        name = c["checker"]
        if name.startswith("llama-guard"):
            lines.append(
                f"- {name}: Llama Guard 3 {r['guard_shape']} shape, {c['dtype']}"
                f"{', FP8 decoder linears' if name.endswith('fp8') else ''}; prefix "
                f"{c['prefix_tokens']['prompt']}/{c['prefix_tokens']['output']} tokens "
                f"(KV cached once), {c['template_tokens_per_row']} template tokens per row after the text; token "
                f"budget {c['token_budget']}, batch <= {c['batch_size']}; {'compiled' if c['compiled'] else 'eager'}, "
                f"{c['checker_pass']} pass; warm-up (compile) {c['warmup_s']} s")
        else:
            lines.append(
                f"- {name}: DebertaV2ForSequenceClassification, deberta-v3 {r['classifier_shape']} shape "
                f"({c['backbone_params'] / 1e6:.1f}M parameters besides the word embeddings), {c['dtype']}, "
                f"{c['attention']} attention; rows by length, token budget {c['token_budget']}, "
                f"batch <= {c['batch_size']}; {'compiled' if c.get('compiled') else 'eager'}; warm-up {c['warmup_s']} s")
    lines += [
        "",
        "| checker | prompts s | outputs s | safety s | % of generation | tokens read | tokens/s | TFLOP/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| (generation) | | | {gen:.2f} | 100% | {r['prompt_tokens']:,} in, {r['output_tokens']:,} out | | |",
    ]
    for c in r["checkers"]:
        tokens = c["checked_tokens_prompts"] + c["checked_tokens_outputs"]
        lines.append(f"| {c['checker']} | {c['safety_prompts_s']:.3f} | {c['safety_outputs_s']:.3f} | "
                     f"**{c['safety_s']:.3f}** | {100 * c['overhead']:.1f}% | {tokens:,} | {c['tokens_per_s']:,} | "
                     f"{c.get('tflops', '-')} |")
    note = "" if r["mode"] == "standard" else " (only the standard mode is measured against these)"
    lines += ["", f"bar: safety <= {BAR:.0%} of generation time: " + ", ".join(
        f"{c['checker']} {'met' if c['overhead'] <= BAR else 'NOT met'}" for c in r["checkers"]) + note]
    measured = [c for c in r["checkers"] if c["checker"] in TARGETS]
    if measured and r["mode"] == "standard":
        lines.append("issue 17: " + ", ".join(f"{c['checker']} <= {TARGETS[c['checker']]} s "
                                               f"{'met' if c['safety_s'] <= TARGETS[c['checker']] else 'NOT met'}"
                                               for c in measured))
    elif measured:
        lines.append("issue 17 (standard mode only): " + ", ".join(f"{c['checker']} <= {TARGETS[c['checker']]} s"
                                                                   for c in measured))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="0.5B generator, 128 rows")
    size.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, 8 rows")
    parser.add_argument("--rows", type=int, default=None, help="rows instead of the mode's")
    parser.add_argument("--checkers", default="llama-guard",
                        help=f"comma list of {', '.join(CHECKERS)} (default: llama-guard)")
    parser.add_argument("--batch-size", type=int, default=128, help="Llama Guard rows per forward pass")
    parser.add_argument("--token-budget", type=int, default=32_768, help="Llama Guard rows x longest row per pass")
    parser.add_argument("--classifier-batch-size", type=int, default=None,
                        help="classifier rows per pass (default: ClassifierChecker's)")
    parser.add_argument("--classifier-token-budget", type=int, default=None,
                        help="classifier rows x longest row per pass (default: ClassifierChecker's)")
    parser.add_argument("--prefix-tokens", type=int, default=0,
                        help="pad the template's category list until the shared prefix has this many tokens "
                             "(default: Llama Guard 3's own template)")
    parser.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    parser.add_argument("--profile", default=None,
                        help="append torch.profiler tables of each checker's checks to this file")
    parser.add_argument("--eager-checker", action="store_true",
                        help="no torch.compile for Llama Guard and the classifier")
    parser.add_argument("--transformers-forward", action="store_true",
                        help="Llama Guard verdicts through transformers' forward, not the lean pass")
    args = parser.parse_args()
    args.checkers = [c.strip() for c in args.checkers.split(",") if c.strip()]
    unknown = [c for c in args.checkers if c not in CHECKERS]
    if unknown or not args.checkers or len(set(args.checkers)) != len(args.checkers):
        parser.error(f"--checkers: a comma list of distinct names among {', '.join(CHECKERS)}")
    mode = "small" if args.small else "tiny" if args.tiny else "standard"
    result = run(mode, args)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
