"""The recipe switches of the recipe study (benchmarks/recipes.py): --batch-in-queue, --head
linear, --mixup, --clip-grad. Each test can fail: it checks what the switch does to a step,
not only that a run finishes."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastseed.methods.seed as seed_module
from fastseed.config import Config
from fastseed.errors import ConfigError
from fastseed.export import method_head
from fastseed.kernels import reference as ref
from fastseed.methods import SEED, SimReg
from fastseed.mixing import check_mixup, mixup
from fastseed.students import clip


class Net(nn.Module):
    num_features = 12

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 12)

    def forward(self, x):
        return self.fc(x)


def test_batch_in_queue_loss_is_over_the_queue_holding_the_batch():
    torch.manual_seed(0)
    queues = SEED.make_queues(dim=8, queue_size=16)
    method = SEED(Net(), queues, dim=8, temp=0.07, distill_t=0.07, batch_in_queue=True)
    x, t = torch.randn(5, 20), torch.randn(5, 8)
    queues.update((t,))  # the step's order with --batch-in-queue: enqueue, then the losses
    assert torch.allclose(queues.queue.keys[:5], F.normalize(t, dim=1))
    loss = method([x], (t,))
    s = method.head(method.student(x)).double()
    expect = ref.seed_loss(s, t.double(), queues.queue.keys.double(), student_temp=0.07, teacher_temp=0.07,
                           self_logit=False)
    with_column = ref.seed_loss(s, t.double(), queues.queue.keys.double(), student_temp=0.07, teacher_temp=0.07)
    assert abs(loss.item() - expect.item()) < 1e-5 and abs(loss.item() - with_column.item()) > 1e-3


@pytest.mark.slow
def test_a_batch_in_queue_run_enqueues_before_each_loss(data_and_teacher, tmp_path, monkeypatch):
    """In a run, every loss with --batch-in-queue sees the step's own keys among the queue's rows
    (they would be missing if the enqueue came after the losses, as SEED's does)."""
    from fastseed.train import train
    seen = []
    real = seed_module.seed_loss

    def spy(s, t, queue, **kw):
        keys = F.normalize(t.float(), dim=1)
        seen.append((kw["self_logit"], (keys @ queue.float().T).amax(1).min().item()))
        return real(s, t, queue, **kw)

    monkeypatch.setattr(seed_module, "seed_loss", spy)
    data, teacher = data_and_teacher
    cfg = Config(method="seed", arch="resnet10t", teacher_arch="resnet10t", distill=str(teacher), data=str(data),
                 res=32, workers=2, epochs=1, batch_size=32, lr=0.1, warmup_epochs=0, queue_size=64,
                 temp=0.07, distill_t=0.07, batch_in_queue=True, mixup=True, clip_grad=1.0, head="linear",
                 output=str(tmp_path / "run"), max_steps=3, log_every=1, ckpt_every=1000, knn_every=0,
                 progress=False, device="cpu")
    assert train(cfg)["step"] == 3
    assert [s for s, _ in seen] == [False] * 3
    assert all(best > 0.9999 for _, best in seen), seen  # each key found in the queue (cosine 1)


@pytest.fixture(scope="module")
def data_and_teacher(fmnist, tmp_path_factory):
    import timm
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)
    return fmnist("train", 256), path


def test_batch_in_queue_refusals():
    with pytest.raises(ConfigError, match="--queue-size"):
        SEED.check(Config(batch_in_queue=True, queue_size=64, batch_size=128), 1)
    with pytest.raises(ConfigError, match="--small-crops"):
        SEED.check(Config(batch_in_queue=True, small_crops=2), 1)


def test_linear_head_is_one_linear_and_export_rebuilds_it():
    method = SEED(Net(), SEED.make_queues(dim=8, queue_size=16), dim=8, head="linear")
    assert [type(m) for m in method.head] == [nn.Linear] and method.head[0].weight.shape == (8, 12)
    rebuilt = method_head("seed", method.head.state_dict())
    x = torch.randn(3, 12)
    assert torch.equal(rebuilt(x), method.head(x))
    mlp = SEED(Net(), SEED.make_queues(dim=8, queue_size=16), dim=8)
    assert len(method_head("seed", mlp.head.state_dict())) == 3


