"""Bad labels files for ``mtag train`` and ``mtag evaluate``: one ``mtag: error:`` line each,
exit 2, no traceback; rows the matcher drops are counted by reason.

The command runs in this process (``flows.cli.main``, stdout and stderr captured at the file
descriptors) on the session's labelled store, except one test that runs it as a subprocess.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import subprocess
import sys

import pytest
from factories import model_downloads, write_labels

from tasks.errors import ParameterError

FIELDS = ("path", "label", "artist")


@contextlib.contextmanager
def prefect_console_to_stderr():
    """Point Prefect's console handlers at the current (captured) ``sys.stderr`` for a while:
    they keep the stream they were configured with, which may be an earlier capture."""
    from prefect.logging.handlers import PrefectConsoleHandler

    import flows.train  # noqa: F401  (configures Prefect's logging)

    handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert handlers, "Prefect's console handler is not configured"
    saved = [(h.stream, h.console.file) for h in handlers]
    for h in handlers:
        h.stream = h.console.file = sys.stderr
    try:
        yield
    finally:
        for h, (stream, file) in zip(handlers, saved, strict=True):
            h.stream, h.console.file = stream, file


@pytest.fixture
def cli(monkeypatch, capfd):
    """``run(*argv) -> (exit status, stdout, stderr)`` of ``flows.cli.main``; the variables
    ``main`` sets and its SIGTERM handler are put back afterwards."""
    from flows.cli import main
    from flows.settings import EMBEDDED_DEFAULTS, QUIET_DEFAULTS

    for key in (*EMBEDDED_DEFAULTS, *QUIET_DEFAULTS, "MTAG_CONFIG"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    previous = signal.getsignal(signal.SIGTERM)

    def run(*argv: str) -> tuple[int, str, str]:
        capfd.readouterr()
        try:
            with prefect_console_to_stderr():
                rc = main(list(argv))
        finally:
            signal.signal(signal.SIGTERM, previous)
        out, err = capfd.readouterr()
        return rc, out, err

    return run


def one_error(rc: int, err: str) -> str:
    """The single ``mtag: error:`` line, which must end stderr; no traceback, exit 2."""
    lines = [line for line in err.splitlines() if "mtag: error:" in line]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("mtag: error: ") and err.rstrip().endswith(lines[0]), err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def rows(labelled_store):
    """The labelled store's label rows that name ingested tracks, paths made absolute."""
    _, labels, _ = labelled_store
    base = os.path.dirname(labels)
    with open(labels, newline="") as fh:
        found = [r | {"path": os.path.join(base, r["path"])} for r in csv.DictReader(fh)]
    return [r for r in found if "missing" not in r["path"]]


@pytest.mark.parametrize("case, expected", [
    ("missing", "labels file not found: "),
    ("binary", "is not a CSV or Parquet file (it holds binary data)"),
    ("all labels empty", "every label in labels file"),
])
def test_bad_file_is_one_line_before_the_store_is_read(cli, tmp_path, case, expected):
    f = tmp_path / "labels.csv"
    if case == "binary":
        f.write_bytes(bytes(range(256)) * 4)
    elif case == "all labels empty":
        f.write_text("path,label\n/m/a.flac,\n/m/b.flac, \n/m/c.flac,|\n")
    # the store does not exist: the file is checked first
    rc, out, err = cli("train", "--store", str(tmp_path / "no-store"), "--labels", str(f),
                       "--model", "linear")
    line = one_error(rc, err)
    assert expected in line and str(f) in line, line
    assert "check the paths" not in line and out == ""
    if case == "all labels empty":
        assert "(3 rows, column 'label'): fill in a label for each track" in line


@pytest.mark.parametrize("case, expected", [
    ("one class", "names only 1 class ('piano', on 48 matched tracks); a tagger needs at "
                  "least 2 classes"),
    ("two flute tracks", "class 'flute' (2 tracks) has too few tracks to split into train, "
                         "valid and test: with --valid-size 0.15 and --test-size 0.15 each "
                         "class needs at least 4 tracks"),
    ("paths elsewhere", "none of the 48 label rows matches an ingested track"),
    ("no such group column", "group column 'singer' (--group-column) is not a column of "
                             "labels file"),
    ("two artists a class", "too few groups to split into train, valid and test: with "
                            "--valid-size 0.15 and --test-size 0.15 each class needs at least "
                            "4 groups (distinct --group-column 'artist' values)"),
])
def test_labels_that_cannot_train_fail_before_the_flow_runs(cli, labelled_store, rows,
                                                            tmp_path, case, expected):
    store, _, _ = labelled_store
    extra: list[str] = []
    if case == "one class":
        rows = [r | {"label": "piano"} for r in rows]
    elif case == "two flute tracks":
        flutes = [r for r in rows if r["label"] == "flute"]
        rows = [r for r in rows if r["label"] != "flute"] + flutes[:2]
    elif case == "paths elsewhere":
        rows = [r | {"path": r["path"].replace("catalogue", "elsewhere")} for r in rows]
    elif case == "no such group column":
        extra = ["--group-column", "singer"]
    else:  # each instrument is played by 2 of the 6 artists
        extra = ["--group-column", "artist"]
    labels = write_labels(tmp_path / "labels.csv", rows, FIELDS)
    rc, out, err = cli("train", "--store", store, "--labels", labels, "--model", "linear",
                       "--registered-name", "never-registered", *extra)
    line = one_error(rc, err)
    assert expected in line and out == "", line
    assert "train-model" not in err and "Flow run" not in err, err  # no run was started
    if case == "paths elsewhere":
        assert f"check the paths: relative ones are taken from the labels file's folder " \
               f"({tmp_path})" in line, line
    if case == "two artists a class":
        assert all(f"'{c}' (2 groups)" in line for c in ("flute", "piano", "trumpet")), line


