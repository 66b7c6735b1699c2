"""Evaluation of frozen encoders: feature extraction, weighted k-NN, linear probes, a
checkpoint's student (`fastseed-eval`), and the k-NN monitor of a training run (`KnnMonitor`).

Everything runs on the device the features live on; nothing syncs to the host inside a loop
except the final accuracies.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastseed.augment import Normalize
from fastseed.checkpoint import read_checkpoint
from fastseed.config import Config
from fastseed.data import eval_loader, image_sizes
from fastseed.models import resize
from fastseed.runtime import gather_rows

LINEAR_LRS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def extract_features(model: nn.Module, loader: Iterable, *, device: torch.device | str,
                     transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32, on ``device``) and labels [N] (int64) of every batch of ``loader``.

    ``loader`` yields ``(images, labels)``. ``transform`` (e.g. a normalising module) gets the
    images as they come, moved to ``device``; without one, uint8 NHWC batches become float NCHW in
    [0, 1] and float batches pass unchanged. ``dtype`` below float32 runs the model under autocast.
    """
    device = torch.device(device)
    model.eval()
    autocast = dtype != torch.float32
    feats, labels = [], []
    # The iterator is made outside inference mode: an FFCV loader allocates its batch buffers
    # there, and its thread (which inference mode, being thread-local, does not cover) writes into
    # them; inference tensors would refuse those in-place writes.
    batches = iter(loader)
    with torch.inference_mode():
        for images, target in batches:
            images = images.to(device, non_blocking=True)
            if transform is not None:
                images = transform(images)
            elif images.dtype == torch.uint8:
                if images.dim() == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
                    images = images.permute(0, 3, 1, 2)
                images = images.float().div_(255)
            # no autocast context unless asked: it refuses device types it does not know (meta)
            with torch.autocast(device.type, dtype=dtype) if autocast else nullcontext():
                out = model(images)
            feats.append(out.float().flatten(1))
            labels.append(torch.as_tensor(target).to(device, torch.long, non_blocking=True))
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    # Concatenating outside inference mode gives ordinary tensors that autograd may save.
    return torch.cat(feats), torch.cat(labels)


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, ks: Sequence[int] = (1, 20, 200),
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int = 1024) -> dict[str, float]:
    """Weighted k-NN top-1 (%) of the test set against the train bank, for every k in ``ks``.

    The InstDisc / DINO vote: with features L2-normalised, the k most cosine-similar bank rows
    each vote for their label with weight exp(sim / T); the class with the largest total wins
    (ties go to the lowest class index). One [chunk, N] similarity matmul and one top-k per chunk
    of test rows; k larger than the bank is clipped to its size (the key keeps the asked k).
    """
    if train_feats.shape[0] == 0 or test_feats.shape[0] == 0:
        raise ValueError("knn_classify: empty train bank or test set")
    device = train_feats.device
    bank = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(device, torch.long)
    test_labels = test_labels.to(device, torch.long)
    if num_classes is None:
        num_classes = int(torch.maximum(train_labels.max(), test_labels.max()).item()) + 1
    n = bank.shape[0]
    kmax = min(max(ks), n)
    correct = {k: torch.zeros((), dtype=torch.long, device=device) for k in ks}
    for start in range(0, test_feats.shape[0], chunk_size):
        query = F.normalize(test_feats[start:start + chunk_size].to(device).float(), dim=1)
        sims, idx = (query @ bank.T).topk(kmax, dim=1)  # sorted, most similar first
        weights = sims.div_(temperature).exp_()
        neighbour_labels = train_labels[idx]
        target = test_labels[start:start + chunk_size]
        for k in ks:
            kk = min(k, n)
            votes = torch.zeros(query.shape[0], num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[k] += (votes.argmax(1) == target).sum()
    total = test_feats.shape[0]
    return {f"knn_top1@{k}": 100.0 * correct[k].item() / total for k in ks}


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, lrs: Sequence[float] = LINEAR_LRS, epochs: int = 100,
                 batch_size: int = 256, weight_decay: float = 0.0, num_classes: int | None = None,
                 seed: int = 0, normalize: bool = True, momentum: float = 0.9,
                 protocol: str | None = None) -> dict:
    """Linear classifiers on frozen features, one per learning rate, trained in one pass.

    The classifiers are stacked as W [L, D, C], b [L, C]: each step is one batched matmul for all
    L learning rates over the same minibatch, and since the loss is a sum of independent per-lr
    cross-entropies each W[l] sees exactly the gradient it would see alone. SGD with momentum
    (torch.optim.SGD semantics: buf = m·buf + g + wd·W; W -= lr·buf), per-step cosine decay,
    init N(0, 0.01²) shared by every lr, one shuffled order per epoch from ``seed``.

    ``normalize`` standardises features with the train mean/std first (common practice for
    cached-feature probes). ``protocol='seed'`` is SEED's (MoCo's main_lincls) setting: lr 30,
    100 epochs, raw features, wd 0, lr ×0.1 at 60% and 80% of training.

    Returns ``{'linear_top1': best %, 'lr': its lr, 'per_lr': {lr: top1 %}}``; the best is chosen
    on the test set, as probe grids usually are.
    """
    schedule = "cosine"
    if protocol == "seed":
        lrs, epochs, normalize, weight_decay, schedule = (30.0,), 100, False, 0.0, "step"
    elif protocol is not None:
        raise ValueError(f"unknown linear-probe protocol {protocol!r} (known: 'seed')")
    device = train_feats.device
    x_train = train_feats.float()
    x_test = test_feats.to(device).float()
    y_train = train_labels.to(device, torch.long)
    y_test = test_labels.to(device, torch.long)
    if normalize:
        mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    if num_classes is None:
        num_classes = int(torch.maximum(y_train.max(), y_test.max()).item()) + 1
    n, d = x_train.shape
    n_lr = len(lrs)

    gen = torch.Generator(device="cpu").manual_seed(seed)
    w0 = torch.randn(d, num_classes, generator=gen) * 0.01
    weight = w0.to(device).expand(n_lr, d, num_classes).clone()
    bias = torch.zeros(n_lr, num_classes, device=device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    base_lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    rows = torch.arange(batch_size, device=device)

    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            x, y = x_train[batch], y_train[batch]
            b = x.shape[0]
            # d(mean CE)/d logits = (softmax - onehot) / B, for all L classifiers at once
            logits = torch.einsum("bd,ldc->lbc", x, weight) + bias[:, None, :]
            grad = logits.softmax(-1)
            grad[:, rows[:b], y] -= 1.0
            grad /= b
            grad_w = torch.einsum("bd,lbc->ldc", x, grad) + weight_decay * weight
            grad_b = grad.sum(1) + weight_decay * bias
            if step == 0:
                buf_w.copy_(grad_w)
                buf_b.copy_(grad_b)
            else:
                buf_w.mul_(momentum).add_(grad_w)
                buf_b.mul_(momentum).add_(grad_b)
            if schedule == "cosine":
                factor = 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            else:
                factor = 0.1 ** sum(step >= int(total_steps * f) for f in (0.6, 0.8))
            lr = base_lr * factor
            weight.sub_(lr[:, None, None] * buf_w)
            bias.sub_(lr[:, None] * buf_b)
            step += 1

    correct = torch.zeros(n_lr, dtype=torch.long, device=device)
    for start in range(0, x_test.shape[0], 4096):
        logits = torch.einsum("bd,ldc->lbc", x_test[start:start + 4096], weight) + bias[:, None, :]
        correct += (logits.argmax(-1) == y_test[start:start + 4096]).sum(1)
    top1 = (100.0 * correct.double() / x_test.shape[0]).tolist()
    per_lr = dict(zip(map(float, lrs), top1))
    best = max(range(n_lr), key=lambda i: (top1[i], -i))
    return {"linear_top1": top1[best], "lr": float(lrs[best]), "per_lr": per_lr}


def load_student(checkpoint: str, trust: bool = False) -> tuple[nn.Module, dict]:
    """The distilled backbone (no head) of a fastseed checkpoint, and the checkpoint's metadata.
    ``student`` is a plain timm state dict: ``timm.create_model(arch, num_classes=0)`` loads it.
    Unpickling runs no code from the file unless ``trust``."""
    import timm

    ckpt = read_checkpoint(checkpoint, trust)
    meta = ckpt["fastseed"]
    model = timm.create_model(meta["arch"], pretrained=False, num_classes=0)
    model.load_state_dict(ckpt["student"], strict=True)
    return model, {**meta, "config": ckpt.get("config", {})}


def evaluate_checkpoint(checkpoint: str, train_data: str, val_data: str, *, res: int | None = None,
                        ks: Sequence[int] = (1, 20, 200), temperature: float = 0.07, linear: bool = False,
                        device: str = "auto", batch_size: int = 512, workers: int = 2,
                        trust: bool = False) -> dict:
    """k-NN (and optionally a linear-probe grid) of a checkpoint's student on labelled betons
    (eval_loader checks each beton before FFCV opens it)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    model, meta = load_student(checkpoint, trust)
    model = model.to(dev).to(memory_format=torch.channels_last)
    cfg = meta["config"]
    res = res or cfg.get("eval_res") or cfg.get("res", 224)
    norm = Normalize(meta["mean"], meta["std"]).to(dev)
    feats = [extract_features(model, eval_loader(p, batch_size=batch_size, res=res, device=dev,
                                                 num_workers=workers), device=dev, transform=norm)
             for p in (train_data, val_data)]
    (ftr, ytr), (fte, yte) = feats
    result = {"checkpoint": str(checkpoint), "arch": meta["arch"], "method": meta["method"], "step": meta["step"],
              "res": res, **knn_classify(ftr, ytr, fte, yte, ks=ks, temperature=temperature)}
    if linear:
        probe = linear_probe(ftr, ytr, fte, yte)
        result |= {"linear_top1": probe["linear_top1"], "linear_lr": probe["lr"]}
    return result


def shard(num_samples: int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous share of `num_samples` images, padded with the last image to
    ceil(N / world), so every rank runs the same number of batches (FSDP's forward is a
    collective) and the ranks' features, gathered in rank order, are the N images in order."""
    size = -(-num_samples // world)
    return np.minimum(np.arange(rank * size, (rank + 1) * size), num_samples - 1)


class KnnMonitor:
    """k-NN top-1 of encoders during and at the end of a run: the labelled bank (`--knn-bank`,
    default the train data) against `--val-data`, at the eval resolution, normalised as the
    teacher's inputs. Its two loaders are built on first use and kept (each FFCV loader
    JIT-compiles for seconds). `encoder` None scores raw pixels.

    Under torchrun every rank calls it (`rank`, `world`): each extracts the features of its
    shard of both sets, the shards are gathered in rank order, and every rank scores the whole
    sets, so no rank waits in a collective while another works alone."""

    def __init__(self, cfg: Config, device: torch.device, mean_std, dtype: torch.dtype | None,
                 batch_size: int = 512, rank: int = 0, world: int = 1):
        self.cfg, self.device, self.mean_std, self.dtype = cfg, device, mean_std, dtype or torch.float32
        self.batch_size, self.rank, self.world, self.loaders = batch_size, rank, world, []

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.val_data)

    def _loader(self, path: str):
        cfg = self.cfg
        indices = None if self.world == 1 else shard(len(image_sizes(path)[0]), self.rank, self.world)
        return eval_loader(path, batch_size=self.batch_size, res=cfg.eval_res or cfg.res, device=self.device,
                           num_workers=cfg.workers, indices=indices)

    def _features(self, encoder, loader, norm, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = extract_features(encoder, loader, device=self.device, transform=norm, dtype=dtype)
        if self.world == 1:
            return feats, labels
        n = loader.num_samples  # the whole beton's: the shards' padding is cut off
        return gather_rows(feats)[:n], gather_rows(labels)[:n]

    def __call__(self, encoder: nn.Module | None, dtype: torch.dtype | None = None) -> dict:
        """k-NN of `encoder` (None: raw pixels) under autocast to `dtype` (default: the monitor's)."""
        cfg = self.cfg
        if not self.loaders:
            self.loaders = [self._loader(p) for p in (cfg.knn_bank or cfg.data, cfg.val_data)]
        if encoder is None:
            encoder, norm, dtype = nn.Flatten(), None, torch.float32  # pixels in [0, 1]
        else:
            norm, dtype = Normalize(self.mean_std[0], self.mean_std[1]).to(self.device), dtype or self.dtype
        (ftr, ytr), (fte, yte) = (self._features(encoder, loader, norm, dtype) for loader in self.loaders)
        return knn_classify(ftr, ytr, fte, yte, ks=sorted({1, cfg.knn_k}), temperature=cfg.knn_t)


class Resized(nn.Module):
    """`model` on its inputs resized to `res` (a teacher at its own resolution, as an encoder)."""

    def __init__(self, model: nn.Module, res: int | None):
        super().__init__()
        self.model, self.res = model, res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize(x, self.res))


__all__ = ["extract_features", "knn_classify", "linear_probe", "load_student", "evaluate_checkpoint",
           "KnnMonitor", "Resized", "LINEAR_LRS"]
