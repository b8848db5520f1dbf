"""The output folder's data contract, checked with readers nobody here wrote.

One folder is built through the real job from an input made to be awkward: two files whose ``id`` is
int32 in one and int64 in the other, a keep column all-null in one file and string in the other, a
chunk whose prompts are all blocked, chunks with none blocked, a chunk whose prompts are all null
(its rows end in ``error``), and a temporary file left by a part write killed between write and
rename, and ``logprobs=2`` for the deepest nested column. Then each reader reads it exactly as the README
says, and must see every input id once, the nested safety verdicts and log-probabilities, and the keep
column:

- ``pandas.read_parquet(folder)``
- ``pyarrow.dataset.dataset(folder, format="parquet")``
- DuckDB ``read_parquet('folder/part-*.parquet')``
- Polars ``read_parquet('folder/part-*.parquet')``
- Spark ``spark.read.parquet(folder)`` (a local JVM; needs a Java runtime: ``scripts/system_deps.sh``)

Nothing here skips: a missing reader or Java fails with the command that installs it.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from airflow_hfllm.config import GenerationParams, ModelSpec
from airflow_hfllm.run.job import TextJob

BLOCKED_TERM = "zanzibarquux"
CHUNK_ROWS = 4
JRE_INSTALL = "scripts/system_deps.sh (or: apt-get install -y --no-install-recommends openjdk-17-jre-headless)"
# Java releases the pinned pyspark (3.5, see pyproject.toml) runs on.
SPARK_JAVA = (11, 17, 21)

# Input rows, in file order; chunk k = rows [4k, 4k + 4).
#   a.parquet  id int32, topic all null:   chunk 0 all blocked, chunk 1 none blocked
#   b.parquet  id int64, topic string:     chunk 2 all prompts null, chunk 3 none blocked, chunk 4 all blocked
A_IDS = [7 * i + 3 for i in range(8)]
B_IDS = [7 * i + 3 for i in range(8, 20)]
ALL_IDS = sorted(A_IDS + B_IDS)
BLOCKED_IDS = set(A_IDS[:4] + B_IDS[8:12])
NULL_PROMPT_IDS = set(B_IDS[:4])
CLEAN_IDS = set(ALL_IDS) - BLOCKED_IDS - NULL_PROMPT_IDS

BLOCKED_VERDICT = {"checker": "blocklist", "safe": False, "score": 1.0, "categories": ["blocklist"]}
SAFE_VERDICT = {"checker": "blocklist", "safe": True, "score": 0.0, "categories": []}


def _prompt(i: int) -> str:
    words = ("river", "engine", "market", "garden", "signal", "yellow", "quiet", "planet")
    return " ".join(words[(i + k) % len(words)] for k in range(3 + i % 5))


def _write_input(folder) -> None:
    folder.mkdir(parents=True)
    a_prompts = [f"{_prompt(i)} {BLOCKED_TERM}" if i in BLOCKED_IDS else _prompt(i) for i in A_IDS]
    pq.write_table(pa.table({
        "id": pa.array(A_IDS, pa.int32()),
        "prompt": pa.array(a_prompts, pa.string()),
        "topic": pa.nulls(len(A_IDS)),  # all null: Arrow's null type
    }), folder / "a.parquet")
    b_prompts = [None if i in NULL_PROMPT_IDS else f"{BLOCKED_TERM} {_prompt(i)}" if i in BLOCKED_IDS else _prompt(i)
                 for i in B_IDS]
    pq.write_table(pa.table({
        "id": pa.array(B_IDS, pa.int64()),
        "prompt": pa.array(b_prompts, pa.string()),
        "topic": pa.array([f"topic-{i}" for i in B_IDS], pa.string()),
    }), folder / "b.parquet")


class Killed(BaseException):
    """A kill between a part's write and its rename (BaseException: no ``except Exception`` stops it)."""


