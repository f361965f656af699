"""What an mtag process pays to start and stop (flows/startup.py): the collector is quiet while
the stack imports and frozen after, the exit skips tear-down but runs everything an orderly exit
runs, and the temporary API's clients get a CA file they can load in a millisecond."""

from __future__ import annotations

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
        from flows.score import SCORE_PRELOAD

        def imported():
            return [m in sys.modules for m in ("torch", "mlflow", "training.artifact")]

        with dask_cluster(None, n_workers=1, preload=SCORE_PRELOAD) as cluster:
            [got] = cluster.client.run(imported).values()
        print(got, "torch" in sys.modules)
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    # the workers hold the stack before their first task; the command never imports torch
    assert out.stdout.strip().splitlines()[-1] == "[True, True, True] False"
