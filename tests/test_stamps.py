"""benchmarks/stamps.py on a small fake stamps root laid out as Debian's tuxpaint-stamps-default
(CI has no package): classes and variants found, the split by source image, `paste`'s mask,
seeded composites, and the betons read back. One test reads the real package where installed."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import stamps as script  # noqa: E402  (benchmarks/stamps.py: the command line)
from _bench import stamps  # noqa: E402  (the set itself)
from _bench.stamps import CLASSES, Cutout  # noqa: E402

# In the first class's folder: a base, its mirror and a numbered variant (one source), and a
# numbered name without a base (its own source).
VARIANTS = ("thing.png", "thing_mirror.png", "Thing-2.png", "gadget7.png")


def shape_png(path: Path, rng: np.random.Generator, flip_of: Path | None = None) -> None:
    """An RGBA cut-out: a random-coloured ellipse, box or triangle with a soft edge (alpha between
    0 and 255) and a transparent surround of random width."""
    if flip_of is not None:
        Image.open(flip_of).transpose(Image.FLIP_LEFT_RIGHT).save(path)
        return
    w, h = rng.integers(30, 110, 2)
    pad = rng.integers(2, 20, 4)
    alpha = Image.new("L", (int(w + pad[0] + pad[1]), int(h + pad[2] + pad[3])), 0)
    draw, box = ImageDraw.Draw(alpha), (int(pad[0]), int(pad[2]), int(pad[0] + w), int(pad[2] + h))
    kind = rng.integers(3)
    if kind == 0:
        draw.ellipse(box, fill=255)
    elif kind == 1:
        draw.rectangle(box, fill=255)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=255)
    alpha = alpha.filter(ImageFilter.GaussianBlur(1.5))
    rgb = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (alpha.size[1], alpha.size[0], 3)), 0, 255)
    Image.fromarray(np.dstack([rgb.astype(np.uint8), np.asarray(alpha)]), "RGBA").save(path)


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """Every class's first folder with 3 shapes, one more in its second folder if it has one;
    VARIANTS in the first class's; files that are not stamps: sound, text, a cartoon sub-folder."""
    root = tmp_path_factory.mktemp("stamps")
    rng = np.random.default_rng(0)
    for k, folders in enumerate(CLASSES.values()):
        first = root / folders[0]
        first.mkdir(parents=True, exist_ok=True)
        for j in range(3):
            shape_png(first / f"c{k}_s{j}.png", rng)
            (first / f"c{k}_s{j}.txt").write_text("a description")
            (first / f"c{k}_s{j}.ogg").write_bytes(b"OggS")
        if len(folders) > 1:
            (root / folders[1]).mkdir(parents=True, exist_ok=True)
            shape_png(root / folders[1] / f"c{k}_extra.png", rng)
        (first / "cartoon").mkdir(exist_ok=True)
        shape_png(first / "cartoon" / f"c{k}_drawing.png", rng)  # a sub-folder no class lists
    first = root / next(iter(CLASSES.values()))[0]
    shape_png(first / VARIANTS[0], rng)
    shape_png(first / VARIANTS[1], rng, flip_of=first / VARIANTS[0])
    for name in VARIANTS[2:]:
        shape_png(first / name, rng)
    return root


