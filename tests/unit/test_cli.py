"""The hfllm CLI: exit codes with one-line reasons, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from tests.conftest import write_prompts

HFLLM = [sys.executable, "-m", "airflow_hfllm.cli"]


def hfllm(*args, **kw):
    return subprocess.run([*HFLLM, *args], capture_output=True, text=True, timeout=300, **kw)


def test_up_front_errors_exit_nonzero_with_one_line(tiny_lm, tmp_path):
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hfllm: error: input not found:") and "missing" in last

    pd.DataFrame({"id": [1, 1], "prompt": ["a", "b"]}).to_parquet(tmp_path / "dup.parquet")
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "dup.parquet"), "--output", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "duplicate ids in column 'id': 1" in done.stderr.strip().splitlines()[-1]


def test_text_prints_manifest(tiny_lm, tmp_path):
    prompts = write_prompts(tmp_path / "in.parquet", 8).prompt
    done = hfllm("text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output",
                 str(tmp_path / "out"), "--max-new-tokens", "6", "--no-sample", "--chunk-rows", "4")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["counts"]["rows"] == 8 and manifest["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    # counts and ids only in logs: no prompt or output text
    outputs = pd.read_parquet(tmp_path / "out").output
    for text in [*prompts, *outputs]:
        assert text[:30] not in done.stderr


def test_kill_9_then_rerun_gives_every_id_once(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in.parquet", 1500)
    out = tmp_path / "out"
    cmd = [*HFLLM, "text", "--model", tiny_lm, "--input", str(tmp_path / "in.parquet"), "--output", str(out),
           "--max-new-tokens", "16", "--chunk-rows", "20", "--seed", "7"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_commit = out / "_commits" / "part-00000.json"
    deadline = time.monotonic() + 240
    while not first_commit.exists():
        assert proc.poll() is None, "the run ended before its first part"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")
               if (out / "_commits" / p.name.replace(".parquet", ".json")).exists()}
    assert written and len(written) < 75, "killed mid-run"
    assert not (out / "_manifest.json").exists()

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for name, stamp in written.items():
        p = Path(out / name)
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{name} was rewritten"
    rows = pd.read_parquet(out)
    assert len(rows) == 1500 and sorted(rows.id) == list(range(1500))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == 1500 and len(manifest["parts"]) == 75
    assert len(manifest["attempts"]) == 2 and manifest["attempts"][0]["finished"] is None
    assert not list(out.glob("_tmp-*"))
