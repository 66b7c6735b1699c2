"""benchmarks/defaults_study.py end to end at its tiny size: a run as fastseed-train resolves its
command line, scored by k-NN and the dense probe, a reference row, the table; a rerun skips them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import defaults_study  # noqa: E402  (benchmarks/ is not a package)

pytestmark = pytest.mark.slow


def test_tiny_study_writes_rows_with_what_ran_and_skips_them_again(tmp_path):
    out, work = tmp_path / "defaults.jsonl", tmp_path / "work"
    argv = ["--size", "tiny", "--datasets", "fashion-mnist", "--recipes", "local", "--references", "raw",
            "--out", str(out), "--workdir", str(work)]
    rows = defaults_study.main(argv)
    raw, run = rows
    assert raw["recipe"] == "raw" and raw["steps"] == 0 and 0 <= raw["miou"] <= 100
    assert run["recipe"] == "local" and run["flags"] == ["--method", "seed", "--local-weight", "1"]
    assert run["local_weight"] == 1.0
    assert run["steps"] == 4 and 0 <= run["knn_top1@20"] <= 100 and 0 <= run["miou"] <= 100
    assert run["probe"]["student_side"] == defaults_study.PROBE_RES
    # the resolved settings: the queue sized to 256 images of 1280-d keys, the warm-up capped
    assert run["queue_size"] == 128 and run["warmup_steps"] == 0 and run["aug"] == "weak"
    assert run["command"].startswith("fastseed-train --data ") and "--local-weight 1" in run["command"]
    assert {"commit", "torch", "device", "date"} <= set(run)
    assert [json.loads(line)["recipe"] for line in out.read_text().splitlines()] == ["raw", "local"]
    assert "| fashion-mnist | local | 1 | 4 |" in out.with_suffix(".md").read_text()
    again = defaults_study.main(argv)  # finished rows are skipped: nothing new is run or written
    assert [r["date"] for r in again] == [r["date"] for r in rows] and len(out.read_text().splitlines()) == 2
    with pytest.raises(SystemExit):
        defaults_study.flags_of("nonsense")
