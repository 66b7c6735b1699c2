"""The patch-relation loss (`--local-weight`, fastseed/methods/local.py) against the definition:
per image, each patch's softmax over its cosine similarities to the image's OTHER patches at
temperature τ, the teacher's matched by the student's (KL, teacher -> student), the mean over
every patch of every image. The reference below is written from that sentence in float64 with
explicit loops, sharing no code with the module."""
from __future__ import annotations

import math

import pytest
import torch

from fastseed.config import Config
from fastseed.errors import ConfigError
from fastseed.methods import METHODS
from fastseed.methods.dense import Dense
from fastseed.methods.local import LocalHead, check_local, local_loss
from fastseed.models import create_student
from fastseed.targets import TeacherTargets
from test_dense import cnn_teacher, images


def reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """float64, loop over images b and patches i: KL(p_i || q_i) over j != i."""
    B, _, h, w = student.shape
    n = h * w
    s = student.double().reshape(B, -1, n)
    tt = teacher.double().reshape(B, -1, n)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for i in range(n):
            others = [j for j in range(n) if j != i]
            cs = torch.stack([torch.dot(s[b, :, i], s[b, :, j]) / (s[b, :, i].norm() * s[b, :, j].norm())
                              for j in others]) / t
            ct = torch.stack([torch.dot(tt[b, :, i], tt[b, :, j]) / (tt[b, :, i].norm() * tt[b, :, j].norm())
                              for j in others]) / t
            q = torch.exp(cs - torch.logsumexp(cs, 0))
            p = torch.exp(ct - torch.logsumexp(ct, 0))
            total = total + (p * (torch.log(p) - torch.log(q))).sum()
    return total / (B * n)


@pytest.mark.parametrize("shape,t", [((2, 5, 2, 2), 0.07), ((3, 7, 3, 2), 0.2), ((1, 4, 1, 3), 1.0),
                                     ((2, 9, 3, 3), 0.5)])
def test_local_loss_matches_the_float64_definition_forward_and_backward(shape, t):
    g = torch.Generator().manual_seed(sum(shape))
    student = torch.randn(*shape, generator=g, requires_grad=True)
    teacher = torch.randn(shape[0], 6, *shape[2:], generator=g)  # another width: only similarities compare
    got = local_loss(student, teacher, t)
    s64 = student.detach().double().requires_grad_(True)
    want = reference(s64, teacher, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.backward()
    want.backward()
    torch.testing.assert_close(student.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_local_loss_is_zero_for_the_same_relations_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 3, 3, generator=g)
    assert local_loss(t, t).abs() < 1e-6
    assert local_loss(3 * t, t).abs() < 1e-6  # cosine: the scale of a token does not matter
    assert local_loss(torch.randn(2, 8, 3, 3, generator=g), t) > 0.01
    with pytest.raises(ValueError, match="different grids"):
        local_loss(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 3, 3))


