"""Images/s of three ways to caption a batch of images with a Qwen2.5-VL-3B-shaped model, one process per way.

    python benchmarks/vision_throughput.py                 # CUDA: random-weight Qwen2.5-VL-3B shape
    python benchmarks/vision_throughput.py --tiny          # CPU smoke test: same code, tiny sizes

Paths:

* ``ours``: a :class:`~airflow_hfllm.vision.job.VisionJob` over a Parquet manifest of image paths, end to end
  (probe headers; decode, resize and patch images in threads; the vision fast engine: vision attention
  packed by length, prefill groups under a token budget, continuous batching over a static KV cache,
  CUDA-graph decode; parts written).
* ``ours-batched``: the same job with ``engine="batched"``: longest-first padded ``generate()`` batches
  sized by a token budget that counts image tokens (cap ``--batch-size``, OOM splits).
* ``one-image``: the spec's ``HuggingFaceImageLLM`` loop: per image, ``apply_chat_template``,
  ``qwen_vl_utils.process_vision_info``, the processor, ``generate()``. It runs on a subset
  (``--one-image-subset``) and is extrapolated to all images (labelled so).
* ``padded``: plain ``generate()`` on padded batches of ``--padded-batch`` (64) rows in manifest order,
  images through ``process_vision_info``, no length sorting, no token budget.

The model is built in-process with random weights of Qwen2.5-VL-3B's shape (text: hidden 2048, 36
layers, 16 heads, 2 KV heads, intermediate 11008, vocab 151936, tied embeddings; vision: depth 32,
hidden 1280, out 2048), in bf16, with the tiny offline tokenizer of :mod:`airflow_hfllm.testing.vision`
(lm_head rows of ids it does not have, EOS and pad are zeroed: every row generates exactly
``--new-tokens`` tokens, so the paths do equal work). Images (``--images``, default 256) are seeded
JPEGs of mixed sizes whose pixel counts lie within the default ``min_pixels``/``max_pixels``
(224*28*28 .. 1280*28*28, i.e. 224..1280 image tokens). Greedy decoding, ``--new-tokens`` 64.
Where ``qwen_vl_utils`` does not import (no torchvision), the baselines use this package's PIL
implementation of ``fetch_image`` instead, and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEXT_3B = dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1_000_000.0})
VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                 fullatt_block_indexes=[7, 15, 23, 31], window_size=112, tokens_per_second=2, patch_size=14,
                 spatial_merge_size=2, temporal_patch_size=2)
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 224 * 28 * 28, 1280 * 28 * 28
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 8 * 28 * 28, 48 * 28 * 28
PROMPTS = ("Describe this image in detail.", "What objects and colours do you see?",
           "Write a caption for this picture.", "What is unusual about this image?")


def pixel_bounds(tiny: bool) -> tuple[int, int]:
    return (TINY_MIN_PIXELS, TINY_MAX_PIXELS) if tiny else (DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)


# -- workload --------------------------------------------------------------------------------------
def make_workload(folder: Path, n: int, min_pixels: int, max_pixels: int, seed: int = 0) -> Path:
    """``n`` seeded JPEGs of mixed sizes (pixel counts within [min_pixels, max_pixels], aspect 1:2..2:1)
    and a manifest ``id, prompt, image``."""
    import random

    import numpy as np
    import pandas as pd
    from PIL import Image

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        area = rng.uniform(min_pixels * 1.05, max_pixels * 0.95)
        aspect = 2 ** rng.uniform(-1, 1)
        w, h = max(28, int((area * aspect) ** 0.5)), max(28, int((area / aspect) ** 0.5))
        rs = np.random.RandomState(seed * 100_003 + k)
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * rs.randint(1, 7) + yy) % 256, (yy * rs.randint(1, 7)) % 256,
                         ((xx ^ yy) * rs.randint(1, 5)) % 256], -1)
        noise = rs.randint(0, 40, (h, w, 3))
        path = folder / f"img-{k:05d}.jpg"
        Image.fromarray(((base + noise) % 256).astype(np.uint8)).save(path, quality=90)
        rows.append({"id": k, "prompt": PROMPTS[k % len(PROMPTS)], "image": str(path)})
    manifest = folder / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    return manifest


# -- model -----------------------------------------------------------------------------------------
def build(model_dir: Path, tiny: bool, dtype: str):
    """A random-weight Qwen2.5-VL built in-process (3B shape on CUDA; with ``tiny``, tiny sizes on the
    CPU, through the same code), put in the shared model cache under ``ModelSpec(model_dir,
    task="vision")`` so that the job finds it there; the folder gets the tokenizer, image processor and
    config (no weights). Returns the loaded model and the spec."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    from airflow_hfllm.engine.cache import MODEL_CACHE
    from airflow_hfllm.engine.loading import LoadedModel
    from airflow_hfllm.config import ModelSpec
    from airflow_hfllm.vision.processor import get_vision_model
    from airflow_hfllm.testing.vision import config, make_image_processor, make_tokenizer

    tok = make_tokenizer()
    shapes = dict(text={"vocab_size": TEXT_3B["vocab_size"]}) if tiny else dict(text=TEXT_3B, vision=VISION_3B)
    cfg = config(tok, tie_word_embeddings=True, **shapes)
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(model_dir)
    make_image_processor().save_pretrained(model_dir)
    cfg.save_pretrained(model_dir)  # config only: the processor fallback reads the model type from it
    device = torch.device("cpu" if tiny else "cuda")
    torch_dtype = torch.float32 if tiny else getattr(torch, dtype)
    started = time.monotonic()
    torch.manual_seed(0)
    torch.set_default_dtype(torch_dtype)
    with device:
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    with torch.no_grad():  # ids the tokenizer lacks, EOS and pad never win: fixed-length replies
        head = model.get_output_embeddings().weight
        head[len(tok):] = 0
        head[[tok.eos_token_id, tok.pad_token_id]] = 0
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sync(device)
    spec = ModelSpec(str(model_dir), dtype=str(torch_dtype).removeprefix("torch."), task="vision")
    loaded = LoadedModel(spec=spec, model=model, tokenizer=tok, device=device, dtype=torch_dtype,
                         load_seconds=time.monotonic() - started)
    MODEL_CACHE.get(spec, lambda: loaded)
    return get_vision_model(spec), spec


