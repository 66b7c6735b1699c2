"""Every benchmark runs end to end at a tiny size on CPU (speed is measured elsewhere: these only
keep the scripts working; their numbers mean nothing on a shared 2-core CPU).

The GPU check's dry run (`make gpu-check-dry`) runs the data, training, k-NN and kernel
benchmarks, the demo and the CUDA test files through the very script the GPU machine runs,
after the same offline install of the tree."""
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytestmark = pytest.mark.slow

STEPS = ["install", "a-environment", "b-correctness", "c-kernels", "d-no-host-sync", "e-knn", "f-data", "g-train",
         "h-demo", "i-multi", "j-cache"]


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_bench_kernels_tiny(tmp_path):
    out = run("benchmarks/bench_kernels.py", "--sizes", "8:96", "--impls", "fused,eager,sdpa", "--reps", "1",
              "--out", str(tmp_path / "k.json"))
    assert "fused" in out and "eager" in out
    assert json.loads((tmp_path / "k.json").read_text())


def test_gpu_check_dry_run(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--out", str(out),
                           "--scratch", str(scratch)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records if "status" in r}
    assert list(status) == STEPS
    assert all(status[s].startswith("ok") for s in STEPS[:-2]), status
    assert all(status[s].startswith("skipped: ") for s in STEPS[-2:]), status  # not in the tree, or no CUDA
    result = {r["step"]: r["result"] for r in records if "result" in r}

    # the installed copy ran, not the tree: its entry points too
    assert Path(result["a-environment"]["fastseed"]).is_relative_to(scratch / "site")
    # every Triton compile of the steps loads this cache manager, which logs the cache's hits
    assert result["a-environment"]["triton_cache_manager"] == "triton_lookups.LoggedCache"
    assert (scratch / "site" / "bin" / "fastseed-train").is_file()
    rows = {s: [r["row"] for r in records if r["step"] == s and "row" in r] for s in STEPS}
    assert {(r["op"], r["D"]) for r in rows["b-correctness"]} == {
        (op, d) for op in ("seed_loss", "info_nce_loss", "enqueue_") for d in (128, 1280, 2048)}
    assert all(r["ok"] for r in rows["b-correctness"])
    assert {(r["impl"], r["D"]) for r in rows["c-kernels"]} == {(i, d) for i in ("fused", "eager", "sdpa")
                                                                 for d in (128, 2048)}
    assert all(r["graph_us"] == "skipped: no CUDA" for r in rows["c-kernels"])
    assert "skipped" in result["d-no-host-sync"]["table"]  # its CUDA tests, collected from the installed copy
    assert result["e-knn"]["median_s"] > 0
    assert result["f-data"]["result"]["fastseed_images_per_s"] > 0
    assert rows["g-train"] and all(r["official_img_s"] > 0 and r["fastseed_img_s"] > 0 for r in rows["g-train"])
    assert "| student distilled (seed)" in result["h-demo"]["table"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {s} |" in summary for s in STEPS) and "## h-demo" in summary


def test_a_capped_step_is_killed_with_its_children(tmp_path):
    """The cap ends the step's whole process group (DataLoader workers, pytest, fastseed-train),
    so that nothing from a capped step runs on into the next one."""
    from gpu_check import run_capped
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    rc = run_capped(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], cap_s=2, env=dict(os.environ),
                    cwd=tmp_path, log=tmp_path / "log")
    assert rc is None and time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    for _ in range(100):  # reaped by init once its parent is gone
        state = Path(f"/proc/{child}/stat")
        if not state.exists() or state.read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the step's child {child} outlived the cap")


def test_trimmed_fashion_mnist_writes_the_betons_the_full_files_write(tmp_path, monkeypatch):
    """gpu_wheels.demo_fashion_mnist zeroes the images no job writes; every job's beton from the
    trimmed files is the full files' byte for byte (small files and subsets here; make
    gpu-wheels passes the demo's jobs). One writer worker: with two, FFCV lays out its pages
    in the order the workers finish, so two writes of the same images differ."""
    from fastseed.data_prep import sources, write_beton
    from gpu_wheels import demo_fashion_mnist

    full, trimmed = tmp_path / "full", tmp_path / "trimmed"
    full.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 300), ("test", 40)):
        arrays = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
        for name, array in zip(sources.FASHION_MNIST_FILES[split], arrays):
            header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
            (full / f"{name}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    jobs = [("fashion-mnist:train", "a.beton", 100), ("fashion-mnist:test", "t.beton", None),
            ("fashion-mnist:train", "b.beton", 30)]
    assert demo_fashion_mnist(full, trimmed, jobs).startswith("images kept: train ")
    images = sources.read_idx(str(trimmed / "train-images-idx3-ubyte.gz"))
    read = np.union1d(sources.subset_indices(300, 100), sources.subset_indices(300, 30))
    assert np.array_equal(np.flatnonzero(images.reshape(300, -1).max(1)), read)  # only those were kept

    betons = {}
    for folder in (full, trimmed):
        monkeypatch.setattr(sources, "FASHION_MNIST_DIRS", (str(folder),))
        for source, name, subset in jobs:
            out = tmp_path / f"{folder.name}-{name}"
            write_beton(source, str(out), subset=subset, compress_probability=0.0, workers=1, progress=False)
            betons.setdefault(name, []).append(out.read_bytes())
    assert all(a == b for a, b in betons.values())
