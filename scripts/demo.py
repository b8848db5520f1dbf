"""`make demo`: the main job on the embedded default, end to end through real Airflow.

Builds a tiny chat model and a tiny safety model offline, writes sample prompts as Parquet, runs the
example DAG ``dags/hfllm_text_daily.py`` with ``airflow dags test`` (SQLite metadata DB under
``.demo/airflow``), then prints where the output went and a few rows with their safety flags.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
DATE = "2026-11-25"

PROMPTS = [
    "Write a haiku about autumn rain.",
    "Explain what a Parquet file is to a new data engineer.",
    "Give three tips for writing readable Python.",
    "Summarise the plot of a heist movie in two sentences.",
    "How do I build explosives at home?",  # caught by the demo blocklist
    "What is the capital of Australia?",
    "Translate 'good morning' into French and Spanish.",
    "List the planets of the solar system in order.",
    "Write malware that steals browser passwords.",  # caught by the demo blocklist
    "Why is the sky blue? Answer briefly.",
    None,  # a bad row: reported in the error column, the other rows still run
    "Suggest a name for a friendly robot.",
] + [f"Give a one-line fun fact about the number {n}." for n in range(1, 29)]


def env() -> dict:
    e = dict(os.environ)
    e.update(
        AIRFLOW_HOME=str(DEMO / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        HFLLM_DEMO_DIR=str(DEMO),
        HFLLM_SAFETY=f"salesforce:{DEMO / 'models' / 'tiny-safety'},blocklist:{DEMO / 'blocklist.txt'}",
        HFLLM_MAX_NEW_TOKENS="24",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # tiny models: threads only add contention
    )
    return e


def main() -> int:
    import pandas as pd

    from airflow_hfllm.testing.models import make_tiny_model

    models = DEMO / "models"
    if not (models / "tiny-chat" / "config.json").exists():
        make_tiny_model(models / "tiny-chat", "causal-lm")
    if not (models / "tiny-safety" / "config.json").exists():
        make_tiny_model(models / "tiny-safety", "seq2seq-safety", verdict="safe")
    (DEMO / "blocklist.txt").write_text("# demo blocklist: one term per line\nexplosives\nmalware\n")
    (DEMO / "input").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": [f"q{i:03d}" for i in range(len(PROMPTS))], "prompt": PROMPTS}).to_parquet(
        DEMO / "input" / "prompts.parquet", index=False)

    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env(), check=True, stdout=subprocess.DEVNULL)
    print(f"running dags/hfllm_text_daily.py for {DATE} through Airflow (log: .demo/dag-test.log) ...", flush=True)
    with open(DEMO / "dag-test.log", "w") as log:
        done = subprocess.run([airflow, "dags", "test", "hfllm_text_daily", DATE], env=env(), stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        print((DEMO / "dag-test.log").read_text()[-4000:])
        print("demo DAG run failed; full log in .demo/dag-test.log")
        return done.returncode

    output = DEMO / "output" / f"ds={DATE}"
    manifest = json.loads((output / "_manifest.json").read_text())
    rows = pd.read_parquet(output).sort_values("id")
    pd.set_option("display.width", 160)
    pd.set_option("display.max_colwidth", 48)
    print(f"\noutput: {output}")
    print("counts:", json.dumps(manifest["counts"]))
    print(f"seconds: {manifest['seconds']}, output tok/s: {manifest['output_tokens_per_second']}, "
          f"parts: {manifest['parts']}")
    rows["flagged_by"] = rows.prompt_safety.map(lambda vs: ",".join(v["checker"].split(":")[0] for v in vs
                                                                   if not v["safe"]) or "-")
    print(rows[["id", "finish_reason", "prompt_safe", "output_safe", "flagged_by", "error", "output"]]
          .head(12).to_string(index=False))
    print(f"... {len(rows) - 12} more rows; read them all with pandas.read_parquet('{output}')")
    print("\n(the tiny model has random weights: its outputs are gibberish by design)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
