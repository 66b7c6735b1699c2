"""Metric sinks: --log picks them, a missing package is one actionable line, records reach every sink."""
import json

import pytest

from fastseed import logs
from fastseed.errors import ConfigError


def test_auto_is_jsonl_plus_the_installed_optional_sinks(monkeypatch):
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name: None)
    assert logs.sink_names("auto") == ["jsonl"]
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name: object())
    assert logs.sink_names("auto") == ["jsonl", "tensorboard"]


def test_explicit_sinks_are_checked(monkeypatch):
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda name: None)
    assert logs.sink_names("jsonl") == ["jsonl"]
    missing = r"--log tensorboard needs tensorboard: pip install 'fastseed\[tensorboard\]'"
    with pytest.raises(ConfigError, match=missing):
        logs.sink_names("jsonl,tensorboard")
    with pytest.raises(ConfigError, match="unknown --log sink 'wandbx'"):
        logs.sink_names("wandbx")


def test_a_record_reaches_every_sink_with_its_time(tmp_path, monkeypatch):
    seen = []

    class Recorder(logs.Sink):
        def __init__(self, out_dir, params):
            self.out_dir, self.params = out_dir, params

        def write(self, record):
            seen.append(record)

        def close(self, status):
            seen.append(status)

    monkeypatch.setitem(logs.SINKS, "recorder", Recorder)
    logger = logs.Logger(tmp_path, True, "jsonl,recorder", {"lr": 0.1})
    logger.log({"step": 3, "loss": 1.5})
    logger.close("KILLED")
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 3 and line["loss"] == 1.5 and line["time"] > 0
    assert seen == [line, "KILLED"]
    quiet = logs.Logger(tmp_path / "absent", False, "jsonl")  # other ranks write nothing
    quiet.log({"step": 1})
    assert quiet.sinks == [] and not (tmp_path / "absent").exists()
    unused = logs.Logger(tmp_path, True, "jsonl")  # nothing logged: no file opened, none written
    (tmp_path / "metrics.jsonl").unlink()
    unused.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_mlflow_needs_a_database_driver_only_for_its_local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert [m for m, _ in logs.MlflowSink.needs()] == ["mlflow", "sqlalchemy", "alembic"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert [m for m, _ in logs.MlflowSink.needs()] == ["mlflow"]


def test_wandb_runs_offline_without_a_key(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert logs.WandbSink.mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert logs.WandbSink.mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert logs.WandbSink.mode() == "disabled"


def test_scalars_are_numbers_but_not_flags():
    assert logs.scalars({"step": 3, "time": 1.0, "loss": 1.5, "final": True, "name": "x", "n": 2}) == \
        {"loss": 1.5, "n": 2}
