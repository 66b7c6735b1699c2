"""Fused Triton kernels of fastseed and their dispatch (docs/ARCHITECTURE.md, "Kernel interfaces").

    seed_loss(student, teacher, queue, *, student_temp=0.2, teacher_temp=1e-4) -> scalar
    info_nce_loss(query, key, queue, *, temp=0.2) -> scalar
    enqueue_(queue, ptr, keys) -> None

CUDA tensors run compiled Triton. CPU tensors run the same Triton kernels in the Triton
interpreter when FASTSEED_CPU_KERNELS=triton (default: when TRITON_INTERPRET=1), else a
chunked PyTorch path; FASTSEED_CPU_KERNELS=torch forces the latter. The choice is read at
call time. Plain-PyTorch oracles with the same names live in fastseed.kernels.reference.
"""

from .enqueue import enqueue_
from .seed_loss import cpu_backend, info_nce_loss, seed_loss

__all__ = ["seed_loss", "info_nce_loss", "enqueue_", "cpu_backend"]