def test_the_self_similarity_is_left_out():
    """With two patches each row has one other patch: its softmax is 1 whatever the similarity,
    so the loss is 0 for any maps; with the diagonal kept it would not be."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 5, 1, 2, generator=g), torch.randn(3, 5, 1, 2, generator=g)
    assert local_loss(a, b).abs() < 1e-7


def test_a_one_token_grid_is_refused_in_one_line():
    head = LocalHead(8, 4)
    with pytest.raises(ConfigError, match="1x1, one token relates to no other"):
        head(torch.randn(2, 8, 2, 2), torch.randn(2, 4, 1, 1))


def test_check_refuses_a_cache_a_negative_weight_and_a_bad_temperature():
    check_local(Config(local_weight=1.0))
    with pytest.raises(ConfigError, match="--teacher-cache stores one key per crop, not the teacher's patch tokens"):
        check_local(Config(local_weight=1.0, teacher_cache="x.tcache"))
    with pytest.raises(ConfigError, match="--local-weight -1"):
        check_local(Config(local_weight=-1.0))
    with pytest.raises(ConfigError, match="--local-t 0"):
        check_local(Config(local_weight=1.0, local_t=0.0))
    for name in ("seed", "simreg", "dense"):  # each method that takes the loss checks it
        with pytest.raises(ConfigError, match="--teacher-cache"):
            METHODS[name].check(Config(method=name, local_weight=1.0, teacher_cache="x.tcache"), 1)
    with pytest.raises(ConfigError, match="--method moco has no teacher"):
        METHODS["moco"].check(Config(method="moco", local_weight=1.0), 1)


@pytest.mark.parametrize("name", ["seed", "simreg", "dense"])
def test_local_weight_adds_w_times_the_loss_from_one_backbone_pass(name, monkeypatch):
    """The method's loss with --local-weight 0.5 = its loss without the term + 0.5 × local_loss of
    its projected, resized map against the teacher's tokens; forward_features runs once; the
    gradient reaches the student and the projector, never the teacher's tokens."""
    teacher, cls = cnn_teacher(res=64), METHODS[name]
    cfg = Config(method=name, local_weight=0.5, local_t=0.1, queue_size=8)
    assert cls.teacher_tokens(cfg)
    x = images(4, 64)
    x[:, :, :32, :32] += 3  # quadrants that differ, so the teacher's 2x2 tokens relate unevenly
    x[:, 0, 32:, :] -= 2
    targets = TeacherTargets(teacher, cls.teacher_inputs, 512, None, {}, tokens=True).targets([x])
    torch.manual_seed(0)
    m = cls.from_config(create_student("resnet10t"), cls.queues_for(cfg, 512, torch.float32), 512, cfg,
                        token_dim=teacher.token_dim).eval()
    calls = []
    forward_features = m.student.forward_features
    monkeypatch.setattr(m.student, "forward_features", lambda x: calls.append(1) or forward_features(x))
    loss = m([x], targets)
    assert len(calls) == 1
    monkeypatch.undo()
    m.local_weight = 0.0
    base = m([x], targets)
    m.local_weight = 0.5
    fmap, tokens = m.student.forward_features(x), targets[-1]
    assert fmap.shape[-2:] == tokens.shape[-2:] == (2, 2)  # 64 px, stride 32 for both: no resize
    want = base + 0.5 * local_loss(m.local.proj(fmap), tokens, 0.1)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    assert (loss - base).abs() > 1e-4  # the term is there
    loss.backward()
    for pname in ("student.conv1.0.weight", "local.proj.weight"):
        grad = dict(m.named_parameters())[pname].grad
        assert grad is not None and grad.abs().sum() > 0, pname
    assert not tokens.requires_grad


def test_without_the_weight_the_state_is_as_before():
    """--local-weight 0 builds no projector: checkpoints of earlier runs load as they were."""
    for name in ("seed", "simreg"):
        cls = METHODS[name]
        cfg = Config(method=name, queue_size=8)
        assert not cls.teacher_tokens(cfg)
        m = cls.from_config(create_student("resnet10t"), cls.queues_for(cfg, 512, torch.float32), 512, cfg)
        assert not any(k.startswith("local.") for k in m.state_dict())
    d = Dense(create_student("resnet10t"), token_dim=8)
    assert not hasattr(d, "local")


def test_compiled_forward_with_the_local_loss_traces_whole_and_matches_eager():
    teacher = cnn_teacher(res=64)
    cfg = Config(method="seed", local_weight=1.0, dense_weight=0.5, queue_size=8)
    targets = TeacherTargets(teacher, METHODS["seed"].teacher_inputs, 512, None, {}, tokens=True).targets([images()])
    torch.manual_seed(0)
    m = METHODS["seed"].from_config(create_student("resnet10t"), METHODS["seed"].queues_for(cfg, 512, torch.float32),
                                    512, cfg, token_dim=512).eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    got, want = compiled([images()], targets), m([images()], targets)
    assert math.isfinite(float(want.detach()))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
