"""The settings module: precedence, types, secrets kept out of files, URLs and output."""

from __future__ import annotations

import dataclasses
import os

import pytest

from flows.settings import (
    SETTINGS,
    Settings,
    SettingsError,
    apply_defaults,
    check_url,
    export_worker_settings,
    load,
    redact,
    settings_table,
)


def test_defaults_then_yaml_then_environment(tmp_path):
    assert load({}) == Settings()
    config = tmp_path / "mtag.yaml"
    config.write_text("store: /data/store\nshard_minutes: 30\nworkers: 3\n")
    got = load({"MTAG_CONFIG": str(config), "MTAG_WORKERS": "8"})
    assert (got.store, got.shard_minutes, got.workers) == ("/data/store", 30.0, 8)
    assert got.config == str(config)


def test_bad_values_and_unknown_or_secret_keys_are_refused(tmp_path):
    with pytest.raises(SettingsError, match="workers: cannot read 'many'"):
        load({"MTAG_WORKERS": "many"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("stroe: /x\n")
    with pytest.raises(SettingsError, match=r"unknown settings \['stroe'\]"):
        load({"MTAG_CONFIG": str(bad)})
    secret = tmp_path / "secret.yaml"
    secret.write_text("aws_secret_access_key: abc\n")
    with pytest.raises(SettingsError, match="secrets come from the environment only"):
        load({"MTAG_CONFIG": str(secret)})


def test_every_setting_is_read_and_checked(tmp_path, monkeypatch):
    """Each MTAG_* variable of the table has its field (one without crashed every command)."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {s.key for s in SETTINGS} <= fields
    got = load({"MTAG_FEATURE_DEVICE": "cuda:1", "MTAG_CACHE_DIR": str(tmp_path)})
    assert (got.feature_device, got.cache_dir) == ("cuda:1", str(tmp_path))
    with pytest.raises(SettingsError, match="feature_device: 'gpu' is not auto"):
        load({"MTAG_FEATURE_DEVICE": "gpu"})
    # a value from the YAML file reaches the workers through the environment; the
    # environment's own value wins
    config = tmp_path / "mtag.yaml"
    config.write_text("feature_device: cpu\ncache_dir: /var/cache/mtag\n")
    monkeypatch.delenv("MTAG_FEATURE_DEVICE", raising=False)
    monkeypatch.setenv("MTAG_CACHE_DIR", "/from/env")
    export_worker_settings(load({"MTAG_CONFIG": str(config)}))
    assert os.environ["MTAG_FEATURE_DEVICE"] == "cpu"
    assert os.environ["MTAG_CACHE_DIR"] == "/from/env"


def test_required_setting_names_its_variable():
    with pytest.raises(SettingsError, match="export MTAG_SOURCE"):
        Settings().require("source")
    assert Settings(source="/music").require("source") == "/music"


def test_credentials_never_travel_in_urls_or_output():
    with pytest.raises(SettingsError, match="credentials in a URL"):
        check_url("s3://AKIA:topsecret@bucket/store")
    with pytest.raises(SettingsError, match="credentials in a URL"):
        load({"MTAG_STORE": "s3://AKIA:topsecret@bucket/store"})
    assert redact("postgresql://mlflow:pw@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    assert redact("/plain/path") == "/plain/path"
    table = settings_table({"AWS_SECRET_ACCESS_KEY": "topsecret",
                            "MLFLOW_TRACKING_URI": "http://u:pw@mlflow:5000"})
    assert "topsecret" not in table and "pw@" not in table and "(set, hidden)" in table
    assert all(f"`{s.env}`" in table for s in SETTINGS)
    assert Settings(store="s3://bucket/x").public()["store"] == "s3://bucket/x"


def test_embedded_defaults_do_not_override_the_environment():
    env = {"DO_NOT_TRACK": "false", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    apply_defaults(env)
    assert env["DO_NOT_TRACK"] == "false"  # the user's value wins
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
