"""``hfllm``: the same jobs as the operators, without Airflow.

    hfllm make-tiny-model DIR [--kind causal-lm|seq2seq-safety|classifier-safety|llama-guard|vision]
    hfllm text --model M --input IN --output OUT [...]
    hfllm vision --model M --input MANIFEST --output OUT [...]
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from airflow_hfllm.engine.loading import HubOptions
from airflow_hfllm.tiny import KINDS as TINY_KINDS

SAFETY_HELP = ("safety checker on prompt and output text: salesforce:MODEL, classifier:MODEL, llama-guard:MODEL "
               "or blocklist:FILE (repeatable)")


def _common_arguments(p, *, chunk_rows: int) -> None:
    """What ``text`` and ``vision`` share: input, output, generation, safety, model loading."""
    p.add_argument("--model", required=True, help="hub id or local folder")
    p.add_argument("--input", required=True, help="Parquet file, folder or glob (path or fsspec URL)")
    p.add_argument("--output", required=True, help="output folder (path or fsspec URL)")
    p.add_argument("--id-column", default="id")
    p.add_argument("--prompt-column", default="prompt")
    p.add_argument("--keep-column", action="append", default=[], dest="keep_columns",
                   help="input column to copy to the output (repeatable)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--prompt-template", default=None, help='Jinja over the row, e.g. "Summarise: {{ row.text }}"')
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--min-length", type=int, default=None, help="minimum new tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chunk-rows", type=int, default=chunk_rows)
    p.add_argument("--batch-size", type=int, default=None, help="cap on rows per batch")
    p.add_argument("--max-prompt-tokens", type=int, default=None)
    p.add_argument("--max-error-rate", type=float, default=0.05)
    p.add_argument("--safety", action="append", default=[], metavar="KIND:MODEL", help=SAFETY_HELP)
    p.add_argument("--on-unsafe-output", choices=("redact", "keep"), default="redact")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"))
    p.add_argument("--revision", default=None)
    p.add_argument("--quantization", default=None, choices=("none", "8bit", "4bit"), help="bitsandbytes (4bit: nf4)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--cache-dir", default=None, help="HF cache folder (default: HF_HOME)")
    p.add_argument("--local-files-only", action="store_true")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--engine", choices=("auto", "fast", "batched"), default="auto",
                   help="auto: the fast engine on a GPU when the model allows, else batched generate()")


def _parsers(sub) -> None:
    text = sub.add_parser("text", help="generate text for a Parquet batch of prompts")
    _common_arguments(text, chunk_rows=1000)
    text.add_argument("--messages-column", default=None, help="chat messages column, instead of --prompt-column")
    text.add_argument("--no-sample", action="store_true", help="greedy decoding")
    text.add_argument("--no-double-quant", action="store_true", help="4bit: keep the quantization constants unquantized")
    text.add_argument("--peft-model", default=None, help="PEFT adapter (hub id or folder) over --model")
    text.add_argument("--no-merge-adapter", action="store_true", help="keep the adapter separate (always when quantized)")

    vision = sub.add_parser("vision", help="generate text for a Parquet manifest of images and prompts")
    _common_arguments(vision, chunk_rows=256)
    vision.add_argument("--image-column", default="image",
                        help="path/URI (local, file://, s3://..., data:image/...;base64,), image bytes, or a list")
    vision.add_argument("--min-pixels", type=int, default=224 * 28 * 28, help="fewest pixels of a resized image")
    vision.add_argument("--max-pixels", type=int, default=1280 * 28 * 28, help="most pixels of a resized image")
    vision.add_argument("--allow-http-images", action="store_true", help="fetch http(s):// images (refused by default)")
    vision.add_argument("--image-backend", choices=("auto", "qwen-vl-utils", "pil"), default="auto",
                        help="auto: qwen_vl_utils where it imports (needs torchvision), else the PIL implementation")
    vision.add_argument("--sample", action="store_true", help="sample (default: greedy, as the spec's image model)")


def run_job(args) -> int:
    from airflow_hfllm.engine.spec import GenerationParams, ModelSpec
    from airflow_hfllm.jobs import TextJob, VisionJob

    env = HubOptions.from_env()
    hub = HubOptions(cache_dir=args.cache_dir or env.cache_dir, token=env.token,
                     local_files_only=args.local_files_only or env.local_files_only)
    common = dict(
        input=args.input,
        output=args.output,
        params=GenerationParams(max_new_tokens=args.max_new_tokens,
                                do_sample=args.sample if args.command == "vision" else not args.no_sample,
                                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                repetition_penalty=args.repetition_penalty, min_length=args.min_length,
                                seed=args.seed, stop=tuple(args.stop)),
        id_column=args.id_column,
        prompt_column=args.prompt_column,
        keep_columns=args.keep_columns,
        system_prompt=args.system_prompt,
        prompt_template=args.prompt_template,
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
        max_prompt_tokens=args.max_prompt_tokens,
        safety_checkers=args.safety,
        on_unsafe_output=args.on_unsafe_output,
        max_error_rate=args.max_error_rate,
        hub=hub,
        progress_every=args.progress_every,
        engine=args.engine,
    )
    model = dict(revision=args.revision, dtype=args.dtype, quantization=args.quantization,
                 trust_remote_code=args.trust_remote_code)
    if args.command == "vision":
        job = VisionJob(model=ModelSpec(args.model, task="vision", **model), image_column=args.image_column,
                        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                        allow_http_images=args.allow_http_images, image_backend=args.image_backend, **common)
    else:
        job = TextJob(model=ModelSpec(args.model, double_quant=not args.no_double_quant, adapter=args.peft_model,
                                      merge_adapter=not args.no_merge_adapter, **model),
                      messages_column=args.messages_column, **common)
    # SIGTERM (a scheduler or a user stopping us) stops between batches like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: job.cancel())
    try:
        manifest = job.run()
    except KeyboardInterrupt:
        job.cancel()
        raise
    print(json.dumps(manifest, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hfllm", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny-model", help="build a tiny random model offline, for demos and tests")
    tiny.add_argument("dir")
    tiny.add_argument("--kind", default="causal-lm", choices=TINY_KINDS)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--verdict", choices=("safe", "unsafe"), default=None,
                      help="safety kinds: always answer this (for tests)")
    _parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from airflow_hfllm.engine.generate import Cancelled
    from airflow_hfllm.io.dataset import InputError
    from airflow_hfllm.jobs import ErrorRateExceeded

    try:
        if args.command == "make-tiny-model":
            from airflow_hfllm.tiny import make_tiny_model

            print(make_tiny_model(args.dir, args.kind, seed=args.seed, verdict=args.verdict))
            return 0
        return run_job(args)
    except (InputError, ValueError, OSError) as exc:
        print(f"hfllm: error: {exc}", file=sys.stderr)
        return 2
    except ErrorRateExceeded as exc:
        print(f"hfllm: error: {exc}", file=sys.stderr)
        return 3
    except (Cancelled, KeyboardInterrupt):
        print("hfllm: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