@pytest.fixture(scope="module")
def folder(tiny_lm, tmp_path_factory):
    """The output folder: a first attempt killed while renaming part 1 into place, then a rerun to
    completion, then the killed write's temporary put back as the kill left it (the writer's own
    cleanup ran here, in-process; a real kill skips it, and a later attempt's cleanup is not something
    a reader can wait for)."""
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path_factory.mktemp("readers")
    _write_input(root / "in")
    (root / "terms.txt").write_text(f"# blocked for the reader test\n{BLOCKED_TERM}\n")
    out = root / "out"

    def job():
        return TextJob(input=str(root / "in"), output=str(out), model=ModelSpec(tiny_lm),
                       params=GenerationParams(max_new_tokens=4, do_sample=False, logprobs=2), chunk_rows=CHUNK_ROWS,
                       keep_columns=["topic"], safety_checkers=[f"blocklist:{root / 'terms.txt'}"],
                       max_error_rate=1.0)

    # The kill: part 1 written under its temporary name, then the process dies before the rename.
    # Whichever call the writer renames with (os.replace, os.rename, fsspec's mv) is intercepted.
    killed: dict = {}

    def dies_renaming_part_1(src, dst) -> None:
        if not killed and os.path.realpath(str(dst)) == os.path.realpath(out / "part-00001.parquet"):
            killed["name"] = os.path.basename(str(src))
            shutil.copyfile(src, root / "killed-temporary")
            raise Killed()

    def dying(real):
        def call(src, dst, *args, **kwargs):
            dies_renaming_part_1(src, dst)
            return real(src, dst, *args, **kwargs)
        return call

    def dying_method(real):
        def call(self, src, dst, *args, **kwargs):
            dies_renaming_part_1(src, dst)
            return real(self, src, dst, *args, **kwargs)
        return call

    with pytest.MonkeyPatch.context() as mp:
        for module, name in ((os, "replace"), (os, "rename"), (shutil, "move")):
            mp.setattr(module, name, dying(getattr(module, name)))
        for name in ("mv", "rename"):
            mp.setattr(LocalFileSystem, name, dying_method(getattr(LocalFileSystem, name)))
        with pytest.raises(Killed):
            job().run()
    assert killed, ("part-00001.parquet was never renamed into place through os.replace, os.rename, "
                    "shutil.move or fsspec's mv: the writer changed how it commits parts; update this kill")
    assert (out / "part-00000.parquet").exists() and not (out / "part-00001.parquet").exists()

    manifest = job().run()
    assert manifest["counts"]["rows"] == len(ALL_IDS)
    assert manifest["counts"]["unsafe_prompt"] == len(BLOCKED_IDS)
    assert manifest["counts"]["errors"] == len(NULL_PROMPT_IDS)
    assert manifest["parts"] == [f"part-{k:05d}.parquet" for k in range(5)]

    shutil.copyfile(root / "killed-temporary", out / killed["name"])
    return out


# -- what every reader must see ---------------------------------------------------------------------

