"""Several teachers, one student (`-k a,b`): the teacher settings split per teacher, each teacher
run on the same crop exactly as it would be alone (renormalised to its own mean/std, at its own
side), a summary head and a loss per teacher, teacher dropping as a function of (seed, step),
the refusals, the k-NN table's rows, and a two-teacher CLI run that resumes bit for bit.
"""
from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import frozen_teacher, refusal, same_weights
from torch import nn

import fastseed.train as train_module
from fastseed.checkpoint import read_checkpoint
from fastseed.cli import cache_main, export_main, train_main
from fastseed.config import Config
from fastseed.configfile import read_settings
from fastseed.errors import ConfigError
from fastseed.methods import SimReg, method_of
from fastseed.methods.several import SimRegSeveral, summary_loss, weighted_loss
from fastseed.methods.simreg import standardize
from fastseed.targets import SeveralTargets, TeacherTargets, build_targets, resolve_teacher_res
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from fastseed.teachers.several import keep_mask, renorm_affine, renormalize, teacher_configs, teacher_weights

TWO = "efficientnet_lite0,efficientnet_lite1"
IMAGES, BATCH, STOP_AT, SNAP_AT = 256, 16, 8, 3  # 16 steps an epoch: the snapshot is mid-epoch


# ---------------------------------------------------------------- the settings, split per teacher
def test_lists_split_one_for_all_or_one_each():
    cfg = Config(teacher_arch=" efficientnet_lite0, efficientnet_lite1 ", distill=",bundled", teacher_res=(32, 48),
                 teacher_pool="cls", teacher_ssl="auto,bundled", teacher_weights=(1.0, 3.0))
    a, b = teacher_configs(cfg)
    assert (a.teacher_arch, a.distill, a.teacher_res, a.teacher_pool, a.teacher_ssl) == \
        ("efficientnet_lite0", None, 32, "cls", "auto")
    assert (b.teacher_arch, b.distill, b.teacher_res, b.teacher_pool, b.teacher_ssl) == \
        ("efficientnet_lite1", None, 48, "cls", "bundled")
    # each is a single-teacher run's config: the several-teacher settings are left at their defaults
    assert all((c.teacher_weights, c.teacher_drop, c.summary_loss) == (None, 0.0, "cosine") for c in (a, b))
    assert teacher_weights(cfg) == [1.0, 3.0] and teacher_weights(cfg.replace(teacher_weights=None)) == [1.0, 1.0]
    assert resolve_teacher_res(cfg.replace(teacher_res=None, res=40)).teacher_res == (40, 40)
    assert method_of(cfg) is SimRegSeveral


def test_one_teacher_keeps_its_config_and_method():
    cfg = Config(teacher_arch="efficientnet_lite0", distill="/a,b/with a comma.pth", teacher_res=32)
    assert teacher_configs(cfg) == [cfg]
    assert method_of(cfg) is SimReg and method_of(cfg.replace(method="seed")).name == "seed"
    assert resolve_teacher_res(cfg) == cfg


@pytest.mark.parametrize("kw, needles", [
    (dict(teacher_res=(32, 48, 64)), ["--teacher-res has 3 value(s) for 2 teacher(s)", TWO, "one per teacher"]),
    (dict(distill="a.pth"), ["--distill has 1 value(s) for 2 teacher(s)", "one per teacher"]),
    (dict(teacher_pool="cls,mean,cls"), ["--teacher-pool has 3 value(s) for 2"]),
    (dict(teacher_ssl="auto,auto,auto"), ["--teacher-ssl has 3 value(s) for 2"]),
    (dict(teacher_weights=(1.0, 2.0, 3.0)), ["--teacher-weights has 3 value(s) for 2"]),
    (dict(teacher_weights=(1.0, 0.0)), ["--teacher-weights", "> 0"]),
    (dict(teacher_drop=1.0), ["--teacher-drop 1.0", "[0, 1)"]),
    (dict(teacher_arch="efficientnet_lite0,,efficientnet_lite1"), ["name each teacher"]),
    (dict(teacher_arch="efficientnet_lite0", teacher_res=(32, 48)), ["--teacher-res has 2 value(s) for 1"]),
    (dict(teacher_arch="efficientnet_lite0", teacher_drop=0.5), ["--teacher-drop", "with one (-k efficientnet_lite0)"]),
    (dict(teacher_arch="efficientnet_lite0", summary_loss="cos-smoothl1", teacher_weights=2.0),
     ["--teacher-weights, --summary-loss", "drop them"]),
])
def test_lists_that_do_not_fit_the_teachers_are_one_line(kw, needles):
    with pytest.raises(ConfigError) as e:
        teacher_configs(Config(**{"teacher_arch": TWO, **kw}))
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


