"""The objectives: the loss they compute, what enters the queue, what is (not) state."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastseed.kernels import reference, seed_loss
from fastseed.methods import METHODS
from helpers import frozen_teacher
from fastseed.methods.moco import MoCo
from fastseed.methods.seed import SEED
from fastseed.methods.simreg import SimReg
from fastseed.targets import TeacherTargets


def test_seed_loss_hand_computed():
    """s = t = e1, one queue key e2, τS = τT = 1: a = b = [1, 0], so
    loss = −Σ softmax(b)·log_softmax(a) = log(1 + e) − e/(1 + e)."""
    s = torch.tensor([[3.0, 0.0]])  # normalised inside: the scale must not matter
    t = torch.tensor([[0.5, 0.0]])
    q = torch.tensor([[0.0, 1.0]])
    want = math.log(1 + math.e) - math.e / (1 + math.e)
    for fn in (reference.seed_loss, seed_loss):
        got = fn(s, t, q, student_temp=1.0, teacher_temp=1.0)
        assert got.item() == pytest.approx(want, rel=1e-6)


def test_seed_loss_sharp_teacher_is_instance_discrimination():
    """τT → 0 makes the target one-hot on column 0 (t·t = 1 beats every queue key), so the
    loss equals InfoNCE of the student against the teacher key."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    q = F.normalize(torch.randn(11, 8, generator=g), dim=1)
    a = seed_loss(s, t, q, student_temp=0.2, teacher_temp=1e-4)
    b = reference.info_nce_loss(s, t, q, temp=0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


class TinyNet(nn.Module):
    def __init__(self, width=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.num_features = width

    def forward(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)


def teacher(dim=6):
    t = nn.Sequential(TinyNet(10, seed=1), nn.Linear(10, dim)).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return frozen_teacher(t)


def build(cls, dim=6, queue_size=10, small_crops=0, small_enqueue="first", **kw):
    """A method around fresh queues (None for SimReg), and the queues."""
    queues = cls.make_queues(dim=dim, queue_size=queue_size, small_crops=small_crops, small_enqueue=small_enqueue)
    return cls(TinyNet(), queues, dim=dim, **kw), queues


def targets_of(cls, views, tnet=None):
    """The live-teacher target source of `cls`, asked once."""
    return TeacherTargets(tnet or teacher(), cls.teacher_inputs, 6, ((0.5,) * 3, (0.5,) * 3), {}).targets(views)


def test_seed_queue_gets_normalised_teacher_keys_after_update():
    m, queues = build(SEED, temp=0.2, distill_t=1e-4)
    x = [torch.randn(4, 3, 8, 8)]
    targets = targets_of(SEED, x)
    before = m.queue.keys.clone()
    loss = m(x, targets)
    loss.backward()
    assert m.student.conv.weight.grad is not None and m.head[0].weight.grad is not None
    assert torch.equal(m.queue.keys, before)  # nothing enqueued before update
    queues.update(targets)
    torch.testing.assert_close(m.queue.keys[:4], F.normalize(targets[0], dim=1))
    torch.testing.assert_close(m.queue.keys[4:], before[4:])
    assert int(m.queue.ptr) == 4


def test_teacher_is_not_state_nor_parameter():
    m, _ = build(SEED)
    names = list(m.state_dict())
    assert not any("teacher" in n for n in names)
    assert {n.split(".")[0] for n in names} == {"student", "head", "queue"}
    n_student = sum(p.numel() for p in (*m.student.parameters(), *m.head.parameters()))
    assert sum(p.numel() for p in m.parameters()) == n_student


def test_seed_small_patches_use_a_second_queue():
    m, queues = build(SEED, queue_size=32, small_crops=2)
    views = [torch.randn(3, 3, 8, 8), torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)]
    targets = targets_of(SEED, views)
    assert targets[1].shape == (6, 6)
    loss = m(views, targets)
    one = SEED.forward(m, views[:1], targets[:1])
    assert loss.item() > one.item()  # CE224 + CE96
    queues.update(targets)
    assert int(m.queue.ptr) == int(m.small_queue.ptr) == 3  # crop 0's keys only (official)
    every, queues = build(SEED, queue_size=32, small_crops=2, small_enqueue="all")
    queues.update(targets)
    assert int(every.queue.ptr) == 3 and int(every.small_queue.ptr) == 6
    torch.testing.assert_close(every.small_queue.keys[:6], F.normalize(targets[1], dim=1))


def test_small_patch_queue_takes_crop_0_at_the_shared_pointer_as_official_seed():
    """The official rule, jacobswan1/SEED seed/small_patch_builder.py (SEED.forward and
    SEED._dequeue_and_enqueue), written out here on its own layout:

        B, N, C, W, H = small_image.shape                      # image-major: B x N crops
        t_small_emb = self.teacher(small_image.view(-1, C, W, H))
        t_small_emb = t_small_emb.view(B, N, self.dim)
        self._dequeue_and_enqueue(t_emb, t_small_emb[:, 0].contiguous())
            ptr = int(self.queue_ptr)
            self.queue[:, ptr:ptr + batch_size] = keys.transpose(0, 1)
            self.small_queue[:, ptr:ptr + batch_size] = small_keys.transpose(0, 1)
            ptr = (ptr + batch_size) % self.K
            self.queue_ptr[0] = ptr

    (its teacher normalises its output; its queues are [dim, K], ours [K, dim]). Three
    batches of B=4 images with N=2 small crops each into K=8 rows: the ring wraps."""
    B, N, K, D = 4, 2, 8, 6
    tnet = teacher(D)
    m, queues = build(SEED, dim=D, queue_size=K, small_crops=N)
    queue, small_queue = m.queue.keys.T.clone(), m.small_queue.keys.T.clone()  # the same random start
    ptr = 0
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        image = torch.randn(B, 3, 8, 8, generator=g)
        small_image = torch.randn(B, N, 3, 4, 4, generator=g)
        # official
        t_emb = F.normalize(tnet(image), dim=1)
        t_small_emb = F.normalize(tnet(small_image.view(-1, 3, 4, 4)), dim=1).view(B, N, D)
        queue[:, ptr:ptr + B] = t_emb.T
        small_queue[:, ptr:ptr + B] = t_small_emb[:, 0].T
        ptr = (ptr + B) % K
        # fastseed: view 0, then one view per small crop
        queues.update(targets_of(SEED, [image, *small_image.unbind(1)], tnet))
    torch.testing.assert_close(m.queue.keys, queue.T)
    torch.testing.assert_close(m.small_queue.keys, small_queue.T)
    assert int(m.queue.ptr) == int(m.small_queue.ptr) == ptr


def test_simreg_loss_is_two_minus_two_cos():
    m, queues = build(SimReg)
    assert queues is None
    x = [torch.randn(4, 3, 8, 8)]
    (t,) = targets_of(SimReg, x)
    m.eval()
    pred = m.head(m.student(x[0]))
    want = (2 - 2 * F.cosine_similarity(pred, t, dim=1)).mean()
    torch.testing.assert_close(m(x, (t,)), want)
    torch.testing.assert_close(m(x, (pred.detach() * 3,)), torch.tensor(0.0), atol=1e-5, rtol=0)


def test_moco_momentum_update_and_keys():
    m, queues = build(MoCo, queue_size=16, temp=0.2, moco_m=0.9)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    k_before = [p.clone() for p in m.key_encoder.parameters()]
    q_now = [p.detach().clone() for p in (*m.student.parameters(), *m.head.parameters())]
    views = [torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8)]
    targets = m.targets(views)
    for kb, q, k in zip(k_before, q_now, m.key_encoder.parameters()):
        torch.testing.assert_close(k, 0.9 * kb + 0.1 * q)
    assert not any(p.requires_grad for p in m.key_encoder.parameters())
    loss = m(views, targets)
    want = reference.info_nce_loss(m.head(m.student(views[0])), targets[0], m.queue.keys, temp=0.2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    queues.update(targets)
    assert int(m.queue.ptr) == 8


def test_methods_registry():
    assert set(METHODS) == {"seed", "simreg", "moco", "dense"}


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_large_100", "efficientnet_b0"])
def test_student_num_features_is_its_pooled_output_width(arch):
    from fastseed.models import create_student
    m = create_student(arch).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)
