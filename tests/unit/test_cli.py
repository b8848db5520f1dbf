"""The hfllm CLI: options, exit codes with one-line reasons, log lines, and resume after kill -9."""

import argparse
import json
import subprocess
import sys

import pandas as pd
import pytest

from airflow_hfllm.cli import build_parser
from tests.conftest import kill_after_first_part, rerun_leaves, write_prompts

HFLLM = [sys.executable, "-m", "airflow_hfllm.cli"]


def hfllm(*args, **kw):
    return subprocess.run([*HFLLM, *args], capture_output=True, text=True, timeout=300, **kw)


def test_up_front_errors_exit_nonzero_with_one_line(tiny_lm, tmp_path):
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr  # exactly 2: an abort at exit (-6) is a failure, not an error code
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hfllm: error: input not found:") and "missing" in last

    pd.DataFrame({"id": [1, 1], "prompt": ["a", "b"]}).to_parquet(tmp_path / "dup.parquet")
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "dup.parquet"), "--output", str(tmp_path / "o"))
    assert done.returncode == 2, done.stderr
    assert "duplicate ids in column 'id': 1" in done.stderr.strip().splitlines()[-1]


def test_text_prints_manifest(tiny_lm, tmp_path):
    prompts = write_prompts(tmp_path / "in.parquet", 8).prompt
    # --progress-every 0: a line whenever the counts move, and the last one once
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output",
                 str(tmp_path / "out"), "--max-new-tokens", "6", "--no-sample", "--chunk-rows", "4",
                 "--progress-every", "0")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["counts"]["rows"] == 8 and manifest["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert done.stderr.count("progress: 8/8 rows") == 1, done.stderr
    assert "Loading weights" not in done.stderr and "it/s]" not in done.stderr  # no loader progress bar
    # counts and ids only in logs: no prompt or output text
    outputs = pd.read_parquet(tmp_path / "out").output
    for text in [*prompts, *outputs]:
        assert text[:30] not in done.stderr


def test_kill_9_then_rerun_gives_every_id_once(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 1500)
    out = tmp_path / "out"
    cmd = [*HFLLM, "text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output", str(out),
           "--max-new-tokens", "16", "--chunk-rows", "20", "--seed", "7"]
    written = kill_after_first_part(cmd, out)
    assert written and len(written) < 75, "killed mid-run"
    assert not (out / "_manifest.json").exists()

    rerun_leaves(cmd, out, written)
    rows = pd.read_parquet(out)
    assert len(rows) == 1500 and sorted(rows.id) == list(range(1500))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 1500 and len(manifest["parts"]) == 75
    assert len(manifest["attempts"]) == 2 and manifest["attempts"][0]["finished"] is None
    assert not list(out.glob("_tmp-*"))


def subcommands() -> dict[str, argparse.ArgumentParser]:
    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_every_option_has_help_and_the_exit_codes_are_listed(capsys):
    for name, parser in {"hfllm": build_parser(), **subcommands()}.items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for code in ("0 ", "2 ", "3 ", "130 "):
        assert f"\n  {code}" in shown.split("exit codes:")[1]
    text_help = subcommands()["text"].format_help()
    assert "(default: 1024)" in text_help and "(default: 1000)" in text_help



def test_help_lists_the_tiny_kinds_without_importing_torch():
    """``hfllm --help`` stays quick: torch, transformers and the tiny-model builders (airflow_hfllm.testing's
    modules) are imported only when a command runs."""
    heavy = ("torch", "transformers", "airflow_hfllm.testing.models", "airflow_hfllm.testing.text",
             "airflow_hfllm.testing.vision")
    code = ("import sys\nfrom airflow_hfllm.cli import main\ntry:\n    main(['make-tiny-model', '--help'])\n"
            f"except SystemExit:\n    pass\nprint(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    *shown, imported = done.stdout.strip().splitlines()
    assert imported == "[]"
    for kind in ("causal-lm", "seq2seq-safety", "classifier-safety", "llama-guard", "vision"):
        assert kind in "\n".join(shown)

def test_sample_switch_on_both_commands_with_the_operators_defaults():
    common = ["--model", "m", "--input", "i", "--output", "o"]
    parse = build_parser().parse_args
    assert parse(["text", *common]).do_sample is True
    assert parse(["text", *common, "--no-sample"]).do_sample is False
    assert parse(["vision", *common]).do_sample is False  # greedy, as the vision operator
    assert parse(["vision", *common, "--sample"]).do_sample is True
    assert parse(["vision", *common, "--no-sample"]).do_sample is False
    assert parse(["vision", *common]).chunk_rows == 256 and parse(["text", *common]).chunk_rows == 1000


@pytest.mark.parametrize("option", ["--batch-size", "--chunk-rows", "--max-new-tokens", "--max-prompt-tokens"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_sizes_below_one_are_refused(capsys, option, value):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["text", "--model", "m", "--input", "i", "--output", "o", option, value])
    assert exited.value.code == 2
    assert f"argument {option}: must be >= 1, got {value}" in capsys.readouterr().err


def test_output_that_is_a_file_is_named(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 2)
    (tmp_path / "out").write_text("x")
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"hfllm: error: output {tmp_path / 'out'} is a file, not a folder"


def test_foreign_files_in_the_output_refused_then_replaced_on_request(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 2)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("someone's notes")
    args = ["text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out"),
            "--max-new-tokens", "2", "--input-fingerprint", "content"]
    done = hfllm(*args)
    assert done.returncode == 2
    assert "holds files this job did not write (notes.txt)" in done.stderr.strip().splitlines()[-1]
    assert hfllm(*args, "--replace-foreign-files").returncode == 0
    assert not (tmp_path / "out" / "notes.txt").exists()
    by_content = json.loads((tmp_path / "out" / "_manifest.json").read_text())["fingerprint"]
    assert hfllm(*args[:-2], "--input-fingerprint", "metadata").returncode == 0  # another job: rebuilt
    assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["fingerprint"] != by_content
