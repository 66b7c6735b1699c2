"""FFCV loaders: shapes, dtypes, multi-view, resume, exact eval pixels, early path errors.
Two loaders for the whole module (each FFCV Loader JIT-compiles for several seconds)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastseed.data import check_beton, eval_loader, ssl_loader
from fastseed.data_prep import subset_indices
from fastseed.data_prep.sources import fashion_mnist

N = 256


@pytest.fixture(scope="module")
def betons(fmnist):
    # Half JPEG, half raw: the multi-view decoder's two paths in one loader.
    return SimpleNamespace(mixed=fmnist("test", N, jpeg=0.5), raw=fmnist("test", N))


@pytest.fixture(scope="module")
def ssl(betons):
    loader = ssl_loader(betons.mixed, batch_size=64, res=24, num_global=2, num_small=3, small_res=12,
                        seed=3, num_workers=2)
    # (views, labels) of epoch 0, cloned: FFCV reuses its buffers a few batches later.
    epoch0 = [([v.clone() for v in views], labels.clone()) for views, labels in loader]
    return loader, epoch0


@pytest.fixture(scope="module")
def evaluation(betons):
    return eval_loader(betons.raw, batch_size=100, res=28, crop_ratio=1.0)


def test_ssl_views(ssl):
    loader, epoch0 = ssl
    assert len(loader) == len(epoch0) == N // 64
    views, labels = epoch0[0]
    assert [tuple(v.shape) for v in views] == [(64, 24, 24, 3)] * 2 + [(64, 12, 12, 3)] * 3
    assert all(v.dtype == torch.uint8 and v.device.type == "cpu" for v in views)
    assert labels.dtype == torch.int64 and labels.shape == (64,)
    assert not torch.equal(views[0], views[1])  # two independent crops of each image
    assert all(v.float().std() > 10 for v in views)  # real pixels, not an empty buffer


def test_ssl_epoch_covers_dataset_in_random_order(ssl):
    _, epoch0 = ssl
    labels = torch.cat([y for _, y in epoch0]).numpy()
    src = fashion_mnist("test")
    want = src.labels[subset_indices(len(src), N)]
    assert sorted(labels.tolist()) == sorted(want.tolist())
    assert not np.array_equal(labels, want)  # shuffled


def test_resume_mid_epoch(ssl):
    """The rest of an epoch, resumed: the same images in the same order, cropped the same way."""
    loader, epoch0 = ssl
    loader.resume(0, batch=2)
    rest = [([v.clone() for v in views], labels.clone()) for views, labels in loader]
    assert len(rest) == len(epoch0) - 2
    for (views, got), (want_views, want) in zip(rest, epoch0[2:]):
        torch.testing.assert_close(got, want)
        assert all(torch.equal(a, b) for a, b in zip(views, want_views))
    assert loader.epoch == 1
    first = next(iter(loader))[1].clone()  # epoch 1: full length again, another permutation
    assert not torch.equal(first, epoch0[0][1])
    loader.epoch = 0
    assert torch.equal(next(iter(loader))[1], epoch0[0][1])


def test_crops_depend_on_seed_epoch_and_sample_only(ssl, betons):
    """Another loader of the same beton and seed, decoding on one thread instead of two, cuts
    exactly the same crops: they are drawn from (seed, epoch, sample, view), not from a
    thread's random state, which is what lets a restarted run continue exactly."""
    _, epoch0 = ssl
    other = ssl_loader(betons.mixed, batch_size=64, res=24, num_global=2, num_small=3, small_res=12, seed=3,
                       num_workers=1)
    for (views, labels), (want_views, want) in zip(other, epoch0):
        assert torch.equal(labels, want) and all(torch.equal(a, b) for a, b in zip(views, want_views))
    again = next(iter(other))[0][0]  # epoch 1: other crops
    assert not torch.equal(again, epoch0[0][0][0])


def test_a_pass_left_early_stops_ffcv_thread(ssl):
    """Breaking out (as --max-steps does) must not leave FFCV's thread decoding or blocked."""
    import threading
    from ffcv.loader.epoch_iterator import EpochIterator
    loader, _ = ssl
    before = {t for t in threading.enumerate() if isinstance(t, EpochIterator)}
    for stop_after in (1, len(loader) - 1):  # mid-epoch, and with the epoch's end already queued
        it = iter(loader)
        for _ in range(stop_after):
            next(it)
        it.close()
        assert {t for t in threading.enumerate() if isinstance(t, EpochIterator)} == before


def test_eval_loader_exact_and_deterministic(evaluation):
    batches = [(x.clone(), y.clone()) for x, y in evaluation]
    assert [len(y) for _, y in batches] == [100, 100, 56]  # no drop_last
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    src = fashion_mnist("test")
    idx = subset_indices(len(src), N)
    np.testing.assert_array_equal(x.numpy(), np.repeat(src.images[idx][..., None], 3, axis=3))
    np.testing.assert_array_equal(y.numpy(), src.labels[idx])
    again = torch.cat([x2.clone() for x2, _ in evaluation])
    assert torch.equal(x, again)


def test_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.beton"):
        ssl_loader(tmp_path / "missing.beton", batch_size=8, res=16)
    (tmp_path / "text.beton").write_text("hello, this is not a beton file at all" * 10)
    with pytest.raises(ValueError, match="text.beton"):
        eval_loader(tmp_path / "text.beton", batch_size=8, res=16)
    (tmp_path / "empty.beton").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.beton"):
        check_beton(tmp_path / "empty.beton")
    with pytest.raises(ValueError, match="num_global"):
        ssl_loader(tmp_path / "missing.beton", batch_size=8, res=16, num_global=0)


def test_ffcv_leaves_torch_threads_alone(betons):
    """FFCV's Compiler.set_num_threads also set torch's intra-op threads: to 1 at its import and to
    the loader's workers at each Loader and epoch, so `--workers 1` computed the student on one core.
    In a fresh process (this one imported FFCV long ago): torch keeps the count it was given through
    a Loader's epoch, while numba still gets the workers."""
    import subprocess
    import sys
    code = (
        "import torch, numba\n"
        "torch.set_num_threads(3)\n"
        "from fastseed.data import ssl_loader\n"
        f"loader = ssl_loader({str(betons.raw)!r}, batch_size=64, res=16, num_workers=1)\n"
        "after_loader = torch.get_num_threads()\n"
        "views, _ = next(iter(loader))\n"
        "print(after_loader, torch.get_num_threads(), numba.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["3", "3", "1"]
