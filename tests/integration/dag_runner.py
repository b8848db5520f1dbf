"""Run one DAG from a dags folder through real Airflow (``dag.test()``, SQLite) and print the run's
state and XCom values as JSON. Run as a subprocess: Airflow reads its configuration (AIRFLOW_HOME,
the dags folder) from the environment once, at import."""

import json
import os
import sys

import pendulum
from airflow.dag_processing.bundles.manager import DagBundlesManager
from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
from airflow.models.asset import AssetEvent
from airflow.models.xcom import XComModel
from airflow.utils import db
from airflow.utils.session import create_session


def main(dag_id: str, logical_date: str, conf: str) -> None:
    db.initdb()
    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        raise SystemExit(f"import errors: {bag.import_errors}")
    sync_bag_to_db(bag, "dags-folder", None)
    dag = bag.dags[dag_id]
    run = dag.test(logical_date=pendulum.parse(logical_date), run_conf=json.loads(conf))
    with create_session() as session:
        xcoms = {name(x.task_id, x.map_index): x.value
                 for x in session.query(XComModel).filter_by(dag_id=dag_id, run_id=run.run_id)
                 if x.key == "return_value"}
        tis = run.get_task_instances(session=session)
        states = {name(ti.task_id, ti.map_index): str(ti.state) for ti in tis}
        labels = {name(ti.task_id, ti.map_index): ti.rendered_map_index for ti in tis if ti.map_index >= 0}
        events = [{"uri": e.asset.uri, "extra": e.extra}
                  for e in session.query(AssetEvent).filter_by(source_dag_id=dag_id, source_run_id=run.run_id)]
    line = "RESULT " + json.dumps({"state": str(run.state), "tasks": states, "xcom": xcoms, "labels": labels,
                                   "asset_events": events}, default=str)
    if os.environ.get("HFLLM_DAG_RESULT"):
        # Listeners' background processes (OpenLineage) share this stdout and can split the line.
        with open(os.environ["HFLLM_DAG_RESULT"], "w") as f:
            f.write(line)
    print(line)


def name(task_id: str, map_index: int) -> str:
    """``task`` or, for a mapped task instance, ``task[2]``."""
    return task_id if map_index < 0 else f"{task_id}[{map_index}]"


if __name__ == "__main__":
    main(*sys.argv[1:])