def _plain(value):
    """numpy and pandas values as plain Python (lists, dicts, ints, None)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN: pandas' null
        return None
    if value is not None and type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def _check(rows: list[dict]) -> None:
    rows = [_plain(r) for r in rows]
    assert rows, "the reader returned no rows"
    for column in ("id", "finish_reason", "prompt_safety", "output_safety", "error", "topic", "top_logprobs"):
        assert column in rows[0], f"column {column!r} missing; the reader saw {sorted(rows[0])}"
    ids = [r["id"] for r in rows]
    assert sorted(ids) == ALL_IDS, (
        f"ids not exactly the input's: missing {sorted(set(ALL_IDS) - set(ids))}, "
        f"unexpected {sorted(set(ids) - set(ALL_IDS))}, {len(ids)} rows for {len(ALL_IDS)} ids")
    by_id = {r["id"]: r for r in rows}
    for i in BLOCKED_IDS:
        r = by_id[i]
        assert (r["finish_reason"], r["prompt_safe"]) == ("unsafe_prompt", False), r
        assert r["prompt_safety"] == [BLOCKED_VERDICT], r
        assert r["output_safety"] == [], r  # not judged: an empty list, not null
    for i in CLEAN_IDS:
        r = by_id[i]
        assert r["finish_reason"] in ("stop", "length") and r["prompt_safe"] is True, r
        assert r["prompt_safety"] == [SAFE_VERDICT], r
        assert r["output_safety"] == [SAFE_VERDICT], r
        tokens = r["top_logprobs"]  # list<struct{id, token, logprob, top: list<struct{id, token, logprob}>}>
        assert len(tokens) == r["output_tokens"] > 0, r
        for t in tokens:
            assert sorted(t) == ["id", "logprob", "token", "top"] and isinstance(t["token"], str), r
            assert [a["id"] for a in t["top"]][:1] == [t["id"]] and len(t["top"]) == 2, r  # greedy
        assert abs(r["output_logprob"] - sum(t["logprob"] for t in tokens)) < 1e-9, r
    for i in BLOCKED_IDS | NULL_PROMPT_IDS:  # not generated
        assert by_id[i]["top_logprobs"] is None and by_id[i]["output_logprob"] is None, by_id[i]
    for i in NULL_PROMPT_IDS:
        r = by_id[i]
        assert (r["finish_reason"], r["error"]) == ("error", "prompt is null"), r
        assert r["prompt_safety"] == [] and r["output_safety"] == [], r
    assert {i: by_id[i]["topic"] for i in ALL_IDS} == {
        **{i: None for i in A_IDS}, **{i: f"topic-{i}" for i in B_IDS}}


def _require(module: str):
    try:
        return __import__(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not installed ({exc}): pip install -e '.[dev]'")


# -- the readers, each called as the README says ------------------------------------------------------

def test_pandas(folder):
    pd = _require("pandas")
    _check(pd.read_parquet(folder).to_dict("records"))


def test_pyarrow_dataset(folder):
    import pyarrow.dataset as ds

    _check(ds.dataset(folder, format="parquet").to_table().to_pylist())


def test_duckdb(folder):
    duckdb = _require("duckdb")
    result = duckdb.sql(f"select * from read_parquet('{folder}/part-*.parquet')")
    columns = result.columns
    _check([dict(zip(columns, row)) for row in result.fetchall()])


def test_polars(folder):
    pl = _require("polars")
    _check(pl.read_parquet(f"{folder}/part-*.parquet").to_dicts())


def test_spark(folder, spark):
    _check([row.asDict(recursive=True) for row in spark.read.parquet(str(folder)).collect()])


# -- the folder itself ----------------------------------------------------------------------------------

def test_parts_share_one_arrow_schema(folder):
    """One schema for all parts, promoted over the input files: id int64 (int32 + int64), topic string
    (all-null + string). Readers that take the schema of one file (Spark, DuckDB, pyarrow.dataset)
    depend on it."""
    parts = sorted(folder.glob("part-*.parquet"))
    assert len(parts) == 5
    schemas = {p.name: pq.read_schema(p).remove_metadata() for p in parts}
    first = schemas[parts[0].name]
    differing = {name: str(s) for name, s in schemas.items() if not s.equals(first)}
    assert not differing, f"parts' schemas differ from {parts[0].name}'s:\n{first}\n" + "\n".join(
        f"--- {name}:\n{s}" for name, s in differing.items())
    assert first.field("id").type == pa.int64()
    assert first.field("topic").type == pa.string()


def test_temporaries_match_no_parquet_glob(folder):
    """The killed write's temporary: a name every reader skips, given the folder (``_`` first) or a
    glob (``part-*.parquet``, and ``*.parquet`` too)."""
    leftovers = [n for n in os.listdir(folder) if n.startswith("_tmp")]
    assert leftovers, "the killed write's temporary is not in the folder"
    for name in leftovers:
        assert not fnmatch.fnmatch(name, "part-*.parquet"), name
        assert not fnmatch.fnmatch(name, "*.parquet"), f"{name} matches *.parquet: a glob reader would read it"


# -- Spark ----------------------------------------------------------------------------------------------

def _java_major(java: str) -> int | None:
    try:
        shown = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', shown)
    if not found:
        return None
    major = int(found.group(1))
    return int(found.group(2)) if major == 1 else major  # "1.8.0" is Java 8


def java_home() -> str:
    """JAVA_HOME if set, else the first Java that Spark runs on: ``java`` on PATH, then those under
    /usr/lib/jvm. Fails (never skips) with the install command when there is none."""
    if os.environ.get("JAVA_HOME"):
        home = os.environ["JAVA_HOME"]
        if not os.access(os.path.join(home, "bin", "java"), os.X_OK):
            pytest.fail(f"JAVA_HOME={home} has no bin/java; unset it or install a Java runtime: {JRE_INSTALL}")
        return home
    candidates = []
    on_path = shutil.which("java")
    if on_path:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(on_path))))
    candidates += sorted(os.path.dirname(os.path.dirname(os.path.realpath(j)))
                         for j in glob.glob("/usr/lib/jvm/*/bin/java"))
    seen = {}
    for home in dict.fromkeys(candidates):
        seen[home] = _java_major(os.path.join(home, "bin", "java"))
        if seen[home] in SPARK_JAVA:
            return home
    if seen:
        pytest.fail(f"no Java that Spark 3.5 runs on ({', '.join(map(str, SPARK_JAVA))}); found "
                    f"{', '.join(f'{h} (Java {m})' for h, m in seen.items())}. Install one: {JRE_INSTALL}")
    pytest.fail(f"no Java runtime for Spark (no JAVA_HOME, no java on PATH, nothing in /usr/lib/jvm): {JRE_INSTALL}")


@pytest.fixture(scope="module")
def spark():
    home = java_home()
    _require("pyspark")
    from pyspark.sql import SparkSession

    env = {"JAVA_HOME": home, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        session = (
            SparkSession.builder.master("local[1]").appName("hfllm-readers")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "1")
            .config("spark.default.parallelism", "1")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.driver.memory", "512m")
            # a short-lived JVM: the C1 compiler alone and the serial collector start fastest
            .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
            .getOrCreate()
        )
    except Exception as exc:
        pytest.fail(f"Spark did not start with JAVA_HOME={home}: {exc}")
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        # The JVM outlives stop(); end it (it exits when its stdin closes) so the rest of the test run
        # has its memory back.
        from pyspark import SparkContext

        gateway = SparkContext._gateway
        if gateway is not None:
            gateway.shutdown()
            SparkContext._gateway = SparkContext._jvm = None
            proc = getattr(gateway, "proc", None)
            if proc is not None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
