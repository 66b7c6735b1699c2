"""Argument checks shared by the fused ops and their references.

Every failure is a ValueError that names the offending argument, raised before any
kernel runs. The checks read shapes, dtypes and Python numbers only, so they cost
nothing at run time and trace cleanly under torch.compile.
"""

import math

import torch


def check_matrix(name: str, x, *, rows: int | None = None, dim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected {rows} (one per student/query row)")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has D={x.shape[1]}, but the queue has D={dim}")


def check_temperature(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_queue(queue) -> None:
    check_matrix("queue", queue)
    if queue.shape[0] == 0:
        raise ValueError("queue is empty (K=0); it needs at least one row")
    if queue.shape[1] == 0:
        raise ValueError("queue has D=0")


def check_loss_args(student_name: str, student, teacher_name: str, teacher, queue, temps: dict) -> None:
    """Checks for seed_loss / info_nce_loss: [B, D], [B, D], [K, D] on one device."""
    check_queue(queue)
    check_matrix(student_name, student, dim=queue.shape[1])
    if student.shape[0] == 0:
        raise ValueError(f"{student_name} is empty (B=0)")
    check_matrix(teacher_name, teacher, rows=student.shape[0], dim=queue.shape[1])
    for name, value in temps.items():
        check_temperature(name, value)
    for name, x in ((student_name, student), (teacher_name, teacher)):
        if x.device != queue.device:
            raise ValueError(f"{name} is on {x.device} but queue is on {queue.device}")


def check_enqueue_args(queue, ptr, keys) -> None:
    check_queue(queue)
    if not isinstance(ptr, torch.Tensor):
        raise ValueError(f"ptr must be an int64 tensor, got {type(ptr).__name__}")
    if ptr.dtype != torch.int64:
        raise ValueError(f"ptr must be an int64 tensor, got dtype {ptr.dtype}")
    if ptr.numel() != 1:
        raise ValueError(f"ptr must hold exactly one element, got shape {tuple(ptr.shape)}")
    check_matrix("keys", keys, dim=queue.shape[1])
    for name, x in (("ptr", ptr), ("keys", keys)):
        if x.device != queue.device:
            raise ValueError(f"{name} is on {x.device} but queue is on {queue.device}")