# -- the spec's image reading ----------------------------------------------------------------------
def vision_info_reader(min_pixels: int, max_pixels: int):
    """``(read(messages) -> images, label)``: ``qwen_vl_utils.process_vision_info`` (the spec's call), or
    where it does not import, this package's PIL implementation of its ``fetch_image``."""
    try:
        from qwen_vl_utils import process_vision_info
    except Exception as exc:
        from airflow_hfllm.vision.images import ImageLoader
        from airflow_hfllm.vision.sources import parse_cell

        loader = ImageLoader(min_pixels, max_pixels, backend="pil")

        def read(messages):
            refs = [c["image"] for m in messages for c in m["content"] if isinstance(c, dict) and "image" in c]
            return [loader.load(loader.probe(parse_cell(ref)[0])) for ref in refs]

        return read, f"qwen_vl_utils unavailable ({type(exc).__name__}): own PIL fetch_image"

    def read(messages):
        images, _ = process_vision_info(messages)
        return images

    return read, "qwen_vl_utils.process_vision_info"


def spec_messages(row: dict, min_pixels: int, max_pixels: int) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image", "image": row["image"], "min_pixels": min_pixels, "max_pixels": max_pixels},
        {"type": "text", "text": row["prompt"]},
    ]}]


def baseline_generate(loaded, processor, rows: list[dict], read, new_tokens: int, min_pixels: int,
                      max_pixels: int) -> int:
    """One ``generate()`` over ``rows`` as the Qwen model card does it; output tokens (pad excluded)."""
    import torch

    texts, images = [], []
    for row in rows:
        messages = spec_messages(row, min_pixels, max_pixels)
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images += read(messages)
    processor.tokenizer.padding_side = "left"
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt",
                       size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    processor.batch_decode(new, skip_special_tokens=True)
    return int((new != processor.tokenizer.pad_token_id).sum())


