"""One Airflow deployment on loopback (``cluster.py``) shared by every end-to-end test of the session:
starting it costs more than most tests."""

import os

import pytest

from tests.e2e.cluster import Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.environ.get("HFLLM_SKIP_E2E") == "1":
        pytest.skip("HFLLM_SKIP_E2E=1")
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's report carries the tail of every cluster process's log: CI shows why."""
    report = (yield).get_result()
    c = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and isinstance(c, Cluster) and c.procs:
        report.sections.append(("cluster process logs", c.report()))