# ---------------------------------------------------------------- each teacher on the same crop
def test_renormalisation_is_the_float64_formula():
    g = torch.Generator().manual_seed(0)
    src, dst = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), (IMAGENET_MEAN, IMAGENET_STD)
    x = torch.randn(4, 3, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    y = renormalize(x, renorm_affine(src, dst))
    m0, s0, m1, s1 = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (*src, *dst))
    want = ((x.double() * s0 + m0) - m1) / s1
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert renorm_affine(src, ((0.5,) * 3, (0.5,) * 3)) is None and renormalize(x, None) is x  # same: as it is


@torch.no_grad()
def test_two_teachers_give_each_teachers_own_targets():
    """The bundled teachers share mean/std: each key equals its teacher's alone, bit for bit, each
    at its own side."""
    cfg = resolve_teacher_res(Config(teacher_arch=TWO, res=32, teacher_res=(32, 48), device="cpu"))
    both = build_targets(cfg, torch.device("cpu"), dtype=None, compile_fn=None)
    alone = [build_targets(c, torch.device("cpu"), dtype=None, compile_fn=None) for c in teacher_configs(cfg)]
    assert isinstance(both, SeveralTargets) and all(isinstance(t, TeacherTargets) for t in alone)
    assert [m.teacher.res for m in both.members] == [32, 48] and both.dims == (1280, 1280) and both.dim == 2560
    views = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
             .contiguous(memory_format=torch.channels_last)]
    keys = both.targets(views)
    assert len(keys) == 2
    for key, single in zip(keys, alone):
        assert torch.equal(key, single.targets(views)[0])
    info = both.info
    assert info["arch"] == TWO and [t["arch"] for t in info["teachers"]] == TWO.split(",")
    assert [t["sha256"] for t in info["teachers"]] == [t.info["sha256"] for t in alone]
    assert [t["res"] for t in info["teachers"]] == [32, 48]
    assert both.mean_std == alone[0].mean_std


