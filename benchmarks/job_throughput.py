"""The whole job end to end (``hfllm text``) against the fast engine alone on the same token ids (issue 17).

    python3 benchmarks/job_throughput.py --shape 7b --rows 2048                # one GPU
    python3 benchmarks/job_throughput.py --device cpu --shape tiny --rows 48   # the flow only, on a CPU

A random-weight model of ``benchmarks/throughput.py``'s ``SHAPES`` (``build``) is saved once under
``--checkpoint-dir`` with a real tokenizer next to it: the package's offline byte-level BPE
(``airflow_hfllm.testing.text``, ~1,230 tokens, a chat template). Its ids lie below the model's vocabulary;
the lm_head rows of every other id and of the special tokens are zeroed, so greedy decoding (whose best
random logit is above 0) writes only real text and never EOS: every row runs to ``--new-tokens``, as in the
engine benchmark. The config carries the tokenizer's EOS and pad ids, so the job stops on EOS as it would.

The input is ``--rows`` rows of text from the tokenizer's corpus, each 100-300 tokens (mean ~200) once the
chat template formats it. Three processes, one after the other, each with the whole GPU (a process that
held the model would shrink the next one's KV cache): the checkpoint build (first use only), the job
(``python -m airflow_hfllm.cli text``, greedy, ``--engine fast``, a fresh output folder; its tok/s is the
manifest's ``output_tokens_per_second``: output tokens over ``generate_seconds``, which holds the CUDA graph
capture, reading, tokenizing and writing), then the engine alone: the same loader, the prompts encoded by the
job's own functions (``PromptBuilder.messages``, ``TextKind.request``), ``FastEngine.generate`` after a
warm-up, as throughput.py's ``ours`` path times it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.throughput import CHECKPOINT_DIR, SHAPES, build  # noqa: E402

# For checking the flow on a CPU only; registered here so throughput.py's table keeps real shapes.
SHAPES.setdefault("tiny", ("qwen2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, vocab_size=2048,
                                         tie_word_embeddings=False)))


def checkpoint(shape: str, checkpoint_dir: str, device: str) -> str:
    """The folder of the random ``shape`` model with the BPE tokenizer (built and saved on first use)."""
    import torch

    from airflow_hfllm.testing.text import tokenizer

    folder = os.path.join(checkpoint_dir, f"random-{shape}-bpe")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    started = time.monotonic()
    tok = tokenizer("causal-lm")
    model = build(shape, "bfloat16", device=device).model
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[len(tok):] = 0  # a zero row scores 0, below the best of ~1,200 random logits: never picked
        head[tok.all_special_ids] = 0  # EOS among them: rows run to max_new_tokens
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id)
    for config in (model.config, model.generation_config):
        for name, value in ids.items():
            setattr(config, name, value)
    partial = f"{folder}.partial-{os.getpid()}"  # renamed when complete: a killed save is never reused
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(partial, folder)
    print(f"saved random {shape} checkpoint with the BPE tokenizer to {folder} in {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    return folder


def write_input(path: str, rows: int, seed: int = 1234) -> None:
    """``rows`` prompts of 100-300 tokens once chat-formatted: windows of the tokenizer's own corpus."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from airflow_hfllm.engine.prompts import encode
    from airflow_hfllm.testing.text import tokenizer
    from airflow_hfllm.testing.tokenizer import corpus

    tok = tokenizer("causal-lm")
    template = len(encode(tok, [{"role": "user", "content": ""}]))
    pool = tok.backend_tokenizer.encode(" ".join(corpus()), add_special_tokens=False).ids
    rng = random.Random(seed)
    prompts = []
    for _ in range(rows):
        n = rng.randint(100, 300) - template
        start = rng.randrange(len(pool) - n)
        prompts.append(tok.decode(pool[start:start + n]).strip())
    pq.write_table(pa.table({"id": list(range(rows)), "prompt": prompts}), path)


