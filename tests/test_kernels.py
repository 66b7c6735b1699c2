"""fastseed.kernels against the float64 oracles of fastseed.kernels.reference.

Every loss test runs twice on CPU: `triton` runs the real Triton kernels in the Triton
interpreter (FASTSEED_CPU_KERNELS=triton, set per test, so the rest of the suite keeps the
fast PyTorch path) and `torch` runs the chunked PyTorch path; test_triton_path_is_taken
proves the interpreter really ran the kernels of both Triton paths ("fused" for a 16-bit
queue at D ≤ 128, "tiled" otherwise). Whether the kernels launch on a GPU is the business of
fastseed.kernels.check (tests/test_kernel_check.py).

Tolerances, per input dtype (never loosened to pass; the worst errors measured over these
cases, both backends, were 1.1e-7 / 1.1e-6 for float32, 7.3e-5 / 9.0e-4 for float16 and
1.3e-3 / 1.4e-2 for bfloat16):
  float32:  loss rel 2e-6; gradient max |err| ≤ 2e-5·max|g|. The kernels compute in fp32
            (teacher logits near 1/τT = 1e4 carry ~1e-3 absolute rounding).
  float16:  loss rel 2e-4; gradient max |err| ≤ 5e-3·max|g|. ŝ and the softmax weights enter
            the fp16 dots rounded to 2^-11 (≈4.9e-4), and the gradient is returned in fp16.
  bfloat16: loss rel 2e-3; gradient max |err| ≤ 2e-2·max|g|. The same with an 8-bit
            mantissa, and the interpreter converts fp32 to bf16 by truncation (2^-8, biased;
            a GPU rounds to nearest); the split partials are stored in bf16. The worst case is
            a soft teacher (τT = 1), where g = Σ p Q − v is a small difference of two sums.
"""

import functools
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastseed.kernels as fk
from fastseed.kernels import reference as ref

seed_mod = importlib.import_module("fastseed.kernels.seed_loss")
enqueue_mod = importlib.import_module("fastseed.kernels.enqueue")

