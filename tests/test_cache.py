"""Teacher cache: the stored keys are the teacher's embeddings of the stored crops, the replay
loader cuts exactly those crops and yields exactly those keys, mismatches and damage are
refused, and a build killed mid-way resumes to the same bytes.

One in-process build (EfficientNet-Lite0, bundled weights, on 256 raw Fashion-MNIST images)
and one replay loader serve the module; each FFCV loader JIT-compiles for several seconds.
Independent references: the source images from `fashion_mnist` (raw betons hold them
unchanged), crops by slicing + cv2.resize INTER_AREA (the interpolation the decoders document),
the teacher as `load_teacher` returns it (fp32, contiguous, another instance, other batches).
"""
import shutil
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import build_teacher_cache, refusal

from fastseed.cache import (
    TeacherCache,
    _read_header,
    _records,
    draw_boxes,
    layout,
    slot_phase,
    teacher_record,
    todo,
)
from fastseed.cli import cache_main
from fastseed.config import Config
from fastseed.data import FLIP_BIT, RATIO, _address_view, random_boxes, replay_loader
from fastseed.data_prep import subset_indices
from fastseed.data_prep.sources import fashion_mnist
from fastseed.errors import CacheError
from fastseed.teachers import load_teacher

N, CROPS, TEACHER_RES, RES = 256, 3, 32, 24
# chunk 16 with 48 crops per forward: 16 images a batch; many small chunks leave the kill test
# time to land mid-build
BUILD = dict(crops=CROPS, chunk=16, batch_size=48)
CLI_BUILD = ["--crops", str(CROPS), "--chunk", "16", "--batch-size", "48"]
JPEG_TOL = 8  # levels: FFCV's turbojpeg decode vs OpenCV's, measured up to 6 on these images


# the teacher in fp32 on every CPU (auto is bf16 on one with AMX tiles): the stored keys are checked
# against an fp32 forward of the stored crops
def _cfg(beton, **kw) -> Config:
    return Config(data=str(beton), teacher_arch="efficientnet_lite0", teacher_res=TEACHER_RES, device="cpu",
                  workers=2, seed=7, progress=False, teacher_precision="fp32").replace(**kw)


def _cli_args(beton, output, arch="efficientnet_lite0"):
    return ["--data", str(beton), "-k", arch, "--teacher-res", str(TEACHER_RES), "--device", "cpu",
            "--workers", "2", "--seed", "7", "--no-progress", "--output", str(output), "--teacher-precision", "fp32",
            *CLI_BUILD]


