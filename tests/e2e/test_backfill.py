"""Backfill of the daily DAG on a Celery deployment: three dates, each its own ``ds=`` partition read
from its own input partition; then one partition's output is lost and a reprocessing backfill brings
it back identical while the other two partitions' files stay untouched."""

import hashlib
import json
import shutil
import time

import pandas as pd
import pytest

from tests.conftest import write_prompts

pytestmark = pytest.mark.e2e

DAG = "hfllm_text_daily"
DATES = ("2026-11-02", "2026-11-03", "2026-11-04")
LOST = DATES[1]


def backfill(cluster, conf: dict, reprocess: str, timeout: float = 360) -> dict[str, str]:
    """Create a backfill over DATES, wait until the scheduler has finished it, check every run; the run
    id of each date."""
    created = cluster.rest("POST", "/api/v2/backfills", {
        "dag_id": DAG, "from_date": f"{DATES[0]}T00:00:00Z", "to_date": f"{DATES[-1]}T00:00:00Z",
        "dag_run_conf": conf, "reprocess_behavior": reprocess, "max_active_runs": 3,
    })
    deadline = time.monotonic() + timeout
    while cluster.rest("GET", f"/api/v2/backfills/{created['id']}")["completed_at"] is None:
        runs = cluster.rest("GET", f"/api/v2/dags/{DAG}/dagRuns", params={"run_type": "backfill"})["dag_runs"]
        assert time.monotonic() < deadline, "backfill not done: " + json.dumps(
            [(r["dag_run_id"], r["state"]) for r in runs]) + "\n" + cluster.report()
        time.sleep(2)
    runs = cluster.rest("GET", f"/api/v2/dags/{DAG}/dagRuns", params={"run_type": "backfill"})["dag_runs"]
    assert sorted(r["logical_date"][:10] for r in runs) == list(DATES)
    for r in runs:
        assert r["state"] == "success", cluster.run_report(DAG, r["dag_run_id"])
        assert r["conf"] == conf
    return {r["logical_date"][:10]: r["dag_run_id"] for r in runs}


def files(folder) -> dict[str, tuple[int, int, str]]:
    """Each part file's inode, mtime and content hash."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.glob("part-*.parquet"))}


def rows(folder) -> pd.DataFrame:
    return (pd.read_parquet(folder, columns=["id", "output", "finish_reason", "output_tokens"])
            .set_index("id").sort_index())


def test_backfill_partitions_and_reprocess_regenerates_only_what_was_lost(cluster):
    inputs, out = cluster.demo / "daily-input", cluster.demo / "daily-output"
    for k, ds in enumerate(DATES):
        write_prompts(inputs / f"ds={ds}" / "prompts.parquet", 12, start=100 * k)
    conf = {"input": str(inputs / "ds={ds}"), "output": str(out)}
    # Backfill runs wait while the DAG is paused. Unpaused, the DAG also gets today's scheduled run
    # (catchup=False), which writes under the default output, not here.
    cluster.unpause(DAG)

    run_ids = backfill(cluster, conf, "none")
    first = {ds: rows(out / f"ds={ds}") for ds in DATES}
    for k, ds in enumerate(DATES):
        assert list(first[ds].index) == list(range(100 * k, 100 * k + 12))  # its own input partition
        assert sorted(p.name for p in (out / f"ds={ds}").glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    # Equality below means something only if the samples are long and varied.
    lost = first[LOST]
    assert lost.output_tokens.mean() >= 6 and lost.output.nunique() >= 10
    kept = {ds: files(out / f"ds={ds}") for ds in DATES if ds != LOST}
    fingerprint = json.loads((out / f"ds={LOST}" / "_manifest.json").read_text())["fingerprint"]

    shutil.rmtree(out / f"ds={LOST}")
    assert backfill(cluster, conf, "completed") == run_ids  # the same runs, cleared and run again

    for ds, run_id in run_ids.items():
        [ti] = cluster.task_instances(DAG, run_id)
        assert ti["state"] == "success" and ti["try_number"] == 2 and ti["queue"] == "gpu"
    regenerated = out / f"ds={LOST}"
    pd.testing.assert_frame_equal(rows(regenerated), lost)
    manifest = json.loads((regenerated / "_manifest.json").read_text())
    assert manifest["fingerprint"] == fingerprint and [sorted(a["parts_written"]) for a in manifest["attempts"]] == [[0, 1]]
    for ds, before in kept.items():
        # the task ran again, found every part committed with its fingerprint and wrote none
        assert files(out / f"ds={ds}") == before
        manifest = json.loads((out / f"ds={ds}" / "_manifest.json").read_text())
        assert [sorted(a["parts_written"]) for a in manifest["attempts"]] == [[0, 1], []]