def test_bn_linear_head_has_the_official_simreg_layout_and_export_rebuilds_it():
    # UCDvision/simreg mlp_arch.py get_linear_proj(inp_dim, out_dim): nn.Sequential(
    # nn.BatchNorm1d(inp_dim), nn.Linear(inp_dim, out_dim)) -- its `--linear_pred` predictor
    official = {"0.weight": (12,), "0.bias": (12,), "0.running_mean": (12,), "0.running_var": (12,),
                "0.num_batches_tracked": (), "1.weight": (8, 12), "1.bias": (8,)}
    for cls, name in ((SEED, "seed"), (SimReg, "simreg")):
        method = cls(Net(), SEED.make_queues(dim=8, queue_size=16), dim=8, head="bn-linear")
        assert {k: tuple(v.shape) for k, v in method.head.state_dict().items()} == official
        method.head.train()(torch.randn(5, 12) * 3 + 1)  # moves the running statistics off their init
        rebuilt = method_head(name, method.head.state_dict())
        x = torch.randn(3, 12)
        assert [type(m) for m in rebuilt] == [nn.BatchNorm1d, nn.Linear]
        assert torch.equal(rebuilt(x), method.head.eval()(x))


def test_mixup_is_a_convex_mix_with_one_permutation_for_every_view():
    b = 6
    big = torch.randn(b, 3, 4, 4)
    small = torch.randn(2 * b, 3, 2, 2)  # two small crops, crop-major
    g = torch.Generator().manual_seed(3)
    out = mixup([big, small], g)
    g = torch.Generator().manual_seed(3)
    lam = torch.rand((), generator=g)
    perm = torch.randperm(b, generator=g)
    torch.testing.assert_close(out[0], lam * big + (1 - lam) * big[perm])
    index = torch.cat([perm, perm + b])
    torch.testing.assert_close(out[1], lam * small + (1 - lam) * small[index])
    again = mixup([big, small], torch.Generator().manual_seed(3))
    assert all(torch.equal(a, c) for a, c in zip(out, again))  # the generator decides: a resume mixes alike
    assert not torch.equal(out[0], big)


def test_mixup_refuses_a_teacher_cache():
    with pytest.raises(ConfigError, match="--teacher-cache"):
        check_mixup(Config(mixup=True, teacher_cache="keys.fscache"))
    check_mixup(Config(mixup=True))


def test_clip_bounds_the_global_gradient_norm():
    net = nn.Linear(10, 10)
    (net(torch.randn(4, 10)) * 100).sum().backward()
    before = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert before > 1.0
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    clip(SimpleNamespace(optimizer=optimizer, cfg=Config(clip_grad=1.0)))
    after = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert abs(after.item() - 1.0) < 1e-4


def test_lars_leaves_biases_and_norms_out_of_the_trust_ratio_and_the_decay():
    """LARS as SimCLR/BYOL/LightlyTrain use it: 1-d parameters step as plain SGD (lr × grad);
    weight matrices by lr × trust ratio (0.001·‖w‖/(‖g‖ + wd‖w‖)) × (g + wd·w)."""
    from fastseed.optim import build_optimizer
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(Config(optimizer="lars", weight_decay=0.1, momentum=0.9), net, 0.5, torch.device("cpu"))
    net(torch.randn(8, 6)).pow(2).sum().backward()
    w, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    gw, gb = net[0].weight.grad.clone(), net[0].bias.grad.clone()
    opt.step()
    torch.testing.assert_close(net[0].bias.detach(), b - 0.5 * gb)
    trust = 0.001 * w.norm() / (gw.norm() + 0.1 * w.norm())
    torch.testing.assert_close(net[0].weight.detach(), w - 0.5 * trust * (gw + 0.1 * w))


@pytest.mark.slow
def test_resuming_with_another_number_of_optimizer_groups_is_one_clear_error(data_and_teacher, tmp_path):
    """An SGD checkpoint (one group) resumed with --optimizer lars (two): CheckpointReadError,
    not torch's "different number of parameter groups"."""
    from fastseed.errors import CheckpointReadError
    from fastseed.train import train
    data, teacher = data_and_teacher
    cfg = Config(method="seed", arch="resnet10t", teacher_arch="resnet10t", distill=str(teacher), data=str(data),
                 res=32, workers=2, epochs=1, batch_size=32, lr=0.1, warmup_epochs=0, queue_size=64,
                 output=str(tmp_path / "run"), max_steps=2, ckpt_every=1000, knn_every=0, progress=False,
                 device="cpu")
    train(cfg)
    with pytest.raises(CheckpointReadError, match="parameter group"):
        train(cfg.replace(optimizer="lars", resume="auto", max_steps=4))


