"""Decode attention alone: the Triton kernel's tiles swept at real shapes, KV bytes read per second.

    python benchmarks/decode_attention.py --shapes 7b,gemma3-12b --kv bf16,fp8
    python benchmarks/decode_attention.py --shapes gemma3-12b --kv fp8 --blocks 16,32 --warps 4 --stages 2,3

One layer of a decode step of the standard batch: 512 slots whose rows hold 51-428 keys (a prompt of 50-300
tokens and 0-127 new ones, seeded), queries and cache of the model's attention shape (heads, KV heads,
head_dim, window). Each tile (keys per tile, warps, pipeline stages of ``engine/decode_kernel.py``
``_partial``) is timed over 50 calls after a warm-up; GB/s counts the keys and values the rows hold (what a
step must read) over the time, against the H200's ~4,800 GB/s of HBM. ``default`` marks ``tiles_for``'s
choice; a tile the GPU cannot hold (shared memory) is listed as failed.
"""

from __future__ import annotations

import argparse
import itertools
import json

SHAPES = {  # name -> (heads, kv_heads, head_dim, window)
    "7b": (28, 4, 128, None),
    "qwen3-8b": (32, 8, 128, None),
    "gemma3-12b": (16, 8, 256, None),  # its local layers' window (1024) is wider than these rows
    "phi4-14b": (40, 10, 128, None),
    "gpt-oss-20b": (64, 8, 64, 128),
}


def inputs(shape: str, kv: str, slots: int = 512, seed: int = 0):
    import torch

    heads, kv_heads, head_dim, window = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randint(50, 301, (slots,), generator=g) + torch.randint(0, 128, (slots,), generator=g)).cuda()
    width = 448  # the engine's width for this batch (prompt + 128 new, rounded)
    q = torch.randn(slots, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    cache = [torch.randn(slots, kv_heads, width, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    if kv == "fp8":
        cache = [c.to(torch.float8_e4m3fn) for c in cache]
    held = int((pos + 1).clamp(max=window or 10**9).sum()) * kv_heads * head_dim * 2 * cache[0].element_size()
    return q, cache, pos, window, held


def timed(fn, reps: int = 50) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="7b,gemma3-12b")
    parser.add_argument("--kv", default="bf16,fp8")
    parser.add_argument("--blocks", default="16,32,64")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--stages", default="2,3,4")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    args = parser.parse_args()

    import torch

    from airflow_hfllm.engine.decode_kernel import decode_attention, tiles_for

    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    rows = []
    for shape, kv in itertools.product(args.shapes.split(","), args.kv.split(",")):
        q, (k, v), pos, window, held = inputs(shape, kv)
        scale = q.shape[-1] ** -0.5
        default = tiles_for(q.shape[-1])
        want = decode_attention(q, k, v, pos, scale, window).float()
        tiles = set(itertools.product(ints(args.blocks), ints(args.warps), ints(args.stages))) | {default}
        for tile in sorted(tiles):
            row = dict(shape=shape, kv=kv, block_n=tile[0], warps=tile[1], stages=tile[2], default=tile == default,
                       device=torch.cuda.get_device_name())
            try:
                got = decode_attention(q, k, v, pos, scale, window, tiles=tile).float()
                seconds = timed(lambda: decode_attention(q, k, v, pos, scale, window, tiles=tile))
            except Exception as exc:  # noqa: BLE001 - a tile the GPU cannot hold: listed, the sweep goes on
                row["failed"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            else:
                row.update(us=round(seconds * 1e6, 1), gbps=round(held / seconds / 1e9),
                           max_diff=round(float((got - want).abs().max()), 5))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("| shape | KV | keys/tile | warps | stages | us per layer | GB/s of KV held | max diff vs default |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["shape"], r["kv"], -r.get("gbps", 0))):
        mark = " (default)" if r["default"] else ""
        cells = (f"{r['us']} | {r['gbps']:,} | {r['max_diff']}" if "us" in r else f"failed | | {r['failed']}")
        print(f"| {r['shape']} | {r['kv']} | {r['block_n']}{mark} | {r['warps']} | {r['stages']} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
