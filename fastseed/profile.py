"""`fastseed-train --profile`: where a step's time goes.

Runs a few warm-up steps, then profiles a few more with `torch.profiler` and writes to OUTPUT:
  profile_trace.json   Chrome trace (chrome://tracing, Perfetto)
  profile_kernels.txt  top kernels by self device time (CUDA) or CPU time
  profile_phases.json  mean time per phase of a step
  profile_phases.png   bar chart of the phases (needs matplotlib)
Phases are timed with a device synchronisation at each boundary, so that each one's time is
its own (this slows the profiled steps a little; the training loop itself never syncs).
"""
from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, record_function

from fastseed.config import Config
from fastseed.train import prepare

PHASES = ("data wait", "augment", "teacher", "student forward", "loss", "backward", "optimizer", "enqueue")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    def __init__(self, device):
        self.device, self.times, self.t = device, defaultdict(list), None

    def start(self):
        _sync(self.device)
        self.t = time.perf_counter()

    def lap(self, name: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.times[name].append(now - self.t)
        self.t = now


def _hook_student(method, timer: PhaseTimer):
    """Split the method's forward into 'student forward' (backbone + head) and 'loss'."""
    mods = [method.student, method.head]
    depth = {"n": 0}

    def pre(*_):
        if depth["n"] == 0:
            timer.lap("loss")  # time since the last lap that was not the student
        depth["n"] += 1

    def post(*_):
        depth["n"] -= 1
        if depth["n"] == 0:
            timer.lap("student forward")

    return [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]


def profile(cfg: Config, warmup: int = 3, steps: int = 5) -> dict:
    # Phase hooks need the eager module; the kernels table shows the compiled run's kernels.
    run = prepare(cfg.replace(max_steps=warmup + steps))  # the lr schedule spans the profiled steps
    env, method, out = run.env, run.method, cfg.out_dir
    timer = PhaseTimer(env.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    method.train()
    it = iter(run.loader)
    prof = torch.profiler.profile(activities=activities, record_shapes=False)
    hooks = []
    for step in range(warmup + steps):
        if step == warmup:
            prof.start()
            hooks = _hook_student(method, timer)
            timer.times.clear()
        timer.start()
        with record_function("data wait"):
            try:
                views, _ = next(it)
            except StopIteration:
                it = iter(run.loader)
                views, _ = next(it)
        timer.lap("data wait")
        for g in run.optimizer.param_groups:
            g["lr"] = run.schedule(step)
        with record_function("augment"):
            views = [run.augment(v, generator=run.aug_gen) for v in views]
        timer.lap("augment")
        with run.autocast():
            with record_function("teacher"):
                targets = method.targets(views)
            timer.lap("teacher")
            with record_function("student forward + loss"):
                loss = (method if hooks else run.model)(views, targets)
            timer.lap("loss")
        with record_function("backward"):
            loss.backward()
        timer.lap("backward")
        with record_function("optimizer"):
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        timer.lap("optimizer")
        with record_function("enqueue"):
            method.update(targets)
        timer.lap("enqueue")
    prof.stop()
    for h in hooks:
        h.remove()

    phases = {p: 1e3 * sum(timer.times[p]) / steps for p in PHASES if timer.times[p]}
    sort = "self_cuda_time_total" if env.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    if env.main:
        prof.export_chrome_trace(str(out / "profile_trace.json"))
        (out / "profile_kernels.txt").write_text(table)
        report = {"device": str(env.device), "torch": torch.__version__, "batch_size": cfg.batch_size,
                  "arch": cfg.arch, "method": cfg.method, "steps": steps, "phase_ms": phases,
                  "step_ms": sum(phases.values())}
        (out / "profile_phases.json").write_text(json.dumps(report, indent=2))
        _bar_chart(phases, out / "profile_phases.png", f"{cfg.method} {cfg.arch}, batch {cfg.batch_size}, "
                   f"{env.device}")
        print(table)
        print("ms per step by phase: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        print(f"wrote {out}/profile_trace.json, profile_kernels.txt, profile_phases.json, profile_phases.png",
              file=sys.stderr)
    return phases


def _bar_chart(phases: dict, path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no profile_phases.png (pip install matplotlib)", file=sys.stderr)
        return
    names, ms = list(phases), list(phases.values())
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(names[::-1], ms[::-1], color="#4472c4")
    for y, v in enumerate(ms[::-1]):
        ax.text(v, y, f" {v:.1f} ms", va="center", fontsize=8)
    ax.set_xlabel("ms per step")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
