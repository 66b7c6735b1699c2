"""Image folders as data: `--data DIR` (ImageFolder `DIR/<class>/<image>`, or a flat folder of
images) is written once to a .beton in a cache folder beside the run and reused next time.

The cached file is named by a hash of the folder's image list (relative paths, labels, sizes,
modification times): adding, removing, renaming or rewriting an image gives a new name, so the
next run writes the beton again; an unchanged folder is not read at all beyond its listing.
Writing is `fastseed-prep`'s (`fastseed.data_prep.write_beton`, its defaults): a progress bar,
and every file that fails to decode is listed on stderr and left out.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

CACHE_DIR_NAME = "fastseed-data-cache"


def cache_dir_beside(output: str | os.PathLike) -> Path:
    """The cache folder of a run writing to `output` (a folder or a file): its sibling, so runs
    with different outputs in one place share it."""
    return Path(output).absolute().parent / CACHE_DIR_NAME


def folder_key(source) -> str:
    """Hash of an image-folder source's file list, labels, sizes and mtimes."""
    h = hashlib.sha256(b"fastseed-folder-v1\0")
    for path, label in zip(source.paths, source.labels.tolist()):
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, source.root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve_data(path: str | None, cache_dir: str | os.PathLike, *, progress: bool = True) -> str | None:
    """`path` itself unless it is a folder; for a folder, the cached .beton of its images
    (written first when the folder is new or has changed since)."""
    if path is None or not os.path.isdir(path):
        return path
    from fastseed.errors import PrepError
    from fastseed.data_prep import open_source
    from fastseed.data_prep import write_beton
    source = open_source(path)
    beton = Path(cache_dir) / f"{Path(path).absolute().name}-{folder_key(source)}.beton"
    if beton.is_file():
        print(f"{path}: using {beton} ({len(source)} images)", file=sys.stderr)
        return str(beton)
    beton.parent.mkdir(parents=True, exist_ok=True)
    print(f"{path}: writing {len(source)} images to {beton} (once; reused while the folder is unchanged)",
          file=sys.stderr)
    try:
        report = write_beton(path, str(beton), progress=progress)
    except PrepError as e:
        if e.report is not None:
            print(f"{path}: {e.report}", file=sys.stderr)
        raise
    if report.skipped:
        print(f"{path}: {report}", file=sys.stderr)
    return str(beton)


def resolve_config(cfg, beside: str | os.PathLike | None = None):
    """`cfg` with each image folder among --data, --val-data and --knn-bank replaced by its
    cached .beton beside `beside` (default: the run's output)."""
    cache = cache_dir_beside(beside or cfg.out_dir)
    return cfg.replace(**{name: resolve_data(getattr(cfg, name), cache, progress=cfg.progress)
                          for name in ("data", "val_data", "knn_bank")})
