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
from fastseed.runtime import phase_hook
from fastseed.train import prepare, train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Times the phases a step marks (`runtime.phase` in `train_step` and `Students.step`, sent
    here through `runtime.phase_hook`): a device sync at each boundary, the time since the last
    one goes to the phase that ran; each phase is also a named range in the profiler's trace."""

    def __init__(self, device):
        self.device, self.times, self.name, self.t, self.range = device, defaultdict(float), None, 0.0, None

    def phase(self, name: str | None) -> None:
        _sync(self.device)
        now = time.perf_counter()
        if self.name is not None:
            self.times[self.name] += now - self.t
            self.range.__exit__(None, None, None)
        self.name, self.t = name, now
        if name is not None:
            self.range = record_function(name)
            self.range.__enter__()


def _hook_student(student, timer: PhaseTimer):
    """Split a student's forward into 'student forward' (backbone + head) and 'loss'."""
    mods = [student.method.student, student.method.head]
    depth = {"n": 0}

    def pre(*_):
        if depth["n"] == 0:
            timer.phase(student.phase("student forward"))
        depth["n"] += 1

    def post(*_):
        depth["n"] -= 1
        if depth["n"] == 0:
            timer.phase(student.phase("loss"))

    return [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]


def time_phases(run, warmup: int = 3, steps: int = 5, prof=None) -> dict[str, float]:
    """Mean ms per step of each phase ('data wait', 'augment', 'teacher', then per student
    'student forward', 'loss', 'backward', 'optimizer' (prefixed '<arch>: ' beside others),
    'enqueue') over `steps` steps after `warmup`. The timed steps call each student's eager
    module, so that hooks can split its forward; `prof` (a torch profiler) records just them."""
    timer = PhaseTimer(run.env.device)
    run.students.train()
    it = iter(run.loader)
    hooks = []
    with phase_hook(timer.phase):
        _run_steps(run, timer, it, hooks, warmup, steps, prof)
    for h in hooks:
        h.remove()
    return {name: 1e3 * t / steps for name, t in timer.times.items()}


def _run_steps(run, timer: PhaseTimer, it, hooks: list, warmup: int, steps: int, prof) -> None:
    for step in range(warmup + steps):
        if step == warmup:
            if prof is not None:
                prof.start()
            for s in run.students:
                s.model = s.method  # hooks do not run inside a compiled graph
                hooks += _hook_student(s, timer)
            timer.times.clear()
        timer.phase("data wait")
        try:
            views, *batch = next(it)
        except StopIteration:
            it = iter(run.loader)
            views, *batch = next(it)
        train_step(run, views, step, batch)
        timer.phase(None)
    if prof is not None:
        prof.stop()


def profile(cfg: Config, warmup: int = 3, steps: int = 5) -> dict:
    # Phase hooks need the eager modules: the profiled steps run them (warm-up runs the compiled ones).
    run = prepare(cfg.replace(max_steps=warmup + steps))  # the lr schedule spans the profiled steps
    env, out = run.env, cfg.out_dir
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.device.type == "cuda" else [])
    prof = torch.profiler.profile(activities=activities, record_shapes=False)
    phases = time_phases(run, warmup, steps, prof)
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
