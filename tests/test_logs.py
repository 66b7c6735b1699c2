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
    with pytest.raises(ConfigError, match="--log tensorboard needs the tensorboard package: pip install tensorboard"):
        logs.sink_names("jsonl,tensorboard")
    with pytest.raises(ConfigError, match="unknown --log sink 'wandbx'"):
        logs.sink_names("wandbx")


def test_a_record_reaches_every_sink_with_its_time(tmp_path, monkeypatch):
    seen = []

    class Recorder:
        def __init__(self, out_dir):
            self.out_dir = out_dir

        def write(self, record):
            seen.append(record)

        def close(self):
            seen.append("closed")

    monkeypatch.setitem(logs.SINKS, "recorder", Recorder)
    logger = logs.Logger(tmp_path, True, "jsonl,recorder")
    logger.log({"step": 3, "loss": 1.5})
    logger.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 3 and line["loss"] == 1.5 and line["time"] > 0
    assert seen == [line, "closed"]
    quiet = logs.Logger(tmp_path / "absent", False, "jsonl")  # other ranks write nothing
    quiet.log({"step": 1})
    assert quiet.sinks == [] and not (tmp_path / "absent").exists()
    unused = logs.Logger(tmp_path, True, "jsonl")  # nothing logged: no file opened, none written
    (tmp_path / "metrics.jsonl").unlink()
    unused.close()
    assert not (tmp_path / "metrics.jsonl").exists()
