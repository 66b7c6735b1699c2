"""Plain-PyTorch oracles for the fused ops: the formulas of docs/ARCHITECTURE.md, written literally.

They build the full B×(K+1) logits, so they are slow and memory-hungry by design; tests
compare the fused ops with them in float64, and the benchmarks time them as the baseline.
Computation runs in float64 when any input is float64, else in float32 (never in the
input's half precision: teacher logits near 1/τT = 1e4 need fp32), with autocast off.
"""

import torch
import torch.nn.functional as F

from ._checks import check_enqueue_args, check_loss_args


def _compute_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def seed_loss(student, teacher, queue, *, student_temp=0.2, teacher_temp=1e-4, self_logit=True):
    """loss = mean_i −Σ_j softmax(b_i)_j · log_softmax(a_i)_j with
    a = [ŝ·t̂, ŝ·Q_1 … ŝ·Q_K]/τS and b = [t̂·t̂, t̂·Q_1 … t̂·Q_K]/τT; without `self_logit`
    a = [ŝ·Q_1 … ŝ·Q_K]/τS and b = [t̂·Q_1 … t̂·Q_K]/τT (the batch's keys in Q)."""
    check_loss_args("student", student, "teacher", teacher, queue,
                    {"student_temp": student_temp, "teacher_temp": teacher_temp})
    dtype = _compute_dtype(student, teacher, queue)
    with torch.autocast(student.device.type, enabled=False):
        s = F.normalize(student.to(dtype), dim=1)
        t = F.normalize(teacher.detach().to(dtype), dim=1)
        q = queue.detach().to(dtype)
        first = 0 if self_logit else 1
        a = torch.cat([(s * t).sum(1, keepdim=True), s @ q.T], dim=1)[:, first:] / student_temp
        b = torch.cat([(t * t).sum(1, keepdim=True), t @ q.T], dim=1)[:, first:] / teacher_temp
        return -(torch.softmax(b, dim=1) * torch.log_softmax(a, dim=1)).sum(1).mean()


def info_nce_loss(query, key, queue, *, temp=0.2):
    """MoCo: cross-entropy of [q̂·k̂, q̂·Q_1 … q̂·Q_K]/τ with target 0."""
    check_loss_args("query", query, "key", key, queue, {"temp": temp})
    dtype = _compute_dtype(query, key, queue)
    with torch.autocast(query.device.type, enabled=False):
        q = F.normalize(query.to(dtype), dim=1)
        k = F.normalize(key.detach().to(dtype), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().to(dtype).T], dim=1) / temp
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, target)


@torch.no_grad()
def enqueue_(queue, ptr, keys) -> None:
    """Enqueue the L2-normalised keys one at a time: key i lands in row (ptr+i) mod K."""
    check_enqueue_args(queue, ptr, keys)
    k = queue.shape[0]
    rows = F.normalize(keys.to(_compute_dtype(keys)), dim=1).to(queue.dtype)
    p = int(ptr.reshape(()).item())  # the oracle may sync with the host; the fused op does not
    for row in rows:
        queue[p] = row
        p = (p + 1) % k
    ptr.fill_(p)