def test_dropped_rows_are_counted_by_reason(cli, labelled_store, rows, tmp_path, mlflow_env):
    store, _, _ = labelled_store
    blanked = [r | {"label": ""} if i % 4 == 0 else r for i, r in enumerate(rows)]  # 12 rows
    extra = [{"path": "", "label": "piano", "artist": "x"},  # no path
             {"path": str(tmp_path / "never ingested.flac"), "label": "flute", "artist": "x"},
             rows[1]]  # a second row for a track
    labels = write_labels(tmp_path / "labels.csv", blanked + extra, FIELDS)
    rc, out, err = cli("train", "--store", store, "--labels", labels, "--model", "linear",
                       "--registered-name", "dropped-rows", "--workdir", str(tmp_path / "w"))
    assert rc == 0, out + err
    expected = ("15 of 51 label rows dropped: 12 with an empty label, 1 with an empty "
                "path/track_id, 1 matching no ingested track, 1 repeating the track of an "
                "earlier row (labels merged)")
    assert "labels: 36 tracks, 3 classes from 51 label rows" in out, out
    assert f"  {expected}\n" in out, out
    assert "12 label rows have an empty label, e.g. " in out
    assert "WARNING | Flow run" in err and expected in err, err  # logged by the flow
    assert "split (tracks): " in out and "mtag: error" not in err


def test_evaluate_errors_are_one_line(cli, labelled_store, rows, tmp_path, mlflow_env):
    store, _, _ = labelled_store
    no_label = tmp_path / "no-label.csv"
    no_label.write_text("path,artist\n/m/a.flac,x\n")
    line = one_error(*cli("evaluate", "--store", store, "--labels", str(no_label),
                          "--model-uri", "models:/no-such-model@champion")[::2])
    assert line == (f"mtag: error: labels file {no_label} needs a label column (one of "
                    "'label', 'labels', 'tags', 'tag'); found columns ['path', 'artist']")
    good = write_labels(tmp_path / "good.csv", rows, FIELDS)
    before = model_downloads()
    line = one_error(*cli("evaluate", "--store", store, "--labels", good,
                          "--model-uri", "models:/no-such-model@champion")[::2])
    assert "cannot load model models:/no-such-model@champion from the MLflow registry " \
           "(Registered Model with name=no-such-model not found)" in line, line
    assert model_downloads() == before  # the failed download's folder went with it


def test_error_inside_a_flow_run_is_not_printed_with_a_traceback(labelled_store, tmp_path,
                                                                 capfd):
    """What the preflight cannot see still reaches the caller, without Prefect's traceback
    on the console; without the filter Prefect prints one (so the test can fail)."""
    from flows.train import quiet_expected_errors, train_flow

    store, _, _ = labelled_store
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with prefect_console_to_stderr():
        capfd.readouterr()
        with pytest.raises(ParameterError, match="is empty"):
            train_flow(store=store, labels=str(empty), model="linear")
        loud = capfd.readouterr().err
        with quiet_expected_errors(), pytest.raises(ParameterError, match="is empty"):
            train_flow(store=store, labels=str(empty), model="linear")
        quiet = capfd.readouterr().err
    assert "Traceback" in loud and "ParameterError" in loud, loud
    assert "Traceback" not in quiet and "ParameterError" not in quiet, quiet
    assert "Task run" in loud and "ERROR" in loud and "ERROR" not in quiet, quiet


def test_command_line_zero_byte_file(tmp_path):
    """The real ``mtag`` process: one stderr line and exit 2; ``-v`` adds the traceback."""
    empty = tmp_path / "labels.csv"
    empty.write_bytes(b"")
    argv = [sys.executable, "-m", "flows.cli", "train", "--store", str(tmp_path / "s"),
            "--labels", str(empty)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env=os.environ.copy())
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr == (f"mtag: error: labels file {empty} is empty (0 bytes); it needs a "
                           "header row such as 'path,label' (or 'track_id,label') and one "
                           "row per track\n")
    verbose = subprocess.run([*argv[:3], "-v", *argv[3:]], capture_output=True, text=True,
                             timeout=300, env=os.environ.copy())
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr
    assert verbose.stderr.endswith(proc.stderr)