def listed_pngs(root: Path) -> list[str]:
    """PNGs directly inside the class folders, found without the module."""
    return sorted(p.relative_to(root).as_posix() for folders in CLASSES.values() for f in folders
                  for p in (root / f).glob("*.png"))


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two cut-outs are one image or one the mirror of the other."""
    return a.shape == b.shape and (np.array_equal(a, b) or np.array_equal(a, b[:, ::-1]))


def test_cutouts_find_every_class_and_map_variants(fake_root):
    items = stamps.cutouts(fake_root, max_side=64)
    assert len(items) == len(listed_pngs(fake_root)) == 3 * len(CLASSES) + sum(len(f) > 1 for f in CLASSES.values()) + 4
    assert sorted({c.label for c in items}) == list(range(len(CLASSES)))
    folder = next(iter(CLASSES.values()))[0]
    by_source = {}
    for c in items:
        by_source.setdefault(c.source, []).append(c)
    assert len(by_source[f"{folder}/thing.png"]) == 3  # base, mirror, numbered variant
    assert len(by_source[f"{folder}/gadget7.png"]) == 1  # no "gadget" beside it
    for c in items:
        a = c.rgba[..., 3] >= stamps.TRIM_ALPHA
        assert c.rgba.dtype == np.uint8 and c.rgba.shape[2] == 4 and max(c.rgba.shape[:2]) <= 64
        assert a[0].any() and a[-1].any() and a[:, 0].any() and a[:, -1].any()  # trimmed to the alpha box
        assert (fake_root / c.source).is_file() and CLASSES[list(CLASSES)[c.label]].count(
            str(Path(c.source).parent)) == 1
    again = stamps.cutouts(fake_root, max_side=64)
    assert [(c.label, c.source) for c in again] == [(c.label, c.source) for c in items]
    assert all(np.array_equal(a.rgba, b.rgba) for a, b in zip(again, items))


def test_source_stem_rule():
    stems = {"lion", "lion-2", "pig_golden", "pig_golden2", "strawberry", "strawberry2", "flower1", "flower10",
             "dumper", "dumper_mirror", "cep-1_mirror"}
    assert stamps.source_stem("lion-2", stems) == "lion"
    assert stamps.source_stem("pig_golden2", stems) == "pig_golden"
    assert stamps.source_stem("Strawberry2", stems).lower() == "strawberry"
    assert stamps.source_stem("dumper_mirror", stems) == "dumper"
    assert stamps.source_stem("flower10", stems) == "flower10"  # no "flower": distinct flowers
    assert stamps.source_stem("cep-1_mirror", stems) == "cep-1_mirror"  # neither cep-1 nor cep is there
    assert stamps.source_stem("cep-1_mirror", stems | {"cep"}) == "cep"


def test_split_by_source_every_class_both_sides(fake_root):
    items = stamps.cutouts(fake_root, max_side=64)
    train, test = stamps.split(items, test_share=0.25, seed=0)
    assert len(train) + len(test) == len(items)
    assert not {c.source for c in train} & {c.source for c in test}
    assert {c.label for c in train} == {c.label for c in test} == set(range(len(CLASSES)))
    # independent of `source`: no pixel-identical or mirrored image on both sides
    assert not any(same_pixels(a.rgba, b.rgba) for a in train for b in test)
    again = stamps.split(items, test_share=0.25, seed=0)
    assert [c.source for c in again[1]] == [c.source for c in test]
    draws = {tuple(c.source for c in stamps.split(items, seed=s)[1]) for s in range(6)}
    assert len(draws) > 1  # the seed picks the test sources
    with pytest.raises(ValueError, match="source"):
        stamps.split([c for c in items if c.label != 0] + [c for c in items if c.label == 0][:1])


def test_paste_mask_is_resized_alpha(fake_root):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:70]
    alpha = np.clip(255 * (1.6 - np.hypot((yy - 20) / 18, (xx - 35) / 33)), 0, 255).astype(np.uint8)  # soft disc
    rgba = np.dstack([rng.integers(0, 256, (40, 70, 3)).astype(np.uint8), alpha])
    item = Cutout(rgba, 0, "x.png")
    for box in [(5, 7, 30, 50), (10, 3, 44, 20), (-6, 30, 40, 40)]:  # wide, tall, partly off the canvas
        canvas = rng.integers(0, 256, (48, 64, 3)).astype(np.uint8)
        before = canvas.copy()
        out, mask = stamps.paste(canvas, item, box)
        assert out is canvas and mask.shape == (48, 64) and mask.dtype == bool
        y, x, h, w = box
        s = min(h / 40, w / 70)
        nh, nw = round(40 * s), round(70 * s)
        assert nh == h or nw == w  # fills the box along one side
        resized = np.asarray(Image.fromarray(rgba, "RGBA").resize((nw, nh), Image.LANCZOS))
        full = np.zeros((48 + 2 * 64, 64 + 2 * 128, 4), np.uint8)  # a large margin: no clipping to think about
        oy, ox = 64 + y + (h - nh) // 2, 128 + x + (w - nw) // 2
        full[oy:oy + nh, ox:ox + nw] = resized
        want = full[64:64 + 48, 128:128 + 64]
        np.testing.assert_array_equal(mask, want[..., 3] >= 128)
        assert mask.any() and not mask.all()
        clear, solid = want[..., 3] == 0, want[..., 3] == 255
        np.testing.assert_array_equal(canvas[clear], before[clear])
        np.testing.assert_array_equal(canvas[solid], want[..., :3][solid])
        a = want[..., 3:].astype(float) / 255
        blend = np.rint(want[..., :3] * a + before * (1 - a))
        assert np.abs(canvas.astype(float) - blend).max() <= 1


def test_background_varied_and_seeded():
    bgs = [stamps.background(np.random.default_rng(s), 48) for s in range(12)]
    assert all(b.shape == (48, 48, 3) and b.dtype == np.uint8 for b in bgs)
    np.testing.assert_array_equal(bgs[0], stamps.background(np.random.default_rng(0), 48))
    means = np.array([b.reshape(-1, 3).mean(0) for b in bgs])
    assert means.std(0).min() > 10  # colours vary across draws
    assert np.mean([b.reshape(-1, 3).std(0).mean() > 3 for b in bgs]) > 0.5  # mostly not flat


def test_composite_seeded_and_object_sized():
    item = Cutout(np.full((30, 30, 4), (250, 0, 250, 255), np.uint8), 0, "square.png")  # opaque square
    side = 80
    a = stamps.composite(item, np.random.default_rng(7), side)
    assert a.shape == (side, side, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, stamps.composite(item, np.random.default_rng(7), side))
    assert not np.array_equal(a, stamps.composite(item, np.random.default_rng(8), side))
    shares = []
    for s in range(10):
        got = stamps.composite(item, np.random.default_rng(s), side)
        square = (got == (250, 0, 250)).all(-1)
        ys, xs = np.nonzero(square)
        box = (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
        assert box[0] == box[1] and square.sum() == box[0] * box[1]  # one whole square
        shares.append(box[0] / side)
    assert 0.54 <= min(shares) and max(shares) <= 0.96 and max(shares) - min(shares) > 0.1


def read_beton(path):
    """(images [N, H, W, 3], labels) of a raw-stored beton, without an FFCV loader."""
    from ffcv.reader import Reader
    r = Reader(str(path))
    mm = np.memmap(str(path), np.uint8, mode="r")
    image_field, label_field = (f"f{r.field_names.index(n)}" for n in ("image", "label"))
    images = [np.array(mm[m["data_ptr"]:m["data_ptr"] + int(m["height"]) * int(m["width"]) * 3]).reshape(
        m["height"], m["width"], 3) for m in r.metadata[image_field]]
    assert all(m["mode"] == 1 for m in r.metadata[image_field])  # raw, not JPEG
    return np.stack(images), np.asarray(r.metadata[label_field])


def test_stamps_betons_round_trip(fake_root, tmp_path, capsys):
    from fastseed.data import image_sizes

    work = tmp_path / "w"
    train, test = stamps.stamps_betons(work, side=40, train_per_image=2, test_per_image=1, seed=1, root=fake_root)
    tr, te = stamps.split(stamps.cutouts(fake_root, max_side=128), seed=1)
    for path, items, per in ((train, tr, 2), (test, te, 1)):
        images, labels = read_beton(path)
        assert images.shape == (per * len(items), 40, 40, 3)
        np.testing.assert_array_equal(labels, np.repeat([c.label for c in items], per))
        heights, widths = image_sizes(path)
        assert set(heights) == set(widths) == {40}
        assert len({im.tobytes() for im in images}) == len(images)  # every composite drawn afresh
    first = stamps.composite(tr[0], np.random.default_rng([1, 0]), 40)
    np.testing.assert_array_equal(read_beton(train)[0][0], first)

    meta = json.loads((work / "stamps.json").read_text())
    assert sum(v["images"] for v in meta["test"].values()) == len(te)
    stamp = train.stat().st_mtime_ns, test.stat().st_mtime_ns
    assert stamps.stamps_betons(work, side=40, train_per_image=2, test_per_image=1, seed=1, root=fake_root) == (
        train, test)
    assert (train.stat().st_mtime_ns, test.stat().st_mtime_ns) == stamp  # same parameters: kept

    # the command line, on the same parameters (kept again): a row per class and the paths
    script.main(["--work", str(work), "--side", "40", "--train-per-image", "2", "--test-per-image", "1",
                 "--seed", "1", "--root", str(fake_root), "--preview", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in CLASSES) and str(train) in out
    assert train.stat().st_mtime_ns == stamp[0]
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[1] == len(CLASSES) * 42

    stamps.stamps_betons(work, side=32, train_per_image=2, test_per_image=1, seed=1, root=fake_root)
    assert read_beton(train)[0].shape[1:] == (32, 32, 3)  # another side: written again


def test_missing_package_names_the_apt_command(tmp_path):
    with pytest.raises(SystemExit, match="apt-get install tuxpaint-stamps-default"):
        stamps.cutouts(tmp_path / "absent")
    with pytest.raises(SystemExit, match="apt-get install tuxpaint-stamps-default"):
        stamps.stamps_betons(tmp_path / "w", root=tmp_path / "absent")


def thumb(rgba: np.ndarray) -> np.ndarray:
    """16 x 16 on grey, float: for near-duplicate checks."""
    small = np.asarray(Image.fromarray(rgba, "RGBA").resize((16, 16), Image.BILINEAR)).astype(np.float32)
    a = small[..., 3:] / 255
    return small[..., :3] * a + 128 * (1 - a)


@pytest.mark.skipif(not stamps.STAMPS_ROOT.is_dir(), reason="needs Debian's tuxpaint-stamps-default")
def test_real_package_classes_and_no_leak():
    items = stamps.cutouts()
    sources = {name: {c.source for c in items if c.label == k} for k, name in enumerate(CLASSES)}
    assert len(sources) >= 8 and all(len(s) >= 10 for s in sources.values()), {k: len(v) for k, v in sources.items()}
    train, test = stamps.split(items)
    assert not {c.source for c in train} & {c.source for c in test}
    assert {c.label for c in train} == {c.label for c in test} == set(range(len(CLASSES)))
    # no near-identical image (flips included) on both sides, whatever the file names say
    a = np.stack([thumb(c.rgba) for c in train]).reshape(len(train), -1)
    b = np.stack([np.stack([thumb(c.rgba), thumb(c.rgba[:, ::-1])]) for c in test]).reshape(len(test), 2, -1)
    dist = np.sqrt(((a[:, None, None] - b[None]) ** 2).mean(-1)).min()
    assert dist > 8, dist
