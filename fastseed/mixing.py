"""Input mixup for distillation (`--mixup`): each batch is mixed with a permutation of itself,
x ← λ·x + (1 − λ)·x[π], one λ ~ U(0, 1) per step, before the teacher and the students see it,
so the student matches the teacher on images between the data's (LightlyTrain's `distillation`
does the same; the SEED and SimReg papers do not). λ and π come from the run's augmentation
generator: a resumed run mixes as the uninterrupted one. Every view of a step (the global crop,
and SEED's small crops) takes the same λ and π. A teacher cache holds keys of unmixed crops:
it cannot serve mixed images, and the run is refused (`check_mixup`)."""
from __future__ import annotations

import torch

from fastseed.errors import ConfigError


def check_mixup(cfg) -> None:
    if cfg.mixup and cfg.teacher_cache is not None:
        raise ConfigError("--mixup mixes the images the teacher sees, and --teacher-cache stores keys of unmixed "
                          "crops: drop one of them")


def mixup(views: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """Every view mixed with the same λ and permutation (drawn on the generator's device)."""
    b = views[0].shape[0]
    device = generator.device
    lam = torch.rand((), generator=generator, device=device)
    perm = torch.randperm(b, generator=generator, device=device)
    out = []
    for v in views:
        n = v.shape[0] // b  # small crops are crop-major: crop c of image i is row c·B + i
        index = (perm[None, :] + b * torch.arange(n, device=device)[:, None]).flatten()
        lam_v = lam.to(v.device, v.dtype)
        out.append(torch.lerp(v[index.to(v.device)], v, lam_v))
    return out
