"""The host's mask work for constrained decoding, without a model: llguidance matchers for ``--rows`` rows of
``throughput.py``'s ``JSON_SCHEMA`` over its byte-level vocabulary of a 7B model's size (151,936 tokens), each
step's masks filled in parallel (``fill_next_token_bitmask_par``) and every row then advanced by a random
token its mask allows. It compares matchers copied from one original (llguidance's copies share their
original's lexer behind one lock) with one original per row (``engine/grammar.py``). Prints a table.

    python benchmarks/grammar_masks.py --rows 512 --steps 100
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VOCAB = 151_936


def measure(kind: str, rows: int, steps: int, threads: int | None) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lnp
    import numpy as np
    from llguidance import LLMatcher

    from airflow_hfllm.engine.grammar import compile_grammar
    from benchmarks.throughput import JSON_SCHEMA, grammar_tokenizer

    tokenizer = llguidance.hf.from_tokenizer(grammar_tokenizer(VOCAB), n_vocab=VOCAB, eos_token=[VOCAB - 1])
    grammar = compile_grammar(JSON_SCHEMA)
    executor = llguidance.LLExecutor(threads) if threads else llguidance.LLExecutor()
    rng = np.random.default_rng(0)
    started = time.monotonic()
    if kind == "copies":
        one = LLMatcher(tokenizer, grammar, log_level=0)
        matchers = [one.deep_copy() for _ in range(rows)]
    else:
        matchers = [LLMatcher(tokenizer, grammar, log_level=0).deep_copy() for _ in range(rows)]
    setup = time.monotonic() - started
    mask = np.full((rows, (tokenizer.vocab_size + 31) // 32), -1, dtype=np.int32)
    fill, done = 0.0, 0
    for _ in range(steps):
        live = [(m, i) for i, m in enumerate(matchers) if not (m.is_stopped() or m.is_error())]
        if not live:
            break
        started = time.monotonic()
        lnp.fill_next_token_bitmask_par(executor, live, mask)
        fill += time.monotonic() - started
        done += len(live)
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :VOCAB]
        executor.consume_token_par([(m, int(rng.choice(np.flatnonzero(bits[i])))) for m, i in live])
    return {"matchers": kind, "rows": rows, "steps": steps, "setup_s": round(setup, 2),
            "us_per_row_step": round(fill / done * 1e6, 1), "ms_per_step": round(fill / steps * 1e3, 1),
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="llguidance executor threads (its default: "
                        "80%% of the cores, at most 32)")
    parser.add_argument("--matchers", default="copies,originals", help="comma list of copies, originals")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores\n")
    print("| matchers | rows | steps | setup s | us a row and step | ms a step | max RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.matchers.split(","):
        r = measure(kind, args.rows, args.steps, args.threads)
        print(f"| {kind} | {r['rows']} | {r['steps']} | {r['setup_s']} | {r['us_per_row_step']} | "
              f"{r['ms_per_step']} | {r['max_rss_mb']} |", flush=True)


if __name__ == "__main__":
    main()
