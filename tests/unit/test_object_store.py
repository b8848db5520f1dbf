"""Input and output on an S3-protocol server on loopback (moto), through fsspec/s3fs."""

import json
import socket
import threading
import urllib.request

import pandas as pd
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import write_prompts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def s3_fs(port: int):
    import s3fs

    # A fresh instance (no shared listing cache), as a retry in a new process gets.
    return s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", key="test", secret="test",
                             skip_instance_cache=True)


@pytest.fixture()
def moto_port(monkeypatch):
    """The port of an S3 server on loopback with a bucket named ``bucket``."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # moto keeps its objects in the process, not in the server: without a reset, a test sees the last one's
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3_fs(port).mkdir("bucket")
    yield port
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture()
def s3(moto_port):
    return s3_fs(moto_port)


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


class Outage:
    """A loopback TCP proxy in front of the S3 server that, on the first request starting with
    ``cut_at``, drops every connection (that request's included, before the server sees its body)
    and stops listening: to a client, the server died mid-request and now refuses connections.
    :meth:`listen` brings it back on the same port, with the server behind it and its objects as they
    were. Not moto's own ``stop()``: it leaves in-flight requests to finish and its port bound but
    no longer accepting (clients wait for a read timeout, not a refusal), and a moto process started
    afresh would hold no objects."""

    def __init__(self, target: int, cut_at: bytes):
        self.target, self.cut_at, self.port = target, cut_at, free_port()
        self.cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None

    def listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        with self._lock:
            # Closed at once, not when accept() next returns: a client retrying at once must be refused.
            sockets, self._sockets, self._listener = [*self._sockets, self._listener], [], None
        for sock in filter(None, sockets):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept() or recv() on it
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                if self._listener is not listener:  # closed while this one was let in
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        seen = b""
        try:
            while data := source.recv(1 << 16):
                seen = (seen + data)[-(len(data) + len(self.cut_at)):]
                if from_client and not self.cut.is_set() and self.cut_at in seen:
                    self.cut.set()
                    self.close()
                    return
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):  # one side done: so is the other
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture()
def outage(moto_port):
    # Cut while the second part's PUT is in flight: the first part and its commit record are in.
    proxy = Outage(moto_port, cut_at=b"PUT /bucket/out/part-00001.parquet")
    proxy.listen()
    yield proxy
    proxy.close()


@pytest.mark.timeout(180)  # a hang fails here; with s3fs's and botocore's default retries it fails in seconds
def test_server_gone_mid_write_fails_the_task_and_the_retry_completes(tiny_lm, tmp_path, moto_port, outage):
    df = write_prompts(tmp_path / "in.parquet", 25)
    direct = s3_fs(moto_port)  # a reader's view, past the proxy
    direct.put(str(tmp_path / "in.parquet"), "bucket/in/in.parquet")

    def job():
        fs = s3_fs(outage.port)
        return TextJob(input="bucket/in", input_fs=fs, output="bucket/out", output_fs=fs, model=ModelSpec(tiny_lm),
                       params=GenerationParams(max_new_tokens=6, do_sample=False), chunk_rows=10)

    with pytest.raises(Exception) as failed:  # an Exception: Airflow fails the task and retries it
        job().run()
    assert outage.cut.is_set(), failed.value  # it failed where the server went away, not elsewhere
    assert "part-00001.parquet" in str(failed.value)

    assert sorted(p.rsplit("/", 1)[-1] for p in direct.glob("bucket/out/part-*")) == ["part-00000.parquet"]
    assert direct.exists("bucket/out/_commits/part-00000.json") and not direct.exists("bucket/out/_manifest.json")
    assert pd.read_parquet("bucket/out", filesystem=direct).id.tolist() == list(range(10))  # no partial part

    def written():
        return {k: direct.info("bucket/out/part-00000.parquet")[k] for k in ("ETag", "LastModified")}

    first = written()

    outage.listen()
    manifest = job().run()
    assert manifest["counts"]["rows"] == 25 and manifest["parts"] == [f"part-0000{k}.parquet" for k in range(3)]
    # Told apart by how they ended: both may have started within the second their timestamps resolve.
    (retry,) = [a for a in manifest["attempts"] if a["finished"] is not None]
    assert len(manifest["attempts"]) == 2 and retry["parts_written"] == [1, 2]  # the first part not rewritten
    direct.invalidate_cache()
    assert written() == first
    ids = pd.read_parquet("bucket/out", filesystem=direct).id.tolist()
    assert sorted(ids) == df.id.tolist()