TOL = {torch.float32: (2e-6, 2e-5), torch.float16: (2e-4, 5e-3), torch.bfloat16: (2e-3, 2e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTSEED_CPU_KERNELS", request.param)
    return request.param


def make(b, k, d, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, d, generator=g).to(device, dtype)
    t = torch.randn(b, d, generator=g).to(device, dtype)
    q = F.normalize(torch.randn(k, d, generator=g), dim=1).to(device, dtype)
    return s, t, q


def check(fused_fn, ref_fn, s, t, q, dtype, **temps):
    """Loss and student gradient of fused_fn vs ref_fn on the same values in float64."""
    s1 = s.clone().requires_grad_()
    loss = fused_fn(s1, t, q, **temps)
    loss.backward()
    s64 = s.double().requires_grad_()
    expect = ref_fn(s64, t.double(), q.double(), **temps)
    expect.backward()
    loss_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert s1.grad.dtype == s.dtype and s1.grad.shape == s.shape
    assert abs(loss.item() - expect.item()) <= loss_tol * abs(expect.item()) + 1e-7, (loss.item(), expect.item())
    err = (s1.grad.double() - s64.grad).abs().max().item()
    assert err <= grad_tol * s64.grad.abs().max().item(), err


# Odd B and K (K below, at and past the tile and split sizes), D with and without masking.
SHAPES = [(1, 1, 64), (1, 33, 64), (3, 32, 64), (5, 77, 128), (17, 129, 64),
          (33, 300, 64), (70, 97, 64), (4, 40, 256), (9, 70, 40)]
TEMPS = [(ts, tt) for ts in (0.07, 0.2) for tt in (1e-4, 0.01, 0.07, 1.0)]


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=lambda x: "B{}K{}D{}".format(*x))
def test_seed_loss_shapes(backend, shape, dtype):
    check(fk.seed_loss, ref.seed_loss, *make(*shape, dtype), dtype, student_temp=0.2, teacher_temp=1e-4)


@DTYPES
@pytest.mark.parametrize("ts,tt", TEMPS)
def test_seed_loss_temperatures(backend, ts, tt, dtype):
    check(fk.seed_loss, ref.seed_loss, *make(19, 150, 64, dtype, seed=1), dtype,
          student_temp=ts, teacher_temp=tt)


def test_seed_loss_teacher_near_queue_rows(backend):
    # Queue rows within 1e-3 of the teacher make the τT=0.01 teacher softmax non-trivial
    # (no single column dominates), which random queues never exercise.
    s, t, q = make(6, 90, 64, torch.float32, seed=2)
    q[:6] = F.normalize(F.normalize(t, dim=1) + 1e-3 * torch.randn(6, 64), dim=1)
    q[40:46] = F.normalize(F.normalize(t, dim=1) + 2e-3 * torch.randn(6, 64), dim=1)
    check(fk.seed_loss, ref.seed_loss, s, t, q, torch.float32, student_temp=0.1, teacher_temp=0.01)


# --batch-in-queue: no column 0, the batch's keys already among the queue's rows. K = 1 is left
# out: one column makes the loss exactly 0, where a bound relative to the loss cannot hold for
# 16-bit operands (the fp16 ŝ·Q and the fp32 ŝ·v differ by ~|a|·2^-11 in either mode).
@DTYPES
@pytest.mark.parametrize("shape", [x for x in SHAPES if x[1] > 1], ids=lambda x: "B{}K{}D{}".format(*x))
def test_seed_loss_batch_in_queue_shapes(backend, shape, dtype):
    check(functools.partial(fk.seed_loss, self_logit=False), functools.partial(ref.seed_loss, self_logit=False),
          *make(*shape, dtype), dtype, student_temp=0.07, teacher_temp=0.07)


def batch_in_queue(dtype, seed=3):
    s, t, q = make(19, 150, 64, dtype, seed=seed)
    q[40:59] = F.normalize(t.float(), dim=1).to(dtype)  # the batch's keys, where the enqueue put them
    return s, t, q


@DTYPES
@pytest.mark.parametrize("ts,tt", [(ts, tt) for ts, tt in TEMPS if tt >= 0.01])
def test_seed_loss_batch_in_queue_temperatures(backend, ts, tt, dtype):
    check(functools.partial(fk.seed_loss, self_logit=False), functools.partial(ref.seed_loss, self_logit=False),
          *batch_in_queue(dtype), dtype, student_temp=ts, teacher_temp=tt)


@DTYPES
def test_seed_loss_batch_in_queue_tiny_teacher_temperature(backend, dtype):
    """τT = 1e-4 with the batch in the queue. Column 0's teacher logit is exactly 1/τT; a row's
    own key in the queue is a dot product instead, whose rounding 1/τT = 1e4 magnifies: with an
    fp32 queue the Triton path's "tf32x3" dots (~2^-22 relative) put the gradient 4.9e-4·max|g|
    off (measured), against 2e-7 for SEED's column 0. The 16-bit bounds hold as they are; the
    fp32 bound here is 1e-3·max|g| on the Triton path, the usual one on the PyTorch path. Use
    the mode with τT ≥ 0.01 (its default, 0.07, is in the test above at the usual bounds)."""
    s, t, q = batch_in_queue(dtype)
    s1 = s.clone().requires_grad_()
    loss = fk.seed_loss(s1, t, q, student_temp=0.07, teacher_temp=1e-4, self_logit=False)
    loss.backward()
    s64 = s.double().requires_grad_()
    expect = ref.seed_loss(s64, t.double(), q.double(), student_temp=0.07, teacher_temp=1e-4, self_logit=False)
    expect.backward()
    loss_tol, grad_tol = TOL[dtype]
    if dtype == torch.float32 and backend == "triton":
        grad_tol = 1e-3
    assert abs(loss.item() - expect.item()) <= loss_tol * abs(expect.item())
    assert (s1.grad.double() - s64.grad).abs().max().item() <= grad_tol * s64.grad.abs().max().item()


def test_batch_in_queue_is_the_kl_of_a_teacher_queue_distillation(backend):
    """Against an outside formula, written here from LightlyTrain 0.18's
    lightly_train/_methods/distillation/distillation_loss.py (its `distillation` v1): the keys
    are enqueued first, then KLDivLoss(batchmean)(log_softmax(ŝ·Qᵀ/τ), softmax(t̂·Qᵀ/τ)). KL =
    CE − H(teacher): the same gradient, the loss higher by the teacher's entropy."""
    s, t, q = make(12, 64, 32, torch.float64, seed=4)
    q[20:32] = F.normalize(t, dim=1)  # the batch enqueued before the loss
    tau = 0.07
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = fk.seed_loss(s1, t, q, student_temp=tau, teacher_temp=tau, self_logit=False)
    ours.backward()
    teacher = torch.softmax(F.normalize(t, dim=1) @ q.T / tau, dim=1)
    student = torch.log_softmax(F.normalize(s2, dim=1) @ q.T / tau, dim=1)
    kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=False)(student, teacher)
    kl.backward()
    entropy = -(teacher * teacher.log()).sum(1).mean()
    torch.testing.assert_close(ours, kl + entropy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)


