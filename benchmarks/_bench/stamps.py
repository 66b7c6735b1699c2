"""A colour development set that every machine can install: the cut-outs (photographs; the
buildings are drawings) of Debian's `tuxpaint-stamps-default` (`apt-get install
tuxpaint-stamps-default`; RGBA PNGs under /usr/share/tuxpaint/stamps/<category>/<sub>/),
pasted onto random backgrounds.

Classes (`CLASSES`): each class is the PNGs directly inside its folders (not their sub-folders,
so the `cartoon/` drawings stay out); the .txt/.dat/.ogg/.svg files beside them are ignored.
Symbols, alphabets, signs, seasonal and cartoon folders are left out; so are the trees and
herbs (a mixed folder that overlaps the vegetables) and the line-drawn clothes.

| class | folders | sources (train + test) | images at the defaults (train, test) |
|---|---|---:|---:|
| birds | animals/birds | 35 (26 + 9) | 156, 54 |
| mammals | animals/mammals and its apes, bears, bovines, camel, cats, deer, dogs, equines, rodents; animals/marsupials | 59 (44 + 15) | 282, 90 |
| sea_animals | animals/fish, animals/mammals/aquatic, animals/shellfish | 18 (14 + 4) | 84, 24 |
| small_creatures | animals/insects, animals/amphibians, animals/lizards | 11 (8 + 3) | 54, 18 |
| fruit | food/fruit | 25 (19 + 6) | 114, 42 |
| vegetables | food/vegetables, plants/mushrooms | 19 (14 + 5) | 96, 30 |
| flowers | plants/flowers, plants/flowers/plastic | 25 (19 + 6) | 114, 36 |
| buildings | town/houses/cartoon (drawings: the only houses there are) | 32 (24 + 8) | 144, 48 |
| vehicles | vehicles, its auto, construction, cycle, emergency, flight, flight/planes, masstransit, race, ship; military/vehicles | 21 (16 + 5) | 102, 42 |
| space | space, space/planets, space/moon | 16 (12 + 4) | 72, 24 |
| tools | household/tools | 12 (9 + 3) | 60, 18 |
| instruments | hobbies/music/brass, percussion, string, wind | 11 (8 + 3) | 48, 18 |
| all | | 284 (213 + 71) from 295 PNGs | 1326, 444 |

Source images: `<name>_mirror` (a flipped copy) and `<name><digits>`, `<name>-<digits>`,
`<name>_<digits>` (another photo of the same object: lion-2, cep-1, pig_golden2, Strawberry2)
are variants of `<name>`, applied repeatedly (cep-1_mirror -> cep-1 -> cep); a PNG belongs to
the source of the first name down that chain that a PNG in its folder carries (any case), and
every other PNG is its own source (the mirrors are the only
near-identical pairs, flips included, among the PNGs in use; tests/test_stamps.py checks that no
two sources on opposite sides are). `Cutout.source` is the source's path relative to the root.

Split (`split`): per class, round(25 %) of its sources (at least one, never all) go to test,
drawn with the seed; every cut-out of a source goes where its source goes, so no source and no
variant of it is on both sides, and every class is on both sides.

Composites (`composite`): a `side`-px background (a linear or radial gradient, low-frequency
colour noise, stripes or checks of random colours, plus mild pixel noise), and the cut-out,
flipped horizontally with probability 1/2, fitted inside a square of 55-95 % of the side at a
random position (aspect kept), alpha-composited. `stamps_betons` draws `train_per_image`
composites of each train cut-out and `test_per_image` of each test cut-out (the counts above:
6 and 6, seed 0, package version 2022.06.04; benchmarks/stamps.py prints them for its own
arguments).

    .venv/bin/python benchmarks/stamps.py --work data/stamps --side 64 [--preview stamps.png]
"""  # noqa: E501 (the class table's rows are one line each)
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
INSTALL = "apt-get install tuxpaint-stamps-default"
CLASSES: dict[str, tuple[str, ...]] = {
    "birds": ("animals/birds",),
    "mammals": ("animals/mammals", "animals/mammals/apes", "animals/mammals/bears", "animals/mammals/bovines",
                "animals/mammals/camel", "animals/mammals/cats", "animals/mammals/deer", "animals/mammals/dogs",
                "animals/mammals/equines", "animals/mammals/rodents", "animals/marsupials"),
    "sea_animals": ("animals/fish", "animals/mammals/aquatic", "animals/shellfish"),
    "small_creatures": ("animals/insects", "animals/amphibians", "animals/lizards"),
    "fruit": ("food/fruit",),
    "vegetables": ("food/vegetables", "plants/mushrooms"),
    "flowers": ("plants/flowers", "plants/flowers/plastic"),
    "buildings": ("town/houses/cartoon",),
    "vehicles": ("vehicles", "vehicles/auto", "vehicles/construction", "vehicles/cycle", "vehicles/emergency",
                 "vehicles/flight", "vehicles/flight/planes", "vehicles/masstransit", "vehicles/race", "vehicles/ship",
                 "military/vehicles"),
    "space": ("space", "space/planets", "space/moon"),
    "tools": ("household/tools",),
    "instruments": ("hobbies/music/brass", "hobbies/music/percussion", "hobbies/music/string", "hobbies/music/wind"),
}
# Alpha below this is a near-invisible fringe or glow; it would widen the trimmed box.
TRIM_ALPHA = 16
# Bumped when what the betons hold changes for the same parameters: stale betons are then rewritten.
FORMAT = 1