# -- one path --------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def run_path(path: str, args) -> dict:
    import pandas as pd
    import torch

    from airflow_hfllm.engine.generate import BatchedGenerator
    from airflow_hfllm.config import GenerationParams
    from airflow_hfllm.vision.generator import VisionGenerator
    from airflow_hfllm.vision.processor import get_processor
    from airflow_hfllm.vision.job import VisionJob

    work = Path(args.workdir)
    min_pixels, max_pixels = pixel_bounds(args.tiny)
    loaded, spec = build(work / "model", args.tiny, args.dtype)
    processor = get_processor(spec)
    rows = pd.read_parquet(work / "images" / "manifest.parquet").to_dict("records")
    n = len(rows)
    device = loaded.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    note, batches = "", []

    if path in ("ours", "ours-batched"):
        params = GenerationParams(max_new_tokens=args.new_tokens, do_sample=False)
        recorded = VisionGenerator._generate

        def recording(self, batch, requests):  # instrumentation only: which batch sizes ran
            batches.append(len(batch))
            return recorded(self, batch, requests)

        VisionGenerator._generate = recording
        common = dict(model=spec, params=params, min_pixels=min_pixels, max_pixels=max_pixels,
                      batch_size=args.batch_size, chunk_rows=n, max_error_rate=0.0, progress_every=30,
                      engine="fast" if path == "ours" else "batched")
        warm = work / "warm.parquet"
        pd.DataFrame(rows[:8]).to_parquet(warm, index=False)
        VisionJob(input=str(warm), output=str(work / f"out-warm-{os.getpid()}"), **common).run()
        batches.clear()
        sync(device)
        t0 = time.monotonic()
        profiler = None
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            profiler = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            profiler.__enter__()
        manifest = VisionJob(input=str(work / "images" / "manifest.parquet"),
                             output=str(work / f"out-{os.getpid()}"), **common).run()
        sync(device)
        if profiler is not None:
            profiler.__exit__(None, None, None)
            with open(args.profile, "w") as f:
                for key in ("self_cpu_time_total", "self_cuda_time_total", "cpu_time_total"):
                    f.write(profiler.key_averages().table(sort_by=key, row_limit=40) + "\n")
        seconds = time.monotonic() - t0
        tokens = manifest["tokens"]["output"]
        assert manifest["counts"]["generated"] == n, manifest["counts"]
        if path == "ours":
            note = (f"end to end (manifest in, parts out); fast engine (packed vision attention, static KV "
                    f"cache, CUDA-graph decode), graph capture {manifest['compile_seconds']} s included; {manifest['engine_stats']}; ")
        else:
            cap = args.batch_size or BatchedGenerator(loaded, params).max_batch_size
            note = f"end to end (manifest in, parts out); batched generate(), batch cap {cap}, batches {batches}; "
        note += f"images via {manifest['vision']['image_backend']}"
    elif path == "one-image":
        read, label = vision_info_reader(min_pixels, max_pixels)
        subset = rows[:args.one_image_subset]
        baseline_generate(loaded, processor.processor, rows[:1], read, args.new_tokens, min_pixels, max_pixels)
        sync(device)
        t0 = time.monotonic()
        tokens = sum(baseline_generate(loaded, processor.processor, [row], read, args.new_tokens, min_pixels,
                                       max_pixels) for row in subset)
        sync(device)
        seconds = (time.monotonic() - t0) * n / len(subset)
        tokens = tokens * n // len(subset)
        note = f"EXTRAPOLATED from {len(subset)} images to {n}; {label}"
    elif path == "padded":
        read, label = vision_info_reader(min_pixels, max_pixels)
        size = args.padded_batch
        baseline_generate(loaded, processor.processor, rows[:2], read, args.new_tokens, min_pixels, max_pixels)
        sync(device)
        t0 = time.monotonic()
        tokens = 0
        for start in range(0, n, size):
            tokens += baseline_generate(loaded, processor.processor, rows[start:start + size], read,
                                        args.new_tokens, min_pixels, max_pixels)
            batches.append(len(rows[start:start + size]))
        sync(device)
        seconds = time.monotonic() - t0
        note = f"batches of {size} in manifest order; {label}"
    else:
        raise ValueError(path)

    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return dict(path=path, images=n, new_tokens=args.new_tokens, seconds=round(seconds, 2),
                images_per_s=round(n / seconds, 3), output_tokens=tokens, tok_s=round(tokens / seconds, 1),
                peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else None,
                weights_gib=round(weights / 2**30, 2), dtype=str(loaded.dtype).removeprefix("torch."),
                attn=getattr(loaded.model.config, "_attn_implementation", None), note=note,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                model="tiny" if args.tiny else "qwen2.5-vl-3b-shape")


