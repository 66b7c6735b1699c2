"""The cost of the patch-relation loss (`--local-weight`, fastseed/methods/local.py): a SEED
training step with fastseed's defaults against the same step with `--local-weight 1`, per side.

  step  both runs are built in one process (`fastseed.train.prepare`) on the same synthetic
        uint8 batches already on the device (no decode: the step alone) and timed in windows of
        --steps steps (`_bench.timing`'s windows over one `Batches`), alternating (seed, local),
        then (local, seed), ... for --rounds rounds after --warmup steps each, so that a drift of
        a shared machine falls on both. Reported: ms per step and images/s of each (from the
        median window: a burst of another process's load moves no median), the difference, the
        local loss's share of the step that has it ((local - seed) / local), and the median and
        range of the rounds' time ratios (local / seed). On a CPU also the process's CPU time
        per step and the share by it: on a machine that other jobs share, a window's wall time
        holds the time the process waited for a core, its CPU time does not (with one torch
        thread, --threads 1, nor the time its threads spin waiting for each other). Then
        --phase-steps steps of each run phase by phase (`fastseed.profile.time_phases`, eager
        modules); "student" is the student's forward and both losses together: with a token
        loss the backbone runs through `forward_features`, which the profiler's module hooks do
        not see, so its time falls in the "loss" phase and only the sum of the two compares
        between the runs.
  loss  `local_loss` alone, forward and backward, on [B, C, g, g] maps (the student's in the
        run's precision, as its projector gives them under autocast) at each --micro-grids g,
        beside `fastseed.kernels.seed_loss` on [B, C] keys against a queue of each
        --micro-queues K (C = --micro-width for both): the median of --micro-reps after one
        warm-up call.

What differs between the two runs is all of the loss's cost: the teacher's pass returns its
token map as well (`Teacher.features`), the student's backbone pass keeps its last map, the 1x1
projector and its resize to the teacher's grid, the two [n, C] x [C, n] products per image and
their softmaxes, and the backward of all of it. The epoch of the synthetic loader is ImageNet's
length (1,281,167 images; a few distinct batches repeat), so that `--queue-size auto` sizes the
queue as for ImageNet: 4,096 keys of EfficientNet-Lite0's 1280-d embedding, 65,536 of a MoCo
ResNet-50 head's 128-d. A teacher that is not bundled (resnet50) gets random weights and a
MoCo-v2 projection head (`_bench.data.teacher_checkpoint`): speed does not depend on them.

    .venv/bin/python benchmarks/bench_local.py --out benchmarks/results/local_cost_cpu.jsonl   # CPU: 64 and 128 px
    python benchmarks/bench_local.py --device cuda --res 224 --batch 256 --teacher resnet50 \\
        --out benchmarks/results/local_cost_h200.jsonl       # GPU (the GPU check's n-local): bf16, compiled
    .venv/bin/python benchmarks/bench_local.py -a resnet10t --res 32 --teacher-res 64 --batch 4 --steps 1 \\
        --rounds 2 --micro-batch 4 --micro-width 16 --micro-grids 3 --micro-queues 64   # seconds (a 2x2 grid)

Rows (one per side, one per loss case, each with the command that ran it and its provenance)
are appended to --out; the tables and the command go to the .md beside it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench.data import Batches, teacher_checkpoint
from _bench.rows import command_line
from _bench.tables import markdown
from _bench.timing import TrainWindow, alternate, sync

from fastseed.provenance import append_row, provenance

IMAGENET = 1_281_167
PHASES = ("augment", "teacher", "student", "backward", "optimizer", "enqueue")


class SyntheticLoader:
    """`distinct` batches of uint8 NHWC views on the device, repeated for an epoch of `images`
    images: what `prepare(cfg, loader=...)` takes in place of the FFCV loader."""

    def __init__(self, batch: int, res: int, device: torch.device, images: int = IMAGENET, distinct: int = 2):
        g = torch.Generator(device).manual_seed(0)
        self.batches = [([torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, device=device, generator=g)],
                         torch.zeros(batch, dtype=torch.long, device=device)) for _ in range(distinct)]
        self.length = max(1, images // batch)

    def __len__(self) -> int:
        return self.length

    def resume(self, epoch: int, batch: int = 0) -> None:
        pass

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.length))


def _phases(phases: dict[str, float]) -> dict[str, float]:
    """ms per step by phase, with 'student forward' and 'loss' summed as 'student' (module doc)."""
    merged = {"student": phases.get("student forward", 0.0) + phases.get("loss", 0.0)}
    return {k: round(merged.get(k, phases.get(k, 0.0)), 2) for k in PHASES}


def token_grid(run) -> tuple[int, int, int]:
    """(h, w, C) of the teacher's token map for this run's batches: one teacher pass."""
    views, _ = run.loader.batches[0]
    with torch.no_grad():
        x = run.augment(views[0], generator=run.aug_gen)
        _, tokens = run.targets.teacher.with_tokens(x)
    return tokens.shape[-2], tokens.shape[-1], tokens.shape[1]


def time_side(res: int, *, teacher_res: int | None, student: str, teacher: str, distill: str | None, batch: int,
              steps: int, rounds: int, warmup: int, phase_steps: int, device: torch.device, compile_: str, queue,
              work: Path) -> dict:
    """The two runs at side `res`: alternating windows, then their phases."""
    from fastseed.config import Config
    from fastseed.profile import time_phases
    from fastseed.train import prepare

    loader = SyntheticLoader(batch, res, device)
    base = Config(method="seed", arch=student, teacher_arch=teacher, distill=distill, res=res, teacher_res=teacher_res,
                  batch_size=batch, queue_size=queue, device=device.type, compile=compile_, epochs=10**6,
                  progress=False)
    runs = {"seed": prepare(base.replace(output=str(work / f"seed_{res}")), loader=loader),
            "local": prepare(base.replace(output=str(work / f"local_{res}"), local_weight=1.0), loader=loader)}
    batches = Batches(loader)
    windows = {name: TrainWindow(run, batches) for name, run in runs.items()}
    for run in runs.values():
        run.students.train()
    # `warmup` steps each (lazy inits, compile, cuDNN autotune), then seed, local; local, seed; ...
    timed = alternate({name: lambda w=w: w(steps) for name, w in windows.items()}, rounds,
                      warmup={name: lambda w=w: w(warmup) for name, w in windows.items()})
    times, cpu = timed.seconds, timed.cpu_seconds
    h, w, c = token_grid(runs["local"])
    phases = {name: time_phases(run, warmup=0, steps=phase_steps) for name, run in runs.items()} if phase_steps else {}
    ms = {name: 1e3 * statistics.median(t) / steps for name, t in times.items()}  # a load spike moves no median
    cpu_ms = {name: 1e3 * statistics.median(t) / steps for name, t in cpu.items()}
    on_cpu = device.type == "cpu"  # the process's CPU time: a CUDA step's is the host's alone
    ratios = [loc / seed for seed, loc in zip(times["seed"], times["local"])]
    cfg = runs["seed"].cfg
    return {
        "res": res, "teacher_res": cfg.teacher_res, "grid": f"{h}x{w}", "tokens": h * w, "token_dim": c,
        "queue": cfg.queue_size, "precision": str(runs["seed"].dtype or torch.float32).replace("torch.", ""),
        "teacher_precision": str(runs["seed"].teacher_dtype or torch.float32).replace("torch.", ""),
        "seed_ms_per_step": round(ms["seed"], 2), "local_ms_per_step": round(ms["local"], 2),
        "local_extra_ms": round(ms["local"] - ms["seed"], 2),
        "local_share": round((ms["local"] - ms["seed"]) / ms["local"], 4),
        "seed_images_per_s": round(1e3 * batch / ms["seed"], 1),
        "local_images_per_s": round(1e3 * batch / ms["local"], 1),
        "ratio_median": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3), "ratios": [round(x, 3) for x in ratios],
        "window_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "seed_cpu_ms_per_step": round(cpu_ms["seed"], 2) if on_cpu else None,
        "local_cpu_ms_per_step": round(cpu_ms["local"], 2) if on_cpu else None,
        "local_cpu_share": round((cpu_ms["local"] - cpu_ms["seed"]) / cpu_ms["local"], 4) if on_cpu else None,
        "window_cpu_s": {k: [round(t, 3) for t in v] for k, v in cpu.items()} if on_cpu else None,
        "phase_ms_per_step": {name: _phases(p) for name, p in phases.items()},
        "phase_ms_detail": {name: {k: round(v, 2) for k, v in p.items()} for name, p in phases.items()},
    }


def _median_ms(loss_fn, inputs: tuple, device: torch.device, reps: int) -> float:
    """Median ms of `loss_fn(*inputs).backward()` over `reps` calls after one warm-up call
    (allocations, the kernels' first launch)."""
    times = []
    for i in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        loss_fn(*inputs).backward()
        sync(device)
        if i:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def time_losses(*, batch: int, width: int, grids: list[int], queues: list[int], reps: int,
                device: torch.device) -> list[dict]:
    """Forward and backward of the patch-relation loss at each grid and of the SEED loss at each K."""
    from fastseed.kernels import seed_loss
    from fastseed.methods.local import local_loss

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the runs' autocast: the projector's output
    g = torch.Generator(device).manual_seed(0)

    def randn(*shape, grad=False):
        return torch.randn(*shape, device=device, generator=g).to(dtype).requires_grad_(grad)

    def seed(s, t, q):
        return seed_loss(s, t, q, student_temp=0.07, teacher_temp=0.07)  # fastseed's temperatures

    rows = []
    for grid in grids:
        maps = randn(batch, width, grid, grid, grad=True), randn(batch, width, grid, grid)
        rows.append({"loss": "local", "grid": f"{grid}x{grid}", "queue": None,
                     "ms": round(_median_ms(local_loss, maps, device, reps), 3)})
    for k in queues:
        queue = torch.nn.functional.normalize(torch.randn(k, width, device=device, generator=g), dim=1).to(dtype)
        keys = randn(batch, width, grad=True), randn(batch, width), queue
        rows.append({"loss": "seed", "grid": None, "queue": k, "ms": round(_median_ms(seed, keys, device, reps), 3)})
    return [{**r, "batch": batch, "width": width, "dtype": str(dtype).replace("torch.", ""), "reps": reps}
            for r in rows]


def _cpu_cell(r: dict) -> str:
    if r["seed_cpu_ms_per_step"] is None:
        return "–"
    return f"{r['seed_cpu_ms_per_step']:.1f}, {r['local_cpu_ms_per_step']:.1f}: {r['local_cpu_share']:.1%}"


def table(steps: list[dict], losses: list[dict], command: str) -> str:
    """The comparison per side, its phases, the losses alone, and what ran them."""
    lines = []
    if steps:
        lines.append(markdown(
            ["side px", "teacher grid", "queue", "seed ms/step", "+local ms/step", "difference ms", "local share",
             "ratio (median, range)", "seed img/s", "+local img/s", "CPU ms/step seed, +local: share"],
            [[r["res"], f"{r['grid']} ({r['token_dim']}-d)", r["queue"], f"{r['seed_ms_per_step']:.1f}",
              f"{r['local_ms_per_step']:.1f}", f"{r['local_extra_ms']:+.1f}", f"{r['local_share']:.1%}",
              f"{r['ratio_median']:.3f} ({r['ratio_min']:.3f}-{r['ratio_max']:.3f})",
              f"{r['seed_images_per_s']:.1f}", f"{r['local_images_per_s']:.1f}", _cpu_cell(r)] for r in steps],
            "rlrrrrrlrrl"))
        phased = [r for r in steps if r["phase_ms_per_step"]]
        if phased:
            cells = [[r["res"], *(f"{r['phase_ms_per_step']['seed'][p]:.1f} / {r['phase_ms_per_step']['local'][p]:.1f}"
                                  for p in PHASES)] for r in phased]
            lines += ["", "ms per step by phase (seed / +local):", "",
                      markdown(["side px", *PHASES], cells, "r" * (1 + len(PHASES)))]
        r = steps[0]
        lines += ["", (f"{r['student']} student, {r['teacher']} teacher ({r['teacher_weights']} weights), batch "
                       f"{r['batch']}, {r['precision']} student, {r['teacher_precision']} teacher, compile "
                       f"{r['compile']}; {r['rounds']} rounds of {r['steps_per_window']} steps each way after "
                       f"{r['warmup']} warm-up steps"), ""]
    if losses:
        r = losses[0]
        lines += [(f"Forward + backward alone, B {r['batch']}, C {r['width']}, {r['dtype']}, median of "
                   f"{r['reps']}:"), "",
                  markdown(["loss", "size", "ms"], [[r["loss"], f"grid {r['grid']}" if r["grid"] else f"K {r['queue']}",
                                                     f"{r['ms']:.2f}"] for r in losses], "llr"), ""]
    e = (steps or losses)[0]
    return "\n".join([*lines, f"{e['device']}, torch {e['torch']}, commit {e['commit']}, {e['date']}: `{command}`"])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    device = torch.device(p.parse_known_args(argv)[0].device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    p.add_argument("--res", type=int, nargs="+", default=[224] if gpu else [64, 128],
                   help="student sides, one comparison each")
    p.add_argument("--teacher-res", type=int, default=None,
                   help="the teacher's side (default: each --res); its grid must hold 2 tokens or more")
    p.add_argument("-a", "--student", default="resnet18")
    p.add_argument("-k", "--teacher", default="resnet50" if gpu else "efficientnet_lite0",
                   help="a bundled teacher (its weights), else random weights with a MoCo-v2 head")
    p.add_argument("--batch", type=int, default=256 if gpu else 16)
    p.add_argument("--queue", default="auto", help="--queue-size of both runs (auto: sized for ImageNet)")
    p.add_argument("--steps", type=int, default=5 if gpu else 1, help="steps per timed window")
    p.add_argument("--rounds", type=int, default=5 if gpu else 6, help="alternations of (seed, local) windows")
    p.add_argument("--warmup", type=int, default=3 if gpu else 1, help="untimed steps of each run first (compile)")
    p.add_argument("--phase-steps", type=int, default=3 if gpu else 1, help="steps timed phase by phase (0: none)")
    p.add_argument("--compile", dest="compile_", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--micro-width", type=int, default=1280, help="C: the projected token width and the key width")
    p.add_argument("--micro-grids", type=int, nargs="*", default=[7, 16])
    p.add_argument("--micro-queues", type=int, nargs="*", default=[512, 65536])
    p.add_argument("--micro-reps", type=int, default=10 if gpu else 1)
    p.add_argument("--threads", type=int, default=None, help="torch threads on a CPU (default: torch's)")
    p.add_argument("--out", default=None, help="append the rows as JSON lines; the tables to the .md beside it")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    command = command_line("benchmarks/bench_local.py", argv)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    queue = a.queue if a.queue == "auto" else int(a.queue)
    from fastseed.teachers.bundled import BUNDLED
    steps, losses = [], []
    with tempfile.TemporaryDirectory() as tmp:
        distill = None if a.teacher in BUNDLED else str(teacher_checkpoint(a.teacher, Path(tmp) / f"{a.teacher}.pth"))
        for res in a.res:
            load = os.getloadavg()[0]
            side = time_side(res, teacher_res=a.teacher_res, student=a.student, teacher=a.teacher, distill=distill,
                             batch=a.batch, steps=a.steps, rounds=a.rounds, warmup=a.warmup, phase_steps=a.phase_steps,
                             device=device, compile_=a.compile_, queue=queue, work=Path(tmp))
            row = {"bench": "local_cost", "command": command, "student": a.student, "teacher": a.teacher,
                   "teacher_weights": "bundled" if distill is None else "random", "batch": a.batch,
                   "compile": a.compile_, "steps_per_window": a.steps, "rounds": a.rounds, "warmup": a.warmup,
                   "phase_steps": a.phase_steps, **side, "load_average_before": round(load, 2), **provenance(device)}
            steps.append(row)
            print(append_row(a.out, row), file=sys.stderr)
    if a.micro_grids or a.micro_queues:
        for r in time_losses(batch=a.micro_batch, width=a.micro_width, grids=a.micro_grids, queues=a.micro_queues,
                             reps=a.micro_reps, device=device):
            row = {"bench": "local_loss_alone", "command": command, **r, **provenance(device)}
            losses.append(row)
            print(append_row(a.out, row), file=sys.stderr)
    text = table(steps, losses, command)
    if a.out:
        Path(a.out).with_suffix(".md").write_text(text + "\n")
    print(text)
    return {"steps": steps, "losses": losses}


if __name__ == "__main__":
    main()
