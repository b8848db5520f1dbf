"""One output folder, one schema: decided from all input files before the first part, whatever each
file's types; keep columns that would clash with output columns refused up front; temporary files
that no ``*.parquet`` glob matches; no checker's private configuration in the manifest."""

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.io.dataset import Dataset, InputError
from airflow_hfllm.run.job import TextJob
from tests.conftest import prompt_text
from tests.unit.test_job import job


def write(path, ids, id_type=pa.int64(), **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": pa.array(ids, id_type), "prompt": [prompt_text(i) for i in range(len(ids))],
                      **columns})
    pq.write_table(table, path)


def part_schemas(folder) -> list[pa.Schema]:
    return [pq.read_schema(folder / name).remove_metadata()
            for name in sorted(os.listdir(folder)) if name.startswith("part-")]


def test_parts_share_one_schema_across_input_files_of_different_types(tiny_lm, tmp_path):
    # a.parquet: int32 ids, keep column all null (Arrow null type); b.parquet: int64 ids, strings.
    write(tmp_path / "in" / "a.parquet", [0, 1, 2], pa.int32(), topic=pa.nulls(3), score=pa.array([1, 2, 3], pa.int32()))
    write(tmp_path / "in" / "b.parquet", [3, 4, 5, 6], topic=["x", None, "y", "z"],
          score=pa.array([1.5, 2.5, 3.5, 4.5]))
    job(tiny_lm, tmp_path, chunk_rows=2, keep_columns=["topic", "score"]).run()
    schemas = part_schemas(tmp_path / "out")
    assert len(schemas) == 4 and all(s == schemas[0] for s in schemas[1:])
    assert schemas[0].field("id").type == pa.int64()
    assert schemas[0].field("topic").type == pa.string()
    assert schemas[0].field("score").type == pa.float64()
    # The null part sorts first: every reader that takes the folder must still read it.
    out = pq.read_table(tmp_path / "out").sort_by("id")
    assert out.column("id").to_pylist() == list(range(7))
    assert out.column("topic").to_pylist() == [None, None, None, "x", None, "y", "z"]


def test_a_column_null_in_every_file_is_written_as_string(tiny_lm, tmp_path):
    write(tmp_path / "in" / "a.parquet", [0, 1], note=pa.nulls(2))
    job(tiny_lm, tmp_path, keep_columns=["note"]).run()
    assert part_schemas(tmp_path / "out")[0].field("note").type == pa.string()


def test_integer_ids_in_one_file_and_string_ids_in_another_refused_up_front(tmp_path):
    write(tmp_path / "in" / "a.parquet", [0, 1])
    write(tmp_path / "in" / "b.parquet", ["2", "3"], pa.string())
    with pytest.raises(InputError) as err:
        Dataset.open(str(tmp_path / "in"), required=["id", "prompt"])
    message = str(err.value)
    assert "column 'id'" in message and "a.parquet" in message and "b.parquet" in message
    assert "int64" in message and "string" in message


def test_keep_column_types_that_do_not_unify_refused_naming_files_and_column(tiny_lm, tmp_path):
    write(tmp_path / "in" / "a.parquet", [0, 1], topic=["x", "y"])
    write(tmp_path / "in" / "b.parquet", [2, 3], topic=pa.array([[1], [2]], pa.list_(pa.int64())))
    with pytest.raises(InputError, match=r"column 'topic' .*a\.parquet.*b\.parquet"):
        job(tiny_lm, tmp_path, keep_columns=["topic"]).run()
    assert not (tmp_path / "out").exists() or not any(n.startswith("part-") for n in os.listdir(tmp_path / "out"))
    # A column the job never reads may differ freely.
    job(tiny_lm, tmp_path).run()
    assert sorted(pd.read_parquet(tmp_path / "out").id) == [0, 1, 2, 3]


def test_a_column_missing_from_some_files_reads_as_null(tmp_path):
    write(tmp_path / "in" / "a.parquet", [0, 1], max_new_tokens=pa.array([3, 4], pa.int32()))
    write(tmp_path / "in" / "b.parquet", [2, 3])
    ds = Dataset.open(str(tmp_path / "in"))
    [(_, table)] = list(ds.chunks(10, ["id", "max_new_tokens"]))
    assert table.column("max_new_tokens").to_pylist() == [3, 4, None, None]


@pytest.mark.parametrize("column,id_column", [("output", "id"), ("error", "id"), ("id", "doc_id"),
                                              ("prompt_safety", "id")])
def test_keep_column_named_like_an_output_column_refused(tiny_lm, tmp_path, column, id_column):
    with pytest.raises(ValueError, match=f"keep column '{column}' has the name of an output column"):
        TextJob(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=None, id_column=id_column,
                keep_columns=[column])


def test_temporary_files_match_no_parquet_glob_and_the_next_attempt_removes_them(tiny_lm, tmp_path, monkeypatch):
    write(tmp_path / "in" / "a.parquet", list(range(6)))
    out = tmp_path / "out"

    class Killed(BaseException):
        pass

    replace = os.replace

    def dies_before_rename(src, dst):
        # A writer killed between write and rename: the part's bytes are in the temporary file only.
        if dst.endswith("part-00001.parquet"):
            monkeypatch.setattr(os.path, "exists", lambda p: False)  # and no cleanup ran
            raise Killed("killed between write and rename")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_before_rename)
    with pytest.raises(Killed):
        job(tiny_lm, tmp_path, chunk_rows=2).run()
    monkeypatch.undo()
    leftovers = [n for n in os.listdir(out) if n.startswith("_tmp-")]
    assert leftovers and all(n.endswith(".tmp") for n in leftovers)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["part-00000.parquet"]

    job(tiny_lm, tmp_path, chunk_rows=2).run()
    assert not [n for n in os.listdir(out) if n.startswith("_tmp-")]
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]


def test_blocklist_terms_stay_out_of_the_manifest(tiny_lm, tmp_path):
    write(tmp_path / "in" / "a.parquet", [0, 1])
    terms = tmp_path / "terms.txt"
    terms.write_text("# private\nzebracorn\nsecret-project-name\n")
    manifest = job(tiny_lm, tmp_path, safety_checkers=[f"blocklist:{terms}"]).run()
    written = (tmp_path / "out" / "_manifest.json").read_text()
    for text in (json.dumps(manifest), written):
        assert "zebracorn" not in text and "secret-project-name" not in text
    [checker] = manifest["safety"]
    assert checker == {"checker": "blocklist", "category": "blocklist", "terms": 2, "source": str(terms)}
