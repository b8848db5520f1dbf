"""A real Airflow deployment on loopback, started and stopped by the tests: PostgreSQL (metadata DB and
Celery results), Redis (Celery broker), the API server, scheduler, DAG processor and two Celery workers
serving queue ``gpu``, each in its own process group with its log in ``<root>/logs``.

The DAGs are the repository's ``dags/``, pointed by ``HFLLM_*`` variables at a demo folder holding
a tiny offline model and a prompts Parquet file. Every process gets the same environment (``env``):
a Celery worker parses the DAG file again, and must see the queue, pool and chunk size the DAG
processor saw.

To poke at one by hand: ``.venv/bin/python -m tests.e2e.cluster DIR`` starts it, prints the URL and
the admin password, and stops it on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]
DEPS = "scripts/system_deps.sh"
DAG_IDS = ("hfllm_text_daily", "hfllm_text_sharded", "hfllm_text_ui")
WORKERS = {"worker-a": "gpu,default", "worker-b": "gpu"}  # plan/merge run on the default queue


def worker_hostname() -> str:
    """``[core] hostname_callable`` of the workers: both run on one machine, so each reports the name it
    was started with and a task instance's ``hostname`` says which worker ran it."""
    return os.environ["HFLLM_E2E_WORKER"]


class ClusterError(AssertionError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binaries() -> dict[str, Path]:
    """PostgreSQL's and Redis's server binaries; a clear failure (not a skip) when they are missing."""
    pg = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    redis = shutil.which("redis-server")
    if not pg or not redis:
        raise ClusterError(f"PostgreSQL (initdb under /usr/lib/postgresql) or redis-server missing: run {DEPS} "
                           "(make test does), or set HFLLM_SKIP_E2E=1 to skip the end-to-end tests")
    return {"pg": pg[-1].parent, "redis": Path(redis)}


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return f"<{e}>"
    return "\n".join(text[-lines:])


class Cluster:
    """Start with :meth:`start`, always :meth:`stop` (a ``finally``). Attributes for tests: ``base_url``,
    ``user`` / ``password`` (SimpleAuthManager admin), ``env`` (what every Airflow process got),
    ``dags`` (folder), ``demo`` (inputs and the tiny model), ``log_dir`` (process logs) and
    ``task_log_dir`` (Airflow task logs)."""

    user = "admin"
    queue = "gpu"
    workers = WORKERS

    def __init__(self, root: Path, chunk_rows: int = 6, max_new_tokens: int = 8, input_rows: int = 24):
        self.root = Path(root)
        self.home = self.root / "airflow"
        self.log_dir = self.root / "logs"
        self.task_log_dir = self.root / "task-logs"
        self.demo = self.root / "demo"
        self.dags = ROOT / "dags"
        self.model = self.demo / "models" / "tiny-chat"
        self.chunk_rows, self.max_new_tokens, self.input_rows = chunk_rows, max_new_tokens, input_rows
        self.password = secrets.token_urlsafe(12)
        self.procs: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}
        self.base_url = ""
        self._pg_dir: Path | None = None
        self._token: str | None = None

    # ---- lifecycle

    def start(self, timeout: float = 240) -> "Cluster":
        deadline = time.monotonic() + timeout
        bins = binaries()
        for d in (self.home, self.log_dir, self.task_log_dir, self.demo):
            d.mkdir(parents=True, exist_ok=True)
        # The model is built in the background: torch's import takes as long as Postgres's start.
        demo = self._spawn("demo", [sys.executable, "-c", _DEMO_SCRIPT, str(self.demo), str(self.model),
                                    str(self.input_rows)],
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        pg_port, redis_port, api_port = free_port(), free_port(), free_port()
        self._start_postgres(bins["pg"], pg_port, deadline)
        self._spawn("redis", [str(bins["redis"]), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(self.root)])
        self.base_url = f"http://127.0.0.1:{api_port}"
        self.env = self._airflow_env(pg_port, redis_port, api_port)
        (self.home / "passwords.json").write_text(json.dumps({self.user: self.password}))
        self._wait("redis answers PING", lambda: _redis_ping(redis_port), deadline)
        self._check("airflow db migrate", [sys.executable, "-m", "airflow", "db", "migrate"], deadline)
        self._wait("the demo model and input", lambda: demo.poll() is not None, deadline)
        if demo.returncode:
            raise ClusterError(f"building the demo folder failed:\n{tail(self.log_dir / 'demo.log')}")

        airflow = [sys.executable, "-m", "airflow"]
        self._spawn("api-server", [*airflow, "api-server", "-H", "127.0.0.1", "-p", str(api_port), "-w", "1"],
                    env=self.env)
        self._spawn("scheduler", [*airflow, "scheduler", "--skip-serve-logs"], env=self.env)
        self._spawn("dag-processor", [*airflow, "dag-processor"], env=self.env)
        for name, queues in self.workers.items():
            self._spawn(name, [*airflow, "celery", "worker", "-q", queues, "-c", "1", "-H", f"{name}@%h",
                               "--skip-serve-logs", "--without-mingle", "--without-gossip"],
                        env={**self.env, "HFLLM_E2E_WORKER": name,
                             "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.e2e.cluster.worker_hostname"})
        self._wait("the API server's health endpoint", self._healthy, deadline)
        for name in self.workers:
            self._wait(f"Celery {name} ready", lambda n=name: " ready." in _read(self.log_dir / f"{n}.log"), deadline)
        self.wait_dags(*DAG_IDS, deadline=deadline)
        # As a GPU deployment would: a pool with one slot per GPU worker.
        self.rest("POST", "/api/v2/pools", {"name": self.queue, "slots": len(self.workers)}, expect=(201, 409))
        return self

    def stop(self) -> None:
        """TERM every process group (Postgres last, and with its fast-shutdown INT), KILL what is left."""
        airflow = [p for n, p in self.procs.items() if n not in ("postgres", "redis")]
        for group, grace in ((airflow, 15), ([self.procs.get("redis")], 5), ([self.procs.get("postgres")], 10)):
            group = [p for p in group if p is not None]
            for p in group:
                _signal_group(p, signal.SIGINT if p is self.procs.get("postgres") else signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and any(p.poll() is None for p in group):
                time.sleep(0.2)
            for p in group:
                _signal_group(p, signal.SIGKILL)  # also children left behind by a leader that exited
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for p in self.procs.values():
            if p.stdout:
                p.stdout.close()
        if self._pg_dir:
            shutil.rmtree(self._pg_dir, ignore_errors=True)

    # ---- REST

    def token(self, refresh: bool = False) -> str:
        import httpx

        if self._token is None or refresh:
            r = httpx.post(f"{self.base_url}/auth/token", json={"username": self.user, "password": self.password},
                           timeout=30)
            if r.status_code != 201:
                raise ClusterError(f"POST /auth/token -> {r.status_code}: {r.text[:500]}")
            self._token = r.json()["access_token"]
        return self._token

    def rest(self, method: str, path: str, json: Any = None, params: dict | None = None,
             expect: tuple[int, ...] = (200, 201, 204)) -> Any:
        """One call to the REST API as the admin user; the JSON answer (None when empty)."""
        import httpx

        for attempt in (0, 1):
            r = httpx.request(method, self.base_url + path, json=json, params=params, timeout=60,
                              headers={"Authorization": f"Bearer {self.token(refresh=attempt == 1)}"})
            if r.status_code != 401:
                break
        if r.status_code not in expect:
            raise ClusterError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None

    def wait_dags(self, *dag_ids: str, deadline: float | None = None) -> None:
        """Until the DAG processor has stored each DAG; import errors fail at once, with the traceback."""
        deadline = deadline or time.monotonic() + 120

        def parsed():
            errors = self.rest("GET", "/api/v2/importErrors")
            if errors["total_entries"]:
                raise ClusterError("import errors: " + json.dumps(errors["import_errors"], indent=1)[:4000])
            found = self.rest("GET", "/api/v2/dags", params={"dag_id_pattern": "hfllm_%", "limit": 100})
            return set(dag_ids) <= {d["dag_id"] for d in found["dags"]}

        self._wait(f"DAGs {', '.join(dag_ids)} parsed", parsed, deadline)

    def trigger(self, dag_id: str, run_id: str, logical_date: str, conf: dict | None = None) -> dict:
        self.unpause(dag_id)
        return self.rest("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                         {"dag_run_id": run_id, "logical_date": logical_date, "conf": conf or {}})

    def unpause(self, dag_id: str) -> None:
        self.rest("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 240) -> dict:
        """The run once it ends; a failed run or a timeout raises with its task states and logs."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"
        runs: list[dict] = []
        done = lambda: runs.append(self.rest("GET", path)) or runs[-1]["state"] in ("success", "failed")  # noqa: E731
        self._wait(f"{dag_id} run {run_id}", done, time.monotonic() + timeout, lambda: self.run_report(dag_id, run_id))
        if runs[-1]["state"] != "success":
            raise ClusterError(f"{dag_id} {run_id} ended {runs[-1]['state']}\n{self.run_report(dag_id, run_id)}")
        return runs[-1]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.rest("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                         params={"limit": 1000})["task_instances"]

    # ---- diagnostics

    def run_report(self, dag_id: str, run_id: str) -> str:
        """Task states, hosts and the tail of every task log of one run."""
        out = []
        try:
            for ti in self.task_instances(dag_id, run_id):
                out.append(f"{ti['task_id']}[{ti['map_index']}] {ti['state']} try={ti['try_number']} "
                           f"host={ti['hostname']} queue={ti['queue']}")
        except Exception as e:  # noqa: BLE001 - the report must not hide the original failure
            out.append(f"<task instances: {e}>")
        for log in sorted((self.task_log_dir / f"dag_id={dag_id}" / f"run_id={run_id}").rglob("*.log")):
            out.append(f"--- {log.relative_to(self.task_log_dir)}\n{tail(log, 25)}")
        return "\n".join(out) + "\n" + self.report(lines=25)

    def report(self, lines: int = 40) -> str:
        """The tail of each process's log, for a failure message."""
        return "\n".join(f"===== {name} (exit {p.poll()})\n{tail(self.log_dir / f'{name}.log', lines)}"
                         for name, p in self.procs.items())

    # ---- internals

    def _airflow_env(self, pg_port: int, redis_port: int, api_port: int) -> dict[str, str]:
        from cryptography.fernet import Fernet

        db = f"postgresql+psycopg2://airflow:airflow@127.0.0.1:{pg_port}/airflow"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "HFLLM_"))}
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            # Tasks reach the API server here; the default assumes port 8080.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.home / "passwords.json"),
            "AIRFLOW__API__BASE_URL": self.base_url,
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            # One secret for every process that signs or checks task tokens.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": db,
            "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{db}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
            # A worker holds no queued task while it runs one: the next shard goes to the idle worker.
            "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.task_log_dir),
            "PYTHONPATH": str(ROOT),
            # Two cores: torch threads in parallel tasks would fight (see tests/conftest.py).
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HFLLM_DEMO_DIR": str(self.demo),
            "HFLLM_MODEL": str(self.model),
            "HFLLM_CHUNK_ROWS": str(self.chunk_rows),
            "HFLLM_MAX_NEW_TOKENS": str(self.max_new_tokens),
            "HFLLM_GPU_QUEUE": self.queue,
            "HFLLM_GPU_POOL": self.queue,
            # Not the 4 the sharded test asks for in its run conf: the conf must be what counts.
            "HFLLM_SHARDS": "2",
        })
        return env

    def _start_postgres(self, bin_dir: Path, port: int, deadline: float) -> None:
        # initdb refuses root: the server runs as "postgres", in a folder that user can reach (pytest's
        # tmp folders are private to root).
        self._pg_dir = Path(tempfile.mkdtemp(prefix="hfllm-pg-"))
        data, sock = self._pg_dir / "data", self._pg_dir / "sock"
        sock.mkdir()
        as_pg: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for p in (self._pg_dir, sock):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            as_pg = ["runuser", "-u", "postgres", "--"]
        self._check("initdb", [*as_pg, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                               "-E", "UTF8", "--locale=C", "-N"], deadline, cwd=self._pg_dir)
        # Durability is worthless for a test database; Airflow's components hold many connections.
        self._spawn("postgres", [*as_pg, str(bin_dir / "postgres"), "-D", str(data), "-k", str(sock),
                                 "-h", "127.0.0.1", "-p", str(port), "-c", "fsync=off", "-c", "synchronous_commit=off",
                                 "-c", "full_page_writes=off", "-c", "max_connections=300"], cwd=self._pg_dir)
        isready = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
        self._wait("PostgreSQL accepting connections", lambda: subprocess.run(isready).returncode == 0, deadline)
        self._check("create the airflow role and database",
                    [str(bin_dir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-v",
                     "ON_ERROR_STOP=1", "-c", "CREATE ROLE airflow LOGIN PASSWORD 'airflow'",
                     "-c", "CREATE DATABASE airflow OWNER airflow"], deadline)

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        # Its own session, so stop() can signal the process with every child it forked.
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=cwd or self.root, start_new_session=True)
        log.close()
        return self.procs[name]

    def _check(self, what: str, cmd: list[str], deadline: float, cwd: Path | None = None) -> None:
        log = self.log_dir / (what.replace(" ", "-") + ".log")
        with open(log, "ab") as out:
            try:
                done = subprocess.run(cmd, env=self.env or None, stdout=out, stderr=subprocess.STDOUT, cwd=cwd or self.root,
                                      stdin=subprocess.DEVNULL, timeout=max(1.0, deadline - time.monotonic()),
                                      start_new_session=True)
            except subprocess.TimeoutExpired:
                raise ClusterError(f"{what}: timed out\n{tail(log)}") from None
        if done.returncode:
            raise ClusterError(f"{what}: exit {done.returncode}\n{tail(log)}")

    def _healthy(self) -> bool:
        import httpx

        try:
            health = httpx.get(f"{self.base_url}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all(health.get(k, {}).get("status") == "healthy" for k in ("metadatabase", "scheduler", "dag_processor"))

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float,
              details: Callable[[], str] | None = None) -> None:
        while True:
            dead = [n for n, p in self.procs.items() if n != "demo" and p.poll() is not None]
            if dead:
                raise ClusterError(f"waiting for {what}: {', '.join(dead)} exited\n{self.report()}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out waiting for {what}\n{details() if details else self.report()}")
            time.sleep(1)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


# Run in a subprocess (torch is imported there, not in the test process): the tiny model and the
# sharded / UI DAGs' default input.
_DEMO_SCRIPT = """
import sys
from pathlib import Path
from airflow_hfllm.testing.models import make_tiny_model
from tests.conftest import write_prompts
demo, model, rows = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
make_tiny_model(model, "causal-lm")
write_prompts(demo / "input" / "prompts.parquet", rows)
"""


if __name__ == "__main__":
    c = Cluster(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="hfllm-cluster-")))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the finally below stops the cluster
    try:
        c.start()
        print(f"{c.base_url}  user {c.user}  password {c.password}  logs {c.log_dir}", flush=True)
        while all(p.poll() is None for n, p in c.procs.items() if n != "demo"):
            time.sleep(2)
        print("a process exited:\n" + c.report())
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
