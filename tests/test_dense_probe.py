"""benchmarks/dense_probe.py: mosaic masks follow the pasted items, train and test mosaics share
no item, the metrics match a hand count, the probe separates features that carry the mask from
constant ones, and the CLI writes its rows at size tiny on real Fashion-MNIST."""
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import dense_probe  # noqa: E402  (benchmarks/ is not a package)
from _bench import probe as dp  # noqa: E402  (the mosaics and the probe)

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.exists(), reason="needs Debian's dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the probe's small steps run several times faster than on two threads
    of a shared 2-core machine; the session's count is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def coded_items(ids, classes: int = 3, seed: int = 0):
    """Items whose colour names them: R = id + 1, G = 255 - label, B = 128, on an elliptic alpha
    (so the mask must follow the alpha, not the box); sizes and aspects vary."""
    rng = np.random.default_rng(seed)
    items = []
    for i in ids:
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        yy, xx = np.mgrid[:h, :w]
        inside = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[..., 0], rgba[..., 1], rgba[..., 2] = i + 1, 255 - i % classes, 128
        rgba[..., 3] = np.where(inside, 255, 0)
        items.append(SimpleNamespace(rgba=rgba, label=i % classes, source=f"item{i}"))
    return items


def black(rng, side):
    return np.zeros((side, side, 3), np.uint8)


def decode(images, classes: int):
    """(mask from the colours, the item ids seen) of mosaics of coded items on black."""
    g = images[..., 1].astype(np.int64)
    mask = np.where(g > 0, 255 - g, classes)
    return mask, set(np.unique(images[..., 0])[1:].astype(int) - 1)


@pytest.mark.parametrize("grid,side", [(2, 64), (3, 96), (3, 80)])
def test_masks_follow_pasted_items(grid, side):
    items = coded_items(range(50))
    images, masks, placements = dp.render(items, 6, grid=grid, side=side, classes=3, rng=np.random.default_rng(1),
                                          background=black, paste=dp.paste_rgba)
    assert images.shape == (6, side, side, 3) and masks.shape == (6, side, side) and masks.dtype == np.int64
    mask, _ = decode(images, 3)
    assert (masks == mask).all()
    edges = dp.cell_edges(grid, side)
    for m, placed in enumerate(placements):
        assert len(placed) == grid * grid
        for c, (index, (y, x, h, w)) in enumerate(placed):
            # each item inside its own cell, with its aspect kept and its long side 0.6-1 of the cell
            r, q = divmod(c, grid)
            assert edges[r] <= y and y + h <= edges[r + 1] and edges[q] <= x and x + w <= edges[q + 1]
            ih, iw = items[index].rgba.shape[:2]
            cell = min(edges[r + 1] - edges[r], edges[q + 1] - edges[q])
            assert 0.6 * cell - 1 <= max(h, w) <= cell and abs(h / w - ih / iw) < 0.25 * ih / iw + 0.1
            inside = masks[m, y:y + h, x:x + w]
            assert set(np.unique(inside)) <= {items[index].label, 3} and (inside == items[index].label).any()
        covered = np.zeros((side, side), bool)
        for _, (y, x, h, w) in placed:
            covered[y:y + h, x:x + w] = True
        assert (masks[m][~covered] == 3).all()


@needs_fashion
def test_fashion_items_and_threshold():
    from fastseed.data_prep.sources import fashion_mnist
    items = dp.FashionItems("test")
    source = fashion_mnist("test")
    images, masks, placements = dp.render(items, 4, grid=2, side=64, classes=10, rng=np.random.default_rng(0),
                                          background=dp.dark_texture, paste=dp.paste_rgba)
    for m, placed in enumerate(placements):
        for index, (y, x, h, w) in placed:
            grey = source.images[index]
            inside = masks[m, y:y + h, x:x + w]
            assert set(np.unique(inside)) <= {int(source.labels[index]), 10}
            # the scaled item covers about the share of its 28 px pixels at or above the threshold
            share = (grey >= dp.FASHION_THRESHOLD).mean()
            assert abs((inside != 10).mean() - share) < 0.12
            # pasted pixels are the item's grey (all three channels equal), in the item's range
            fg = images[m, y:y + h, x:x + w][inside != 10]
            assert (fg[:, 0] == fg[:, 1]).all() and (fg[:, 1] == fg[:, 2]).all()
    texture = dp.dark_texture(np.random.default_rng(0), 96)
    assert texture.max() <= 64 and texture.std() > 5


def fake_stamps(n_items: int = 40) -> ModuleType:
    """_bench.stamps's interface, on coded items: split by id parity."""
    mod = ModuleType("stamps")

    @dataclass
    class Cutout:
        rgba: np.ndarray
        label: int
        source: str

    def cutouts(root=None, max_side=128):
        return [Cutout(i.rgba, i.label, i.source) for i in coded_items(range(n_items))]

    def split(items, test_share=0.25, seed=0):
        return ([c for c in items if int(c.source[4:]) % 4], [c for c in items if int(c.source[4:]) % 4 == 0])

    def paste(canvas, item, box):
        return dp.paste_rgba(canvas.copy(), item, box)

    mod.CLASSES = {"a": ("x",), "b": ("y",), "c": ("z",)}
    mod.Cutout, mod.cutouts, mod.split, mod.background, mod.paste = Cutout, cutouts, split, black, paste
    return mod


