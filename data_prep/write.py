"""`fastseed-prep SRC OUT.beton`: any readable source -> an FFCV .beton with fields
`image` (RGBImageField) and `label` (IntField).

The knobs are FFCV's ImageNet recipe (ffcv-imagenet `write_imagenet.py`): `--max-res` (longest
side, e.g. 256-512), `--jpeg-quality`, `--compress-probability` (the share stored as JPEG; the
rest raw), `--workers`, `--subset N`.

Robustness: inputs are written in one pass. An input that fails to decode becomes a placeholder
and is flagged in shared memory (a writer worker that raised would hang FFCV's writer); if any
were flagged, the file is written again without them. So clean data costs one decode per image,
and the report names every input left out. Output goes to a temporary file in the destination
folder and is renamed over OUT only once complete (`os.replace` is atomic on one filesystem).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .sources import MAX_SIDE, ImageFolderSource, PrepError, open_source, subset_indices

MIN_PAGE = 2 << 20  # FFCV's smallest page. Every stored image must fit in one page, and each
# writer worker pads its last page: small pages keep small betons small.
PLACEHOLDER = np.zeros((1, 1, 3), np.uint8)


@dataclass
class PrepReport:
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: str | None = None

    def __str__(self) -> str:
        head = f"{self.written} written, {len(self.skipped)} skipped"
        return "\n".join([head] + [f"  {name}: {reason}" for name, reason in self.skipped])


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _stored_shape(shape: tuple[int, int], max_res: int | None) -> tuple[int, int]:
    """(h, w) after RGBImageField's resize (longest side down to max_res, never up)."""
    h, w = shape
    if max_res and max(h, w) > max_res:
        r = max_res / max(h, w)
        return int(r * h), int(r * w)
    return h, w


class _Samples:
    """What FFCV's writer workers index. Never raises: a failure is flagged in `failed`
    (shared memory, inherited by the worker processes) and written as a 1x1 placeholder."""

    def __init__(self, source, max_res: int | None, page_size: int, failed):
        self.source, self.max_res, self.page_size, self.failed = source, max_res, page_size, failed

    def __len__(self) -> int:
        return len(self.source)

    def load(self, i: int) -> tuple[np.ndarray, int]:
        image, label = self.source.load(i, self.max_res)
        h, w = _stored_shape(image.shape[:2], self.max_res)
        if max(h, w) > MAX_SIDE or h * w * 3 > self.page_size:
            raise ValueError(f"{w}x{h} px is too large for a beton; use --max-res")
        if min(h, w) < 1:
            raise ValueError("empty image")
        return image, label

    def __getitem__(self, i: int):
        try:
            return self.load(i)
        except Exception:
            self.failed[i] = 1
            return PLACEHOLDER, 0


def _header_size(path: str):
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return (0, 0)


def _max_stored_bytes(source, indices, max_res: int | None, workers: int) -> int:
    if max_res:
        return max_res * max_res * 3
    if isinstance(source, ImageFolderSource):
        # Headers only (no decode): sizes the FFCV page so the largest image fits.
        paths = [source.paths[i] for i in indices]
        with multiprocessing.Pool(max(1, workers)) as pool:
            sizes = pool.map(_header_size, paths, chunksize=256)
        return max((w * h * 3 for w, h in sizes if w * h * 3 <= (1 << 31)), default=0)
    return source.max_side ** 2 * 3


@contextlib.contextmanager
def _quiet_ffcv_progress(progress: bool):
    """FFCV's writer always draws a tqdm bar; progress=False silences it."""
    import ffcv.writer
    original = ffcv.writer.tqdm
    if not progress:
        ffcv.writer.tqdm = lambda *a, **k: original(*a, **{**k, "disable": True})
    try:
        yield
    finally:
        ffcv.writer.tqdm = original


def _write(tmp: str, samples: _Samples, indices: np.ndarray, image_field, page_size: int,
           workers: int, progress: bool) -> None:
    from ffcv.fields import IntField
    from ffcv.writer import DatasetWriter
    writer = DatasetWriter(tmp, {"image": image_field, "label": IntField()},
                           page_size=page_size, num_workers=max(1, min(workers, len(indices))))
    with _quiet_ffcv_progress(progress):
        writer.from_indexed_dataset(samples, indices=list(indices), chunksize=100)