def test_batch_in_queue_needs_a_queue(backend):
    s, t, q = make(3, 0, 16, torch.float32)
    with pytest.raises(ValueError, match="at least one row"):
        fk.seed_loss(s, t, q, self_logit=False)


@DTYPES
@pytest.mark.parametrize("shape,temp", [((1, 1, 64), 0.2), ((7, 45, 64), 0.07),
                                        ((33, 300, 128), 0.2), ((20, 64, 64), 1.0)])
def test_info_nce_loss(backend, shape, temp, dtype):
    check(fk.info_nce_loss, ref.info_nce_loss, *make(*shape, dtype, seed=3), dtype, temp=temp)


# Wide embeddings (the tiled path: a ResNet-50 teacher's 2048, Lite0's 1280): small B and K
# keep the interpreter fast; K=45 still crosses tiles (32) and splits (3).
@DTYPES
@pytest.mark.parametrize("d", [384, 768, 1280, 2048])
def test_wide_embeddings(backend, d, dtype):
    s, t, q = make(3, 45, d, dtype, seed=5)
    check(fk.seed_loss, ref.seed_loss, s, t, q, dtype, student_temp=0.2, teacher_temp=1e-4)
    check(fk.seed_loss, ref.seed_loss, s, t, q, dtype, student_temp=0.07, teacher_temp=0.07)
    check(fk.info_nce_loss, ref.info_nce_loss, s, t, q, dtype, temp=0.2)
    assert seed_mod._last_path == ("tiled" if backend == "triton" else "torch")


def test_path_choice():
    # A pure function of D and the queue dtype: whole rows on chip only for 16-bit queues at
    # D ≤ 128 (see seed_loss.py for the measured limits), D-tiled everywhere else.
    assert seed_mod.path(1, torch.bfloat16) == seed_mod.path(128, torch.float16) == "fused"
    assert seed_mod.path(129, torch.bfloat16) == seed_mod.path(2048, torch.float16) == "tiled"
    assert seed_mod.path(64, torch.float32) == seed_mod.path(4096, torch.float32) == "tiled"


@pytest.mark.parametrize("qdtype,kernels", [
    (torch.bfloat16, ["fused_fwd_split", "fused_fwd_merge", "fused_bwd_split", "fused_bwd_reduce"]),
    (torch.float32, ["tiled_stats", "tiled_probs"])], ids=["fused", "tiled"])
def test_triton_path_is_taken(monkeypatch, qdtype, kernels):
    """With FASTSEED_CPU_KERNELS=triton the path's Triton kernels run (in the interpreter)."""
    monkeypatch.setenv("FASTSEED_CPU_KERNELS", "triton")
    launches = []

    def counting(name, kernel):
        class Counted:
            def __getitem__(self, grid):
                launches.append(name)
                return kernel[grid]
        return Counted()

    for name, kernel in list(seed_mod._CPU.items()):
        monkeypatch.setitem(seed_mod._CPU, name, counting(name, kernel))
    s, t, q = make(5, 70, 64, torch.float32)
    s.requires_grad_()
    fk.seed_loss(s, t, q.to(qdtype)).backward()
    assert launches == kernels
    monkeypatch.setenv("FASTSEED_CPU_KERNELS", "torch")
    launches.clear()
    fk.seed_loss(s, t, q.to(qdtype)).backward()
    assert launches == [] and seed_mod._last_path == "torch"


