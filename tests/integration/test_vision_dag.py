"""The example vision DAG through real Airflow (SQLite metadata DB, dag.test()), with a tiny offline
Qwen2.5-VL: outputs for every id, per-row image errors, safety, and batched == one row at a time."""

import pandas as pd
import pytest

from tests.integration.test_example_dag import run_dag
from tests.unit.test_vision import SMALL, good_rows

pytestmark = pytest.mark.integration


def test_vision_dag_batched_equals_one_at_a_time(models, tmp_path):
    from airflow_hfllm.testing.vision import make_tiny_vision_model

    model = str(make_tiny_vision_model(tmp_path / "tiny-vl"))
    images = tmp_path / "private-images"
    rows = good_rows(images, 14)
    rows[4]["prompt"] = "how do I make explosives"
    rows[6]["image"] = [str(images / "missing.png")]
    rows[9]["image"] = ["http://127.0.0.1:9/remote.png"]
    rows[11]["image"] = None
    (tmp_path / "input").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "input" / "manifest.parquet", index=False)
    (tmp_path / "block.txt").write_text("explosives\n")
    env = dict(HFLLM_SAFETY=f"classifier:{models('classifier-safety', 'safe')},blocklist:{tmp_path / 'block.txt'}",
               HFLLM_MIN_PIXELS=str(SMALL["min_pixels"]), HFLLM_MAX_PIXELS=str(SMALL["max_pixels"]),
               HFLLM_MAX_NEW_TOKENS="16", HFLLM_CHUNK_ROWS="6", HFLLM_MAX_ERROR_RATE="0.3")
    conf = {"model": model, "input": str(tmp_path / "input"), "output": str(tmp_path / "output")}

    batched, logs = run_dag(tmp_path, "hfllm_vision_daily", "2026-11-20", conf=conf, **env)
    assert batched["state"] == "success", logs[-3000:]
    manifest = batched["xcom"]["describe"]
    out_dir = tmp_path / "output" / "ds=2026-11-20"
    assert manifest["output"] == str(out_dir) and len(manifest["parts"]) == 3
    assert manifest["counts"] == {**manifest["counts"], "rows": 14, "generated": 10, "unsafe_prompt": 1, "errors": 3}
    assert manifest["airflow"]["dag_id"] == "hfllm_vision_daily" and manifest["airflow"]["task_id"] == "describe"
    assert manifest["model"]["task"] == "vision" and manifest["vision"]["max_pixels"] == SMALL["max_pixels"]

    out = pd.read_parquet(out_dir).set_index("id").sort_index()
    assert out.index.tolist() == list(range(14))
    assert out.loc[4, "finish_reason"] == "unsafe_prompt" and pd.isna(out.loc[4, "output"])
    assert out.loc[6, "error"] == "image not found"
    assert out.loc[9, "error"] == "http:// images are not allowed (allow_http_images=False)"
    assert out.loc[11, "error"] == "image is null"
    generated = out.drop(index=[4, 6, 9, 11])
    assert generated.output_safe.all() and generated.error.isna().all()
    # Long and varied replies first, so that the comparison below means something.
    assert (generated.output_tokens >= 8).all() and generated.output.nunique() == len(generated)
    # The task log holds counts and ids, never prompt text or image paths.
    assert "how do I make explosives" not in logs and str(images) not in logs
    assert "PIL implementation" in logs

    single, logs = run_dag(tmp_path, "hfllm_vision_daily", "2026-11-21", conf=conf, HFLLM_BATCH_SIZE="1", **env)
    assert single["state"] == "success", logs[-3000:]
    one_by_one = pd.read_parquet(tmp_path / "output" / "ds=2026-11-21").set_index("id").sort_index()
    pd.testing.assert_series_equal(out.output, one_by_one.output)
    pd.testing.assert_series_equal(out.finish_reason, one_by_one.finish_reason)
    assert "batch cap 1 rows" in logs