def write_beton(source: str, out_path: str, *, max_res: int | None = None, jpeg_quality: int = 90,
                compress_probability: float | None = None, workers: int = 2, subset: int | None = None,
                progress: bool = True) -> PrepReport:
    """Write `source` to `out_path` (.beton). Returns the report; raises PrepError when the
    source is unusable or nothing could be written (`err.report` then lists the skips).

    compress_probability: share of images stored as JPEG (quality `jpeg_quality`), the rest raw.
    None = raw for array sources of at most 64 px (Fashion-MNIST, CIFAR: JPEG would lose pixels
    and save little), else 0.5 as in FFCV's ImageNet recipe.
    """
    from fastseed._ffcv import keep_torch_threads
    keep_torch_threads()  # before FFCV's first import, which sets torch to one thread
    from ffcv.fields import RGBImageField

    if max_res is not None and max_res < 1:
        raise PrepError(f"--max-res must be positive, got {max_res}")
    if not 1 <= jpeg_quality <= 100:
        raise PrepError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if compress_probability is not None and not 0.0 <= compress_probability <= 1.0:
        raise PrepError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise PrepError(f"output folder does not exist: {out_dir}")
    if os.path.isdir(out_path):
        raise PrepError(f"output is a folder: {out_path}; give a file name like {out_path.rstrip('/')}.beton")

    src = open_source(source)
    indices = subset_indices(len(src), subset)
    if compress_probability is None:
        small = getattr(src, "max_side", None) is not None and src.max_side <= 64
        compress_probability = 0.0 if small else 0.5
    mode = {0.0: "raw", 1.0: "jpg"}.get(compress_probability, "proportion")
    image_field = RGBImageField(write_mode=mode, max_resolution=max_res, jpeg_quality=jpeg_quality,
                                compress_probability=compress_probability)

    largest = _max_stored_bytes(src, indices, max_res, workers)
    page_size = max(MIN_PAGE, 1 << int(np.ceil(np.log2(max(4 * largest, 1)))))  # <= 1/4 wasted per page
    page_size = min(page_size, 1 << 31)
    failed = multiprocessing.RawArray(ctypes.c_uint8, len(src))
    samples = _Samples(src, max_res, page_size, failed)
    flags = np.frombuffer(failed, dtype=np.uint8)

    tmp = os.path.join(out_dir, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    skipped: list[tuple[str, str]] = []
    try:
        for attempt in range(3):
            _write(tmp, samples, indices, image_field, page_size, workers, progress)
            bad = indices[flags[indices] != 0]
            if len(bad) == 0:
                break
            for i in bad:
                try:  # the reason, recomputed here: the workers only flagged the failure
                    samples.load(int(i))
                    reason = "failed while writing (unreadable at that moment)"
                except Exception as e:
                    reason = _reason(e)
                skipped.append((src.name(int(i)), reason))
            indices = indices[flags[indices] == 0]
            if len(indices) == 0:
                report = PrepReport(0, skipped, None)
                raise PrepError(f"nothing could be written: all {len(skipped)} inputs were skipped", report)
        else:
            raise PrepError(f"inputs kept failing to read while writing {out_path}; is the source changing?")
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return PrepReport(len(indices), skipped, out_path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastseed-prep",
        description="Write images to an FFCV .beton (fields: image, label).",
        epilog="SRC: an image folder (ROOT/CLASS/IMAGE), a .npz with 'images' (N,H,W[,C]) uint8 and "
               "'labels', fashion-mnist:train | fashion-mnist:test, or a CIFAR-10/100 python "
               "directory (training batches) or one of its batch files (e.g. .../test_batch).")
    p.add_argument("src")
    p.add_argument("out", metavar="OUT.beton")
    p.add_argument("--max-res", type=int, default=None,
                   help="resize so the longest side is at most this (FFCV ImageNet recipe: 256-512)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-probability", type=float, default=None,
                   help="share of images stored as JPEG, the rest raw (default: 0 for <=64 px arrays, else 0.5)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--subset", type=int, default=None, help="write N randomly chosen (seeded) inputs")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = write_beton(args.src, args.out, max_res=args.max_res, jpeg_quality=args.jpeg_quality,
                             compress_probability=args.compress_probability, workers=args.workers,
                             subset=args.subset, progress=not args.no_progress)
    except PrepError as e:
        if e.report is not None:
            print(e.report)
        print(f"fastseed-prep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fastseed-prep: error: {e.strerror or e}: {e.filename or args.out}", file=sys.stderr)
        return 2
    print(report)
    return 0