def test_interpreter_bf16_dot():
    # The interpreter holds bf16 as uint16 bit patterns and its tl.dot multiplied those
    # integers (a bf16 queue gave a loss of ~4e11 instead of ~5); launches through
    # Interpreted widen bf16 dot operands to fp32, as the tensor cores compute.
    import triton.language as tl
    from fastseed.kernels._interpret import Interpreted

    def dot(A, B, C, N: tl.constexpr):
        i = tl.arange(0, N)
        a = tl.load(A + i[:, None] * N + i[None, :])
        b = tl.load(B + i[:, None] * N + i[None, :])
        tl.store(C + i[:, None] * N + i[None, :], tl.dot(a, b))

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(16, 16)
    Interpreted(dot)[(1,)](a, b, c, 16)
    torch.testing.assert_close(c, a.float() @ b.float())


def test_tiled_backward_crosses_chunks(monkeypatch):
    # The tiled backward materialises p − r for _P_ELEMS values at a time: with 3 rows and
    # 384 values that is 128 columns, so K=300 takes 3 chunks, the last one partial.
    monkeypatch.setenv("FASTSEED_CPU_KERNELS", "triton")
    monkeypatch.setattr(seed_mod, "_P_ELEMS", 3 * 128)
    for dtype in (torch.float32, torch.bfloat16):
        check(fk.seed_loss, ref.seed_loss, *make(3, 300, 256, dtype, seed=6), dtype,
              student_temp=0.1, teacher_temp=0.05)
    assert seed_mod._last_path == "tiled"


@pytest.mark.parametrize("b,k", [(1, 1), (3, 100), (256, 65536), (4096, 4097), (256, 127)])
def test_cuda_plan_covers_queue(b, k):
    # The split plan on a 132-SM GPU: row blocks of 64, splits of whole 128-column multiples,
    # each split non-empty and together exactly covering the K queue columns.
    block_b, n_splits, cols = seed_mod._plan(b, k, seed_mod.Launcher(seed_mod._CUDA, 90, 264))
    assert block_b == 64 and cols % 128 == 0
    assert (n_splits - 1) * cols < k <= n_splits * cols


def test_torch_path_crosses_chunks(monkeypatch):
    # The chunked path with 3 chunks (the last one partial) equals the single-chunk result.
    monkeypatch.setenv("FASTSEED_CPU_KERNELS", "torch")
    monkeypatch.setattr(seed_mod, "_CHUNK", 64)
    check(fk.seed_loss, ref.seed_loss, *make(11, 150, 64, torch.float32), torch.float32,
          student_temp=0.2, teacher_temp=0.07)


def test_default_cpu_backend_is_torch(monkeypatch):
    monkeypatch.delenv("FASTSEED_CPU_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert fk.cpu_backend() == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fk.cpu_backend() == "triton"
    monkeypatch.setenv("FASTSEED_CPU_KERNELS", "cuda")
    with pytest.raises(ValueError, match="FASTSEED_CPU_KERNELS"):
        fk.cpu_backend()


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("where", ["student", "teacher", "queue"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["tiled", "fused"])
def test_non_finite_inputs_give_nan(backend, where, bad, dtype):
    s, t, q = make(5, 40, 64, dtype)
    {"student": s, "teacher": t, "queue": q}[where][2, 3] = bad
    assert torch.isnan(fk.seed_loss(s, t, q))
    if where != "teacher":
        assert torch.isnan(fk.info_nce_loss(s, t, q))


def test_gradient_only_to_student():
    s, t, q = make(4, 30, 64, torch.float32)
    s.requires_grad_(), t.requires_grad_(), q.requires_grad_()
    fk.seed_loss(s, t, q).backward()
    assert s.grad is not None and t.grad is None and q.grad is None


def test_autocast_bf16_cpu():
    # The training step runs under bf16 autocast: the embeddings arrive in bf16.
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 64)
    x, t = torch.randn(6, 32), torch.randn(6, 64)
    q = F.normalize(torch.randn(50, 64), dim=1).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = head(x)
        loss = fk.seed_loss(s, t, q)
    assert s.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    expect = ref.seed_loss(s.detach().double(), t.double(), q.double())
    assert abs(loss.item() - expect.item()) <= 1e-4 * expect.item()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------- enqueue


@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,ptr0,n", [(10, 0, 3), (10, 8, 5), (10, 9, 10), (10, 4, 23), (7, 0, 7), (5, 2, 0)],
                         ids=["plain", "wrap", "n=k-wrap", "n>k", "n=k", "n=0"])
