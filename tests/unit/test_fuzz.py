"""Property-based: random small inputs, chunk sizes, engines and kill points. Whatever the rows hold,
the job fails only where it is killed; the rerun then leaves every input row exactly once, and a
further rerun writes nothing."""

import json
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.parts import OutputDir
from airflow_hfllm.run.job import TextJob
from tests.conftest import WORDS

# A short context makes "longer than the context" cheap to build, and caps what a row asking for a
# huge max_new_tokens generates (up to the context's end) at a few dozen tokens.
CONTEXT = 96
# Words the tiny model often writes: outputs are blocked too, not only prompts.
BLOCKED = ("wife", "film", "center", "doctor", "crowd")
FINISH = {"stop", "length", "unsafe_prompt", "unsafe_output", "error"}
SCHEMA = {"id": pa.int64(), "prompt": pa.string(), "topic": pa.string(), "max_new_tokens": pa.int64()}


class Killed(BaseException):
    """The worker dying mid-write (SIGKILL, OOM killer): not an ``Exception``, so no handler of the
    job's can take it for a row's problem."""


@pytest.fixture(scope="session")
def short_lm(tiny_lm, tmp_path_factory):
    """The session's tiny LM with a context of ``CONTEXT`` positions (its weights don't depend on it)."""
    path = tmp_path_factory.mktemp("short-lm") / "model"
    shutil.copytree(tiny_lm, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    return str(path)


@pytest.fixture(scope="session")
def blocklist(tmp_path_factory):
    path = tmp_path_factory.mktemp("blocklist") / "terms.txt"
    path.write_text("# tiny-model words\n" + "\n".join(BLOCKED) + "\n", encoding="utf-8")
    return str(path)


words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
prompts = st.one_of(
    words,
    st.none(),
    st.sampled_from(["", " ", "\t\n  ", "\u3000\u00a0"]),  # empty; whitespace, Unicode's too
    st.just("window " * 120),  # over the context on its own
    st.sampled_from(["café naïve crème", "日本語のテキスト", "emoji 🚀🔥 Ωμέγα", "עברית العربية",
                     "zero\u200bwidth", "nul\x00byte", "\ud7ff\ue000\U0010fffd"]),
    st.tuples(words, st.sampled_from(BLOCKED)).map(lambda t: f"{t[0]} {t[1].upper()} {t[0]}"),
)
topics = st.one_of(st.none(), st.text(max_size=8))
max_new_tokens = st.sampled_from([None, 0, -1, 1, 3, 10**12, 2**63 - 1])


@st.composite
def cases(draw):
    sizes = draw(st.lists(st.integers(0, 12), min_size=1, max_size=3))
    ids = draw(st.lists(st.integers(-(2**62), 2**62), min_size=sum(sizes), max_size=sum(sizes), unique=True))
    columns = ["id", "prompt"]
    if draw(st.booleans()):
        columns.append("topic")
    if draw(st.booleans()):
        columns.append("max_new_tokens")
    values = {"prompt": prompts, "topic": topics, "max_new_tokens": max_new_tokens}
    files, start = [], 0
    for n in sizes:
        file = {c: draw(st.lists(values[c], min_size=n, max_size=n)) for c in columns if c != "id"}
        files.append({"id": ids[start:start + n], **file})
        start += n
    return {
        "files": files,
        "chunk_rows": draw(st.integers(1, 5)),
        "engine": draw(st.sampled_from(["batched", "fast"])),
        "params": GenerationParams(max_new_tokens=draw(st.integers(1, 4)), do_sample=draw(st.booleans())),
        # the k-th part write dies (none does when the job writes fewer parts)
        "kill_at": draw(st.integers(1, 4)),
        # before the part; between the part and its commit record; after both
        "kill_when": draw(st.sampled_from(["before", "between", "after"])),
    }


def write_input(folder: Path, files: list[dict]) -> list[int]:
    folder.mkdir()
    for k, file in enumerate(files):
        schema = pa.schema([(name, SCHEMA[name]) for name in file])
        pq.write_table(pa.table(file, schema=schema), folder / f"f{k}.parquet")
    return [i for file in files for i in file["id"]]


def dying_write_part(kill_at: int, kill_when: str, calls: list):
    real = OutputDir.write_part

    def write_part(self, index, table, record):
        calls.append(index)
        if len(calls) != kill_at:
            return real(self, index, table, record)
        if kill_when != "before":
            real(self, index, table, record)
        if kill_when == "between":  # the state a kill between the part's write and its record's leaves
            self.fs.rm(self.join("_commits", f"part-{index:05d}.json"))
        raise Killed(f"part {index} ({kill_when})")

    return write_part


def stamps(out: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


@settings(derandomize=True, database=None, max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_killed_job_reruns_to_every_row_exactly_once(short_lm, blocklist, case):
    with tempfile.TemporaryDirectory() as tmp:
        ids = write_input(Path(tmp) / "in", case["files"])
        out = Path(tmp) / "out"
        keep = ["topic"] if "topic" in case["files"][0] else []

        def job():
            return TextJob(input=str(Path(tmp) / "in"), output=str(out), model=ModelSpec(short_lm),
                           params=case["params"], chunk_rows=case["chunk_rows"], engine=case["engine"],
                           keep_columns=keep, safety_checkers=[f"blocklist:{blocklist}"], max_error_rate=1.0)

        calls = []
        with mock.patch.object(OutputDir, "write_part", dying_write_part(case["kill_at"], case["kill_when"], calls)):
            try:
                job().run()
                killed = False
            except Killed:
                killed = True
        assert killed == (len(calls) >= case["kill_at"])  # row problems never fail the job
        event(f"engine={case['engine']}, killed={case['kill_when'] if killed else 'no'}")

        manifest = job().run()
        rows = pd.read_parquet(out)
        assert sorted(rows.id) == sorted(ids)  # every row exactly once
        assert set(rows.finish_reason) <= FINISH
        failed = rows.finish_reason == "error"
        assert rows.error[failed].notna().all() and rows.error[~failed].isna().all()
        event(f"rows={'0' if not ids else '1-9' if len(ids) < 10 else '10+'}")
        for reason in set(rows.finish_reason):
            event(f"finish_reason={reason}")
        counts = manifest["counts"]
        assert counts["rows"] == len(ids) == manifest["input"]["rows"]
        assert counts["errors"] == failed.sum()
        for reason in ("unsafe_prompt", "unsafe_output"):
            assert counts[reason] == (rows.finish_reason == reason).sum()
        assert counts["generated"] == rows.finish_reason.isin(["stop", "length", "unsafe_output"]).sum()
        if keep:
            by_id = {i: t for file in case["files"] for i, t in zip(file["id"], file["topic"])}
            assert rows.topic.astype(object).where(rows.topic.notna(), None).tolist() == [by_id[i] for i in rows.id]

        before, attempts = stamps(out), set(os.listdir(out / "_attempts"))
        again = job().run()
        assert stamps(out) == before and again["counts"] == counts and again["parts"] == manifest["parts"]
        (new,) = set(os.listdir(out / "_attempts")) - attempts
        assert json.loads((out / "_attempts" / new).read_text())["parts_written"] == []


def test_an_input_without_rows_leaves_a_folder_with_the_output_columns(short_lm, tmp_path):
    """Found by the test above: an input without rows wrote no part, so a reader of the folder found no
    columns (pandas: an empty frame without 'id'; Spark: no schema to infer). Now one empty part."""
    write_input(tmp_path / "in", [{"id": [], "prompt": []}])
    manifest = TextJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=ModelSpec(short_lm)).run()
    assert manifest["counts"]["rows"] == 0
    assert list(pd.read_parquet(tmp_path / "out").columns)[:3] == ["id", "output", "finish_reason"]
