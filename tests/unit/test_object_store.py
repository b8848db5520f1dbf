"""Input and output on an S3-protocol server on loopback (moto), through fsspec/s3fs."""

import json
import socket

import pandas as pd
import pytest

from airflow_hfllm.engine.spec import GenerationParams, ModelSpec
from airflow_hfllm.jobs import TextJob
from tests.conftest import write_prompts


@pytest.fixture()
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="test", secret="test")
    fs.mkdir("bucket")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_job_reads_and_writes_s3_and_resumes(tiny_lm, tmp_path, s3):
    df = write_prompts(tmp_path / "in.parquet", 25)
    s3.put(str(tmp_path / "in.parquet"), "bucket/prompts/day=1/in.parquet")

    def job():
        return TextJob(input="bucket/prompts/day=1", input_fs=s3, output="bucket/out/day=1", output_fs=s3,
                       model=ModelSpec(tiny_lm), params=GenerationParams(max_new_tokens=6, do_sample=False),
                       chunk_rows=10)

    manifest = job().run()
    assert manifest["output"] == "s3://bucket/out/day=1"
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.ls("bucket/out/day=1"))
    assert names == ["_attempts", "_commits", "_job.json", "_manifest.json",
                     "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    with s3.open("bucket/out/day=1/_manifest.json") as f:
        assert json.load(f)["counts"]["rows"] == 25
    with s3.open("bucket/out/day=1/part-00001.parquet") as f:
        assert pd.read_parquet(f).id.tolist() == list(range(10, 20))

    # A retry after losing one part rewrites only that part.
    before = {p: s3.info(p)["ETag"] for p in s3.glob("bucket/out/day=1/part-*")}
    s3.rm("bucket/out/day=1/part-00002.parquet")
    again = job().run()
    assert again["counts"]["rows"] == 25 and len(again["attempts"]) == 2
    after = {p: s3.info(p)["ETag"] for p in s3.glob("bucket/out/day=1/part-*")}
    assert after == before  # same bytes back, the others untouched
    ids = sorted(i for p in after for i in pd.read_parquet(s3.open(p)).id)
    assert ids == df.id.tolist()
