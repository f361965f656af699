"""What an mtag process pays to start and stop (flows/startup.py): the collector is quiet while
the stack imports and frozen after, the exit skips tear-down but runs everything an orderly exit
runs, and the temporary API's clients get a CA file they can load in a millisecond."""

from __future__ import annotations

import ast
import ssl
import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def test_exit_now_runs_what_an_orderly_exit_runs_and_keeps_the_code():
    out = run_python("""
        import atexit, sys, threading, time
        from flows.startup import exit_now

        atexit.register(lambda: print("atexit handler", flush=True))
        threading._register_atexit(lambda: print("threading callback", flush=True))

        def late():
            time.sleep(0.3)
            print("non-daemon thread finished")

        threading.Thread(target=late).start()
        sys.stdout.write("buffered, not flushed")
        exit_now(3)
    """)
    assert out.returncode == 3, out.stderr
    # threading's callbacks and the join first, then atexit; what was buffered is not lost
    assert out.stdout.index("threading callback") < out.stdout.index("atexit handler")
    assert "non-daemon thread finished" in out.stdout
    assert out.stdout.index("non-daemon thread finished") < out.stdout.index("atexit handler")
    assert "buffered, not flushed" in out.stdout


def test_the_stack_is_frozen_only_after_the_command_said_it_is_starting():
    out = run_python("""
        import gc
        from flows import startup

        startup.started()  # a process that did not call starting(): left as it is
        print(gc.get_freeze_count(), gc.get_threshold())
        startup.starting()
        print(gc.get_threshold())
        import pandas  # noqa: F401
        startup.started()
        print(gc.get_freeze_count(), gc.get_threshold())
    """)
    assert out.returncode == 0, out.stderr
    before, during, after = out.stdout.splitlines()
    assert before.startswith("0 ") and before.endswith("(700, 10, 10)")
    assert during == "(100000, 50, 100)"
    frozen, thresholds = after.split(" ", 1)
    assert int(frozen) > 10_000 and thresholds == "(700, 10, 10)"


def test_a_frozen_process_that_exits_normally_reports_no_leaks():
    # duckdb's nanobind types report themselves leaked when the heap is still frozen at exit
    out = run_python("""
        import duckdb
        from flows import startup

        startup.pause_collection()
        duckdb.connect().sql("select 1 as x").arrow()
        startup.resume_collection()
        startup.starting()
        startup.started()
    """)
    assert out.returncode == 0, out.stderr
    assert "leaked" not in out.stderr, out.stderr[-2000:]


def test_local_workers_come_forked_with_the_stack_frozen_and_the_collector_on():
    import gc

    from flows.cluster import dask_cluster

    def collector():
        return gc.isenabled(), gc.get_freeze_count()

    with dask_cluster(None, n_workers=1) as cluster:
        [(enabled, frozen)] = cluster.client.run(collector).values()
    assert enabled and frozen > 10_000


def test_the_loopback_ca_file_holds_one_certificate_and_is_rebuilt_when_torn(tmp_path,
                                                                           monkeypatch):
    from flows.prefect_api import loopback_ca_file

    monkeypatch.setenv("MTAG_CACHE_DIR", str(tmp_path))
    path = loopback_ca_file()
    assert path is not None and path.startswith(str(tmp_path))
    text = open(path).read()
    assert text.count("BEGIN CERTIFICATE") == 1
    ctx = ssl.create_default_context(cafile=path)
    assert len(ctx.get_ca_certs()) == 1
    with open(path, "w") as fh:
        fh.write("-----BEGIN CERTIFICATE-----\ntorn")
    assert loopback_ca_file() is None  # not handed to Prefect, and removed
    assert loopback_ca_file() == path  # rebuilt
    assert len(ssl.create_default_context(cafile=path).get_ca_certs()) == 1


def test_the_loopback_ca_file_is_skipped_where_the_cache_cannot_be_written(tmp_path,
                                                                         monkeypatch):
    from flows.prefect_api import loopback_ca_file

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MTAG_CACHE_DIR", str(blocker / "cache"))
    assert loopback_ca_file() is None


