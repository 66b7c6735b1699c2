"""The patch-token loss (fastseed/methods/dense.py): its formula against a plain restatement,
the resize to the teacher's grid, the gradient, one backbone pass per student and one teacher
pass per step, `--method dense` and `--dense-weight` through the CLI with two students
(checkpoint, resume, export), the teacher cache's refusal, and a DINOv2 ViT's patch tokens."""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from helpers import refusal
from test_dino_teachers import dinov2_reference, dinov2_state

from fastseed.checkpoint import read_checkpoint
from fastseed.cli import config_from_args, export_main, train_main
from fastseed.config import Config
from fastseed.errors import ConfigError
from fastseed.methods import METHODS
from fastseed.methods.dense import Dense, dense_loss, to_grid
from fastseed.models import create_student
from fastseed.targets import TeacherTargets
from fastseed.teachers import load_teacher
from fastseed.teachers.base import Teacher, TeacherBundle, freeze

import pytest


def cnn_teacher(res: int | None = None) -> TeacherBundle:
    torch.manual_seed(3)
    return TeacherBundle(Teacher(freeze(timm.create_model("resnet10t", num_classes=0))), 512, 512, (0.5,) * 3,
                         (0.5,) * 3, "test", "", "test", res=res)


def images(n=4, res=32, seed=0):
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def plain_dense(fmap, weight, bias, tokens):
    """The loss written out: area-resize S to T's grid, P = W·S + b per cell, then the mean over
    images and cells of Σ_c (P/‖P‖ − T/‖T‖)²."""
    B, C, H, W = fmap.shape
    h, w = tokens.shape[-2:]
    cells = fmap.reshape(B, C, h, H // h, w, W // w).mean((3, 5))  # the area average, block by block
    total = 0.0
    for b in range(B):
        for i in range(h):
            for j in range(w):
                p = weight @ cells[b, :, i, j] + bias
                t = tokens[b, :, i, j]
                total = total + ((p / p.norm() - t / t.norm()) ** 2).sum()
    return total / (B * h * w)


def test_dense_loss_is_the_squared_distance_of_normalised_tokens():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 2, 2, generator=g), torch.randn(3, 5, 2, 2, generator=g)
    want = ((F.normalize(s, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1).mean()
    torch.testing.assert_close(dense_loss(s, t), want)
    e1, e2 = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    assert dense_loss(2 * e1, e1).item() == pytest.approx(0, abs=1e-7)  # the scale does not matter
    assert dense_loss(e1, e2).item() == pytest.approx(2)                # orthogonal: ‖e1 − e2‖² = 2
    assert dense_loss(e1, -e1).item() == pytest.approx(4)


def test_dense_method_loss_matches_the_plain_formula():
    """resnet10t at 128 px: a 4×4 map, area-pooled to a 1×1 teacher grid; at 256 px, 8×8 to 2×2
    (factor 4: a bilinear 2× shrink would average the same pairs of cells as the area does)."""
    for res, grid in ((128, 1), (256, 2)):
        torch.manual_seed(0)
        m = Dense(create_student("resnet10t"), token_dim=6).eval()
        x = images(2, res)
        tokens = torch.randn(2, 6, grid, grid, generator=torch.Generator().manual_seed(1))
        fmap = m.student.forward_features(x)
        want = plain_dense(fmap, m.dense.proj.weight[:, :, 0, 0], m.dense.proj.bias, tokens)
        torch.testing.assert_close(m([x], (None, tokens)), want, rtol=1e-5, atol=1e-6)


def test_to_grid_averages_when_shrinking_and_is_bilinear_when_growing():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert to_grid(x, (4, 4)) is x
    torch.testing.assert_close(to_grid(x, (2, 2)), torch.tensor([[2.5, 4.5], [10.5, 12.5]]).view(1, 1, 2, 2))
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # every cell counts, not the centre's
    torch.testing.assert_close(to_grid(x, (1, 1)), x.mean().view(1, 1, 1, 1))
    one = torch.tensor([[[[7.0]]]])
    assert torch.equal(to_grid(one, (2, 2)), torch.full((1, 1, 2, 2), 7.0))  # a 1×1 map spreads evenly
    # 2 → 4, align_corners=False: output cell k samples the input at (k + ½)/2 − ½, clamped at the edges
    r = torch.tensor([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    x = torch.tensor([[1.0, 2.0], [3.0, 5.0]]).view(1, 1, 2, 2)
    torch.testing.assert_close(to_grid(x, (4, 4))[0, 0], r @ x[0, 0] @ r.T)


def test_gradient_reaches_the_student_and_its_projector_not_the_teacher():
    teacher = cnn_teacher(res=64)
    torch.manual_seed(0)
    m = Dense(create_student("resnet10t"), token_dim=teacher.token_dim)
    targets = TeacherTargets(teacher, Dense.teacher_inputs, 512, None, {}, tokens=True).targets([images()])
    assert not targets[-1].requires_grad and targets[-1].shape == (4, 512, 2, 2)
    m([images()], targets).backward()
    for name in ("student.conv1.0.weight", "student.layer4.0.bn2.weight", "dense.proj.weight", "dense.proj.bias"):
        grad = dict(m.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("name", ["seed", "simreg"])
def test_dense_weight_adds_w_times_the_dense_loss_from_one_backbone_pass(name, monkeypatch):
    """SEED/SimReg with --dense-weight 0.5: their own loss (the same weights without the term) plus
    0.5 × Dense's loss of the same student and projector; forward_features runs once."""
    teacher, cls = cnn_teacher(res=64), METHODS[name]
    cfg = Config(method=name, dense_weight=0.5, queue_size=8)
    targets = TeacherTargets(teacher, cls.teacher_inputs, 512, None, {}, tokens=True).targets([images()])
    assert len(targets) == 2 and targets[1].dim() == 4
    torch.manual_seed(0)
    m = cls.from_config(create_student("resnet10t"), cls.queues_for(cfg, 512, torch.float32), 512, cfg,
                        token_dim=teacher.token_dim).eval()
    calls = []
    forward_features = m.student.forward_features
    monkeypatch.setattr(m.student, "forward_features", lambda x: calls.append(1) or forward_features(x))
    loss = m([images()], targets)
    assert len(calls) == 1
    monkeypatch.undo()
    alone = m.dense_weight
    m.dense_weight = 0.0
    base = m([images()], targets)
    m.dense_weight = alone
    dense = Dense(m.student, token_dim=teacher.token_dim)
    dense.dense = m.dense
    torch.testing.assert_close(loss, base + 0.5 * dense([images()], targets), rtol=1e-5, atol=1e-6)


def test_one_teacher_pass_gives_the_embedding_and_its_tokens(monkeypatch):
    teacher = cnn_teacher(res=64)
    x = images()
    want = teacher(x)
    calls = []
    forward_features = teacher.model.backbone.forward_features
    monkeypatch.setattr(teacher.model.backbone, "forward_features", lambda y: calls.append(1) or forward_features(y))
    emb, tokens = TeacherTargets(teacher, Dense.teacher_inputs, 512, None, {}, tokens=True).targets([x])
    assert len(calls) == 1
    torch.testing.assert_close(emb, want)
    # the tokens are the map the embedding was pooled from (a ResNet: its mean)
    torch.testing.assert_close(tokens.mean((2, 3)), want)


def test_compiled_dense_forward_traces_whole_and_matches_eager():
    teacher = cnn_teacher(res=64)
    cfg = Config(method="seed", dense_weight=1.0, queue_size=8)
    targets = TeacherTargets(teacher, METHODS["seed"].teacher_inputs, 512, None, {}, tokens=True).targets([images()])
    torch.manual_seed(0)
    m = METHODS["seed"].from_config(create_student("resnet10t"), METHODS["seed"].queues_for(cfg, 512, torch.float32),
                                    512, cfg, token_dim=512).eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled([images()], targets), m([images()], targets), rtol=1e-5, atol=1e-6)


def test_dinov2_patch_tokens_feed_the_dense_loss(tmp_path):
    """A DINOv2 ViT-S/14 file in the official layout: its token map is the official forward's
    normed patch tokens on the h×w grid, from the same pass as its CLS embedding."""
    state = dinov2_state(seed=0)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    bundle = load_teacher("dinov2_vits14", str(tmp_path / "dinov2_vits14_pretrain.pth"), res=56)
    x = images(2, 56, seed=2)
    cls, patches = dinov2_reference(state, x, registers=0, offset=0.1, antialias=False)
    emb, tokens = bundle.with_tokens(x)
    assert bundle.token_dim == 384 and tokens.shape == (2, 384, 4, 4)
    torch.testing.assert_close(tokens.flatten(2).transpose(1, 2), patches, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb, cls, rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    m = Dense(create_student("resnet10t"), token_dim=bundle.token_dim)  # 64 px: a 2×2 map, bilinear to 4×4
    loss = m([images(2, 64)], (emb, tokens))
    loss.backward()
    assert 0 < loss.item() < 4 and m.dense.proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ end to end through the CLI
@pytest.fixture(scope="module")
def beton(fmnist):
    return fmnist("test", 64)


def cli(beton, out, *extra):
    return ["--data", str(beton), "-a", "resnet10t,test_efficientnet", "-k", "efficientnet_lite0", "--res", "32",
            "--teacher-res", "64", "-b", "16", "--queue-size", "32", "--epochs", "1", "--output", str(out),
            "--device", "cpu", "--workers", "1", "--no-progress", "--knn-every", "0", "--log-every", "1", *extra]


@pytest.mark.slow
def test_cli_method_dense_trains_two_students_and_exports_without_the_projector(beton, tmp_path, capsys):
    out = tmp_path / "dense"
    assert train_main(cli(beton, out, "--method", "dense", "--max-steps", "2")) == 0
    for arch in ("resnet10t", "test_efficientnet"):
        ckpt = read_checkpoint(out / arch / "checkpoint_last.pt")
        assert ckpt["fastseed"]["method"] == "dense" and ckpt["head"] == {}
        assert ckpt["buffers"]["dense.proj.weight"].shape[0] == 1280  # EfficientNet-Lite0's token width
    capsys.readouterr()
    assert export_main([str(out), "--arch", "resnet10t", "--format", "safetensors", "--output",
                        str(tmp_path / "exp")]) == 0
    from safetensors.torch import load_file
    exported = load_file(next((tmp_path / "exp").glob("*.safetensors")))
    assert not any("dense" in k or "proj" in k for k in exported)
    assert set(exported) == set(timm.create_model("resnet10t", num_classes=0).state_dict())
    capsys.readouterr()
    code = export_main([str(out), "--arch", "resnet10t", "--format", "timm", "--with-head", "--output",
                        str(tmp_path / "exp2")])
    refusal(code, capsys.readouterr().err, "no embedding head")


@pytest.mark.slow
def test_cli_seed_with_dense_weight_trains_checkpoints_and_resumes(beton, tmp_path):
    out = tmp_path / "seed"
    assert train_main(cli(beton, out, "--dense-weight", "0.5", "--max-steps", "2")) == 0
    first = read_checkpoint(out / "resnet10t" / "checkpoint_last.pt")
    assert first["head"] and "dense.proj.weight" in first["buffers"] and first["config"]["dense_weight"] == 0.5
    assert train_main(cli(beton, out, "--dense-weight", "0.5", "--max-steps", "3", "--resume", "auto")) == 0
    later = read_checkpoint(out / "resnet10t" / "checkpoint_last.pt")
    assert later["fastseed"]["step"] == 3
    assert not torch.equal(later["buffers"]["dense.proj.weight"], first["buffers"]["dense.proj.weight"])


def test_cli_refuses_dense_targets_from_a_teacher_cache(beton, tmp_path, capsys):
    for extra in (["--dense-weight", "1"], ["--method", "dense"], ["--method", "simreg", "--dense-weight", "1"]):
        code = train_main(cli(beton, tmp_path / "out", "--teacher-cache", str(tmp_path / "x.tcache"), *extra))
        refusal(code, capsys.readouterr().err, "--teacher-cache", "patch tokens", "1.6 TB")
    assert not (tmp_path / "out").exists()


def test_refusals_of_what_dense_cannot_run_with(beton, tmp_path, capsys):
    code = train_main(cli(beton, tmp_path / "out", "--method", "dense", "--dense-weight", "0.5"))
    refusal(code, capsys.readouterr().err, "--method dense trains the patch-token loss alone")
    code = train_main(cli(beton, tmp_path / "out", "--dense-weight", "-1"))
    refusal(code, capsys.readouterr().err, "--dense-weight -1.0")
    with pytest.raises(ConfigError, match="no official recipe"):
        config_from_args(["--data", "x.beton", "--method", "dense", "--recipe", "official"])
    assert not (tmp_path / "out").exists()
