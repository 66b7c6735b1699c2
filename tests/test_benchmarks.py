"""Every benchmark runs end to end at a tiny size on CPU (speed is measured elsewhere: these only
keep the scripts working; their numbers mean nothing on a shared 2-core CPU).

The GPU check's dry run (`make gpu-check-dry`) runs the data, training, k-NN, kernel and local-loss
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
sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts and their _bench
sys.path.insert(0, str(ROOT / "benchmarks" / "gpu"))  # the GPU check's tooling
pytestmark = pytest.mark.slow

STEPS = ["install", "a-environment", "b-correctness", "c-kernels", "d-no-host-sync", "e-knn", "f-train", "g-demo",
         "h-vit-teacher", "i-restart", "j-data", "k-train-pairs", "l-cache", "m-multi", "n-local", "triton-cache"]


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
    proc = subprocess.run([sys.executable, "benchmarks/gpu/gpu_check.py", "--dry", "--out", str(out),
                           "--scratch", str(scratch)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-6000:]
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    status = {r["step"]: r["status"] for r in records if "status" in r}
    assert list(status) == STEPS
    dry_as_f, no_cuda = ("k-train-pairs", "h-vit-teacher"), ("l-cache", "m-multi")
    assert all(status[s].startswith("ok") for s in STEPS[:-1] if s not in dry_as_f + no_cuda), status
    assert all(status[s].startswith("skipped: dry, f-train ran the same code") for s in dry_as_f), status
    assert all(status[s].startswith("skipped: no CUDA") for s in no_cuda), status
    result = {r["step"]: r["result"] for r in records if "result" in r}
    # the install says plainly what it could not install here: CI has no .whl/, and the ffcv wheel
    # is a cp312 build (make gpu-rehearse installs it under the GPU machine's Python 3.12)
    assert "fastseed (this tree)" in status["install"]
    if not list((ROOT / ".whl").glob("*.whl")):
        assert "no carried wheels" in status["install"]
    elif sys.version_info[:2] != (3, 12):
        assert "not installable under Python" in status["install"]

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
    assert result["a-environment"]["shm"].startswith("/dev/shm: ")
    # every test of the pytest steps recorded one by one as it ended (skipped here: no CUDA)
    tests = [r for r in records if r["step"] == "d-no-host-sync" and "test" in r]
    assert len(tests) == 6 and all(r["outcome"] == "skipped" for r in tests)
    assert "6 skipped" in result["d-no-host-sync"]["table"]
    assert result["e-knn"]["median_s"] > 0
    # the installed copy has no history: the steps record the tree's commit that the check passed on
    from fastseed.provenance import git_commit
    assert result["e-knn"]["commit"] == git_commit(ROOT) and result["e-knn"]["commit"]
    assert result["j-data"]["result"]["fastseed_images_per_s"] > 0
    assert rows["f-train"] and all(r["official_img_s"] > 0 and r["fastseed_img_s"] > 0 for r in rows["f-train"])
    assert "| student distilled (simreg)" in result["g-demo"]["table"]
    # n-local's dry arguments: one comparison on a 2x2 grid, then the two losses alone
    local = result["n-local"]["result"]
    assert [(r["bench"], r.get("grid")) for r in local] == [("local_cost", "2x2"), ("local_loss_alone", "3x3"),
                                                            ("local_loss_alone", None)]
    # the kill/restart step, with two gloo ranks here: the restarted group resumed and finished
    restart = result["i-restart"]
    assert restart["resumed"].startswith("resumed from") and restart["final_step"] == 24
    assert 0 < restart["kill_to_first_step_s"] < 300
    summary = (out / "summary.md").read_text()
    assert all(f"| {s} |" in summary for s in STEPS) and "## g-demo" in summary
    log = (out / "gpu_check.log").read_text()
    assert "===== d-no-host-sync" in log and "short test summary info" in log  # pytest's -rA output, streamed


def test_gpu_check_plan_fits_the_window():
    """Calls 1 and 2 fit ~12 minutes of device time with the machine's start and the pause between
    them even when each runs to its budget, each call's command ends well inside the 10 minutes
    a command may run, and every step is in exactly one call, in the order of its letter."""
    import gpu_check as g
    assert 90 + g.CALLS[1].budget_s + 30 + g.CALLS[2].budget_s <= 12 * 60
    assert all(c.budget_s + 60 <= 8 * 60 for c in g.CALLS.values())
    in_calls = [name for c in g.CALLS.values() for name in c.steps]
    assert in_calls == [s.name for s in g.STEPS] == sorted(in_calls)
    assert all(s.why and s.cap_s >= s.expected_s for s in g.STEPS)
    assert "| a-environment |" in g.plan()


def make_wheel(folder: Path, name: str, tag: str) -> Path:
    """A one-module wheel with these tags (pip installs it offline like the carried ones)."""
    import zipfile
    wheel = folder / f"{name}-1.0-{tag}.whl"
    dist = f"{name}-1.0.dist-info"
    files = {f"{name}.py": "VALUE = 42\n", f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"}
    files[f"{dist}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_install_takes_the_carried_wheels_it_can_and_names_the_others(tmp_path):
    """The dry run's install is the GPU machine's: the carried wheels with pip and no index, then the
    tree, reused by a later call; a wheel this interpreter cannot take is named (dry) or stops the
    check with what to do (on the GPU machine)."""
    import gpu_check
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "carried_probe", "py3-none-any")
    other = "cp39" if sys.version_info[:2] != (3, 9) else "cp310"
    make_wheel(wheels, "foreign_probe", f"{other}-{other}-manylinux_2_17_x86_64")
    site, log = tmp_path / "scratch" / "site", tmp_path / "log"
    with pytest.raises(gpu_check.InstallError, match="foreign_probe-1.0-.*cannot install under Python"):
        gpu_check.install(site, dry=False, log=log, wheels_dir=wheels)
    status = gpu_check.install(site, dry=True, log=log, wheels_dir=wheels)
    assert status.startswith("carried_probe-1.0-py3-none-any.whl, fastseed (this tree)")
    assert "not installable under Python" in status and "foreign_probe" in status
    assert (site / "carried_probe.py").is_file() and (site / "fastseed" / "__init__.py").is_file()
    assert not (site / "foreign_probe.py").exists()
    assert gpu_check.install(site, dry=True, log=log, wheels_dir=wheels).startswith("reused: ")


def test_step_env_extends_pythonpath(tmp_path, monkeypatch):
    import gpu_check
    monkeypatch.setenv("PYTHONPATH", "/already/there")
    env = gpu_check.step_env(tmp_path / "site", None, tmp_path / "lookups", tmp_path, tmp_path / "out")
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "site"), str(ROOT / "benchmarks" / "gpu"),
                                                   str(ROOT / "benchmarks"), "/already/there"]


def test_triton_cache_match_says_up_front_when_the_cache_cannot_hit(tmp_path, monkeypatch):
    import gpu_check
    here = {"triton": "3.6.0", "libtriton_sha256": "a" * 64, "ptxas": "Cuda compilation tools, release 12.8",
            "triton_key_sha256": "k"}
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path)
    (tmp_path / "SOURCE.json").write_text(json.dumps({"commit": "c", "tree": "t", "triton_cache": here}))
    assert gpu_check.triton_cache_match(here, "/cache").startswith("matches")
    other = here | {"libtriton_sha256": "b" * 64}
    note = gpu_check.triton_cache_match(other, "/cache")
    assert note.startswith("the carried Triton cache cannot hit") and "libtriton_sha256" in note
    assert gpu_check.triton_cache_match(here, None) == "no Triton cache carried"
    fingerprint = gpu_check.triton_fingerprint()  # this machine's triton: every field filled
    assert set(fingerprint) == set(here) and len(fingerprint["libtriton_sha256"]) == 64


def test_loader_prefetch_fits_dev_shm(monkeypatch):
    import shutil

    from _bench import data as bench_data
    free = {"bytes": 10 * 2**30}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free["bytes"], 0, free["bytes"]))
    batch = 256 * 3 * 224 * 224 * 4  # 147 MiB
    assert bench_data.shm_prefetch(16, batch, want=4)[:2] == (16, 2)  # half of 10 GiB: 34 batches
    free["bytes"] = 64 * 2**20  # a container's default /dev/shm
    workers, prefetch, note = bench_data.shm_prefetch(16, batch, want=4)
    assert (workers, prefetch) == (1, 1) and "1 workers instead of 16" in note
    assert bench_data.shm_prefetch(0, batch, want=4) == (0, None, None)


def test_pytest_steps_record_each_test_and_fail_one_past_its_limit(tmp_path):
    """gpu_pytest.py: each test's outcome appended as it ends; a test past its time limit fails
    and the next one still runs."""
    (tmp_path / "test_probe.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(30)\n\ndef test_fast():\n    assert True\n")
    results = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks" / "gpu"),
                                                       os.environ.get("PYTHONPATH", "")]),
               FASTSEED_TEST_TIMEOUT_S="1", FASTSEED_TEST_RESULTS=str(results), FASTSEED_CHECK_STEP="probe")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path / "test_probe.py"), "-p", "gpu_pytest",
                           "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(tmp_path), "-rA"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and time.monotonic() - t0 < 25, proc.stdout[-2000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["test"].split("::")[1], r["outcome"]) for r in lines] == [("test_slow", "failed"),
                                                                          ("test_fast", "passed")]
    assert "ran past its 1 s limit" in lines[0]["error"] and lines[0]["step"] == "probe"


def test_compile_cache_artifacts_carry_to_a_fresh_cache(tmp_path):
    """What one process compiled, saved by compile_cache.save, is found by a process on a fresh
    on-disk cache after compile_cache.load_once (an FX graph cache hit, no compile)."""
    code = ("import sys, torch, compile_cache\n"
            "note = compile_cache.load_once()\n"
            "f = torch.compile(lambda x: torch.sin(x) * 2 + 1)\n"
            "f(torch.ones(8))\n"
            "from torch._dynamo.utils import counters\n"
            "print(note, counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss'])\n"
            "print(compile_cache.save('probe'))\n")
    base = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "benchmarks" / "gpu"),
                                                        os.environ.get("PYTHONPATH", "")]))

    def run_in(cache_dir, **extra):
        env = dict(base, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / cache_dir), **extra)
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout.splitlines()

    first = run_in("cache1", FASTSEED_COMPILE_CACHE_OUT=str(tmp_path / "out"))
    assert first[-2] == "None 0 1" and first[-1].startswith("probe.bin: "), first
    second = run_in("cache2", FASTSEED_COMPILE_CACHE_IN=str(tmp_path / "out"))
    assert second[-2].startswith("torch.compile artifacts carried: probe.bin: ") and "inductor" in second[-2], second
    assert second[-2].endswith(" 1 0"), second  # one FX graph cache hit, no miss: nothing compiled


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


def test_a_spent_budget_skips_the_rest_and_says_how_to_run_it(tmp_path):
    """No step starts once the budget is spent; its status names the command that runs it alone."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu/gpu_check.py", "--dry", "--steps", "e", "--budget", "5",
                           "--out", str(out), "--scratch", str(tmp_path / "scratch")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    status = {r["step"]: r["status"] for r in map(json.loads, (out / "gpu_check.jsonl").read_text().splitlines())
              if "status" in r}
    assert status["e-knn"] == "skipped: the 5 s budget is spent (run it alone: --steps e)"