@pytest.fixture(scope="module")
def built(tmp_path_factory, fmnist):
    d = tmp_path_factory.mktemp("cache")
    # half JPEG, half raw: both decode paths of the box decoder in one loader
    (d / "data.beton").symlink_to(fmnist("test", N, jpeg=0.5))  # the cache beside links to the session's betons
    (d / "other.beton").symlink_to(fmnist("test", N // 2))
    cache = build_teacher_cache(_cfg(d / "data.beton"), d / "data.tcache", **BUILD)
    return d, cache


@pytest.fixture(scope="module")
def images(built):
    """(decoded images, labels, raw?) of the beton's samples, without fastseed's decoders: raw
    samples are the source images themselves; JPEG ones are the stored JPEG decoded by OpenCV
    (libjpeg's upsampling differs from FFCV's turbojpeg decode by up to 6 levels, measured)."""
    from ffcv.reader import Reader
    src = fashion_mnist("test")
    idx = subset_indices(len(src), N)
    raw = np.repeat(src.images[idx][..., None], 3, axis=3)
    path = built[0] / "data.beton"
    reader = Reader(str(path))
    meta, table, data = reader.metadata["f0"], reader.alloc_table, np.fromfile(path, np.uint8)
    size = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
    is_raw = meta["mode"] == 1
    for i in np.flatnonzero(~is_raw):
        ptr = int(meta["data_ptr"][i])
        raw[i] = cv2.cvtColor(cv2.imdecode(data[ptr:ptr + size[ptr]], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert 0.3 < is_raw.mean() < 0.7
    return raw, src.labels[idx], is_raw


@pytest.fixture(scope="module")
def replay(built):
    d, cache = built
    loader = replay_loader(d / "data.beton", cache, batch_size=64, res=RES, seed=3)
    epochs = [[([v.clone() for v in views], labels.clone(), keys.clone()) for views, labels, keys in loader]
              for _ in range(2)]
    return loader, epochs


def _crop(image, box, size):
    """Independent RandomResizedCrop replay: slice the box, INTER_AREA to size, mirror if flagged."""
    y, x, h, w = (int(v) for v in box)
    flip, w = bool(w & FLIP_BIT), w & (FLIP_BIT - 1)
    out = cv2.resize(np.ascontiguousarray(image[y:y + h, x:x + w]), (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def _all_keys(cache) -> torch.Tensor:
    return torch.from_numpy(np.array(cache._keys)).view(cache.dtype)


# ---------------------------------------------------------------- boxes
def test_random_boxes_are_torchvisions_random_resized_crops():
    """Same distribution as torchvision's RandomResizedCrop.get_params (fixed seeds; 20 000 of
    ours, 1 500 of torchvision's (0.5 ms each): mean area share, aspect and centre within ~4
    standard errors, 0.02), the same centred box when nothing fits, inside the image, mirrored
    half the time."""
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    sizes = [(28, 28), (400, 300), (1, 100), (100, 1)]  # the last two: the fallback only
    ours = random_boxes([h for h, _ in sizes], [w for _, w in sizes], 20_000, (0.2, 1.0),
                        np.random.default_rng(0)).astype(np.int64)
    assert np.mean(ours[..., 3] >= FLIP_BIT) == pytest.approx(0.5, abs=0.01)
    ours[..., 3] &= FLIP_BIT - 1
    for (H, W), got in zip(sizes, ours):
        y, x, h, w = got.T
        assert ((y >= 0) & (x >= 0) & (h >= 1) & (w >= 1) & (y + h <= H) & (x + w <= W)).all()
        if min(H, W) == 1:
            fallback = RandomResizedCrop.get_params(torch.zeros(1, H, W), (0.2, 1.0), RATIO)
            np.testing.assert_array_equal(got, [fallback] * len(got))
            continue
        tv = np.array([RandomResizedCrop.get_params(torch.zeros(1, H, W), (0.2, 1.0), RATIO) for _ in range(1500)])
        for stat in (lambda b: b[:, 2] * b[:, 3] / (H * W), lambda b: b[:, 3] / b[:, 2],
                     lambda b: (b[:, 0] + b[:, 2] / 2) / H, lambda b: (b[:, 1] + b[:, 3] / 2) / W):
            assert stat(got).mean() == pytest.approx(stat(tv).mean(), abs=0.02)


def test_draw_boxes_are_fixed_by_seed_and_block():
    heights = np.random.default_rng(1).integers(20, 600, 9000)
    widths = np.random.default_rng(2).integers(20, 600, 9000)
    a = draw_boxes(heights, widths, 4, 0, (0.2, 1.0))
    # the documented recipe: images 4096-8191 are block 1, drawn from default_rng([seed, 1])
    np.testing.assert_array_equal(a[4096:8192], random_boxes(heights[4096:8192], widths[4096:8192], 4, (0.2, 1.0),
                                                             np.random.default_rng([0, 1])))
    np.testing.assert_array_equal(draw_boxes(heights, widths, 4, 0, (0.2, 1.0)), a)
    assert (draw_boxes(heights, widths, 4, 1, (0.2, 1.0)) != a).mean() > 0.5


def test_address_view_sees_rewrites_after_compile():
    import numba
    table = np.zeros((4, 1, 4), np.uint16)
    view = _address_view(table)
    total = numba.njit(lambda: view().astype(np.int64).sum())
    assert total() == 0
    table[2, 0] = [1, 2, 3, 4]  # in place, after compilation: a frozen copy would still read 0
    assert total() == 10
    with pytest.raises(ValueError, match="C-contiguous"):
        _address_view(table[:, :, ::2])


def test_todo_splits_the_chunks_left_among_ranks():
    done = np.array([1, 0, 0, 1, 0, 0, 0])  # chunks of 10 images, 65 images
    one = todo(done, 65, 10, 0, 1)
    np.testing.assert_array_equal(one, np.concatenate([np.arange(10, 30), np.arange(40, 65)]))
    parts = [todo(done, 65, 10, r, 2) for r in range(2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), one)
    assert not set(parts[0]) & set(parts[1])


# ---------------------------------------------------------------- the build
def test_stored_keys_are_the_teachers_embeddings_of_the_stored_crops(built, images):
    _, cache = built
    teacher = load_teacher("efficientnet_lite0").model  # fp32, contiguous: not the build's instance
    norms = _all_keys(cache).float().norm(dim=-1)
    flipped = cache.boxes[..., 3] >= FLIP_BIT
    usable = (norms.numpy() > 0.5) & images[2][:, None]  # raw samples: the exact pixels are known
    picks = [tuple(p) for f in (True, False) for p in np.argwhere(usable & (flipped == f))[:4]]

    def embed(crops):
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        with torch.no_grad():
            return F.normalize(teacher(x), dim=1)

    stored = torch.stack([_all_keys(cache)[i, r] for i, r in picks]).float()
    ref = embed([_crop(images[0][i], cache.boxes[i, r], TEACHER_RES) for i, r in picks])
    # bf16 rounds to nearest: within half an ulp, 2^-8 relative
    torch.testing.assert_close(stored, ref, rtol=2 ** -8, atol=1e-5)
    mirrored = embed([_crop(images[0][i], cache.boxes[i, r] ^ np.array([0, 0, 0, FLIP_BIT], np.uint16),
                            TEACHER_RES) for i, r in picks])
    for k in range(len(picks)):  # the test can fail: the other flip's key is another key
        assert not torch.allclose(stored[k], mirrored[k], rtol=2 ** -8, atol=1e-5)
    assert cache.dtype == torch.bfloat16 and cache.dim == 1280 and cache.header["teacher"]["head"] is False


def test_header_records_the_build(built):
    d, cache = built
    h = cache.header
    assert (h["crops"], h["seed"], h["teacher_res"], h["crop_scale"], h["precision"]) == (CROPS, 7, 32, [0.2, 1.0],
                                                                                        "fp32")
    assert h["beton"]["num_samples"] == N and h["beton"]["size"] == (d / "data.beton").stat().st_size
    assert h["teacher"]["arch"] == "efficientnet_lite0" and len(h["teacher"]["sha256"]) == 64
    assert (d / "data.tcache").stat().st_size == layout(N, CROPS, 1280, 16)["size"]
    assert not (d / "data.tcache.part").exists()
    cache.verify()


# ---------------------------------------------------------------- replay
def test_replay_cuts_the_stored_crop_and_yields_its_key(built, replay, images):
    _, cache = built
    _, epochs = replay
    where: dict[bytes, list] = {}  # a key's bits -> the (image, crop) pairs that stored it
    for (i, r), row in np.ndenumerate(_all_keys(cache).view(torch.int16).numpy().view(f"V{1280 * 2}")[..., 0]):
        where.setdefault(row.tobytes(), []).append((i, r))
    jpeg_diff = []
    for epoch, batches in enumerate(epochs):
        slots, seen = cache.slots(epoch), []
        for views, labels, keys in batches:
            assert views[0].shape == (64, RES, RES, 3) and keys.shape == (64, 1280) and keys.dtype == torch.bfloat16
            for b in range(len(labels)):
                found = where[keys[b].view(torch.int16).numpy().tobytes()]
                i, r = next((i, r) for i, r in found if r == slots[i])
                seen.append(i)
                want = _crop(images[0][i], cache.boxes[i, r], RES)
                if images[2][i]:
                    np.testing.assert_array_equal(views[0][b].numpy(), want)
                else:  # another stored crop of the image, for scale
                    other = _crop(images[0][i], cache.boxes[i, (r + 1) % CROPS], RES)
                    jpeg_diff.append([np.abs(views[0][b].numpy().astype(int) - w).max() for w in (want, other)])
                assert labels[b] == images[1][i]
        assert sorted(seen) == list(range(N))  # every image once an epoch
    # JPEG samples: within the two decoders' difference (6 measured) of the OpenCV reference,
    # while another crop of the same image is off by more (> 100 for 99% of them, measured)
    jpeg_diff = np.array(jpeg_diff)
    assert len(jpeg_diff) > 100 and jpeg_diff[:, 0].max() <= JPEG_TOL and np.mean(jpeg_diff[:, 1] > JPEG_TOL) > 0.95
    assert np.mean(cache.slots(0) != cache.slots(1)) == 1.0  # the next epoch replays the next crop
    np.testing.assert_array_equal(cache.slots(CROPS + 1), cache.slots(1))
    np.testing.assert_array_equal(cache.slots(0), slot_phase(N, CROPS, 7))


def test_replay_resumes_mid_epoch_exactly(replay):
    loader, epochs = replay
    loader.resume(1, batch=2)
    rest = [(views[0].clone(), keys.clone()) for views, _, keys in loader]
    assert len(rest) == len(epochs[1]) - 2
    for (view, keys), (want_views, _, want_keys) in zip(rest, epochs[1][2:]):
        assert torch.equal(view, want_views[0]) and torch.equal(keys, want_keys)


def test_replay_serves_one_pass_at_a_time(replay):
    loader, _ = replay
    first = iter(loader)
    next(first)
    with pytest.raises(RuntimeError, match="one pass at a time"):
        next(iter(loader))
    first.close()
    assert len(next(iter(loader))) == 3  # the table is free again once the pass is closed


# ---------------------------------------------------------------- refusals
def test_cache_that_does_not_fit_the_run_is_refused(built):
    d, cache = built
    with pytest.raises(CacheError, match="another beton.*num_samples: 256 in the file, 128"):
        cache.check(beton=d / "other.beton")
    with pytest.raises(CacheError, match="other.beton"):
        replay_loader(d / "other.beton", cache, batch_size=8, res=RES)
    lite1 = load_teacher("efficientnet_lite1")
    record = teacher_record({"arch": lite1.arch, "format": lite1.format, "sha256": lite1.sha256, "dim": lite1.dim},
                            lite1, (lite1.mean, lite1.std))
    with pytest.raises(CacheError, match="another teacher.*sha256"):
        cache.check(teacher=record)
    with pytest.raises(CacheError, match="small-crops"):
        cache.check(small_crops=6)
    with pytest.raises(CacheError, match="crop_scale.*--crop-scale 0.2,1.0"):
        cache.check(crop_scale=(0.14, 1.0))
    with pytest.raises(CacheError, match="teacher_res 32.*64"):
        cache.check(teacher_res=64)
    cache.check(beton=d / "data.beton", crop_scale=(0.2, 1.0), teacher_res=32)


def test_cli_refuses_other_beton_or_teacher_and_keeps_the_file(built, capsys):
    d, _ = built
    before = (d / "data.tcache").read_bytes()
    refusal(cache_main(_cli_args(d / "other.beton", d / "data.tcache")), capsys.readouterr().err,
            "data.tcache", "beton.")
    refusal(cache_main(_cli_args(d / "data.beton", d / "data.tcache", arch="efficientnet_lite1")),
            capsys.readouterr().err, "data.tcache", "teacher.arch", "efficientnet_lite1")
    assert (d / "data.tcache").read_bytes() == before
    assert cache_main(_cli_args(d / "data.beton", d / "data.tcache")) == 0  # the same build: up to date
    assert "up to date" in capsys.readouterr().err


def test_damaged_or_truncated_cache_is_refused(built, tmp_path, capsys):
    d, cache = built
    src = d / "data.tcache"
    off = cache.header["layout"]

    def damaged(name, offset=None, data=None, size=None):
        path = tmp_path / name
        shutil.copy(src, path)
        with open(path, "r+b") as f:
            if data is not None:
                f.seek(offset)
                f.write(data)
            if size is not None:
                f.truncate(size)
        return path

    with pytest.raises(CacheError, match="truncated"):
        TeacherCache.open(damaged("short.tcache", size=off["size"] - 100))
    with pytest.raises(CacheError, match="not a fastseed teacher cache"):
        TeacherCache.open(damaged("magic.tcache", 0, b"NOTCACHE"))
    with pytest.raises(CacheError, match="unreadable header"):
        TeacherCache.open(damaged("header.tcache", 40, b"\xff\xfe{{"))
    with pytest.raises(CacheError, match=r"incomplete \(15 of 16"):
        TeacherCache.open(damaged("record.tcache", off["chunks"] + 3 * 8, np.array([0, 0], "<u4").tobytes()))
    key_byte = off["keys"] + 5 * 16 * CROPS * 1280 * 2 + 777  # in chunk 5: images 80-95
    flipped = damaged("keys.tcache", key_byte, bytes([src.read_bytes()[key_byte] ^ 0x40]))
    with pytest.raises(CacheError, match="images 80-95 do not match their checksum"):
        TeacherCache.open(flipped).verify()
    box = damaged("box.tcache", off["boxes"] + 8 * (CROPS * 9 + 1), np.array([20, 20, 20, 20], "<u2").tobytes())
    with pytest.raises(CacheError, match="image 9, crop 1 lies outside the image"):
        TeacherCache.open(box).check_beton(d / "data.beton")
    # an existing output is verified
    refusal(cache_main(_cli_args(d / "data.beton", flipped)), capsys.readouterr().err, "keys.tcache", "checksum")


# ---------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_build_killed_mid_way_resumes_to_the_same_file(built, tmp_path):
    d, _ = built
    out = tmp_path / "killed.tcache"
    part = tmp_path / "killed.tcache.part"
    main = "import sys; from fastseed.cli import cache_main; sys.exit(cache_main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", main, *_cli_args(d / "data.beton", out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done, deadline = 0, time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if part.exists():
            with open(part, "rb") as f:
                done = int(_records(f.fileno(), _read_header(part))[:, 0].sum())
            if done:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 0 < done < N // 16 and not out.exists(), f"kill came at {done} chunks"
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "chunks already written" in resumed.stderr
    assert not part.exists()
    whole, again = (d / "data.tcache").read_bytes(), out.read_bytes()
    body = TeacherCache.open(out).header["layout"]["chunks"]
    assert again[body:] == whole[body:]  # records, boxes and keys bit-identical to the one-go build
