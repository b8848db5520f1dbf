"""Prompt templates (row and template variables in one render, what they read, up-front checks) and
the messages column's type check."""

import datetime

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import airflow_hfllm.engine.loading as loading
from airflow_hfllm.engine.prompts import PromptBuilder, RowError, describe_value
from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.io.dataset import InputError
from airflow_hfllm.run.job import TextJob

GREEDY = GenerationParams(max_new_tokens=4, do_sample=False)


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model starts loading: the checks under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(loading, "get_model", refuse)


def text_input(tmp_path, **columns) -> str:
    path = tmp_path / "in.parquet"
    pd.DataFrame({"id": [1, 2], **columns}).to_parquet(path, index=False)
    return str(path)


def text_job(tmp_path, **kw) -> TextJob:
    kw.setdefault("input", str(tmp_path / "in.parquet"))
    kw.setdefault("prompt_column", None)
    return TextJob(output=str(tmp_path / "out"), model=ModelSpec("no-such-model"), params=GREEDY, **kw)


def test_one_render_reads_row_and_template_variables():
    builder = PromptBuilder(prompt_column=None, prompt_template="{{ ds }} {{ params.tone }}: {{ row.text | upper }}",
                            template_context={"ds": "2026-11-21", "params": {"tone": "dry"}, "ti": object()})
    assert builder.messages({"text": "hello"}) == [{"role": "user", "content": "2026-11-21 dry: HELLO"}]
    assert builder.messages({"text": "bye"})[0]["content"] == "2026-11-21 dry: BYE"
    # only what the template reads goes into each render and into the fingerprint
    assert builder.variables_read() == {"ds": "2026-11-21", "params.tone": "dry"}


def test_what_a_template_reads():
    reads = PromptBuilder(prompt_template=(
        "{{ row.text }} {{ row['my col'] }} {{ row.title[:5] | trim }} {% set x = row.body %}{{ x }}"
        "{% for i in range(2) %}{{ i }}{% endfor %} {{ macros.ds_add(ds, 1) }} {{ params['a'].b }}")).reads
    assert reads.columns == ("text", "my col", "title", "body")
    assert not reads.dynamic_row
    assert reads.variables == {"macros": {(("attr", "ds_add"),)}, "ds": {()},
                               "params": {(("item", "a"), ("attr", "b"))}}
    # columns known only per row
    for template in ("{{ row[name] }}", "{{ row.get('x') }}", "{% for k in row %}{{ k }}{% endfor %}", "{{ row }}"):
        assert PromptBuilder(prompt_template=template).reads.dynamic_row, template
    # row['items'] is a column; row.items is the dict's method
    assert PromptBuilder(prompt_template="{{ row['items'] }}").reads.columns == ("items",)


def test_fingerprint_names_functions_without_their_address():
    def ds_add(ds, days):
        return ds

    first = describe_value(ds_add)
    assert "0x" not in first and first.endswith("ds_add>")
    assert describe_value({"when": datetime.date(2026, 11, 21), "n": [1, "a"]}) == {"when": "2026-11-21", "n": [1, "a"]}
    # a method of a date renders from that date: {{ logical_date.strftime('%Y') }}
    assert describe_value(datetime.date(2026, 1, 1).strftime) != describe_value(datetime.date(2027, 1, 1).strftime)


def test_template_variable_values_change_the_fingerprint(tmp_path):
    text_input(tmp_path, text=["a", "b"])
    template = "{{ ds }}: {{ row.text }}"

    def fp(context, template=template):
        job = text_job(tmp_path, prompt_template=template, template_context=context)
        return job._fingerprint(job.open_input(), 0)

    day1 = fp({"ds": "2026-11-20", "run_id": "r1"})
    assert fp({"ds": "2026-11-21", "run_id": "r1"}) != day1
    assert fp({"ds": "2026-11-20", "run_id": "r2"}) == day1  # not read by the template
    # a template that reads no variable keeps the fingerprint it always had
    plain = text_job(tmp_path, prompt_template="{{ row.text }}", template_context={"ds": "x"})
    assert plain.prompts.fingerprint() == [None, "{{ row.text }}"]


def test_missing_column_fails_up_front_naming_column_and_file(tmp_path, no_model):
    path = text_input(tmp_path, text=["a", "b"])
    with pytest.raises(InputError, match=r"in\.parquet: prompt_template reads column 'missing', which the input "
                                         r"does not have \(columns: id, text\)"):
        text_job(tmp_path, prompt_template="Say {{ row.text }} and {{ row.missing | upper }}").run()
    assert path and not (tmp_path / "out").exists()


def test_dynamic_column_missing_fails_on_the_first_row_up_front(tmp_path, no_model):
    text_input(tmp_path, text=["a", "b"])
    with pytest.raises(InputError, match=r"in\.parquet: prompt_template fails on the first row: .*'nope'"):
        text_job(tmp_path, prompt_template="{{ row[col] }}", template_context={"col": "nope"}).run()


def test_unknown_variable_and_bad_syntax_fail_up_front(tmp_path, no_model):
    text_input(tmp_path, text=["a", "b"])
    with pytest.raises(InputError, match=r"prompt_template reads ds, not defined here: it can read the input row"):
        text_job(tmp_path, prompt_template="{{ ds }} {{ row.text }}").run()
    with pytest.raises(InputError, match="prompt_template is not valid Jinja"):
        text_job(tmp_path, prompt_template="{{ row.text }").run()


def test_other_template_errors_stay_row_errors():
    builder = PromptBuilder(prompt_column=None, prompt_template="{{ row.text + 1 }}")
    with pytest.raises(RowError, match="prompt_template failed"):
        builder.messages({"text": "a"})


@pytest.mark.parametrize("messages, problem", [
    (["hello", "there"], "large_string"),
    ([[{"role": 1, "content": "hi"}], [{"role": 2, "content": "yo"}]], "whose 'role' is int64"),
    ([[{"role": "user", "text": "hi"}], [{"role": "user", "text": "yo"}]], "without a 'content' field"),
])
def test_messages_column_type_is_checked_up_front(tmp_path, no_model, messages, problem):
    table = pa.table({"id": [1, 2], "messages": messages})
    if problem == "large_string":
        table = table.cast(pa.schema([("id", pa.int64()), ("messages", pa.large_string())]))
    pq.write_table(table, tmp_path / "chat.parquet")
    expected = rf"chat\.parquet: column 'messages' is .*{problem}.*expected a list of structs"
    with pytest.raises(InputError, match=expected):
        text_job(tmp_path, input=str(tmp_path / "chat.parquet"), messages_column="messages").run()


def test_positive_sizes_and_output_that_is_a_file(tmp_path, no_model):
    text_input(tmp_path, prompt=["a", "b"])
    for name in ("batch_size", "max_prompt_tokens"):
        for bad in (0, -1):
            with pytest.raises(ValueError, match=f"{name} must be >= 1"):
                text_job(tmp_path, prompt_column="prompt", **{name: bad})
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(InputError, match=r"output .*out is a file, not a folder"):
        text_job(tmp_path, prompt_column="prompt").run()
    assert (tmp_path / "out").read_text() == "not a folder"