def test_sgd_and_adamw_step_with_fused_kernels_on_a_cpu_and_match_the_plain_step():
    from fastseed.optim import build_optimizer
    for name in ("sgd", "adamw"):
        nets = [nn.Linear(7, 5), nn.Linear(7, 5)]
        nets[1].load_state_dict(nets[0].state_dict())
        fused = build_optimizer(Config(optimizer=name, weight_decay=0.1), nets[0], 0.05, torch.device("cpu"))
        assert all(g["fused"] for g in fused.param_groups)
        plain = {"sgd": torch.optim.SGD(nets[1].parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, foreach=False),
                 "adamw": torch.optim.AdamW(nets[1].parameters(), lr=0.05, weight_decay=0.1, foreach=False)}[name]
        x = torch.randn(4, 7)
        for _ in range(3):
            for net, opt in zip(nets, (fused, plain)):
                opt.zero_grad()
                net(x).square().sum().backward()
                opt.step()
        for a, b in zip(nets[0].parameters(), nets[1].parameters()):
            torch.testing.assert_close(a, b)


def test_standardized_targets_are_each_dimension_over_the_batch():
    """`--simreg-targets standardize`: (t − mean) / (std + 1e-5) per dimension over the batch's rows,
    the std with Bessel's correction (numpy's ddof=1), computed here in float64 numpy."""
    from fastseed.methods.simreg import standardize
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(7, 5, generator=g) + 3.0, dim=1)  # a shared component, as a teacher's
    a = t.double().numpy()
    want = (a - a.mean(0)) / (a.std(0, ddof=1) + 1e-5)
    got = standardize(t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-5)
    assert got.mean(0).abs().max() < 1e-5 and (got.std(0) - 1).abs().max() < 1e-3
    bf16 = standardize(t.bfloat16())  # a bf16 teacher's keys: the statistics still in float32
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, standardize(t.bfloat16().float()))


def test_simreg_targets_refusals_and_the_other_methods_keep_their_targets():
    with pytest.raises(ConfigError, match="standardize"):
        SimReg.check(Config(method="simreg", simreg_targets="whiten"), 1)
    with pytest.raises(ConfigError, match="--batch-size"):
        SimReg.check(Config(method="simreg", simreg_targets="standardize", batch_size=1), 1)
    t = (torch.randn(4, 3),)
    assert SimReg.loss_targets(Config(simreg_targets="raw"), t) is t
    assert SEED.loss_targets(Config(simreg_targets="standardize"), t) is t  # SEED's softmax sees the raw keys


@pytest.mark.slow
@pytest.mark.parametrize("targets", ["raw", "standardize"])
def test_a_simreg_run_regresses_what_its_setting_says(data_and_teacher, tmp_path, monkeypatch, targets):
    """In a run, SimReg's loss sees the teacher's keys as the source gave them (raw) or standardised
    per dimension over the batch, checked at each step against the formula on the source's keys."""
    from fastseed.train import train
    seen = []
    real = SimReg.forward

    def spy(self, views, t):
        seen.append(t[0].detach().float().clone())
        return real(self, views, t)

    monkeypatch.setattr(SimReg, "forward", spy)
    raw_keys = []
    monkeypatch.setattr(SimReg, "loss_targets", staticmethod(
        lambda cfg, t, real=SimReg.loss_targets: (raw_keys.append(t[0].float().clone()), real(cfg, t))[1]))
    data, teacher = data_and_teacher
    cfg = Config(method="simreg", arch="resnet10t", teacher_arch="resnet10t", distill=str(teacher), data=str(data),
                 res=32, workers=2, epochs=1, batch_size=32, lr=0.1, warmup_epochs=0, head="linear",
                 simreg_targets=targets, output=str(tmp_path / "run"), max_steps=2, log_every=1, ckpt_every=1000,
                 knn_every=0, progress=False, device="cpu")
    assert train(cfg)["step"] == 2
    assert len(seen) == len(raw_keys) == 2
    for raw, t in zip(raw_keys, seen):
        if targets == "raw":
            assert torch.equal(t, raw)
        else:
            a = raw.double().numpy()
            want = torch.from_numpy((a - a.mean(0)) / (a.std(0, ddof=1) + 1e-5)).float()
            torch.testing.assert_close(t, want, rtol=1e-4, atol=1e-4)
            assert (t - raw).abs().max() > 0.5  # far from the raw keys