@torch.no_grad()
def test_a_teacher_of_other_normalisation_sees_the_crop_as_alone():
    """Teacher B (ImageNet mean/std) gets the loader's views (normalised with teacher A's 0.5) back
    in its own normalisation: its keys equal B alone on the views normalised its way."""
    torch.manual_seed(0)
    a, b = (frozen_teacher(timm.create_model("test_resnet", num_classes=0), res=r) for r in (None, 24))
    half = ((0.5,) * 3, (0.5,) * 3)
    src_a = TeacherTargets(a, SimReg.teacher_inputs, a.model.num_features, half,
                           {"arch": "a", "format": "test", "sha256": "a", "dim": 0})
    src_b = TeacherTargets(b, SimReg.teacher_inputs, b.model.num_features, (IMAGENET_MEAN, IMAGENET_STD),
                           {"arch": "b", "format": "test", "sha256": "b", "dim": 0})
    both = SeveralTargets([src_a, src_b], ("cls", "cls"))
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def normalised(mean, std):
        return ((pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).contiguous(
            memory_format=torch.channels_last)

    key_a, key_b = both.targets([normalised(*half)])
    assert torch.equal(key_a, src_a.targets([normalised(*half)])[0])
    torch.testing.assert_close(key_b, src_b.targets([normalised(IMAGENET_MEAN, IMAGENET_STD)])[0],
                               rtol=1e-4, atol=1e-5)
    assert both.mean_std == half


# ---------------------------------------------------------------- the loss and teacher dropping
def test_teacher_dropping_is_a_function_of_seed_and_step_and_keeps_one():
    for drop in (0.3, 0.9, 0.999):
        masks = [keep_mask(seed, step, 3, drop) for seed in (0, 1) for step in range(300)]
        again = [keep_mask(seed, step, 3, drop) for seed in (0, 1) for step in range(300)]
        assert all(torch.equal(m, n) for m, n in zip(masks, again))
        assert all(m.any() for m in masks)
    masks = torch.stack([keep_mask(0, step, 3, 0.3) for step in range(2000)]).float()
    assert abs(masks.mean().item() - 0.7) < 0.03  # each kept with probability 1 - P
    assert not torch.equal(masks[:100], torch.stack([keep_mask(1, s, 3, 0.3) for s in range(100)]).float())
    assert all(keep_mask(0, step, 2, 0.0).all() for step in range(50))


def test_the_loss_is_the_weighted_mean_over_kept_teachers():
    losses = torch.tensor([1.0, 2.0, 3.0])
    weights = torch.tensor([1.0, 2.0, 1.0])
    assert weighted_loss(losses, weights, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(2.0)
    assert weighted_loss(losses, weights, torch.ones(3)).item() == pytest.approx(8 / 4)
    assert weighted_loss(losses, weights, torch.tensor([0.0, 1.0, 0.0])).item() == pytest.approx(2.0)


class Pooled(nn.Module):
    """A student's pooled features: one Linear of flattened pixels."""
    num_features = 6

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, self.num_features)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_dropped_teacher_trains_nothing_and_the_kept_ones_do():
    torch.manual_seed(0)
    model = SimRegSeveral(Pooled(), dims=(5, 7), weights=[1.0, 2.0])
    views = [torch.randn(8, 3, 4, 4)]
    keys = (torch.randn(8, 5), torch.randn(8, 7))
    loss = model(views, (*keys, torch.tensor([0.0, 1.0])))
    pred = model.heads[1](model.student(views[0]))
    assert torch.equal(loss, summary_loss(pred.float(), keys[1]))  # teacher 0 dropped: teacher 1's loss alone
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.heads[0].parameters())
    assert all(p.grad.abs().sum() > 0 for p in (*model.heads[1].parameters(), *model.student.parameters()))


def test_the_summary_losses_are_their_formulas():
    g = torch.Generator().manual_seed(3)
    p, t = torch.randn(6, 9, generator=g), 3 * torch.randn(6, 9, generator=g)
    cos = F.cosine_similarity(p.double(), t.double(), dim=1)
    diff = (p.double() - t.double()).abs()
    smooth = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean(1)  # beta 1
    torch.testing.assert_close(summary_loss(p, t).double(), (2 - 2 * cos).mean())
    torch.testing.assert_close(summary_loss(p, t, "cos-smoothl1").double(), (0.5 * (1 - cos) + 0.5 * smooth).mean())


@pytest.mark.parametrize("targets, head", [("raw", "linear"), ("standardize", "linear"), ("standardize", "mlp")])
def test_one_teacher_gives_simregs_loss_bit_for_bit(targets, head):
    """The several-teacher loss of one teacher, kept, is SimReg's on the same inputs and weights."""
    torch.manual_seed(0)
    cfg = Config(simreg_targets=targets)
    student = Pooled()
    one = SimReg(student, dim=5, head=head)
    several = SimRegSeveral(student, dims=(5,), head=head)
    several.heads[0].load_state_dict(one.head.state_dict())
    views, keys = [torch.randn(8, 3, 4, 4)], (torch.randn(8, 5),)
    want = one(views, SimReg.loss_targets(cfg, keys))
    got = several(views, (*SimRegSeveral.loss_targets(cfg, keys), torch.ones(1)))
    assert torch.equal(got, want)
    if targets == "standardize":
        assert torch.equal(SimRegSeveral.loss_targets(cfg, keys)[0], standardize(keys[0]))


