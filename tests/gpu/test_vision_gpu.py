"""The vision fast engine (CUDA graphs) vs generate() on a GPU, tiny Qwen2.5-VL in fp32 (TF32 off), and
tiny Qwen3-VL / Qwen3-VL-MoE.

Measured on an H100 (2026-11-26): fast vs one-at-a-time 100% and 80% of 40 rows in two runs,
transformers' padded batch vs one-at-a-time 77.5% (see the assertion for why not 100%)."""

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


from tests.unit.test_vision import tiny_vl  # noqa: E402,F401  (the session fixture)


def test_vision_fast_engine_agrees_with_generate_on_gpu(tiny_vl, tmp_path):
    from tests.unit.test_vision import good_rows, job, read, write_manifest

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    write_manifest(tmp_path, good_rows(tmp_path / "images", 40))
    fast = job(tiny_vl, tmp_path, out="fast", engine="fast", chunk_rows=40, batch_size=8).run()
    batched = job(tiny_vl, tmp_path, out="batched", engine="batched", chunk_rows=40).run()
    job(tiny_vl, tmp_path, out="single", engine="batched", chunk_rows=40, batch_size=1).run()
    assert fast["engine"] == "fast" and fast["device"].startswith("cuda") and batched["engine"] == "batched-generate"
    a, b, c = read(tmp_path / "fast"), read(tmp_path / "batched"), read(tmp_path / "single")
    assert a.output.nunique() == 40 and (a.output_tokens >= 8).all()
    rates = {"fast~batched": (a.output == b.output).mean(), "fast~single": (a.output == c.output).mean(),
             "batched~single": (b.output == c.output).mean()}
    print(f"\nvision, fp32 on {torch.cuda.get_device_name()}, rows agreeing of 40: {rates}")
    # The tiny model's replies are far from ties on the CPU (where fast == batched exactly), but on a GPU
    # fp32 GEMMs round differently for every batch shape, and its sharp attention carries that into
    # some replies: transformers' own padded batches agree with one-at-a-time generate() on 77.5% of
    # rows (H100, 2026-11-26). The fast engine must agree with one-at-a-time at least as well; a broken
    # path (rope offsets, image embeddings, KV copies) agrees on ~0%.
    assert rates["fast~single"] >= min(0.9, rates["batched~single"] - 0.05)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_qwen3_vl_fast_engine_agrees_with_generate_on_gpu(tmp_path, family):
    """Qwen3-VL (16-pixel patches, deepstack features, interleaved multimodal rope; MoE through batched_mm in
    fp32) on the fast engine with CUDA graphs vs one-at-a-time generate(), in fp32 with TF32 off: the first
    32 greedy tokens agree on >= 95% of rows."""
    from airflow_hfllm.config import GenerationParams, ModelSpec
    from airflow_hfllm.testing.vision import make_tiny_vision_model
    from airflow_hfllm.vision.job import VisionJob
    from tests.unit.test_qwen3_vl import SMALL
    from tests.unit.test_vision import good_rows, read, write_manifest

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    n = 64
    model = ModelSpec(str(make_tiny_vision_model(tmp_path / family, family=family)), dtype="float32")
    write_manifest(tmp_path, good_rows(tmp_path / "images", n))

    def run(out, **kw):
        return VisionJob(input=str(tmp_path / "in.parquet"), output=str(tmp_path / out), model=model, chunk_rows=n,
                         params=GenerationParams(max_new_tokens=32, do_sample=False), **SMALL, **kw).run()

    fast = run("fast", engine="fast", batch_size=16)
    single = run("single", engine="batched", batch_size=1)
    assert fast["engine"] == "fast" and fast["device"].startswith("cuda") and single["engine"] == "batched-generate"
    assert fast["engine_stats"]["capture_seconds"] > 0  # decode ran as a CUDA graph
    a, c = read(tmp_path / "fast"), read(tmp_path / "single")
    assert (c.output_tokens >= 24).mean() >= 0.8 and c.output.nunique() >= 0.9 * n  # not vacuous
    rate = (a.output == c.output).mean()
    print(f"\n{family}, fp32 on {torch.cuda.get_device_name()}: first 32 tokens agree for {rate:.0%} of {n} rows")
    assert rate >= 0.95
