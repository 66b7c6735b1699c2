"""DINOv2 / DINOv3 teachers against their official forward, from files in the official layouts.

The state dicts below have the keys and shapes of the official models as the hubs build them
(facebookresearch/dinov2 dinov2/hub/backbones.py + dinov2/models/vision_transformer.py;
facebookresearch/dinov3 dinov3/hub/backbones.py + dinov3/models/{vision_transformer,convnext}.py),
filled with random values; the reference forwards restate those files' equations, written here
from the official code (cited per function), with neither fastseed's classes nor timm's. The
hub entrypoints fix each network's depth (vit_small passes depth=12 itself), so the releases are
tested at full depth at small sides (ViT-S/14 at 28 and 56 px); ViT-g's SwiGLU, whose smallest
release is 1.1B parameters, is tested on a one-block ViT-g (DinoVisionTransformer takes depth).
"""
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from helpers import refusal

from fastseed.errors import TeacherLoadError
from fastseed.teachers import detect_format, load_teacher
from fastseed.teachers.dino import RELEASES, build, find_release, load

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def cosine(a, b):
    return F.cosine_similarity(a.double(), b.double(), dim=-1).min().item()


def images(res, n=1, seed=1):
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def fill(spec: dict, seed: int) -> dict:
    """Random tensors of the given shapes: norms and LayerScale around 1 (so every block counts),
    weights ~ 1/sqrt(fan in), biases and tokens small."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in spec.items():
        scale = key.endswith(("gamma", "norm1.weight", "norm2.weight", "norm.weight"))
        if scale or (".1.weight" in key and len(shape) == 1):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif len(shape) >= 2 and not key.endswith(("token", "tokens", "pos_embed")):
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        elif key.endswith(("token", "tokens", "pos_embed")):
            out[key] = torch.randn(shape, generator=g) * 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


# ---------------------------------------------------------------------------------------------
# DINOv2 (dinov2/models/vision_transformer.py, dinov2/layers/*)


def dinov2_spec(width=384, depth=12, registers=0, swiglu=False, grid=37) -> dict:
    """{key: shape} of DinoVisionTransformer(img_size=518, patch_size=14, block_chunks=0,
    init_values=1.0).state_dict(): Block = norm1, attn.qkv/proj (MemEffAttention), ls1.gamma, norm2,
    mlp (Mlp fc1/fc2, or SwiGLUFFNFused w12/w3 with hidden (int(4D * 2/3) + 7) // 8 * 8), ls2.gamma."""
    d = width
    spec = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,)}
    if registers:
        spec["register_tokens"] = (1, registers, d)
    hidden = (int(4 * d * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        spec.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "ls2.gamma": (d,)})
        if swiglu:
            spec.update({b + "mlp.w12.weight": (2 * hidden, d), b + "mlp.w12.bias": (2 * hidden,),
                         b + "mlp.w3.weight": (d, hidden), b + "mlp.w3.bias": (d,)})
        else:
            spec.update({b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
                         b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    spec.update({"norm.weight": (d,), "norm.bias": (d,)})
    return spec


def dinov2_state(width=384, depth=12, registers=0, swiglu=False, grid=37, seed=0) -> dict:
    return fill(dinov2_spec(width, depth, registers, swiglu, grid), seed)


def attention(x, sd, b, heads, qkv_bias, rope=None, prefix=0):
    """Attention.forward (dinov2 layers/attention.py; dinov3 layers/attention.py SelfAttention),
    softmax written out."""
    B, N, C = x.shape
    qkv = F.linear(x, sd[b + "attn.qkv.weight"], qkv_bias).reshape(B, N, 3, heads, C // heads)
    q, k, v = [t.transpose(1, 2) for t in qkv.unbind(2)]
    if rope is not None:
        q, k = rope(q, prefix), rope(k, prefix)
    a = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1) @ v
    return F.linear(a.transpose(1, 2).reshape(B, N, C), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])


def dinov2_reference(sd, x, *, registers, offset, antialias, heads=6, swiglu=False):
    """DinoVisionTransformer.forward_features (eval): prepare_tokens_with_masks (patch embed, CLS,
    + interpolate_pos_encoding, registers after the CLS), Block (x + ls1(attn(norm1)); x +
    ls2(mlp(norm2))), LayerNorm eps 1e-6; returns x_norm_clstoken and x_norm_patchtokens."""
    B, _, w, h = x.shape
    D = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], 1)
    pos = sd["pos_embed"]
    N = pos.shape[1] - 1
    if t.shape[1] - 1 == N and w == h:
        pe = pos
    else:
        M = int(math.sqrt(N))
        w0, h0 = w // 14, h // 14
        kw = {"scale_factor": ((w0 + offset) / M, (h0 + offset) / M)} if offset else {"size": (w0, h0)}
        patch = F.interpolate(pos[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=antialias, **kw)
        assert (w0, h0) == patch.shape[-2:]
        pe = torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, -1, D)], 1)
    t = t + pe
    if registers:
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]], 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        t = t + sd[b + "ls1.gamma"] * attention(y, sd, b, heads, sd[b + "attn.qkv.bias"])
        y = F.layer_norm(t, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        if swiglu:  # SwiGLUFFN: w12 -> chunk -> silu(x1) * x2 -> w3
            x1, x2 = F.linear(y, sd[b + "mlp.w12.weight"], sd[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "ls2.gamma"] * y
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return t[:, 0], t[:, 1 + registers:]


@pytest.fixture(scope="module")
def v2():
    return dinov2_state(seed=0)


@pytest.fixture(scope="module")
def v2_reg():
    return dinov2_state(registers=4, seed=1)


def save(tmp_path, state, name):
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("res", [28, 56])
def test_dinov2_release_matches_official_forward(tmp_path, v2, res):
    """dinov2_vits14_pretrain.pth: detected under auto, mask_token known, bicubic resampling with
    scale factor (w0 + 0.1) / 37 and no antialias."""
    path = save(tmp_path, v2, "dinov2_vits14_pretrain.pth")
    bundle = load_teacher("dinov2_vits14", path, res=res)
    x = images(res)
    cls, _ = dinov2_reference(v2, x, registers=0, offset=0.1, antialias=False)
    assert cosine(bundle.model(x), cls) >= 0.9999
    assert (bundle.format, bundle.dim, bundle.mean, bundle.std) == ("dinov2", 384, *IMAGENET)
    # the test can tell: resampling to the output size (timm's way, and the _reg models') is another forward
    other, _ = dinov2_reference(v2, x, registers=0, offset=0, antialias=True)
    assert cosine(other, cls) < 0.9999


@pytest.mark.parametrize("res", [28, 56])
def test_dinov2_reg_release_matches_official_forward(tmp_path, v2_reg, res):
    """dinov2_vits14_reg4_pretrain.pth: registers after the CLS, resampling to the output size with
    antialias."""
    path = save(tmp_path, v2_reg, "dinov2_vits14_reg4_pretrain.pth")
    bundle = load_teacher("dinov2_vits14_reg", path, res=res)
    x = images(res)
    cls, patches = dinov2_reference(v2_reg, x, registers=4, offset=0, antialias=True)
    assert cosine(bundle.model(x), cls) >= 0.9999
    tokens, grid = bundle.model.patch_tokens(x)
    assert grid == (res // 14, res // 14) and tokens.shape == patches.shape
    assert cosine(tokens.flatten(0, 1), patches.flatten(0, 1)) >= 0.9999


def test_dinov2_unresampled_on_the_files_own_grid():
    """On the file's own grid the release adds its position embeddings as they are (a 2 x 2 grid,
    DinoVisionTransformer(img_size=28), stands for the hub's 37 x 37 at 518 px)."""
    sd = dinov2_state(grid=2, seed=7)
    net = build(RELEASES["dinov2_vits14"], sd)
    x = images(28, n=1)
    cls, _ = dinov2_reference(sd, x, registers=0, offset=0.1, antialias=False)
    assert cosine(net.eval()(x), cls) >= 0.9999


@pytest.mark.parametrize("res", [28, 42])
def test_dinov2_giant_swiglu(res):
    """ViT-g/14's SwiGLUFFNFused (w12 packs both input projections; hidden 4096 of 6144) on one block."""
    sd = dinov2_state(width=1536, depth=1, swiglu=True, seed=2)
    net = build(replace(RELEASES["dinov2_vitg14"], depth=1), sd).eval()
    x = images(res)
    cls, _ = dinov2_reference(sd, x, registers=0, offset=0.1, antialias=False, heads=24, swiglu=True)
    assert cosine(net(x), cls) >= 0.9999


@pytest.mark.parametrize("res", [28, 56])
def test_timm_dinov2_state_dicts_load_at_any_patch_multiple(tmp_path, v2, v2_reg, res):
    """timm's vit_small_patch14_dinov2 / _reg4_ state dicts (timm's keys: no mask_token; with
    registers reg_token, the CLS position folded into cls_token, pos_embed of the patches only)
    at sides other than 518, with the release's resampling."""
    plain = {k: v for k, v in v2.items() if k != "mask_token"}
    reg = {k: v for k, v in v2_reg.items() if k not in ("mask_token", "register_tokens", "cls_token", "pos_embed")}
    reg.update(reg_token=v2_reg["register_tokens"], cls_token=v2_reg["cls_token"] + v2_reg["pos_embed"][:, :1],
               pos_embed=v2_reg["pos_embed"][:, 1:])
    x = images(res)
    for arch, state, ref, ssl in (("vit_small_patch14_dinov2", plain, v2, "plain"),
                                  ("vit_small_patch14_reg4_dinov2.lvd142m", reg, v2_reg, "auto")):
        bundle = load_teacher(arch, save(tmp_path, state, f"{arch}.pth"), ssl, res=res)
        registers = 4 if "reg4" in arch else 0
        cls, _ = dinov2_reference(ref, x, registers=registers, offset=0 if registers else 0.1,
                                  antialias=bool(registers))
        assert cosine(bundle.model(x), cls) >= 0.9999, arch


# ---------------------------------------------------------------------------------------------
# DINOv3 ViT (dinov3/models/vision_transformer.py, dinov3/layers/*)


def dinov3_spec(width=384, depth=12, ffn_ratio=4.0, swiglu=False, align=8, qkv_bias=True) -> dict:
    """{key: shape} of DinoVisionTransformer as dinov3_vits16 builds it (patch 16, n_storage_tokens
    4, layerscale, SwiGLUFFN w1/w2/w3 with hidden int(D * ffn_ratio * 2/3) aligned to ``align``),
    without its buffers."""
    d = width
    spec = {"cls_token": (1, 1, d), "storage_tokens": (1, 4, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, 16, 16), "patch_embed.proj.bias": (d,)}
    hidden = int(d * ffn_ratio)
    sw = int(hidden * 2 / 3)
    sw += -sw % align
    for i in range(depth):
        b = f"blocks.{i}."
        spec.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "ls2.gamma": (d,)})
        if qkv_bias:
            spec[b + "attn.qkv.bias"] = (3 * d,)
        if swiglu:
            spec.update({b + "mlp.w1.weight": (sw, d), b + "mlp.w1.bias": (sw,), b + "mlp.w2.weight": (sw, d),
                         b + "mlp.w2.bias": (sw,), b + "mlp.w3.weight": (d, sw), b + "mlp.w3.bias": (d,)})
        else:
            spec.update({b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    spec.update({"norm.weight": (d,), "norm.bias": (d,)})
    return spec


def dinov3_state(width=384, depth=12, heads=6, ffn_ratio=4.0, swiglu=False, seed=0) -> dict:
    """dinov3_spec filled, with the buffers: LinearKMaskedBias's bias_mask (1, 0, 1 by thirds, as
    init_weights sets it) and the RoPE periods base ** (2 i / (D_head / 2)), stored rounded to
    bf16; norms are LayerNorm eps 1e-5."""
    d = width
    sd = fill(dinov3_spec(width, depth, ffn_ratio, swiglu), seed)
    head = d // heads
    sd["rope_embed.periods"] = (100.0 ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))
                                ).to(torch.bfloat16).float()
    for i in range(depth):
        mask = torch.ones(3 * d)
        mask[d:2 * d] = 0
        sd[f"blocks.{i}.attn.qkv.bias_mask"] = mask
    return sd


def dinov3_reference(sd, x, *, heads=6, swiglu=False, storage=4):
    """DinoVisionTransformer.forward_features (eval, untied norms off): tokens [CLS + 0 * mask_token,
    storage, patches]; RopePositionEmbedding (coords (i + 0.5) / H per axis mapped to [-1, 1],
    angles 2 pi coord / period, [h, w] then tiled twice); SelfAttention.apply_rope on the patch
    tokens only, rope_rotate_half; SelfAttentionBlock x + ls1(attn(norm1)), x + ls2(mlp(norm2))."""
    B = x.shape[0]
    D = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    h, w = t.shape[-2:]
    t = t.flatten(2).transpose(1, 2)
    cls = sd["cls_token"] + 0 * sd["mask_token"]
    t = torch.cat([cls.expand(B, -1, -1), sd["storage_tokens"].expand(B, -1, -1), t], 1)
    periods = sd["rope_embed.periods"].float()
    ch, cw = torch.arange(0.5, h) / h, torch.arange(0.5, w) / w
    coords = 2.0 * torch.stack(torch.meshgrid(ch, cw, indexing="ij"), -1).flatten(0, 1) - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = torch.sin(angles), torch.cos(angles)

    def rope(z, prefix):
        zp = z[:, :, prefix:]
        z1, z2 = zp.chunk(2, dim=-1)
        return torch.cat([z[:, :, :prefix], zp * cos + torch.cat([-z2, z1], -1) * sin], 2)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        bias = sd.get(b + "attn.qkv.bias")
        if bias is not None:
            bias = bias * sd[b + "attn.qkv.bias_mask"]
        y = F.layer_norm(t, (D,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-5)
        t = t + sd[b + "ls1.gamma"] * attention(y, sd, b, heads, bias, rope, 1 + storage)
        y = F.layer_norm(t, (D,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-5)
        if swiglu:
            gate = F.silu(F.linear(y, sd[b + "mlp.w1.weight"], sd[b + "mlp.w1.bias"]))
            y = F.linear(gate * F.linear(y, sd[b + "mlp.w2.weight"], sd[b + "mlp.w2.bias"]),
                         sd[b + "mlp.w3.weight"], sd[b + "mlp.w3.bias"])
        else:
            y = F.linear(F.gelu(F.linear(y, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"])),
                         sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        t = t + sd[b + "ls2.gamma"] * y
    t = F.layer_norm(t, (D,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return t[:, 0], t[:, 1 + storage:]


@pytest.fixture(scope="module")
def v3():
    return dinov3_state(seed=3)


@pytest.mark.parametrize("res", [32, 64])
def test_dinov3_release_matches_official_forward(tmp_path, v3, res):
    path = save(tmp_path, v3, "dinov3_vits16_pretrain_lvd1689m-08c60483.pth")
    assert detect_format(torch.load(path)) == "dinov3"
    bundle = load_teacher("dinov3_vits16", path, res=res, pool="cls+mean")
    x = images(res)
    cls, patches = dinov3_reference(v3, x)
    assert bundle.dim == 768 and bundle.format == "dinov3"
    out = bundle.model(x)
    assert cosine(out[:, :384], cls) >= 0.9999 and cosine(out[:, 384:], patches.mean(1)) >= 0.9999
    tokens, grid = bundle.model.patch_tokens(x)
    assert grid == (res // 16, res // 16) and cosine(tokens.flatten(0, 1), patches.flatten(0, 1)) >= 0.9999


def test_dinov3_keeps_the_files_rope_periods_through_a_cast(v3):
    """The release's periods (rounded to bf16 in the file) are what its RoPE uses; timm would
    recompute them exactly when the model is cast."""
    net = build(RELEASES["dinov3_vits16"], v3).eval().to(torch.bfloat16)
    assert net.net.rope.periods.dtype == torch.float32  # timm keeps them in fp32 ...
    assert torch.equal(net.net.rope.periods, v3["rope_embed.periods"])  # ... and fastseed the file's values


@pytest.mark.parametrize("res", [32, 48])
def test_dinov3_small_plus_swiglu(tmp_path, res):
    sd = dinov3_state(ffn_ratio=6, swiglu=True, seed=4)
    bundle = load_teacher("dinov3_vits16plus", save(tmp_path, sd, "dinov3_vits16plus.pth"), res=res)
    x = images(res)
    assert cosine(bundle.model(x), dinov3_reference(sd, x, swiglu=True)[0]) >= 0.9999


@pytest.mark.parametrize("res", [32, 64])
def test_timm_dinov3_state_dict_without_rope_periods(tmp_path, v3, res):
    """timm's vit_small_patch16_dinov3(_qkvb) keys: reg_token, gamma_1/2, q_bias and v_bias (no key
    bias), no periods buffer: it is computed, as the official model's init does."""
    timm_sd = {}
    for k, v in v3.items():
        if k in ("mask_token", "rope_embed.periods") or k.endswith("bias_mask"):
            continue
        if k.endswith("attn.qkv.bias"):
            q, _, vb = v.chunk(3)
            timm_sd[k.replace("qkv.bias", "q_bias")], timm_sd[k.replace("qkv.bias", "v_bias")] = q, vb
            continue
        name = k.replace("storage_tokens", "reg_token")
        timm_sd[name.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
    bundle = load_teacher("vit_small_patch16_dinov3", save(tmp_path, timm_sd, "timm_dinov3.pth"), "plain", res=res)
    ref = dict(v3, **{"rope_embed.periods": 100.0 ** (2 * torch.arange(16, dtype=torch.float32) / 32)})
    x = images(res)
    assert cosine(bundle.model(x), dinov3_reference(ref, x)[0]) >= 0.9999


def test_dinov3_satellite_weights_have_their_own_normalisation(tmp_path, v3):
    """SAT-493M: told by the file name (as the hub does), timm's tag, or ViT-L's local CLS norm
    (keys and shapes only: meta tensors); a satellite teacher gets the satellite mean/std."""
    spec = dict(dinov3_spec(width=1024, depth=24), **{"rope_embed.periods": (16,)})
    spec.update({f"blocks.{i}.attn.qkv.bias_mask": (3072,) for i in range(24)})
    state = {k: torch.empty(shape, device="meta") for k, shape in spec.items()}
    untied = dict(state, **{"local_cls_norm.weight": torch.empty(1024, device="meta")})
    for arch, sd, name, satellite in (("dinov3_vitl16", state, "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", True),
                                      ("dinov3_vitl16", state, "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth", False),
                                      ("vit_large_patch16_dinov3.sat493m", state, "model.pth", True),
                                      (None, untied, "model.pth", True)):
        assert find_release(sd, arch, "auto", name).satellite is satellite, (arch, name)
    found = find_release(v3, "dinov3_vits16", "auto", "x.pth")
    bundle = load(replace(found, satellite=True), sha256="", source="x.pth")
    assert bundle.mean == (0.430, 0.411, 0.296) and bundle.std == (0.213, 0.156, 0.143)


# ---------------------------------------------------------------------------------------------
# DINOv3 ConvNeXt (dinov3/models/convnext.py)


def convnext_spec(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3)) -> dict:
    """{key: shape} of ConvNeXt(depths, dims).state_dict(): downsample_layers (stem conv 4/4 +
    LayerNorm channels_first; LayerNorm + conv 2/2), stages.i.j (dwconv 7x7, norm, pwconv1/2,
    gamma), norm, and norms.3 (the same module as norm, registered twice)."""
    spec = {"downsample_layers.0.0.weight": (dims[0], 3, 4, 4), "downsample_layers.0.0.bias": (dims[0],),
            "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],)}
    for i in range(1, 4):
        spec.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],), f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                     f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                     f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, (c, n) in enumerate(zip(dims, depths)):
        for j in range(n):
            s = f"stages.{i}.{j}."
            spec.update({s + "gamma": (c,), s + "dwconv.weight": (c, 1, 7, 7), s + "dwconv.bias": (c,),
                         s + "norm.weight": (c,), s + "norm.bias": (c,), s + "pwconv1.weight": (4 * c, c),
                         s + "pwconv1.bias": (4 * c,), s + "pwconv2.weight": (c, 4 * c), s + "pwconv2.bias": (c,)})
    spec.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],)})
    return spec


def convnext_state(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), seed=6) -> dict:
    sd = fill(convnext_spec(dims, depths), seed)
    sd["norms.3.weight"], sd["norms.3.bias"] = sd["norm.weight"], sd["norm.bias"]
    return sd


def convnext_reference(sd, x, depths=(3, 3, 9, 3)):
    """ConvNeXt.forward_features: Block = dwconv, LayerNorm (channels_last, eps 1e-6), pwconv1,
    GELU, pwconv2, gamma, residual; CLS = global mean; one LayerNorm over [CLS, patches]."""
    def ln_first(t, p):  # LayerNorm(data_format="channels_first")
        u = t.mean(1, keepdim=True)
        s = (t - u).pow(2).mean(1, keepdim=True)
        return sd[p + ".weight"][:, None, None] * ((t - u) / torch.sqrt(s + 1e-6)) + sd[p + ".bias"][:, None, None]

    for i in range(4):
        d = f"downsample_layers.{i}"
        if i == 0:
            x = ln_first(F.conv2d(x, sd[d + ".0.weight"], sd[d + ".0.bias"], stride=4), d + ".1")
        else:
            x = F.conv2d(ln_first(x, d + ".0"), sd[d + ".1.weight"], sd[d + ".1.bias"], stride=2)
        c = x.shape[1]
        for j in range(depths[i]):
            s = f"stages.{i}.{j}."
            y = F.conv2d(x, sd[s + "dwconv.weight"], sd[s + "dwconv.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), sd[s + "norm.weight"], sd[s + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[s + "pwconv1.weight"], sd[s + "pwconv1.bias"])),
                         sd[s + "pwconv2.weight"], sd[s + "pwconv2.bias"])
            x = x + (sd[s + "gamma"] * y).permute(0, 3, 1, 2)
    tokens = torch.cat([x.mean([-2, -1]).unsqueeze(1), x.flatten(2).transpose(1, 2)], 1)
    tokens = F.layer_norm(tokens, (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return tokens[:, 0], tokens[:, 1:]


@pytest.fixture(scope="module")
def convnext():
    return convnext_state()


@pytest.mark.parametrize("res", [32, 64])
def test_dinov3_convnext_release_matches_official_forward(tmp_path, convnext, res):
    sd = convnext
    path = save(tmp_path, sd, "dinov3_convnext_tiny_pretrain_lvd1689m-21b726bb.pth")
    bundle = load_teacher("dinov3_convnext_tiny", path, res=res, pool="mean")
    x = images(res)
    cls, patches = convnext_reference(sd, x)
    assert cosine(bundle.model(x), patches.mean(1)) >= 0.9999
    ours, _, grid = bundle.model.backbone.tokens(x)
    assert cosine(ours, cls) >= 0.9999 and grid == (res // 32, res // 32)


@pytest.mark.parametrize("res", [32, 64])
def test_timm_convnext_keys_load_as_dinov3_when_k_says_so(tmp_path, convnext, res):
    """timm's ConvNeXt keys (stem, stages.i.downsample, stages.i.blocks.j.conv_dw / mlp.fc1 / fc2,
    head.norm) do not say how the network was trained: -k convnext_tiny.dinov3_lvd1689m does."""
    timm_sd = {}
    for k, v in convnext.items():
        if k.startswith("norms."):
            continue
        k = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        k = re.sub(r"^downsample_layers\.(\d)\.", r"stages.\1.downsample.", k)
        k = re.sub(r"^stages\.(\d)\.(\d+)\.", r"stages.\1.blocks.\2.", k)
        k = k.replace("dwconv", "conv_dw").replace("pwconv1", "mlp.fc1").replace("pwconv2", "mlp.fc2")
        timm_sd["head.norm." + k[len("norm."):] if k.startswith("norm.") else k] = v
    bundle = load_teacher("convnext_tiny.dinov3_lvd1689m", save(tmp_path, timm_sd, "convnext_tiny.pth"), res=res)
    x = images(res)
    assert bundle.format == "dinov3" and cosine(bundle.model(x), convnext_reference(convnext, x)[0]) >= 0.9999


# Every hub entrypoint, restated from dinov2/hub/backbones.py and dinov3/hub/backbones.py (+
# dinov3/models/convnext.py convnext_sizes): (spec function, its arguments, buffers).
HUB = {
    "dinov2_vits14": (dinov2_spec, dict(width=384, depth=12)),
    "dinov2_vitb14": (dinov2_spec, dict(width=768, depth=12)),
    "dinov2_vitl14": (dinov2_spec, dict(width=1024, depth=24)),
    "dinov2_vitg14": (dinov2_spec, dict(width=1536, depth=40, swiglu=True)),
    "dinov2_vits14_reg": (dinov2_spec, dict(width=384, depth=12, registers=4)),
    "dinov2_vitb14_reg": (dinov2_spec, dict(width=768, depth=12, registers=4)),
    "dinov2_vitl14_reg": (dinov2_spec, dict(width=1024, depth=24, registers=4)),
    "dinov2_vitg14_reg": (dinov2_spec, dict(width=1536, depth=40, swiglu=True, registers=4)),
    "dinov3_vits16": (dinov3_spec, dict(width=384, depth=12)),
    "dinov3_vits16plus": (dinov3_spec, dict(width=384, depth=12, ffn_ratio=6, swiglu=True)),
    "dinov3_vitb16": (dinov3_spec, dict(width=768, depth=12)),
    "dinov3_vitl16": (dinov3_spec, dict(width=1024, depth=24)),
    "dinov3_vitl16plus": (dinov3_spec, dict(width=1024, depth=24, ffn_ratio=6, swiglu=True)),
    "dinov3_vith16plus": (dinov3_spec, dict(width=1280, depth=32, ffn_ratio=6, swiglu=True)),
    "dinov3_vit7b16": (dinov3_spec, dict(width=4096, depth=40, ffn_ratio=3, swiglu=True, align=64, qkv_bias=False)),
    "dinov3_convnext_tiny": (convnext_spec, dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3))),
    "dinov3_convnext_small": (convnext_spec, dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3))),
    "dinov3_convnext_base": (convnext_spec, dict(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3))),
    "dinov3_convnext_large": (convnext_spec, dict(dims=(192, 384, 768, 1536), depths=(3, 3, 27, 3))),
}


@pytest.mark.parametrize("hub", list(HUB))
def test_every_release_layout_is_recognised_and_fits_timms_network(hub):
    """Each release's keys and shapes (no values: tensors of 2+ dims on the meta device, vectors zero)
    name their entrypoint under auto and convert onto timm's network key for key and shape:
    loading stops only at the values the meta tensors lack."""
    spec_fn, kwargs = HUB[hub]
    spec = spec_fn(**kwargs)
    if spec_fn is dinov3_spec:
        head = kwargs["width"] // {384: 6, 768: 12, 1024: 16, 1280: 20, 4096: 32}[kwargs["width"]]
        spec["rope_embed.periods"] = (head // 4,)
        if kwargs.get("qkv_bias", True):
            spec.update({f"blocks.{i}.attn.qkv.bias_mask": (3 * kwargs["width"],) for i in range(kwargs["depth"])})
    if spec_fn is convnext_spec:
        spec.update({"norms.3.weight": spec["norm.weight"], "norms.3.bias": spec["norm.bias"]})
    state = {k: torch.zeros(s) if len(s) == 1 else torch.empty(s, device="meta") for k, s in spec.items()}
    if "rope_embed.periods" in state:
        n = state["rope_embed.periods"].numel()
        state["rope_embed.periods"] = 100.0 ** (2 * torch.arange(n, dtype=torch.float32) / (2 * n))
    found = find_release(state, None, "auto", "model.pth")
    assert found.release.hub == hub
    with pytest.raises(TeacherLoadError, match="no value for"):
        build(found.release, state)


# ---------------------------------------------------------------------------------------------
# Detection, strictness, bad input


def test_detection_tells_dinov2_from_dino_v1(tmp_path, v2):
    """Under auto, a bare DINOv2 file is read as DINOv2 with no -k at all; a DINO v1 ViT (no
    mask token, no LayerScale) still asks for --teacher-ssl."""
    assert load_teacher(None, save(tmp_path, v2, "a.pth")).arch == "dinov2_vits14"
    v1 = {k: v for k, v in v2.items() if k != "mask_token" and ".ls" not in k}
    with pytest.raises(TeacherLoadError, match="--teacher-ssl dino"):
        load_teacher("vit_small_patch16_224", save(tmp_path, v1, "dino_deitsmall16_pretrain.pth"))


def test_wrong_arch_unknown_key_and_declared_format_are_one_line_errors(tmp_path, v2):
    path = save(tmp_path, v2, "dinov2_vits14_pretrain.pth")
    with pytest.raises(TeacherLoadError, match="-k dinov2_vitb14 but the checkpoint is a DINOv2 ViT release.*"
                                               "pass -k dinov2_vits14"):
        load_teacher("dinov2_vitb14", path)
    with pytest.raises(TeacherLoadError, match="pass -k dinov2_vits14"):
        load_teacher("vit_small_patch16_224", path)
    with pytest.raises(TeacherLoadError, match="--teacher-ssl auto or dinov2"):
        load_teacher("dinov2_vits14", path, ssl="mocov3")
    extra = dict(v2, **{"head.weight": torch.zeros(10, 384)})
    with pytest.raises(TeacherLoadError, match="head.weight"):
        load_teacher("dinov2_vits14", save(tmp_path, extra, "x.pth"))
    with pytest.raises(TeacherLoadError, match="not a multiple of dinov2_vits14's patch size 14: "
                                               "pass --teacher-res 98 or 112"):
        load_teacher("dinov2_vits14", path, res=100)


def test_teacher_uses_fused_attention(monkeypatch, v3, v2):
    """timm's attention calls F.scaled_dot_product_attention (SDPA: fused kernels on CUDA), once a block."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*a, **k):
        calls.append(1)
        return sdpa(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    for release, sd, res in (("dinov2_vits14", v2, 28), ("dinov3_vits16", v3, 32)):
        calls.clear()
        build(RELEASES[release], sd).eval()(images(res, n=1))
        assert len(calls) == 12, release


def test_dinov2_forward_compiles_whole_in_bf16(v2):
    """Training holds the teacher in bf16 and compiles it on CUDA: the release's token assembly
    and position resampling trace into one graph (dynamo, no graph break)."""
    net = build(RELEASES["dinov2_vits14"], v2).eval().to(torch.bfloat16)
    x = images(28).to(torch.bfloat16)
    with torch.inference_mode():
        assert cosine(torch.compile(net, backend="eager", fullgraph=True)(x), net(x)) >= 0.9999


def test_teacher_res_defaults_to_the_release_224():
    from fastseed.config import Config
    from fastseed.targets import teacher_side
    assert teacher_side(Config(teacher_arch="dinov2_vits14", res=32)) == 224
    assert teacher_side(Config(teacher_arch="vit_small_patch16_dinov3", res=32, teacher_res=64)) == 64
    assert teacher_side(Config(teacher_arch="resnet50", res=32)) == 32


@pytest.fixture(scope="module")
def beton(fmnist):
    return fmnist("test", 64)


def test_cli_trains_from_dinov2_hub_file_end_to_end(tmp_path, beton, v2):
    """fastseed-train -k dinov2_vits14 --distill dinov2_vits14_pretrain.pth --data x.beton, on the CPU."""
    from fastseed.cli import train_main
    from fastseed.checkpoint import read_checkpoint
    path = save(tmp_path, v2, "dinov2_vits14_pretrain.pth")
    out = tmp_path / "run"
    rc = train_main(["-k", "dinov2_vits14", "--distill", path, "--data", str(beton), "--teacher-res", "28",
                     "--res", "32", "-a", "resnet10t", "-b", "16", "--max-steps", "2", "--queue-size", "64",
                     "--workers", "1", "--device", "cpu", "--output", str(out), "--no-progress",
                     "--knn-every", "0", "--teacher-pool", "cls+mean"])
    assert rc == 0
    ckpt = read_checkpoint(out / "checkpoint_last.pt")
    assert ckpt["fastseed"]["teacher"]["format"] == "dinov2" and ckpt["fastseed"]["teacher"]["dim"] == 768


def test_cli_refuses_a_side_that_is_no_patch_multiple(tmp_path, beton, v2, capsys):
    from fastseed.cli import train_main
    path = save(tmp_path, v2, "dinov2_vits14_pretrain.pth")
    rc = train_main(["-k", "dinov2_vits14", "--distill", path, "--data", str(beton), "--teacher-res", "30",
                     "--output", str(tmp_path / "out"), "--device", "cpu"])
    refusal(rc, capsys.readouterr().err, "pass --teacher-res 28 or 42")
    assert not (tmp_path / "out").exists()
