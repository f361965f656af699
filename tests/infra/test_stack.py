"""The local stack with real servers: ingest → train → score against them, schedules that fire,
and nothing left running after ``mtag stack down``.

Every server binds to 127.0.0.1 and is stopped by its process group id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from factories import write, write_labels

from tasks.synth import render_track

pytestmark = pytest.mark.slow


def mtag(*args, env, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtag {args} failed ({proc.returncode}):\n{proc.stdout}\n"
                             f"{proc.stderr}")
    return proc.stdout


def api(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"},
                                 method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def flow_runs(prefect_url):
    runs = api(f"{prefect_url}/flow_runs/filter", {"limit": 200})
    flows = {f["id"]: f["name"] for f in api(f"{prefect_url}/flows/filter", {"limit": 200})}
    return [r | {"flow_name": flows.get(r["flow_id"])} for r in runs]


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A stack on free ports (the Prefect scheduler loop shortened for the schedule test)."""
    from infra import stack as st

    root = tmp_path_factory.mktemp("stack")
    store = str(root / "store")
    cat = root / "catalogue"
    rows = []
    for i in range(12):
        inst = ("piano", "flute", "trumpet")[i % 3]
        write(str(cat / inst / f"t{i:02d}.wav"), render_track(
            inst, "ballad", seconds=4.0, sample_rate=22050, seed=300 + i), 22050)
        rows.append({"path": f"catalogue/{inst}/t{i:02d}.wav", "label": inst})
    labels = write_labels(root / "labels.csv", rows)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MTAG_DASK_ADDRESS")}
    env |= {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            "PREFECT_HOME": str(root / "client-prefect-home")}
    out = mtag("stack", "up", "--store", store, "--workers", "2", "--prefect-port", "0",
               "--mlflow-port", "0", "--dask-port", "0", env=env, timeout=400)
    assert "healthy" in out
    record = st.read(store)
    try:
        yield {"store": store, "catalogue": str(cat), "labels": str(labels),
               "env": env | record["env"], "record": record}
    finally:
        mtag("stack", "down", "--store", store, env=env, check=False)
        for svc in record["services"].values():  # whatever happened, nothing stays behind
            if _group_alive(svc["pid"]):
                os.killpg(svc["pid"], signal.SIGKILL)


def listeners(pids):
    """(pid, ip, port) of every listening socket of the processes ``pids`` and their
    descendants (the nanny's spawned workers, the servers' children)."""
    import psutil

    procs = []
    for pid in pids:
        root = psutil.Process(pid)
        procs += [root, *root.children(recursive=True)]
    return sorted({(p.pid, c.laddr.ip, c.laddr.port) for p in procs
                   for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN})


