"""Helpers several test files share (fixtures are in conftest.py)."""
from __future__ import annotations

import torch
from torch import nn

from fastseed.cache import build_cache
from fastseed.checkpoint import read_checkpoint
from fastseed.runtime import setup_env
from fastseed.targets import live_targets
from fastseed.teachers.base import TeacherBundle


def frozen_teacher(model: nn.Module, res: int | None = None, dim: int = 0) -> TeacherBundle:
    """`model` as a run holds a frozen teacher (eval, no gradients), without a checkpoint."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TeacherBundle(model, dim, dim, (0.5,) * 3, (0.5,) * 3, "test", "", "test", res=res)


def build_teacher_cache(cfg, output, **build):
    """fastseed-cache's build of `cfg`'s live teacher at `output` (fastseed.cache.build_cache)."""
    env = setup_env(cfg)
    return build_cache(cfg, output, live_targets(cfg, env), env, **build)


def refusal(code: int, stderr: str, *needles: str, alone: bool = True) -> str:
    """Assert that an entry point refused its input as fastseed promises: exit code 2, no
    traceback, one `error: ...` line naming every needle, and nothing else on stderr (with
    `alone` False, lines a run printed before it may precede it, but none may follow). Returns
    the line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2, (code, stderr[-3000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert len(lines) == 1 or not alone, stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def same_weights(a, b, step: int) -> None:
    """Assert that the checkpoints at `a` and `b` are both at `step` and hold the same student,
    head and buffers, bit for bit (a resumed run against one never stopped)."""
    x, y = read_checkpoint(a), read_checkpoint(b)
    assert x["fastseed"]["step"] == y["fastseed"]["step"] == step
    for part in ("student", "head", "buffers"):
        assert x[part].keys() == y[part].keys()
        for name, tensor in y[part].items():
            assert torch.equal(x[part][name], tensor), f"{part}.{name}"
