"""The Airflow 3 UI in a real browser (Debian's headless Chromium driven by Playwright) against the
loopback deployment: sign in, open ``hfllm_text_ui``, fill its Params form, trigger, and watch the run
succeed in the page; then check through the REST API and the output folder that the run used what the
form said. And the ``huggingface`` connection form: its relabelled and hidden fields, and a saved
connection. Screenshots land in ``test-artifacts/ui/`` (or ``$HFLLM_ARTIFACTS/ui``).

The page changes under the test (React refetches each panel on its own schedule): every read of a
state that can still change polls to a deadline (Playwright's ``expect``), never reads once."""

import json
import os
import re
import shutil
import subprocess
import sys
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
RUN_TIMEOUT_S = 150  # the run, from the trigger to its end in the page
SETTLE_TIMEOUT_S = 60  # one panel catching up with another (each refetches on its own interval)


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


def sign_in(page, cluster, path: str) -> None:
    """SimpleAuthManager's sign-in page, landing on ``path``."""
    page.goto(f"{cluster.base_url}{path}")
    page.get_by_label("Username").fill(cluster.user)
    page.get_by_label("Password").fill(cluster.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**{path}")


def wait_until(check, what: str, details=None) -> None:
    """Run ``check`` (a Playwright ``expect`` with its own timeout, which polls until it holds); when it
    times out, fail with ``what``, what the page showed last and ``details()``."""
    try:
        check()
    except AssertionError as e:
        pytest.fail(f"{what}:\n{e}" + (f"\n{details()}" if details else ""), pytrace=False)


def test_trigger_form_run_succeeds(chromium, cluster, page, artifacts):
    from playwright.sync_api import expect

    t0 = time.monotonic()
    sign_in(page, cluster, f"/dags/{DAG}")

    page.get_by_role("button", name="Trigger Dag").click()
    form = page.get_by_role("dialog")
    # Airflow names each Params field "element_<param>" (its text fields' labels are not tied to them).
    field = lambda name: form.locator(f'input[name="element_{name}"]')  # noqa: E731
    # Defaults come from the deployment's environment (HFLLM_MODEL, HFLLM_DEMO_DIR) via the DAG processor;
    # the form fills them in once the DAG's params have loaded.
    expect(field("model")).to_have_value(str(cluster.model), timeout=SETTLE_TIMEOUT_S * 1000)
    expect(field("input")).to_have_value(str(cluster.demo / "input"))
    field("max_new_tokens").fill(str(MAX_NEW_TOKENS))
    field("temperature").fill(str(TEMPERATURE))
    expect(field("max_new_tokens")).to_have_value(str(MAX_NEW_TOKENS))
    expect(field("temperature")).to_have_value(str(TEMPERATURE))
    shot(page, artifacts, "1-trigger-form", form)
    form.get_by_role("button", name="Trigger", exact=True).click()

    # The UI opens the new run's page; its header badge follows the run's state.
    page.wait_for_url(f"**/dags/{DAG}/runs/**")
    run_id = unquote(page.url.split("/runs/", 1)[1].split("/")[0].split("?")[0])
    badge = page.locator('[data-testid="header-card"] [data-testid="state-badge"]')
    report = lambda: cluster.run_report(DAG, run_id)  # noqa: E731
    wait_until(lambda: expect(badge).to_have_text(re.compile(r"^\s*(success|failed)\s*$", re.I), use_inner_text=True,
                                                  timeout=RUN_TIMEOUT_S * 1000),
               f"run {run_id} did not end in the UI within {RUN_TIMEOUT_S} s", report)
    state = badge.inner_text().strip().lower()  # an ended run's state no longer changes
    if state == "success":
        # The task table refetches on its own schedule: it may still show Running when the header says
        # Success (seen on a clean clone), so it gets its own wait, and the screenshot waits for both.
        task_state = page.locator('td[data-testid="table-cell-state"] [data-testid="state-badge"]')
        wait_until(lambda: expect(task_state).to_have_text("Success", use_inner_text=True,
                                                           timeout=SETTLE_TIMEOUT_S * 1000),
                   f"run {run_id} ended success, but its task's state in the UI's table did not read Success "
                   f"within {SETTLE_TIMEOUT_S} s", report)
    shot(page, artifacts, f"2-run-{state}")
    assert state == "success", report()

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


def test_huggingface_connection_form(chromium, cluster, page, artifacts):
    """Admin > Connections > Add Connection, type HuggingFace: the form is the one the provider info
    declares (password relabelled "HF token", login/port/schema hidden), and what it saves is what the
    hook reads (the token in the connection's password)."""
    from playwright.sync_api import expect

    conn_id, token, endpoint = "hf_ui_form", "hf_ui_form_dummy_token", "https://hub.example.test"
    sign_in(page, cluster, "/connections")
    page.get_by_role("button", name="Add Connection").click()
    form = page.get_by_role("dialog")
    form.get_by_label("Connection ID").fill(conn_id)
    timeout = SETTLE_TIMEOUT_S * 1000
    form_text = lambda: f"the form read:\n{form.inner_text() if form.count() else '<gone>'}"  # noqa: E731
    # The type picker (react-select) lists each type by the provider info's hook-name (the bare
    # connection type without one); typing filters its options.
    form.get_by_role("combobox").fill("hugging")
    option = page.get_by_role("option", name="HuggingFace", exact=True)
    wait_until(lambda: expect(option).to_be_visible(timeout=timeout), "the connection type picker offers no "
               "'HuggingFace' (hook-name missing from the provider info?)",
               lambda: f"options: {page.get_by_role('option').all_inner_texts()}")
    option.click()
    # The standard fields render once the type is picked (from GET /ui/connections/hook_meta).
    wait_until(lambda: expect(form.get_by_label("HF token")).to_be_visible(timeout=timeout),
               "the HuggingFace connection form shows no field labelled 'HF token' (ui-field-behaviour in "
               "the provider info not applied?)", form_text)
    expect(form.get_by_label("HF token")).to_have_attribute("type", "password")
    expect(form.get_by_label("Hub endpoint (optional)")).to_have_attribute("placeholder", "https://huggingface.co")
    # Hidden fields are not rendered at all (checked once "HF token" is there: the same render shows both).
    hidden = form.locator(", ".join(f'input[name="{n}"]' for n in ("login", "port", "schema", "url_schema")))
    wait_until(lambda: expect(hidden).to_have_count(0), "the form shows login, port or schema, which the "
               "HuggingFace connection's field behaviour hides", form_text)
    for label in ("Login", "Port", "Schema", "Password"):  # "Password" is relabelled "HF token"
        wait_until(lambda label=label: expect(form.get_by_label(label, exact=True)).to_have_count(0),
                   f"the HuggingFace connection form shows a field labelled {label!r}", form_text)
    form.get_by_label("HF token").fill(token)
    form.get_by_label("Hub endpoint (optional)").fill(endpoint)
    shot(page, artifacts, "3-connection-form", form)

    form.get_by_role("button", name="Save").click()
    # The dialog closes once the API has stored the connection; it stays open with the error otherwise.
    wait_until(lambda: expect(form).to_have_count(0, timeout=timeout),
               f"saving connection {conn_id} did not close the form", form_text)
    conn = cluster.rest("GET", f"/api/v2/connections/{conn_id}")
    assert (conn["conn_type"], conn["host"], conn["login"], conn["port"]) == ("huggingface", endpoint, None, None)
    # The REST API masks the password: the CLI reads it back, as the hook would.
    done = subprocess.run([sys.executable, "-m", "airflow", "connections", "get", conn_id, "-o", "json"],
                          env=cluster.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    [stored] = json.loads(done.stdout)
    assert stored["password"] == token, "the 'HF token' field did not land in the connection's password"