def test_stack_runs_the_pipeline_against_real_servers(stack):
    env, store = stack["env"], stack["store"]
    services = stack["record"]["services"]
    assert set(services) == {"prefect", "mlflow", "dask-scheduler", "dask-workers"}
    for svc in services.values():
        assert svc["url"] is None or "127.0.0.1" in svc["url"]
    status = mtag("stack", "status", "--store", store, env=env)
    assert status.count("healthy") == 4
    listening = listeners([svc["pid"] for svc in services.values()])
    assert len(listening) >= 6 and {ip for _, ip, _ in listening} == {"127.0.0.1"}, listening

    out = mtag("ingest", stack["catalogue"], "--no-progress", env=env)  # MTAG_STORE from env
    assert "12 ok" in out and env["MTAG_DASK_ADDRESS"] in out
    out = mtag("train", "--labels", stack["labels"], "--model", "linear",
               "--registered-name", "stack-tagger", env=env)
    assert "registered stack-tagger v1" in out
    out = mtag("score", "--model-uri", "models:/stack-tagger@champion", "--no-progress",
               env=env)
    assert "Scored 12 tracks" in out

    prefect = env["PREFECT_API_URL"]
    runs = flow_runs(prefect)
    names = {r["flow_name"] for r in runs if r["state_type"] == "COMPLETED"}
    assert {"ingest", "train-model", "score"} <= names
    keys = {a["key"] for a in api(f"{prefect}/artifacts/filter", {"limit": 50})}
    assert {"ingest-summary", "train-summary", "score-summary"} <= keys
    task_runs = api(f"{prefect}/task_runs/filter", {"limit": 200})
    assert any(t["name"].startswith("extract-") for t in task_runs)  # ran on the stack's Dask

    mlflow = env["MLFLOW_TRACKING_URI"]
    model = api(f"{mlflow}/api/2.0/mlflow/registered-models/get?name=stack-tagger")
    version = model["registered_model"]["latest_versions"][0]
    assert version["version"] == "1"
    run = api(f"{mlflow}/api/2.0/mlflow/runs/get?run_id={version['run_id']}")["run"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model"] == "linear" and params["feature_set"].startswith("fs-")
    assert os.path.isdir(os.path.join(store, "mlflow", "artifacts"))  # proxied artifacts


def test_a_schedule_creates_a_run_that_completes(stack):
    env = stack["env"] | {"MTAG_SOURCE": stack["catalogue"], "MTAG_STORE": stack["store"]}
    prefect = env["PREFECT_API_URL"]
    code = ("from infra.deployments import serve; "
            "serve(overrides={'nightly-catalogue-ingest': 5, 'weekly-retrain': 3600, "
            "'score-new-tracks': 3600})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        done = []
        while time.time() < deadline and not done:
            time.sleep(3)
            assert proc.poll() is None, "serve exited"
            done = [r for r in flow_runs(prefect) if r["flow_name"] == "scheduled-ingest"
                    and r["state_type"] == "COMPLETED" and r["deployment_id"]
                    and "auto-scheduled" in r["tags"]]
        assert done, [(r["flow_name"], r["state_type"], r["tags"]) for r in flow_runs(prefect)]
        deployments = api(f"{prefect}/deployments/filter", {"limit": 20})
        assert {d["name"] for d in deployments} >= {"nightly-catalogue-ingest",
                                                   "weekly-retrain", "score-new-tracks"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_deploy_registers_cron_schedules_in_a_process_pool(stack):
    env = stack["env"] | {"MTAG_WORK_POOL": "test-pool", "MTAG_INGEST_CRON": "15 3 * * *"}
    out = mtag("deploy", env=env)
    assert out.count("deployed ") == 3 and "prefect worker start --pool test-pool" in out
    prefect = env["PREFECT_API_URL"]
    pool = api(f"{prefect}/work_pools/test-pool")
    assert pool["type"] == "process"
    found = {d["name"]: d for d in api(f"{prefect}/deployments/filter", {"limit": 20})
             if d["work_pool_name"] == "test-pool"}
    assert set(found) == {"nightly-catalogue-ingest", "weekly-retrain", "score-new-tracks"}
    ingest = found["nightly-catalogue-ingest"]
    assert ingest["entrypoint"] == "flows/scheduled.py:scheduled_ingest"
    assert [s["schedule"]["cron"] for s in ingest["schedules"]] == ["15 3 * * *"]
    assert [s["schedule"]["cron"] for s in found["weekly-retrain"]["schedules"]] == ["0 4 * * 0"]


def test_down_leaves_no_process_behind(stack):
    """Last in this module: stops the module's stack (the fixture's teardown is the fallback)."""
    store, env = stack["store"], stack["env"]
    pids = [s["pid"] for s in stack["record"]["services"].values()]
    assert all(_group_alive(p) for p in pids)
    out = mtag("stack", "down", "--store", store, env=env)
    assert "dask-workers, dask-scheduler, mlflow, prefect" in out
    assert not [p for p in pids if _group_alive(p)]
    status = mtag("stack", "status", "--store", store, env=env, check=False)
    assert "healthy" not in status and "stopped" in status