def run_job(folder: str, input_path: str, output: str, new_tokens: int, env: dict) -> dict:
    """``hfllm text`` as a user runs it; the manifest, and the command's wall seconds."""
    cmd = [sys.executable, "-m", "airflow_hfllm.cli", "text", "--model", folder, "--input", input_path,
           "--output", output, "--max-new-tokens", str(new_tokens), "--no-sample", "--engine", "fast",
           "--local-files-only"]
    started = time.monotonic()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)  # the manifest is read from the folder
    wall = time.monotonic() - started
    if done.returncode:
        raise SystemExit(f"hfllm text failed with exit code {done.returncode}")
    with open(os.path.join(output, "_manifest.json")) as f:
        manifest = json.load(f)
    stats = manifest["engine_stats"] or {}
    gen, compile_s = manifest["generate_seconds"], manifest["compile_seconds"]
    return dict(path="job (hfllm text)", rows=manifest["counts"]["rows"], prompt_tokens=manifest["tokens"]["prompt"],
                tokens=manifest["tokens"]["output"], seconds=gen, tok_s=manifest["output_tokens_per_second"],
                wall_s=round(wall, 2), manifest_s=manifest["seconds"], load_s=manifest["load_seconds"],
                compile_s=compile_s, tok_s_after_capture=round(manifest["tokens"]["output"] / (gen - compile_s), 1),
                prefill_s=stats.get("prefill_seconds"), prefill_gpu_s=stats.get("prefill_gpu_seconds"),
                decode_steps=stats.get("decode_steps"), slots=stats.get("slots"), engine=manifest["engine"],
                device=manifest["device"], errors=manifest["counts"]["errors"])


def run_engine(folder: str, input_path: str, new_tokens: int) -> dict:
    """The fast engine alone on the prompts the job fed it, encoded by the job's own functions."""
    import pyarrow.parquet as pq
    import torch

    from airflow_hfllm.config import GenerationParams, HubOptions, ModelSpec
    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.engine.loading import load
    from airflow_hfllm.engine.prompts import PromptBuilder
    from airflow_hfllm.run.kinds import TextKind

    def sync():
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    loaded = load(ModelSpec(folder), HubOptions(local_files_only=True))
    table = pq.read_table(input_path)
    prompts, kind = PromptBuilder(), TextKind()
    started = time.monotonic()
    requests = kind.requests([(prompts.messages(row), None, new_tokens) for row in table.to_pylist()], loaded)
    tokenize_s = time.monotonic() - started
    keys = table.column("id").to_pylist()
    engine = FastEngine(loaded, GenerationParams(max_new_tokens=new_tokens, do_sample=False))
    longest = max(requests, key=lambda r: len(r.input_ids))
    started = time.monotonic()
    engine.generate(requests[:63] + [longest])  # warm-up: allocates the cache, captures the graph
    sync()
    warmup_s = time.monotonic() - started
    engine.stats()
    steps_before, engine.prefill_seconds, engine.prefill_gpu_seconds = engine.steps, 0.0, 0.0
    started = time.monotonic()
    out = engine.generate(requests, keys=keys)
    sync()
    seconds = time.monotonic() - started
    tokens = sum(c.output_tokens for c in out)
    stats = engine.stats()
    return dict(path="engine alone", rows=len(requests), prompt_tokens=sum(len(r.input_ids) for r in requests),
                tokens=tokens, seconds=round(seconds, 3), tok_s=round(tokens / seconds, 1),
                load_s=round(loaded.load_seconds, 2), warmup_s=round(warmup_s, 2), tokenize_s=round(tokenize_s, 3),
                prefill_s=stats["prefill_seconds"], prefill_gpu_s=stats["prefill_gpu_seconds"],
                decode_steps=engine.steps - steps_before, slots=stats["slots"], device=str(loaded.device))


