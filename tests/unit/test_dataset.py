"""Reading input: deterministic chunks and clear up-front errors."""

import pandas as pd
import pytest

from airflow_hfllm.io.dataset import Dataset, InputError
from tests.conftest import write_prompts


def test_chunks_span_files_in_sorted_order(tmp_path):
    write_prompts(tmp_path / "in" / "b.parquet", 7, start=100)
    write_prompts(tmp_path / "in" / "a.parquet", 5, start=0)
    write_prompts(tmp_path / "in" / "_skipped.parquet", 3, start=900)  # reader contract: _ files are not data
    (tmp_path / "in" / ".hidden").write_text("not parquet")
    ds = Dataset.open(str(tmp_path / "in"), required=["id", "prompt"])
    assert [f.path.rsplit("/", 1)[-1] for f in ds.files] == ["a.parquet", "b.parquet"]
    chunks = list(ds.chunks(4, ["id"]))
    assert [k for k, _ in chunks] == [0, 1, 2]
    ids = [t.column("id").to_pylist() for _, t in chunks]
    assert ids == [[0, 1, 2, 3], [4, 100, 101, 102], [103, 104, 105, 106]]
    # only wanted chunks, the same rows
    assert [t.column("id").to_pylist() for _, t in ds.chunks(4, ["id"], wanted={2})] == [ids[2]]
    assert ds.num_chunks(4) == 3 and ds.rows == 12


def test_glob_and_single_file(tmp_path):
    write_prompts(tmp_path / "x1.parquet", 2)
    write_prompts(tmp_path / "x2.parquet", 2, start=2)
    assert Dataset.open(str(tmp_path / "x*.parquet")).rows == 4
    assert Dataset.open(str(tmp_path / "x2.parquet")).rows == 2
    assert Dataset.open(f"file://{tmp_path}/x1.parquet").rows == 2


def test_missing_input(tmp_path):
    with pytest.raises(InputError, match="input not found: .*nope"):
        Dataset.open(str(tmp_path / "nope"))


def test_not_parquet_names_the_file(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 2)
    (tmp_path / "in" / "b.parquet").write_text("id,prompt\n1,hello\n")
    with pytest.raises(InputError, match=r"b\.parquet: not a readable Parquet file"):
        Dataset.open(str(tmp_path / "in"))


def test_missing_column_names_file_and_column(tmp_path):
    pd.DataFrame({"id": [1], "text": ["hi"]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(InputError, match=r"a\.parquet: missing column 'prompt'.*columns: id, text"):
        Dataset.open(str(tmp_path / "a.parquet"), required=["id", "prompt"])
    pd.DataFrame({"key": [1], "prompt": ["hi"]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"b\.parquet: missing column 'id'"):
        Dataset.open(str(tmp_path / "b.parquet"), required=["id", "prompt"])


def test_duplicate_ids_are_listed_with_their_files(tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", 5)
    write_prompts(tmp_path / "in" / "b.parquet", 5, start=3)
    with pytest.raises(InputError) as err:
        Dataset.open(str(tmp_path / "in"), required=["id", "prompt"])
    message = str(err.value)
    assert "duplicate ids in column 'id'" in message
    assert "3 (" in message and "4 (" in message and "a.parquet" in message and "b.parquet" in message


def test_null_ids_and_wrong_types(tmp_path):
    pd.DataFrame({"id": ["a", None], "prompt": ["x", "y"]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(InputError, match=r"n\.parquet: column 'id' has 1 null ids \(first at row 1\)"):
        Dataset.open(str(tmp_path / "n.parquet"))
    pd.DataFrame({"id": [1, 2], "prompt": [1.5, 2.5]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(InputError, match=r"t\.parquet: column 'prompt' is double, expected string"):
        Dataset.open(str(tmp_path / "t.parquet"), required=["id", "prompt"], string_columns=["prompt"])