def test_train_and_test_mosaics_use_disjoint_items(tmp_path, monkeypatch):
    fake = fake_stamps()
    monkeypatch.setattr(dp, "_stamps", lambda: fake)
    assert dp.num_classes("stamps") == 3
    (trx, trm), (tex, tem) = dp.mosaic_sets("stamps", tmp_path, grid=2, side=64, n_train=12, n_test=8)
    assert trx.dtype == np.uint8 and trm.dtype == np.int64 and trx.shape == (12, 64, 64, 3) and tem.shape == (8, 64, 64)
    (train_mask, train_ids), (test_mask, test_ids) = decode(trx, 3), decode(tex, 3)
    assert (train_mask == trm).all() and (test_mask == tem).all()
    assert train_ids and test_ids and not train_ids & test_ids
    assert all(i % 4 for i in train_ids) and all(i % 4 == 0 for i in test_ids)
    # 8 mosaics × 4 cells from 10 test items: every item is used before any repeats
    assert len(test_ids) == 10
    # cached: a second call reads the same arrays back
    (trx2, trm2), _ = dp.mosaic_sets("stamps", tmp_path, grid=2, side=64, n_train=12, n_test=8)
    assert (trx2 == trx).all() and (trm2 == trm).all() and len(list(tmp_path.glob("*.npz"))) == 1


def test_fashion_mosaics_route_splits(tmp_path, monkeypatch):
    train, test = coded_items(range(30), classes=10), coded_items(range(30, 50), classes=10, seed=1)
    monkeypatch.setattr(dp, "item_splits", lambda dataset: (train, test, black, dp.paste_rgba))
    (trx, _), (tex, _) = dp.mosaic_sets("fashion-mnist", tmp_path, grid=3, side=96, n_train=3, n_test=3)
    assert decode(trx, 10)[1] <= set(range(30)) and decode(tex, 10)[1] <= set(range(30, 50))


def test_metrics_by_hand():
    truth = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    cm = dp.confusion(pred, truth, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    s = dp.scores(cm.numpy())
    # IoU: class 0 1/(1+1+1), class 1 2/(2+1+0), class 2 1/(1+0+1); class 3 absent from both
    assert s["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50.0]) and s["iou"][3] is None
    assert s["miou"] == pytest.approx(50.0) and s["pixel_acc"] == pytest.approx(400 / 6)


def rect_set(n: int, side: int = 32, seed: int = 0):
    """Images whose grey value is 10 + 60·class, masks of one or two class rectangles on background 3."""
    rng = np.random.default_rng(seed)
    masks = np.full((n, side, side), 3, np.int64)
    for m in masks:
        for _ in range(2):
            y, x, h, w = rng.integers(0, side - 12, 2).tolist() + rng.integers(6, 12, 2).tolist()
            m[y:y + h, x:x + w] = rng.integers(0, 3)
    images = np.repeat((10 + 60 * masks).astype(np.uint8)[..., None], 3, axis=3)
    return images, masks


def test_probe_reads_masks_from_features_and_nothing_from_constants():
    train, test = rect_set(40), rect_set(20, seed=1)

    def one_hot(x):  # the class back from the normalised grey, one-hot, averaged over 4×4 blocks
        grey = (x[:, 0] * 0.5 + 0.5) * 255
        cls = ((grey - 10) / 60).round().long().clamp(0, 3)
        return torch.nn.functional.avg_pool2d(torch.nn.functional.one_hot(cls, 4).permute(0, 3, 1, 2).float(), 4)

    good = dp.probe(one_hot, train, test, classes=3, steps=150)
    assert good["map"] == [4, 8, 8] and good["miou"] > 85 and good["pixel_acc"] > 95

    flat = dp.probe(lambda x: torch.ones(x.shape[0], 5, 4, 4), train, test, classes=3, steps=150)
    bg = (test[1] == 3).mean()
    assert flat["pixel_acc"] == pytest.approx(100 * bg)  # background everywhere
    present = sum(v is not None for v in flat["iou"])
    assert flat["iou"][3] == pytest.approx(100 * bg) and flat["miou"] == pytest.approx(100 * bg / present)
    assert all(v in (None, 0.0) for v in flat["iou"][:3])


def test_probe_is_seeded():
    train, test = rect_set(16), rect_set(8, seed=1)
    def fn(x):
        return torch.nn.functional.avg_pool2d(x, 8)
    a, b = (dp.probe(fn, train, test, classes=3, steps=30, seed=3) for _ in range(2))
    assert a["miou"] == b["miou"] and a["final_loss"] == b["final_loss"]


@needs_fashion
def test_cli_tiny_fashion(tmp_path):
    out = tmp_path / "probe.jsonl"
    args = ["--size", "tiny", "--dataset", "fashion-mnist", "--rows", "raw", "init", "--workdir",
            str(tmp_path / "work"), "--out", str(out)]
    dense_probe.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["grid"], r["side"], r["row"]) for r in rows] == [(2, 64, "raw"), (2, 64, "init"), (3, 96, "raw"),
                                                                 (3, 96, "init")]
    assert [r["map"] for r in rows] == [[3, 64, 64], [512, 2, 2], [3, 96, 96], [512, 3, 3]]
    assert all(0 <= r["miou"] <= 100 and 0 < r["pixel_acc"] <= 100 and r["commit"] and r["steps"] == 20
               and r["n_train"] == 48 and r["classes"] == 10 for r in rows)
    assert "| fashion-mnist | 3×3 / 96 | init | resnet18 | 512×3×3 | 48 / 24 |" in out.with_suffix(".md").read_text()
    dense_probe.main(args)  # finished rows are skipped
    assert len(out.read_text().splitlines()) == 4