@dataclass(frozen=True)
class Cutout:
    rgba: np.ndarray  # uint8 [H, W, 4], trimmed to the alpha bounding box, longer side <= max_side
    label: int  # index into list(CLASSES)
    source: str  # the source image's path relative to the root; variants share their source's


def _check_root(root: Path) -> None:
    if not root.is_dir():
        raise SystemExit(f"{root} not found: install Debian's stamps with `{INSTALL}`")


def _pngs(root: Path) -> list[tuple[int, Path]]:
    """(label, path) of every PNG of CLASSES under `root`, sorted; a missing folder holds none."""
    return [(label, p) for label, folders in enumerate(CLASSES.values()) for folder in folders
            for p in sorted((root / folder).glob("*.png")) if p.is_file()]


def source_stem(stem: str, stems: set[str]) -> str:
    """The stem of the source image that the PNG `stem` is a variant of (itself if none);
    `stems`: the lower-cased stems of the PNGs in the same folder."""
    m = re.fullmatch(r"(.+)_mirror", stem, flags=re.IGNORECASE)
    if m:
        base = source_stem(m.group(1), stems)  # a mirror of a numbered variant: cep-1_mirror -> cep
        if base.lower() in stems:
            return base
    m = re.fullmatch(r"(.+?)[-_]?\d+", stem)
    if m and m.group(1).lower() in stems:
        return source_stem(m.group(1), stems)
    return stem


def _source(path: Path, root: Path) -> str:
    stems = {p.stem.lower() for p in path.parent.glob("*.png")}
    base = source_stem(path.stem, stems).lower()
    # the file's own spelling of the base name (Strawberry2 -> strawberry.png)
    name = next((p.name for p in sorted(path.parent.glob("*.png")) if p.stem.lower() == base), path.name)
    return (path.parent / name).relative_to(root).as_posix()


def trim(rgba: np.ndarray, max_side: int) -> np.ndarray:
    """`rgba` cut to the box of alpha >= TRIM_ALPHA and shrunk (aspect kept) to longer side <= max_side."""
    ys, xs = np.nonzero(rgba[..., 3] >= TRIM_ALPHA)
    if len(ys) == 0:
        raise ValueError("fully transparent image")
    rgba = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = rgba.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        # PIL resamples RGBA premultiplied, so transparent pixels' colours do not bleed into the edge
        rgba = np.asarray(Image.fromarray(rgba, "RGBA").resize((max(1, round(w * s)), max(1, round(h * s))),
                                                                Image.LANCZOS))
    return np.ascontiguousarray(rgba)


def cutouts(root: Path = STAMPS_ROOT, max_side: int = 128) -> list[Cutout]:
    """Every PNG of CLASSES under `root` as a trimmed cut-out, sorted by (label, path)."""
    root = Path(root)
    _check_root(root)
    items = []
    for label, path in _pngs(root):
        with Image.open(path) as im:
            rgba = np.asarray(im.convert("RGBA"))
        items.append((label, path.relative_to(root).as_posix(),
                      Cutout(trim(rgba, max_side), label, _source(path, root))))
    missing = sorted(set(CLASSES) - {list(CLASSES)[label] for label, _, _ in items})
    if missing:
        raise SystemExit(f"{root}: no stamps for classes {missing}; is it {INSTALL}'s layout?")
    return [c for _, _, c in sorted(items, key=lambda t: t[:2])]


