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

from airflow_hfllm.config import CONFIGS, HubOptions
from airflow_hfllm.options import Option, options
from airflow_hfllm.testing import KINDS as TINY_KINDS
from airflow_hfllm.testing import VERDICTS as TINY_VERDICTS

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


def bounded(opt: Option):
    """The option's argparse type: its bounds checked here, so a bad value gets argparse's usage line."""
    def parse(text: str):
        try:
            value = opt.type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if opt.type is int else 'a number'}: {text!r}") \
                from None
        problem = opt.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = opt.type.__name__
    return parse


def add_option(parser, opt: Option, kind: str) -> None:
    default = opt.default_for(kind)
    kw = dict(dest=opt.name, help=opt.help)
    if default is dataclasses.MISSING:
        kw.update(required=True)
    elif opt.type is bool:
        # a switch that is on somewhere (or only for one kind) gets its --no- form
        varies = any(value != opt.default for value in opt.per_kind.values())
        kw.update(default=default, action=argparse.BooleanOptionalAction if default or varies else "store_true")
    elif opt.many:
        kw.update(default=[], action="append", metavar=opt.metavar)
    else:
        kw.update(default=default, metavar=opt.metavar)
        if opt.choices is not None:
            kw.update(choices=tuple("none" if c is None else c for c in opt.choices))
        elif opt.type in (int, float):
            kw.update(type=bounded(opt))
    parser.add_argument(opt.cli, **kw)


def add_job_arguments(parser, kind: str) -> None:
    """Every option of a ``kind`` job, from :mod:`airflow_hfllm.config`."""
    parser.add_argument("--input", required=True, help="Parquet file, folder or glob (path or fsspec URL)")
    parser.add_argument("--output", required=True, help="output folder (path or fsspec URL)")
    for cls in CONFIGS:
        for opt in options(cls, kind):
            if opt.cli:
                add_option(parser, opt, kind)


def _parsers(sub) -> None:
    commands = {"text": "generate text for a Parquet batch of prompts",
                "vision": "generate text for a Parquet manifest of images and prompts"}
    for kind, summary in commands.items():
        add_job_arguments(sub.add_parser(kind, help=summary, formatter_class=HelpFormatter), kind)


def run_job(args) -> int:
    from airflow_hfllm.config import GenerationParams, ModelSpec

    kind = args.command
    given = {o.name: getattr(args, o.name) for cls in CONFIGS for o in options(cls, kind) if o.cli}
    pick = lambda cls: {o.name: given.pop(o.name) for o in options(cls, kind) if o.name in given}  # noqa: E731
    env = HubOptions.from_env()
    hub = pick(HubOptions)
    hub = HubOptions(cache_dir=hub["cache_dir"] or env.cache_dir, token=env.token,
                     local_files_only=hub["local_files_only"] or env.local_files_only)
    arguments = dict(input=args.input, output=args.output, hub=hub, model=ModelSpec(**pick(ModelSpec)),
                     params=GenerationParams(**pick(GenerationParams)), **given)
    if kind == "vision":
        from airflow_hfllm.vision.job import VisionJob

        job = VisionJob(**arguments)
    else:
        from airflow_hfllm.run.job import TextJob

        job = TextJob(**arguments)
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
    from airflow_hfllm.run.job import ErrorRateExceeded

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
