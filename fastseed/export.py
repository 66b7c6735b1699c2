"""Writing a distilled student for use outside fastseed.

    export_timm_state_dict(checkpoint, path) -> meta

writes the backbone (no head) as a plain timm state dict, atomically:
``timm.create_model(meta['arch'], num_classes=0).load_state_dict(torch.load(path))``.
"""
from __future__ import annotations

from pathlib import Path

from fastseed.checkpoint import atomic_save
from fastseed.evaluate import load_student


def export_timm_state_dict(checkpoint: str, path: str | Path, trust: bool = False) -> dict:
    """The backbone of `checkpoint` as a timm state dict at `path`; returns the checkpoint's metadata."""
    model, meta = load_student(checkpoint, trust)
    atomic_save(model.state_dict(), Path(path))
    return meta