# ---------------------------------------------------------------- through the command line
@pytest.fixture(scope="module")
def beton(fmnist):
    return fmnist("train", IMAGES)


def _args(beton, out, *extra) -> list[str]:
    return ["--data", str(beton), "--output", str(out), "-a", "resnet10t", "-k", TWO, "--res", "32",
            "--teacher-res", "32,48", "-b", str(BATCH), "--epochs", "1", "--log-every", "1", "--knn-every", "0",
            "--no-progress", "--device", "cpu", "--workers", "2", "--lr", "0.05", "--warmup-epochs", "0", *extra]


@pytest.mark.parametrize("extra, needles", [
    (["--method", "seed"], ["--method simreg only", "--method seed distils one teacher"]),
    (["--method", "dense"], ["--method simreg only", "--method dense"]),
    (["--method", "moco"], ["--method simreg only", "--method moco"]),
    (["--dense-weight", "1"], ["token losses", "--dense-weight"]),
    (["--local-weight", "1"], ["token losses", "--local-weight"]),
    (["--small-crops", "2"], ["--small-crops", "several teachers"]),
    (["--teacher-res", "32,48,64"], ["--teacher-res has 3 value(s) for 2 teacher(s)"]),
    (["--distill", "x.pth"], ["--distill has 1 value(s) for 2 teacher(s)"]),
    (["--teacher-weights", "1,2,3"], ["--teacher-weights has 3 value(s)"]),
    (["-k", "efficientnet_lite0,dinov2_vits14", "--distill", ",DUMMY", "--teacher-res", "32"],
     ["teacher resolution 32 is not a multiple of dinov2_vits14's patch size 14", "--teacher-res 28 or 42"]),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(beton, tmp_path, capsys, extra, needles):
    dummy = tmp_path / "dummy.pth"
    dummy.write_bytes(b"not read: the side is checked first")
    out = tmp_path / "run"
    code = train_main(_args(beton, out, *[e.replace("DUMMY", str(dummy)) for e in extra]))
    refusal(code, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_a_teacher_cache_is_refused_with_several_teachers(beton, tmp_path, capsys):
    cache = tmp_path / "train.tcache"
    cache.write_bytes(b"")
    code = train_main(_args(beton, tmp_path / "run", "--teacher-cache", str(cache)))
    refusal(code, capsys.readouterr().err, "a teacher cache holds one teacher's keys", "--teacher-cache")
    assert not (tmp_path / "run").exists()


def test_fastseed_cache_takes_one_teacher(beton, tmp_path, capsys):
    out = tmp_path / "train.tcache"
    code = cache_main(["--data", str(beton), "--output", str(out), "-k", TWO, "--device", "cpu"])
    refusal(code, capsys.readouterr().err, "a teacher cache holds one teacher's keys", "one -k")
    assert not out.exists()


def test_a_settings_file_takes_a_list_per_teacher(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(f"teacher_arch: {TWO}\nteacher_res: [32, 48]\nteacher_pool: cls,mean\nteacher_weights: [1, 2]\n"
                    "teacher_drop: 0.25\nsummary_loss: cos-smoothl1\n")
    got = read_settings(path)
    assert got["teacher_res"] == (32, 48) and got["teacher_weights"] == (1.0, 2.0) and got["teacher_pool"] == "cls,mean"
    for text, needle in (("teacher_pool: cls,max\n", "teacher_pool"), ("teacher_drop: 1.5\n", "teacher_drop"),
                         ("summary_loss: l2\n", "summary_loss"), ("teacher_weights: [1, 0]\n", "teacher_weights")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            read_settings(path)


@pytest.mark.slow
def test_the_knn_table_has_a_row_per_teacher(beton, fmnist, tmp_path, capsys):
    val = fmnist("test", 64)
    code = train_main(_args(beton, tmp_path / "run", "--max-steps", "2", "--table", "--val-data", str(val)))
    out = capsys.readouterr().out
    assert code == 0, out
    assert "teacher 1 (efficientnet_lite0)" in out and "teacher 2 (efficientnet_lite1)" in out, out
    final = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"final"' in line][-1]
    assert {"teacher/0/knn_top1@20", "teacher/1/knn_top1@20"} <= final.keys()


@pytest.mark.slow
def test_a_two_teacher_run_records_both_and_resumes_bit_for_bit(beton, tmp_path, monkeypatch, capsys):
    """A run with teacher dropping, uneven weights and UNIC's loss to step 8, never stopped, against
    the same run resumed from its mid-epoch checkpoint of step 3: the same weights and heads."""
    extra = ["--max-steps", str(STOP_AT), "--ckpt-every", str(SNAP_AT), "--teacher-drop", "0.5",
             "--teacher-weights", "1,2", "--summary-loss", "cos-smoothl1"]
    ref, snap = tmp_path / "uninterrupted", tmp_path / "snapshot"
    save = train_module.save_checkpoints

    def save_and_snapshot(run, step, *rest):  # keep the mid-epoch checkpoint the run later writes over
        save(run, step, *rest)
        if step == SNAP_AT:
            snap.mkdir()
            shutil.copy(ref / "checkpoint_last.pt", snap / "checkpoint_last.pt")

    monkeypatch.setattr(train_module, "save_checkpoints", save_and_snapshot)
    assert train_main(_args(beton, ref, *extra)) == 0, capsys.readouterr().err
    monkeypatch.setattr(train_module, "save_checkpoints", save)

    ckpt = read_checkpoint(snap / "checkpoint_last.pt")
    meta = ckpt["fastseed"]
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (SNAP_AT, 0, SNAP_AT)
    teachers = meta["teacher"]["teachers"]
    assert [t["arch"] for t in teachers] == TWO.split(",") and [t["res"] for t in teachers] == [32, 48]
    assert meta["teacher"]["arch"] == TWO and ckpt["config"]["teacher_weights"] == (1.0, 2.0)
    assert ckpt["head"] == {} and {k.split(".")[0] for k in ckpt["buffers"]} == {"heads"}
    assert [ckpt["buffers"][f"heads.{i}.0.weight"].shape[0] for i in (0, 1)] == [1280, 1280]

    capsys.readouterr()
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(snap / "checkpoint_last.pt", resumed / "checkpoint_last.pt")
    assert train_main(_args(beton, resumed, *extra, "--resume", "auto")) == 0
    p = capsys.readouterr()
    assert f"at step {SNAP_AT} " in p.err, p.err[-3000:]
    same_weights(resumed / "checkpoint_last.pt", ref / "checkpoint_last.pt", STOP_AT)

    # the same checkpoint resumed with the teachers in another order is refused in one line
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(snap / "checkpoint_last.pt", swapped / "checkpoint_last.pt")
    args = _args(beton, swapped, *extra, "--resume", "auto")
    args[args.index(TWO)] = "efficientnet_lite1,efficientnet_lite0"
    code = train_main(args)
    refusal(code, capsys.readouterr().err, "teacher efficientnet_lite0,efficientnet_lite1 (sha256",
            "this run loads efficientnet_lite1,efficientnet_lite0", "in the same order", alone=False)
    assert read_checkpoint(swapped / "checkpoint_last.pt")["fastseed"]["step"] == SNAP_AT

    # export keeps the backbone; --with-head refuses the heads of several teachers in one line
    code = export_main([str(ref), "--format", "safetensors", "--output", str(tmp_path / "r"), "--with-head"])
    refusal(code, capsys.readouterr().err, "no embedding head", "a head per teacher", "without --with-head")
    assert not (tmp_path / "r").exists()
