"""``hfllm``: the same jobs as the operators, without Airflow.

    hfllm make-tiny-model DIR [--kind causal-lm|seq2seq-safety|classifier-safety|llama-guard|vision]
    hfllm text --model M --input IN --output OUT [...]
    hfllm vision --model M --input MANIFEST --output OUT [...]

``hfllm COMMAND --help`` lists a command's options with their defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys

from airflow_hfllm.config import HubOptions
from airflow_hfllm.config import DTYPES
from airflow_hfllm.testing import KINDS as TINY_KINDS
from airflow_hfllm.testing import VERDICTS as TINY_VERDICTS

SAFETY_HELP = ("safety checker on prompt and output text: salesforce:MODEL, classifier:MODEL, llama-guard:MODEL "
               "or blocklist:FILE (repeatable)")

EXIT_CODES = """exit codes:
  0    done; the manifest is printed as JSON
  1    unexpected error (with a traceback)
  2    bad arguments or input (missing file or column, duplicate ids, bad template, output is a file, ...)
  3    more rows ended in error than --max-error-rate allows (everything is written)
  130  stopped (Ctrl-C or SIGTERM); parts written so far are kept for the rerun
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown, except where there is none to show: required, unset, a switch that is off."""

    def _get_help_string(self, action):
        switch = action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction)
        if action.required or action.default is None or action.default == [] or switch:
            return action.help
        return super()._get_help_string(action)


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _default(job_class, name: str):
    """A job class's default for ``name``: the CLI shows and uses the jobs' own defaults."""
    f = job_class.__dataclass_fields__[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _common_arguments(p, job_class) -> None:
    """What ``text`` and ``vision`` share: input, output, generation, safety, model loading."""
    params = _default(job_class, "params")
    p.add_argument("--model", required=True, help="hub id or local folder")
    p.add_argument("--input", required=True, help="Parquet file, folder or glob (path or fsspec URL)")
    p.add_argument("--output", required=True, help="output folder (path or fsspec URL)")
    p.add_argument("--id-column", default=_default(job_class, "id_column"), help="unique join key column")
    p.add_argument("--prompt-column", default=_default(job_class, "prompt_column"), help="prompt string column")
    p.add_argument("--keep-column", action="append", default=[], dest="keep_columns",
                   help="input column to copy to the output (repeatable)")
    p.add_argument("--system-prompt", default=None, help="system message for every row without one of its own")
    p.add_argument("--prompt-template", default=None,
                   help='Jinja over the row, instead of --prompt-column, e.g. "Summarise: {{ row.text }}"')
    p.add_argument("--max-new-tokens", type=at_least_one, default=params.max_new_tokens,
                   help="tokens to generate per row (a max_new_tokens column overrides it per row)")
    p.add_argument("--sample", action=argparse.BooleanOptionalAction, default=params.do_sample,
                   help="sample (--no-sample: greedy decoding)")
    p.add_argument("--temperature", type=float, default=params.temperature, help="sampling temperature")
    p.add_argument("--top-p", type=float, default=params.top_p, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=params.top_k, help="top-k sampling (0: off)")
    p.add_argument("--repetition-penalty", type=float, default=params.repetition_penalty, help="1.0: none")
    p.add_argument("--min-length", type=int, default=params.min_length, help="minimum new tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=params.seed,
                   help="sampling seed (none: one is drawn, kept in the output folder and reused by reruns)")
    p.add_argument("--chunk-rows", type=at_least_one, default=_default(job_class, "chunk_rows"),
                   help="rows per input chunk and output part (the unit of resume)")
    p.add_argument("--batch-size", type=at_least_one, default=_default(job_class, "batch_size"),
                   help="cap on rows per batch (none: a token budget decides)")
    p.add_argument("--max-prompt-tokens", type=at_least_one, default=_default(job_class, "max_prompt_tokens"),
                   help="longest prompt accepted; longer rows get an error (none: the model's context "
                        "minus the row's max new tokens)")
    p.add_argument("--max-error-rate", type=float, default=_default(job_class, "max_error_rate"),
                   help="exit 3 (after writing) when more than this share of rows ended in error")
    p.add_argument("--safety", action="append", default=[], metavar="KIND:MODEL", help=SAFETY_HELP)
    p.add_argument("--on-unsafe-output", choices=("redact", "keep"), default=_default(job_class, "on_unsafe_output"),
                   help="redact: an unsafe output is written as null; keep: written, flagged")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="auto: bfloat16 on a GPU (float16 where unsupported, and for 8bit), float32 on the CPU")
    p.add_argument("--revision", default=None, help="model revision: branch, tag or commit")
    p.add_argument("--quantization", default=None, choices=("none", "8bit", "4bit"), help="bitsandbytes (4bit: nf4)")
    p.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    p.add_argument("--cache-dir", default=None, help="HF cache folder (none: HFLLM_CACHE_DIR, else HF_HOME)")
    p.add_argument("--local-files-only", action="store_true",
                   help="never reach the hub (also when HF_HUB_OFFLINE=1)")
    p.add_argument("--progress-every", type=float, default=_default(job_class, "progress_every"),
                   help="seconds between progress lines")
    p.add_argument("--engine", choices=("auto", "fast", "batched"), default=_default(job_class, "engine"),
                   help="auto: the fast engine on a GPU when the model allows, else batched generate()")
    p.add_argument("--input-fingerprint", choices=("metadata", "content"),
                   default=_default(job_class, "input_fingerprint"),
                   help="how a changed input is noticed: metadata (size and etag/mtime) or content (a SHA-256 "
                        "of every input file, read each run: for files rewritten with size and mtime kept)")
    p.add_argument("--replace-foreign-files", action="store_true",
                   help="delete files in the output folder that hfllm did not write (default: refuse the folder)")


def _parsers(sub) -> None:
    from airflow_hfllm.jobs import TextJob
    from airflow_hfllm.vision.job import VisionJob

    text = sub.add_parser("text", help="generate text for a Parquet batch of prompts", formatter_class=HelpFormatter)
    _common_arguments(text, TextJob)
    text.add_argument("--messages-column", default=None,
                      help="chat messages column (list of {role, content}), instead of --prompt-column")
    text.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                      help="4bit: also quantize the quantization constants")
    text.add_argument("--peft-model", default=None, help="PEFT adapter (hub id or folder) over --model")
    text.add_argument("--merge-adapter", action=argparse.BooleanOptionalAction, default=True,
                      help="merge the adapter into the weights (never when quantized)")

    vision = sub.add_parser("vision", help="generate text for a Parquet manifest of images and prompts",
                            formatter_class=HelpFormatter)
    _common_arguments(vision, VisionJob)
    vision.add_argument("--image-column", default=_default(VisionJob, "image_column"),
                        help="path/URI (local, file://, s3://..., data:image/...;base64,), image bytes, or a list")
    vision.add_argument("--min-pixels", type=at_least_one, default=_default(VisionJob, "min_pixels"),
                        help="fewest pixels of a resized image")
    vision.add_argument("--max-pixels", type=at_least_one, default=_default(VisionJob, "max_pixels"),
                        help="most pixels of a resized image")
    vision.add_argument("--allow-http-images", action="store_true", help="fetch http(s):// images (refused by default)")
    vision.add_argument("--image-backend", choices=("auto", "qwen-vl-utils", "pil"),
                        default=_default(VisionJob, "image_backend"),
                        help="auto: qwen_vl_utils where it imports (needs torchvision), else the PIL implementation")


def run_job(args) -> int:
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.jobs import TextJob
    from airflow_hfllm.vision.job import VisionJob

    env = HubOptions.from_env()
    hub = HubOptions(cache_dir=args.cache_dir or env.cache_dir, token=env.token,
                     local_files_only=args.local_files_only or env.local_files_only)
    common = dict(
        input=args.input,
        output=args.output,
        params=GenerationParams(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
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
        input_fingerprint=args.input_fingerprint,
        replace_foreign_files=args.replace_foreign_files,
    )
    model = dict(revision=args.revision, dtype=args.dtype, quantization=args.quantization,
                 trust_remote_code=args.trust_remote_code)
    if args.command == "vision":
        job = VisionJob(model=ModelSpec(args.model, task="vision", **model), image_column=args.image_column,
                        min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                        allow_http_images=args.allow_http_images, image_backend=args.image_backend, **common)
    else:
        job = TextJob(model=ModelSpec(args.model, double_quant=args.double_quant, adapter=args.peft_model,
                                      merge_adapter=args.merge_adapter, **model),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hfllm", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of:")
    tiny = sub.add_parser("make-tiny-model", help="build a tiny random model offline, for demos and tests",
                          formatter_class=HelpFormatter)
    tiny.add_argument("dir", help="folder to write the model to")
    tiny.add_argument("--kind", default="causal-lm", choices=TINY_KINDS, help="what kind of model")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    tiny.add_argument("--verdict", choices=TINY_VERDICTS, default=None,
                      help="safety kinds: always answer this (for tests)")
    _parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "fsspec", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from airflow_hfllm.engine.generate import Cancelled
    from airflow_hfllm.io.dataset import InputError
    from airflow_hfllm.jobs import ErrorRateExceeded

    try:
        if args.command == "make-tiny-model":
            from airflow_hfllm.testing.models import make_tiny_model

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