def test_enqueue(backend, k, ptr0, n, qdtype):
    g = torch.Generator().manual_seed(0)
    queue = F.normalize(torch.randn(k, 16 * 4, generator=g), dim=1).to(qdtype)
    keys = torch.randn(n, 64, generator=g) * 3
    got, want = queue.clone(), queue.clone()
    p_got, p_want = torch.tensor([ptr0]), torch.tensor([ptr0])
    fk.enqueue_(got, p_got, keys)
    ref.enqueue_(want, p_want, keys)
    assert p_got.item() == p_want.item() == (ptr0 + n) % k
    # Rows land exactly where the oracle puts them; values agree to the dtype's rounding
    # (the kernel's fp32 norm sums in another order than F.normalize).
    torch.testing.assert_close(got, want)
    if n:
        assert enqueue_mod._last_path == backend


def test_enqueue_scalar_ptr_and_float64(backend):
    queue = torch.zeros(6, 64, dtype=torch.float64)
    ptr = torch.tensor(4)
    keys = torch.randn(3, 64, dtype=torch.float64)
    fk.enqueue_(queue, ptr, keys)
    assert ptr.item() == 1
    torch.testing.assert_close(queue[[4, 5, 0]], F.normalize(keys, dim=1))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("call,name", [
    (lambda m, s, t, q: m.seed_loss(s, t, q[:, :32]), "student"),
    (lambda m, s, t, q: m.seed_loss(s, t[:, :32], q), "teacher"),
    (lambda m, s, t, q: m.seed_loss(s[None], t, q), "student"),
    (lambda m, s, t, q: m.seed_loss(s, t, q[None]), "queue"),
    (lambda m, s, t, q: m.seed_loss(s, t[:3], q), "teacher"),
    (lambda m, s, t, q: m.seed_loss(s, t, q[:0]), "queue"),
    (lambda m, s, t, q: m.seed_loss(s, t, q, student_temp=0.0), "student_temp"),
    (lambda m, s, t, q: m.seed_loss(s, t, q, teacher_temp=-1e-4), "teacher_temp"),
    (lambda m, s, t, q: m.seed_loss(s, t, q, teacher_temp=float("nan")), "teacher_temp"),
    (lambda m, s, t, q: m.info_nce_loss(s, t, q, temp=0), "temp"),
    (lambda m, s, t, q: m.info_nce_loss(s, t, q[:, :16]), "query"),
    (lambda m, s, t, q: m.enqueue_(q, torch.tensor([0], dtype=torch.int32), t), "ptr"),
    (lambda m, s, t, q: m.enqueue_(q, torch.tensor([0.0]), t), "ptr"),
    (lambda m, s, t, q: m.enqueue_(q, torch.tensor([0]), t[:, :8]), "keys"),
    (lambda m, s, t, q: m.enqueue_(q[:0], torch.tensor([0]), t), "queue"),
])
@pytest.mark.parametrize("module", [fk, ref], ids=["fused", "reference"])
def test_bad_input(module, call, name):
    # The same checks guard the fused ops and their oracles; the message names the argument.
    with pytest.raises(ValueError, match=name):
        call(module, *make(4, 20, 64, torch.float32))


# ---------------------------------------------------------------------------------- torch.library


