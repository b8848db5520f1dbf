"""The Airflow 3 UI in a real browser (Debian's headless Chromium driven by Playwright) against the
loopback deployment: sign in, open ``hfllm_text_ui``, fill its Params form, trigger, and watch the run
succeed in the page; then check through the REST API and the output folder that the run used what the
form said. Screenshots land in ``test-artifacts/ui/`` (or ``$HFLLM_ARTIFACTS/ui``)."""

import json
import os
import shutil
import time
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pytest

from tests.e2e.cluster import DEPS, ROOT

pytestmark = pytest.mark.e2e

DAG = "hfllm_text_ui"
CHROMIUM = "/usr/bin/chromium"
# No GPU, no sandbox as root, and nothing that reaches out to the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS, TEMPERATURE = 5, 1.3  # both differ from the DAG's defaults (64, 0.7)


@pytest.fixture(scope="session")
def chromium():
    """Chromium and Playwright, checked before the deployment starts: missing, they fail the test with
    what to install (a skip would hide a broken CI)."""
    if os.environ.get("HFLLM_SKIP_E2E") == "1":
        pytest.skip("HFLLM_SKIP_E2E=1")
    if not (os.access(CHROMIUM, os.X_OK) and shutil.which("chromedriver")):
        pytest.fail(f"{CHROMIUM} or chromedriver missing: run {DEPS} (Debian packages chromium, chromium-driver; "
                    "make test does), or set HFLLM_SKIP_E2E=1 to skip the end-to-end tests", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright missing: pip install -e '.[dev]' (its driver ships in the wheel; the browser is "
                    "Debian's, never `playwright install`)", pytrace=False)
    return CHROMIUM


@pytest.fixture
def page(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            tmp_path / "chromium-profile", executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def artifacts(request):
    folder = Path(os.environ.get("HFLLM_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def shot(page, folder: Path, name: str, target=None) -> None:
    path = folder / f"{name}.png"
    (target or page).screenshot(path=str(path))
    print(f"screenshot: {path}")


def test_trigger_form_run_succeeds(chromium, cluster, page, artifacts):
    t0 = time.monotonic()
    # Sign in (SimpleAuthManager's page), landing on the DAG.
    page.goto(f"{cluster.base_url}/dags/{DAG}")
    page.get_by_label("Username").fill(cluster.user)
    page.get_by_label("Password").fill(cluster.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{DAG}")

    page.get_by_role("button", name="Trigger Dag").click()
    form = page.get_by_role("dialog")
    # Airflow names each Params field "element_<param>" (its text fields' labels are not tied to them).
    field = lambda name: form.locator(f'input[name="element_{name}"]')  # noqa: E731
    # Defaults come from the deployment's environment (HFLLM_MODEL, HFLLM_DEMO_DIR) via the DAG processor.
    assert field("model").input_value() == str(cluster.model)
    assert field("input").input_value() == str(cluster.demo / "input")
    field("max_new_tokens").fill(str(MAX_NEW_TOKENS))
    field("temperature").fill(str(TEMPERATURE))
    assert field("max_new_tokens").input_value() == str(MAX_NEW_TOKENS)
    shot(page, artifacts, "1-trigger-form", form)
    form.get_by_role("button", name="Trigger", exact=True).click()

    # The UI opens the new run's page; its header badge follows the run's state.
    page.wait_for_url(f"**/dags/{DAG}/runs/**")
    run_id = unquote(page.url.split("/runs/", 1)[1].split("/")[0].split("?")[0])
    badge = page.locator('[data-testid="header-card"] [data-testid="state-badge"]')
    deadline = time.monotonic() + 150
    while (state := badge.inner_text().strip().lower()) not in ("success", "failed"):
        assert time.monotonic() < deadline, f"run {run_id} still {state!r} in the UI\n{cluster.run_report(DAG, run_id)}"
        page.wait_for_timeout(1000)
    shot(page, artifacts, f"2-run-{state}")
    assert state == "success", cluster.run_report(DAG, run_id)
    task_state = page.locator('td[data-testid="table-cell-state"] [data-testid="state-badge"]')
    assert task_state.inner_text().strip() == "Success"

    # The API agrees, and the run carried the form's values as numbers (not strings) to the task.
    run = cluster.rest("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}")
    assert run["state"] == "success" and run["run_type"] == "manual" and run["triggered_by"] == "ui"
    assert run["conf"]["max_new_tokens"] == MAX_NEW_TOKENS and run["conf"]["temperature"] == TEMPERATURE
    assert run["conf"]["model"] == str(cluster.model)
    [ti] = cluster.task_instances(DAG, run_id)
    assert (ti["queue"], ti["pool"], ti["hostname"] in cluster.workers) == (cluster.queue, cluster.queue, True)
    manifest = cluster.rest("GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/generate/xcomEntries/"
                                   "return_value")["value"]
    assert manifest["generation"]["max_new_tokens"] == MAX_NEW_TOKENS
    assert manifest["generation"]["temperature"] == TEMPERATURE

    out = Path(manifest["output"])
    assert out.parent == cluster.demo / "output-ui" and out.name.startswith("run=")
    assert json.loads((out / "_manifest.json").read_text())["fingerprint"] == manifest["fingerprint"]
    rows = pd.read_parquet(out)
    expected = pd.read_parquet(cluster.demo / "input", columns=["id"]).id
    assert sorted(rows.id) == sorted(expected) and manifest["counts"]["rows"] == cluster.input_rows
    assert rows.output_tokens.between(1, MAX_NEW_TOKENS).all() and (rows.finish_reason != "error").all()
    print(f"UI run {run_id}: {time.monotonic() - t0:.1f} s from sign-in to checked output")
