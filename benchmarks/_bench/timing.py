"""Alternating timed windows: each contender (a pipeline, a run, a loader) is called once
untimed (the warm-up: JIT, worker start, compile, page cache), then `rounds` times, one call of
each per round, so that a busy shared machine slows every contender alike. With `flip` the
order reverses every other round (A B, B A, ...): no contender always runs second."""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Windows:
    """Per contender, in round order: the wall seconds of each timed call, this process's CPU
    seconds of it, and what the call returned."""
    seconds: dict[str, list[float]]
    cpu_seconds: dict[str, list[float]]
    results: dict[str, list[Any]]


def alternate(contenders: Mapping[str, Callable[[], Any]], rounds: int, *, flip: bool = True,
              warmup: Mapping[str, Callable[[], Any]] | None = None) -> Windows:
    """Call each of `warmup` (default: each contender) once, in order, untimed; then `rounds`
    rounds of one timed call of each contender, in order, reversed every other round if `flip`."""
    for fn in (warmup or contenders).values():
        fn()
    out = Windows(*({name: [] for name in contenders} for _ in range(3)))
    for r in range(rounds):
        names = list(contenders)[::-1] if flip and r % 2 else list(contenders)
        for name in names:
            cpu, t = time.process_time(), time.perf_counter()
            result = contenders[name]()
            out.seconds[name].append(time.perf_counter() - t)
            out.cpu_seconds[name].append(time.process_time() - cpu)
            out.results[name].append(result)
    return out


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainWindow:
    """Windows of training steps of one prepared run (`fastseed.train.prepare`) over batches it
    may share with other runs (`data.Batches`): `window(n)` trains on the next n batches, its
    step numbers going on from the last window's, with a device sync at both ends."""

    def __init__(self, run, batches):
        self.run, self.batches, self.step = run, batches, 0

    def __call__(self, steps: int) -> None:
        from fastseed.train import train_step
        sync(self.run.env.device)
        for _ in range(steps):
            views, *batch = self.batches.next()  # the loader's labels (and a cache's keys)
            train_step(self.run, views, self.step, batch)
            self.step += 1
        sync(self.run.env.device)
