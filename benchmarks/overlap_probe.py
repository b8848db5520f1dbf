"""Can the safety checks hide behind decoding? The standard batch's checks run concurrently with its
generation, on the same GPU, and the wall time is compared with generation alone.

    python benchmarks/overlap_probe.py [--json FILE]

Same workload as `benchmarks/safety_overhead.py` (7B-shape generator through `FastEngine`, 512 rows,
128 new tokens; Llama Guard 3 1B-shape checker, forced safe, lean verdict pass, compiled). The checks
(prompts, then outputs with their prompts) run in a second thread while the main thread generates:

- ``stream``: on a second CUDA stream, free to take any SM;
- ``green-N``: on a CUDA green context of N SMs (the decoder keeps the others), where torch has them.

A probe, not a job path: it tells whether an overlapped design could meet the 10% bar. Output checks
here judge the outputs of an earlier identical generation, so both checks have all their rows at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.safety_overhead import guard_checker, sync, word_texts  # noqa: E402
from benchmarks.throughput import build, workload  # noqa: E402


def side_stream(mode: str):
    """(stream, green context or None, whether the context was made current) for the checks' thread.
    The caller keeps the context referenced while it runs: a collected one destroys its CUDA context."""
    import torch

    if not mode.startswith("green-"):
        return torch.cuda.Stream(), None, False
    from torch.cuda.green_contexts import GreenContext

    ctx = GreenContext.create(num_sms=int(mode.split("-")[1]), device_id=torch.cuda.current_device())
    if hasattr(ctx, "Stream"):  # torch >= 2.12
        return ctx.Stream(), ctx, False
    ctx.set_context()  # torch 2.10/2.11: the calling thread's current context and stream
    return torch.cuda.current_stream(), ctx, True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--modes", default="stream,green-32,green-48,green-66")
    parser.add_argument("--json", default=None, help="append the result as a JSON line to this file")
    args = parser.parse_args()
    import torch

    from airflow_hfllm.engine.fast import FastEngine
    from airflow_hfllm.config import GenerationParams

    checker = guard_checker("1b", "cuda", torch.bfloat16)
    tok = checker.load().tokenizer
    loaded = build("7b")
    requests = workload("standard", 512)
    engine = FastEngine(loaded, GenerationParams(max_new_tokens=128, do_sample=False))
    engine.generate(requests)  # warm-up: KV cache, graph capture
    prompts = word_texts(tok, [r.input_ids for r in requests])
    outputs = word_texts(tok, [list(map(int, c.text.split())) for c in engine.generate(requests)])

    def checks():
        checker.check(prompts, "prompt")
        checker.check(outputs, "output", context=prompts)

    checks()  # warm-up: the compile
    sync()
    t0 = time.perf_counter()
    checks()
    sync()
    alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate(requests)
    sync()
    gen = time.perf_counter() - t0
    result = dict(device=torch.cuda.get_device_name(), generation_s=round(gen, 3), checks_alone_s=round(alone, 3),
                  sequential_s=round(gen + alone, 3), modes={})
    print(f"{result['device']}: generation alone {gen:.3f} s, checks alone {alone:.3f} s, "
          f"one after the other {gen + alone:.3f} s (+{100 * alone / gen:.1f}%)", flush=True)
    print("\n| checks run | generation done at | checks done at | wall | over generation alone |\n|---|---|---|---|---|")
    for mode in args.modes.split(","):
        box: dict = {}

        def side():
            try:
                stream, ctx, current = side_stream(mode)
                start = time.perf_counter()
                with torch.cuda.stream(stream):
                    checks()
                stream.synchronize()
                box["checks"] = time.perf_counter() - start
                if current:
                    ctx.pop_context()
            except Exception as exc:  # e.g. no green contexts in this torch or driver
                box["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"

        sync()
        t0 = time.perf_counter()
        thread = threading.Thread(target=side)
        thread.start()
        engine.generate(requests)
        torch.cuda.current_stream().synchronize()  # this thread's stream only
        generated = time.perf_counter() - t0
        thread.join()
        sync()
        wall = time.perf_counter() - t0
        result["modes"][mode] = dict(generation_s=round(generated, 3), wall_s=round(wall, 3), **box)
        print(f"| {mode} | {generated:.2f} s | {box.get('checks', float('nan')):.2f} s | {wall:.2f} s | "
              f"+{100 * (wall / gen - 1):.1f}% | {box.get('error', '')}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