def table(results: list[dict]) -> str:
    base = {r["path"]: r["images_per_s"] for r in results}
    ratio = lambda r, p: f"{r['images_per_s'] / base[p]:.1f}x" if base.get(p) else "-"  # noqa: E731
    lines = ["| path | images | images/s | output tok/s | x one-image | x padded | seconds | peak GiB | note |",
             "|" + "---|" * 9]
    for r in results:
        lines.append(f"| {r['path']} | {r['images']} | {r['images_per_s']:,.2f} | {r['tok_s']:,.0f} | "
                     f"{ratio(r, 'one-image')} | {ratio(r, 'padded')} | {r['seconds']} | {r['peak_gib']} | "
                     f"{r['note']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes, few small images")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 256; --tiny: 12)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per image (default 64; --tiny: 8)")
    parser.add_argument("--paths", default="ours,ours-batched,one-image,padded")
    parser.add_argument("--batch-size", type=int, default=None, help="ours: cap on rows per batch (default: "
                        "the generator's, 256 on GPU; the token budget from free memory and OOM splits do the rest)")
    parser.add_argument("--padded-batch", type=int, default=None, help="padded: rows per batch (default 64; --tiny: 4)")
    parser.add_argument("--one-image-subset", type=int, default=None,
                        help="one-image: images timed, then extrapolated (default 16; --tiny: 3)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", default=None, help="images, manifest and outputs (default: a temp folder)")
    parser.add_argument("--path-timeout", type=float, default=3600, help="seconds one path may take")
    parser.add_argument("--json", default=None, help="append results as JSON lines to this file")
    parser.add_argument("--profile", default=None, help="ours: write torch.profiler tables to this file (slower)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.tiny
    args.images = args.images or (12 if tiny else 256)
    args.new_tokens = args.new_tokens or (8 if tiny else 64)
    args.padded_batch = args.padded_batch or (4 if tiny else 64)
    args.one_image_subset = min(args.one_image_subset or (3 if tiny else 16), args.images)
    if tiny:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print("RESULT " + json.dumps(run_path(args.one, args)), flush=True)
        return 0

    if not tiny:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: use --tiny for the CPU smoke test", file=sys.stderr)
            return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hfllm-vision-bench-"))
    min_pixels, max_pixels = pixel_bounds(tiny)
    t0 = time.monotonic()
    if not (work / "images" / "manifest.parquet").exists():
        make_workload(work / "images", args.images, min_pixels, max_pixels)
    print(f"workload: {args.images} images in {work / 'images'} ({time.monotonic() - t0:.1f} s), "
          f"{args.new_tokens} new tokens, greedy", flush=True)
    results = []
    forwarded = ["--images", str(args.images), "--new-tokens", str(args.new_tokens), "--dtype", args.dtype,
                 "--padded-batch", str(args.padded_batch), "--one-image-subset", str(args.one_image_subset),
                 "--workdir", str(work)] + (["--tiny"] if tiny else []) + (["--profile", args.profile] if args.profile else []) + \
                (["--batch-size", str(args.batch_size)] if args.batch_size else [])
    for path in args.paths.split(","):
        try:
            done = subprocess.run([sys.executable, __file__, *forwarded, "--one", path], capture_output=True,
                                  text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), timeout=args.path_timeout)
        except subprocess.TimeoutExpired:
            print(f"{path}: no result within {args.path_timeout:.0f} s", flush=True)
            continue
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{path} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        results.append(json.loads(line[7:]))
        print(json.dumps(results[-1]), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    if results:
        print(f"\n{results[0]['model']} on {results[0]['device']} ({results[0]['dtype']}, attention "
              f"{results[0]['attn']}), {args.images} images, {args.new_tokens} new tokens, greedy\n")
        print(table(results))
    return 0 if len(results) == len(args.paths.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
