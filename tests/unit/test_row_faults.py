"""One bad value ends its own row in ``error``; the job and the other rows go on."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from airflow_hfllm.config import ModelSpec
from airflow_hfllm.run.job import TextJob
from tests.conftest import prompt_text
from tests.unit.test_job import GREEDY, job, read


def write(path, **columns) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def invalid_utf8(values: list[bytes]) -> pa.Array:
    """A string array holding these bytes as they are (pyarrow checks nothing when built from buffers)."""
    offsets = [0]
    for v in values:
        offsets.append(offsets[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))])


def test_invalid_utf8_in_a_string_column_fails_its_row_only(tiny_lm, tmp_path):
    prompts = [prompt_text(i).encode() for i in range(4)]
    prompts[2] = b"caf\xe9 au lait"  # Latin-1, not UTF-8
    write(tmp_path / "in" / "a.parquet", id=list(range(4)), prompt=invalid_utf8(prompts))
    manifest = job(tiny_lm, tmp_path, max_error_rate=0.5).run()
    out = read(tmp_path)
    assert out.loc[2, "error"] == "column 'prompt' holds a string that is not valid UTF-8"
    assert out.drop(index=2).error.isna().all() and manifest["counts"]["errors"] == 1


def test_bad_max_new_tokens_values_fail_their_rows_and_null_or_nan_mean_the_default(tiny_lm, tmp_path):
    write(tmp_path / "in" / "a.parquet", id=list(range(5)), prompt=[prompt_text(i) for i in range(5)],
          max_new_tokens=["3", "many", None, "0", "2.5"])
    write(tmp_path / "in" / "b.parquet", id=[5, 6], prompt=[prompt_text(5), prompt_text(6)],
          max_new_tokens=pa.array([float("nan"), 2.0]))

    def run(name):  # one file at a time: a string and a double column don't unify across files
        return TextJob(input=str(tmp_path / "in" / f"{name}.parquet"), output=str(tmp_path / f"out-{name}"),
                       model=ModelSpec(tiny_lm), params=GREEDY, max_error_rate=1.0).run()

    run("a")
    out = pq.read_table(tmp_path / "out-a").sort_by("id").to_pylist()
    assert out[0]["error"] is None and out[0]["output_tokens"] <= 3
    assert out[1]["error"] == "max_new_tokens is 'many', not a whole number of at least 1"
    assert out[2]["error"] is None and out[2]["output_tokens"] <= 12
    assert out[3]["error"] == "max_new_tokens is '0', not a whole number of at least 1"
    assert out[4]["error"] == "max_new_tokens is '2.5', not a whole number of at least 1"
    run("b")
    out = pq.read_table(tmp_path / "out-b").sort_by("id").to_pylist()
    assert [r["error"] for r in out] == [None, None] and out[1]["output_tokens"] <= 2


def test_a_row_asking_for_more_tokens_than_the_context_holds_is_capped_by_it(tiny_lm, tmp_path):
    write(tmp_path / "in" / "a.parquet", id=[0, 1], prompt=[prompt_text(0), prompt_text(1)],
          max_new_tokens=[1_000_000, 2])
    # min_length keeps EOS away, so the first row runs until something stops it: the context's end.
    job(tiny_lm, tmp_path, max_prompt_tokens=200, params=GREEDY.replace(min_length=10**6)).run()
    out = read(tmp_path)
    context = 2048  # the tiny model's max_position_embeddings
    assert out.error.isna().all()
    assert out.loc[0, "prompt_tokens"] + out.loc[0, "output_tokens"] == context
    assert out.loc[0, "finish_reason"] == "length"
    assert out.loc[1, "output_tokens"] == 2


def test_messages_the_chat_template_refuses_fail_their_row_only(tiny_lm, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_lm, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m.role) }}{% endif %}{{ m.role }}: {{ m.content }}\n"
        "{% endfor %}assistant:")
    messages = [[{"role": "user", "content": prompt_text(i)}] for i in range(3)]
    messages[1] = [{"role": "tool", "content": "42"}]
    write(tmp_path / "in" / "a.parquet", id=[0, 1, 2], messages=messages)
    job(str(model), tmp_path, prompt_column=None, messages_column="messages", max_error_rate=0.5).run()
    out = read(tmp_path)
    assert out.loc[1, "error"] == "the model's chat template refused the messages: unknown role tool"
    assert out.drop(index=1).error.isna().all()
