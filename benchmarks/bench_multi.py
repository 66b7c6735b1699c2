"""A family of students in one run against one run per student: images/s of one joint run
(`-a a,b,c`: one decode + augmentation of each view, one teacher forward, one queue per batch)
and of the N solo runs in sequence, in the same process, on the same data (one FFCV loader of
the same synthetic JPEGs: each window takes its next batches), for the same steps.

Windows alternate (joint, solo 1 .. solo N) `--rounds` times after one warm-up step each, so a
busy shared machine slows every run alike; each round gives ratio = (the N solo windows' time)
/ (the joint window's time), and the result is the median ratio and its spread. Then the
phases of a joint step and of each solo step (`fastseed.profile.time_phases`: device syncs at
each phase boundary) say where the time goes: data (loader wait + augmentation), teacher,
students, enqueue.

The teacher is a ResNet-50 with MoCo-style projection head and random weights (speed does not
depend on the weights); the students ResNet-18, EfficientNet-B0 and MobileNetV3-Large.

    .venv/bin/python benchmarks/bench_multi.py --out benchmarks/results/multi_cpu.jsonl        # CPU, 64 px
    python benchmarks/bench_multi.py --res 224 --device cuda --out benchmarks/results/multi_h100.jsonl
    .venv/bin/python benchmarks/bench_multi.py --tiny                                        # seconds
    .venv/bin/pytest benchmarks/bench_multi.py                                               # tiny, CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from _bench.data import Batches, make_images, teacher_checkpoint
from _bench.timing import TrainWindow, alternate

from fastseed.provenance import append_row, provenance

TEACHER, STUDENTS = "resnet50", ("resnet18", "efficientnet_b0", "mobilenetv3_large_100")
TINY_TEACHER, TINY_STUDENTS = "resnet10t", ("resnet10t", "test_efficientnet")


def _summarise(phases: dict[str, float]) -> dict[str, float]:
    """ms per step: data (loader wait + augmentation), teacher, students (all their phases), enqueue."""
    data = phases.get("data wait", 0.0) + phases.get("augment", 0.0)
    known = data + phases.get("teacher", 0.0) + phases.get("enqueue", 0.0)
    return {"data": round(data, 1), "teacher": round(phases.get("teacher", 0.0), 1),
            "students": round(sum(phases.values()) - known, 1), "enqueue": round(phases.get("enqueue", 0.0), 1)}


def bench(res: int = 64, batch: int = 32, steps: int = 2, rounds: int = 5, images: int = 512, workers: int = 2,
          device: str = "cpu", compile_: str = "auto", tiny: bool = False, phase_steps: int = 2) -> dict:
    from fastseed.config import Config
    from fastseed.data import ssl_loader
    from fastseed.data_prep import write_beton
    from fastseed.profile import time_phases
    from fastseed.train import prepare

    dev = torch.device(device)
    teacher_arch, archs = (TINY_TEACHER, TINY_STUDENTS) if tiny else (TEACHER, STUDENTS)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", images, 400 if res > 64 else int(1.25 * res))
        beton = tmp / "images.beton"
        write_beton(str(tmp / "images"), str(beton), max_res=512, jpeg_quality=90,
                    compress_probability=1.0 if res > 64 else 0.0, workers=workers, progress=False)
        ckpt = teacher_checkpoint(teacher_arch, tmp / f"{teacher_arch}.pth")
        loader = ssl_loader(str(beton), batch_size=batch, res=res, device=dev, num_workers=workers)
        base = Config(method="seed", teacher_arch=teacher_arch, distill=str(ckpt), data=str(beton), res=res,
                      batch_size=batch, workers=workers, device=dev.type, compile=compile_, epochs=10**6,
                      progress=False)
        runs = {"joint": prepare(base.replace(arch=",".join(archs), output=str(tmp / "joint")), loader=loader)}
        runs |= {a: prepare(base.replace(arch=a, output=str(tmp / a)), loader=loader) for a in archs}
        for run in runs.values():
            run.students.train()
        batches = Batches(loader)
        windows = {name: TrainWindow(run, batches) for name, run in runs.items()}
        # a warm-up step each (lazy inits, compile, cuDNN autotune), then `rounds` rounds of `steps` each
        times = alternate({name: lambda w=w: w(steps) for name, w in windows.items()}, rounds, flip=False,
                          warmup={name: lambda w=w: w(1) for name, w in windows.items()}).seconds
        batches.close()
        ratios = [sum(times[a][r] for a in archs) / times["joint"][r] for r in range(rounds)]
        phases = {name: time_phases(run, warmup=0, steps=phase_steps) for name, run in runs.items()}
    joint_s, solo_s = sum(times["joint"]), sum(sum(times[a]) for a in archs)
    n = rounds * steps * batch
    return {
        "bench": "multi", "teacher": teacher_arch, "students": list(archs), "res": res, "batch": batch,
        "steps_per_window": steps, "rounds": rounds, "images": images, "workers": workers, "compile": compile_,
        "teacher_weights": "random", **provenance(dev),
        "joint_images_per_s": round(n / joint_s, 2), "solo_sequence_images_per_s": round(n / solo_s, 2),
        "ratio_median": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3), "ratios": [round(x, 3) for x in ratios],
        "window_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "phase_ms_per_step": {name: _summarise(p) for name, p in phases.items()},
        "phase_ms_detail": {name: {k: round(v, 1) for k, v in p.items()} for name, p in phases.items()},
    }


def test_bench_multi_tiny(benchmark):
    """Tiny CPU run under pytest-benchmark: the joint run and the solo runs work end to end."""
    result = benchmark.pedantic(bench, kwargs=dict(res=32, batch=16, steps=1, rounds=1, images=64, tiny=True,
                                                   phase_steps=1), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["ratio_median"] > 0 and result["phase_ms_per_step"]["joint"]["teacher"] > 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="steps per window")
    p.add_argument("--rounds", type=int, default=5, help="alternations of (joint, solo 1 .. solo N)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", dest="compile_", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--phase-steps", type=int, default=2, help="steps timed phase by phase, per run")
    p.add_argument("--tiny", action="store_true", help="ResNet-10t teacher, two tiny students (CI)")
    p.add_argument("--out", default=None, help="append the result as one JSON line")
    a = p.parse_args(argv)
    result = bench(a.res, a.batch, a.steps, a.rounds, a.images, a.workers, a.device, a.compile_, a.tiny,
                   a.phase_steps)
    print(append_row(a.out, result))
    print(f"joint {result['joint_images_per_s']} img/s, solo runs in sequence {result['solo_sequence_images_per_s']} "
          f"img/s: {result['ratio_median']}x (median of {a.rounds}; {result['ratio_min']}-{result['ratio_max']})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