def report(job: dict, engine: dict, new_tokens: int) -> str:
    ratio = job["tok_s"] / engine["tok_s"]
    lines = ["| path | rows | prompt tokens | output tokens | seconds | output tok/s | x engine |",
             "|---|---|---|---|---|---|---|"]
    for r in (job, engine):
        lines.append(f"| {r['path']} | {r['rows']:,} | {r['prompt_tokens']:,} | {r['tokens']:,} | {r['seconds']:.2f} | "
                     f"{r['tok_s']:,.0f} | {r['tok_s'] / engine['tok_s']:.2f}x |")
    other = job["manifest_s"] - job["load_s"] - job["seconds"]
    rest = job["seconds"] - job["compile_s"] - engine["seconds"]
    full = job["tokens"] == engine["tokens"] == job["rows"] * new_tokens
    lines += [
        "",
        f"job/engine: {ratio:.1%} (the bar, at least 90%: {'met' if ratio >= 0.9 else 'NOT met'}); "
        f"the job without its graph capture: {job['tok_s_after_capture']:,.0f} tok/s "
        f"({job['tok_s_after_capture'] / engine['tok_s']:.1%})",
        f"same token ids: prompt tokens {'equal' if job['prompt_tokens'] == engine['prompt_tokens'] else 'DIFFER'}; "
        f"every row ran to {new_tokens} new tokens: "
        f"{'yes' if full else 'NO'}; job errors: {job['errors']}",
        "",
        "where the job's time goes (s):",
        f"- hfllm text wall {job['wall_s']:.2f} = manifest seconds {job['manifest_s']:.2f} + interpreter start, "
        f"imports, exit {job['wall_s'] - job['manifest_s']:.2f}",
        f"- manifest seconds = load {job['load_s']:.2f} + generate {job['seconds']:.2f} + input checks, "
        f"fingerprint, manifest {other:.2f}",
        f"- generate {job['seconds']:.2f} = graph capture {job['compile_s']:.2f} + the engine alone's "
        f"{engine['seconds']:.2f} + {rest:.2f} more; in that more: tokenizing the prompts "
        f"(~{engine['tokenize_s']:.2f}, timed in the engine's process), reading chunks, decoding and writing parts, "
        f"and scheduling (the manifest does not time these apart)",
        f"- prefill host/GPU: job {job['prefill_s']}/{job['prefill_gpu_s']}, engine {engine['prefill_s']}/"
        f"{engine['prefill_gpu_s']}; decode steps: job {job['decode_steps']}, engine {engine['decode_steps']}; "
        f"slots: job {job['slots']}, engine {engine['slots']}",
        f"- engine alone: load {engine['load_s']:.2f}, warm-up (cache, capture) {engine['warmup_s']:.2f}, "
        f"not timed; device {engine['device']}",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--shape", default="7b", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--checkpoint-dir", default=CHECKPOINT_DIR,
                        help="where the random checkpoint is saved and reused (~15 GB for 7b)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--json", default=None, help="append both results as JSON lines to this file")
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:  # a child process: one step, its result on the last line
        name, *rest = args.step
        result = checkpoint(args.shape, args.checkpoint_dir, args.device) if name == "checkpoint" \
            else run_engine(rest[0], rest[1], args.new_tokens)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the loader puts models on a GPU whenever it sees one
        # one thread: torch's spinning threads slow down many times over on cores shared with other work
        env.setdefault("OMP_NUM_THREADS", "1")

    def child(*step: str):
        cmd = [sys.executable, __file__, "--shape", args.shape, "--new-tokens", str(args.new_tokens),
               "--checkpoint-dir", args.checkpoint_dir, "--device", args.device, "--step", *step]
        done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode or line is None:
            raise SystemExit(f"step {step[0]} failed (exit code {done.returncode})")
        return json.loads(line[7:])

    folder = child("checkpoint")
    with tempfile.TemporaryDirectory(prefix="hfllm-job-bench-") as work:
        input_path, output = os.path.join(work, "input.parquet"), os.path.join(work, "output")
        write_input(input_path, args.rows)
        job = run_job(folder, input_path, output, args.new_tokens, env)
        engine = child("engine", folder, input_path)
    for r in (job, engine):
        r.update(shape=args.shape, new_tokens=args.new_tokens)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    print(report(job, engine, args.new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