def test_scoring_workers_are_forked_with_the_model_stack_imported():
    # in a process of its own: the fork server of this test session may have started already,
    # with the preload list of whichever cluster came first
    out = run_python("""
        import sys
        from flows.cluster import dask_cluster
        from flows.score import score_preload

        def imported():
            return [m in sys.modules for m in ("torch", "training.artifact", "mlflow",
                                               "sklearn")]

        with dask_cluster(None, n_workers=1, preload=score_preload(None, "log_mel")) as cluster:
            [got] = cluster.client.run(imported).values()
        print(got, "torch" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    # the workers hold the stack before their first task, not MLflow (the model comes from
    # the command's download) nor scikit-learn (a network); the command never imports torch
    assert out.stdout.strip().splitlines()[-1] == "[True, True, False, False] False"


def test_a_model_with_scikit_learn_parts_gets_it_preloaded():
    from flows.score import score_preload

    for kind in ("summary", "mixed", None):
        assert "sklearn.pipeline" in score_preload(None, kind)
    assert not any(m.startswith("sklearn") for m in score_preload(None, "mfcc"))
    assert score_preload("src", "mfcc")[-1] == "flows.ingest_worker"
    # importing what loads a model imports neither scikit-learn, MLflow nor the optimiser
    # that fits a temperature
    out = run_python("""
        import sys
        import training.artifact, flows.score_worker
        print([m in sys.modules for m in ("sklearn", "mlflow", "scipy.optimize")])
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, False, False]"
    # nor does the score flow's module (what a worker imports to unpickle a score task) import
    # the ingest stack
    out = run_python("""
        import sys
        import flows.score
        print([m in sys.modules for m in ("flows.ingest", "flows.ingest_worker", "numba")])
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[False, False, False]"


def test_whether_an_api_is_configured_is_told_without_prefect_only_when_certain(
        tmp_path, monkeypatch):
    from flows.prefect_api import _configured_without_settings as configured

    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH",
                "PREFECT_TEST_MODE"):
        monkeypatch.delenv(key, raising=False)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.chdir(work)
    (work / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert configured() is False  # nothing of Prefect's anywhere: the fast path
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert configured() is True
    monkeypatch.delenv("PREFECT_API_URL")
    # each place Prefect may read a URL from makes it unsure: Prefect's settings decide
    for name, text in (("pyproject.toml", "[tool.prefect.api]\nurl = 'http://h/api'\n"),
                       (".env", "PREFECT_API_URL=http://h/api\n"), ("prefect.toml", "")):
        (work / name).write_text(text)
        assert configured() is None, name
        (work / name).unlink()
    (home / "profiles.toml").write_text('active = "local"\n')
    assert configured() is None
    (home / "profiles.toml").unlink()
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert configured() is None


def test_a_fork_server_started_early_gives_workers_the_pre_spawn_environment():
    """Started before any cluster (as the ingest command does), the fork server still gets
    Dask's one-thread BLAS setting and the allocator settings, and the cluster's workers are
    forked from it (a worker with OpenBLAS's default pool burnt 2.5 x the CPU)."""
    out = run_python("""
        import os
        os.environ.pop("OPENBLAS_NUM_THREADS", None)
        import multiprocessing.forkserver as fsrv
        from flows.cluster import dask_cluster, start_fork_server

        start_fork_server(("numpy",))
        server = fsrv._forkserver._forkserver_pid
        print("parent", os.environ.get("OPENBLAS_NUM_THREADS"))

        def probe():
            import os
            from threadpoolctl import threadpool_info
            blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
            return (os.getppid(), os.environ.get("OPENBLAS_NUM_THREADS"),
                    os.environ.get("MALLOC_MMAP_THRESHOLD_"), blas)

        with dask_cluster(n_workers=1) as cluster:
            (ppid, blas_env, mmap, blas), = cluster.client.run(probe).values()
        print("worker", ppid == server, blas_env, mmap, blas)
    """)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "parent None" in lines  # this process's own environment is left as it was
    worker = next(line for line in lines if line.startswith("worker")).split(" ", 4)
    assert worker[1:4] == ["True", "1", str(64 << 20)], worker
    assert set(ast.literal_eval(worker[4])) == {1}, worker


def test_workers_get_dasks_pre_spawn_environment_with_ours_over_it():
    """One environment for both ways a local worker starts (a cluster's nanny, the early
    fork server): Dask's one-thread defaults, a user's own entries, and the allocator
    thresholds that replace Dask's trim threshold."""
    import dask

    from flows.cluster import WORKER_ENV, worker_environ

    with dask.config.set({"distributed.nanny.pre-spawn-environ.MTAG_TEST_ENTRY": 7}):
        env = worker_environ()
    assert env["OMP_NUM_THREADS"] == "1" and env["MTAG_TEST_ENTRY"] == "7"
    assert env["MALLOC_TRIM_THRESHOLD_"] == WORKER_ENV["MALLOC_TRIM_THRESHOLD_"] != "65536"
    assert all(isinstance(v, str) for v in env.values())