def test_opcheck(backend):
    s, t, q = make(5, 70, 64, torch.float32)
    s.requires_grad_()
    for hard, self_logit in ((False, True), (False, False), (True, True)):
        torch.library.opcheck(seed_mod._seed_ce, (s, t, q, 0.2, 0.07, hard, self_logit))
        _, lse, c = seed_mod._seed_ce(s.detach(), t, q, 0.2, 0.07, hard, self_logit)
        torch.library.opcheck(seed_mod._seed_ce_backward,
                              (torch.tensor(1.0), s.detach(), t, q, lse, c, 0.2, 0.07, hard))
    torch.library.opcheck(enqueue_mod._enqueue_op, (q.clone(), torch.tensor([65]), t))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_step(backend, compiler):
    """The losses and the enqueue of a training step each compile as one graph (the step
    calls backward between them) and match eager."""
    if compiler == "inductor" and backend == "triton":
        pytest.skip("the op is opaque to inductor; one inductor run covers the registration")
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 64)
    x, t = torch.randn(6, 16), torch.randn(6, 64)

    def losses(head, x, t, queue):
        s = head(x)
        return (fk.seed_loss(s, t, queue, student_temp=0.2, teacher_temp=0.07)
                + fk.info_nce_loss(s, t, queue, temp=0.2))

    queue0 = F.normalize(torch.randn(40, 64), dim=1)
    results = []
    for loss_fn, enqueue_fn in ((losses, fk.enqueue_),
                                (torch.compile(losses, fullgraph=True, backend=compiler),
                                 torch.compile(fk.enqueue_, fullgraph=True, backend=compiler))):
        head.zero_grad()
        queue, ptr = queue0.clone(), torch.tensor([38])
        loss = loss_fn(head, x, t, queue)
        loss.backward()
        enqueue_fn(queue, ptr, t)  # only after backward: the backward reads the queue
        results.append((loss.detach(), head.weight.grad.clone(), queue, ptr))
    (l0, g0, q0, p0), (l1, g1, q1, p1) = results
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(q1, q0)
    assert p0.item() == p1.item() == 4


def test_enqueue_before_backward_is_caught():
    # Pitfall 1: the backward re-reads the queue, so autograd refuses a queue changed under it.
    s, t, q = make(4, 30, 64, torch.float32)
    s.requires_grad_()
    loss = fk.seed_loss(s, t, q)
    fk.enqueue_(q, torch.tensor([0]), t)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 64), (5, 77, 128), (37, 1000, 256), (256, 65536, 128), (1024, 4097, 128),
                                   (64, 4097, 1280), (256, 65536, 2048)])
def test_cuda_seed_loss(shape, qdtype):
    b, k, d = shape
    s, t, q = make(b, k, d, torch.bfloat16, device="cuda")
    q = q.to(qdtype)
    for fused_fn, ref_fn, temps in ((fk.seed_loss, ref.seed_loss, dict(student_temp=0.2, teacher_temp=1e-4)),
                                    (fk.seed_loss, ref.seed_loss, dict(student_temp=0.07, teacher_temp=0.07)),
                                    (fk.info_nce_loss, ref.info_nce_loss, dict(temp=0.2))):
        s1 = s.clone().requires_grad_()
        loss = fused_fn(s1, t, q, **temps)
        loss.backward()
        assert seed_mod._last_path == seed_mod.path(d, qdtype)
        s64 = s.double().requires_grad_()
        expect = ref_fn(s64, t.double(), q.double(), **temps)
        expect.backward()
        assert abs(loss.item() - expect.item()) <= 1e-2 * abs(expect.item())
        cos = F.cosine_similarity(s1.grad.double().flatten(), s64.grad.flatten(), dim=0).item()
        assert cos >= 0.999, cos


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("d", [128, 2048])
def test_cuda_enqueue_bf16(d):
    queue = torch.zeros(1000, d, device="cuda", dtype=torch.bfloat16)
    want = queue.clone()
    ptr, p_want = torch.tensor([990], device="cuda"), torch.tensor([990], device="cuda")
    keys = torch.randn(1500, d, device="cuda")
    fk.enqueue_(queue, ptr, keys)
    ref.enqueue_(want, p_want, keys)
    assert enqueue_mod._last_path == "triton" and ptr.item() == p_want.item()
    torch.testing.assert_close(queue, want)