def test_triton_cache_is_unpacked_once_per_machine(tmp_path):
    """A later call finds the unpacked cache as the earlier ones left it (what they compiled
    into it included), known by the archive's content, not its times; another archive replaces it."""
    import tarfile

    import gpu_check

    def archive(name: str, text: str) -> Path:
        entry = tmp_path / "src" / "ENTRY"
        entry.mkdir(parents=True, exist_ok=True)
        (entry / "k.cubin").write_text(text)
        (entry / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.cubin": "/elsewhere/ENTRY/k.cubin"}}))
        path = tmp_path / name
        with tarfile.open(path, "w:xz") as tar:
            tar.add(entry, arcname="ENTRY")
        return path

    first, dest = archive("a.tar.xz", "one"), tmp_path / "scratch" / "triton-cache"
    assert gpu_check.prepare_triton_cache(first, dest) == {"ENTRY": "k"}
    assert json.loads((dest / "ENTRY" / "__grp__k.json").read_text())["child_paths"]["k.cubin"] == str(
        dest / "ENTRY" / "k.cubin")
    (dest / "COMPILED").mkdir()  # an entry a step compiled
    os.utime(first, (0, 0))  # a new copy of the tree: new times, same bytes
    assert gpu_check.prepare_triton_cache(first, dest) == {"ENTRY": "k"} and (dest / "COMPILED").is_dir()
    assert sorted(os.listdir(dest.parent)) == sorted([dest.name, f".{dest.name}.carried.json"])
    gpu_check.prepare_triton_cache(archive("b.tar.xz", "two"), dest)
    assert not (dest / "COMPILED").exists() and (dest / "ENTRY" / "k.cubin").read_text() == "two"
