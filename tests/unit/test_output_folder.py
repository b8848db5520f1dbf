"""The output folder's integrity: parts verified against their commit records on resume, fsynced
before the rename, foreign files and self-reading folders refused, in-place input edits noticed on
request."""

import json
import os
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.io.dataset import InputError
from tests.conftest import write_prompts
from airflow_hfllm.config import ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.unit.test_job import GREEDY, job


def ids(folder) -> list:
    return sorted(pd.read_parquet(folder).id)


def attempts_wrote(folder) -> list[list[int]]:
    """The parts each attempt wrote (attempts in one second have no order: sorted by what they wrote)."""
    return sorted(json.loads(p.read_text())["parts_written"] for p in (folder / "_attempts").iterdir())


@pytest.mark.parametrize("damage", ["truncate", "same-size"])
def test_a_part_changed_after_its_commit_is_redone(tiny_lm, tmp_path, damage):
    write_prompts(tmp_path / "in" / "a.parquet", 6)
    out = tmp_path / "out"
    job(tiny_lm, tmp_path, chunk_rows=2).run()
    record = json.loads((out / "_commits" / "part-00001.json").read_text())
    part = out / "part-00001.parquet"
    assert record["bytes"] == part.stat().st_size and len(record["sha256"]) == 64
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:100] + b"X" * 8 + data[108:])

    manifest = job(tiny_lm, tmp_path, chunk_rows=2).run()
    assert attempts_wrote(out) == [[0, 1, 2], [1]]
    assert ids(out) == list(range(6)) and manifest["counts"]["rows"] == 6


def test_parts_and_records_are_fsynced_before_their_rename(tiny_lm, tmp_path, monkeypatch):
    write_prompts(tmp_path / "in" / "a.parquet", 4)
    synced, events = set(), []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    def spy_replace(src, dst):
        events.append((os.path.basename(dst), os.path.abspath(src) in synced))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    job(tiny_lm, tmp_path, chunk_rows=2).run()
    renamed = dict(events)
    assert {"part-00000.parquet", "part-00001.parquet", "part-00000.json", "_manifest.json"} <= set(renamed)
    assert all(renamed.values()), [name for name, ok in events if not ok]


def test_an_output_folder_with_foreign_files_is_refused_unless_they_may_be_replaced(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 4)
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(tmp_path / "in" / "a.parquet", out / "part-00000-c000.snappy.parquet")  # Spark's
    (out / "part-abcde.parquet").write_bytes(b"another tool")
    with pytest.raises(InputError, match=r"holds files this job did not write \(part-00000-c000\.snappy\.parquet, "
                                         r"part-abcde\.parquet\).*replace_foreign_files"):
        job(tiny_lm, tmp_path).run()
    job(tiny_lm, tmp_path, replace_foreign_files=True).run()
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]
    assert ids(out) == list(range(4))


def test_an_output_folder_inside_the_input_folder_is_refused_up_front(tiny_lm, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 4)
    with pytest.raises(InputError, match="is inside the input folder"):
        job(tiny_lm, tmp_path, output=str(tmp_path / "in" / "out")).run()
    assert not (tmp_path / "in" / "out").exists()
    # A glob whose files lie inside the output folder: the same loop the other way round.
    write_prompts(tmp_path / "both" / "a.parquet", 2)
    with pytest.raises(InputError, match="input files are inside the output folder"):
        TextJob(input=str(tmp_path / "both" / "*.parquet"), output=str(tmp_path / "both"), model=ModelSpec(tiny_lm),
                params=GREEDY).run()


def test_content_fingerprint_notices_an_input_rewritten_with_size_and_mtime_kept(tiny_lm, tmp_path):
    path = tmp_path / "in" / "a.parquet"
    path.parent.mkdir()
    # Uncompressed and plain-encoded, so a word can be swapped in the file's bytes at the same size.
    pq.write_table(pa.table({"id": [0, 1], "prompt": ["alpha one", "beta two"]}), path, compression="none",
                   use_dictionary=False)
    out = tmp_path / "out"

    def rewrite_in_place(old: bytes, new: bytes) -> None:  # as `cp -p` or `rsync -t` would
        stat = path.stat()
        path.write_bytes(path.read_bytes().replace(old, new))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_size == stat.st_size

    first = job(tiny_lm, tmp_path).run()
    rewrite_in_place(b"alpha", b"gamma")
    assert pd.read_parquet(path).prompt[0] == "gamma one"
    assert job(tiny_lm, tmp_path).run()["fingerprint"] == first["fingerprint"]  # by metadata: unnoticed

    shutil.rmtree(out)
    first = job(tiny_lm, tmp_path, input_fingerprint="content").run()
    rewrite_in_place(b"gamma", b"delta")
    again = job(tiny_lm, tmp_path, input_fingerprint="content").run()
    assert again["fingerprint"] != first["fingerprint"] and attempts_wrote(out) == [[0]]  # rebuilt