def split(items: list[Cutout], test_share: float = 0.25, seed: int = 0) -> tuple[list[Cutout], list[Cutout]]:
    """(train, test) by source image, per class: round(test_share * sources) of each class's sources,
    at least one and never all, drawn with `seed`, go to test with all their cut-outs. Order kept."""
    rng = np.random.default_rng(seed)
    test_sources = set()
    for label in sorted({c.label for c in items}):
        sources = sorted({c.source for c in items if c.label == label})
        if len(sources) < 2:
            raise ValueError(f"class {label} has {len(sources)} source image(s); a split needs two")
        n = min(len(sources) - 1, max(1, round(test_share * len(sources))))
        test_sources.update(sources[i] for i in rng.permutation(len(sources))[:n])
    return [c for c in items if c.source not in test_sources], [c for c in items if c.source in test_sources]


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.uniform(0, 255, (n, 3)).astype(np.float32)


def background(rng: np.random.Generator, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: a linear or radial gradient between two random colours, low-frequency
    colour noise, stripes or checks of random colours (random angle and period), plus pixel noise."""
    yy, xx = (np.mgrid[0:side, 0:side].astype(np.float32) + 0.5) / side  # in (0, 1)
    kind = rng.integers(5)
    if kind == 0:  # linear gradient
        a = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(a) + yy * np.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        c = _colours(rng, 2)
        img = c[0] + t[..., None] * (c[1] - c[0])
    elif kind == 1:  # radial gradient around a random centre
        cy, cx = rng.uniform(0, 1, 2)
        t = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        t = np.clip(t / rng.uniform(0.5, 1.2), 0, 1)
        c = _colours(rng, 2)
        img = c[0] + t[..., None] * (c[1] - c[0])
    elif kind == 2:  # low-frequency noise: a coarse random grid, bicubically upsampled
        n = int(rng.integers(2, 7))
        grid = rng.uniform(0, 255, (n, n, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((side, side), Image.BICUBIC)).astype(np.float32)
    elif kind == 3:  # stripes of 2-4 colours
        a = rng.uniform(0, np.pi)
        period = rng.uniform(0.08, 0.4)
        c = _colours(rng, int(rng.integers(2, 5)))
        t = (xx * np.cos(a) + yy * np.sin(a)) / period
        img = c[np.floor(t).astype(np.int64) % len(c)]
    else:  # checks of two colours, possibly rotated
        a = rng.uniform(0, np.pi / 2)
        cell = rng.uniform(0.08, 0.3)
        u = (xx * np.cos(a) + yy * np.sin(a)) / cell
        v = (-xx * np.sin(a) + yy * np.cos(a)) / cell
        c = _colours(rng, 2)
        img = c[(np.floor(u) + np.floor(v)).astype(np.int64) % 2]
    img = img + rng.normal(0, rng.uniform(1, 6), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _fit(shape: tuple[int, int], h: int, w: int) -> tuple[int, int]:
    """(height, width) of an image of `shape` scaled to fit inside h x w, aspect kept."""
    s = min(h / shape[0], w / shape[1])
    return max(1, min(h, round(shape[0] * s))), max(1, min(w, round(shape[1] * s)))


def paste(canvas: np.ndarray, item: Cutout, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Alpha-composite `item`, resized with PIL (LANCZOS, aspect kept) to fit inside `box` = (y, x, h, w)
    and centred in it, onto `canvas` (uint8 [H, W, 3], in place; parts outside it are dropped).
    Returns (canvas, mask): mask [H, W] bool, the pixels with the resized alpha >= 128."""
    y, x, h, w = box
    nh, nw = _fit(item.rgba.shape[:2], h, w)
    rgba = np.asarray(Image.fromarray(item.rgba, "RGBA").resize((nw, nh), Image.LANCZOS))
    top, left = y + (h - nh) // 2, x + (w - nw) // 2
    H, W = canvas.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + nh, H), min(left + nw, W)
    mask = np.zeros((H, W), bool)
    if y0 >= y1 or x0 >= x1:
        return canvas, mask
    part = rgba[y0 - top:y1 - top, x0 - left:x1 - left]
    alpha = part[..., 3:].astype(np.uint32)
    region = canvas[y0:y1, x0:x1].astype(np.uint32)
    canvas[y0:y1, x0:x1] = ((part[..., :3] * alpha + region * (255 - alpha) + 127) // 255).astype(np.uint8)
    mask[y0:y1, x0:x1] = part[..., 3] >= 128
    return canvas, mask


def composite(item: Cutout, rng: np.random.Generator, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: `background`, then `item` (flipped horizontally with probability 1/2)
    fitted inside a square of 55-95 % of `side` at a uniformly random position."""
    canvas = background(rng, side)
    box = max(1, round(side * rng.uniform(0.55, 0.95)))
    y, x = rng.integers(0, side - box + 1, 2)
    if rng.random() < 0.5:
        item = Cutout(np.ascontiguousarray(item.rgba[:, ::-1]), item.label, item.source)
    return paste(canvas, item, (int(y), int(x), box, box))[0]


def _files_digest(root: Path) -> str:
    """Names and sizes of the PNGs in use: a changed package rewrites the betons."""
    h = hashlib.sha1()
    for label, p in _pngs(root):
        h.update(f"{label}:{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()


def _counts(items: list[Cutout], per_image: int) -> dict[str, dict[str, int]]:
    return {name: {"sources": len({c.source for c in items if c.label == k}),
                   "images": per_image * sum(c.label == k for c in items)} for k, name in enumerate(CLASSES)}


def stamps_betons(work: Path, *, side: int = 64, train_per_image: int = 6, test_per_image: int = 6, seed: int = 0,
                  root: Path = STAMPS_ROOT) -> tuple[Path, Path]:
    """(train.beton, test.beton) of composites under `work` (stamps_train.beton, stamps_test.beton),
    written once: kept when both exist and stamps.json beside them records the same parameters,
    classes and PNG files. Labels: index into list(CLASSES). Raw pixels (no JPEG)."""
    from fastseed.data_prep import write_beton

    work, root = Path(work), Path(root)
    _check_root(root)
    work.mkdir(parents=True, exist_ok=True)
    train_path, test_path, meta_path = work / "stamps_train.beton", work / "stamps_test.beton", work / "stamps.json"
    params = {"format": FORMAT, "side": side, "train_per_image": train_per_image, "test_per_image": test_per_image,
              "seed": seed, "root": str(root), "classes": {k: list(v) for k, v in CLASSES.items()},
              "files": _files_digest(root)}
    if train_path.exists() and test_path.exists() and meta_path.exists():
        if json.loads(meta_path.read_text()).get("params") == params:
            return train_path, test_path
    meta_path.unlink(missing_ok=True)  # a half-written pair is never taken for a finished one
    train, test = split(cutouts(root, max_side=max(128, side)), seed=seed)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        for part, (items, per_image, path) in enumerate(((train, train_per_image, train_path),
                                                         (test, test_per_image, test_path))):
            rng = np.random.default_rng([seed, part])
            images = np.stack([composite(c, rng, side) for c in items for _ in range(per_image)])
            labels = np.repeat(np.array([c.label for c in items], np.int64), per_image)
            npz = Path(tmp) / f"{path.stem}.npz"
            np.savez(npz, images=images, labels=labels)
            write_beton(str(npz), str(path), compress_probability=0.0, progress=False)
    meta = {"params": params, "train": _counts(train, train_per_image), "test": _counts(test, test_per_image)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return train_path, test_path


def preview(path: Path, root: Path = STAMPS_ROOT, side: int = 64, per_class: int = 8, seed: int = 0) -> None:
    """A PNG grid: one row per class, `per_class` train composites of it, the class name on the left."""
    from PIL import ImageDraw

    train, _ = split(cutouts(root, max_side=max(128, side)), seed=seed)
    rng = np.random.default_rng(seed)
    label_w = 110
    sheet = Image.new("RGB", (label_w + per_class * (side + 2), len(CLASSES) * (side + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, name in enumerate(CLASSES):
        items = [c for c in train if c.label == k]
        draw.text((4, k * (side + 2) + side // 2 - 6), name, fill=(0, 0, 0))
        for j, i in enumerate(rng.choice(len(items), per_class, replace=len(items) < per_class)):
            sheet.paste(Image.fromarray(composite(items[i], rng, side)), (label_w + j * (side + 2), k * (side + 2)))
    sheet.save(path)
