"""Image folders as --data: written once to a cached beton beside the run, reused while the
folder is unchanged, written again when it changes, broken files listed and left out."""
from __future__ import annotations

import os

import numpy as np
import pytest
from ffcv.reader import Reader
from PIL import Image

import fastseed.data_prep
from fastseed.cli import train_main
from fastseed.config import Config
from fastseed.folders import CACHE_DIR_NAME, resolve_config, resolve_data


def image(path, seed, size=(20, 24)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def count(beton) -> int:
    return Reader(str(beton)).num_samples


@pytest.fixture
def folder(tmp_path):
    """ImageFolder: 2 classes, 5 readable images (PNG and JPEG), one broken file."""
    root = tmp_path / "images"
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            image(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}", seed=10 * len(cls) + i)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def test_folder_is_written_once_and_reused(folder, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    beton = resolve_data(str(folder), cache, progress=False)
    err = capsys.readouterr().err
    assert f"writing 6 images to {beton}" in err
    assert "5 written, 1 skipped" in err and f"{folder / 'dog' / 'broken.jpg'}:" in err
    assert count(beton) == 5 and os.path.dirname(beton) == str(cache)

    def no_write(*a, **k):
        raise AssertionError("the cached beton was written again")
    monkeypatch.setattr(fastseed.data_prep, "write_beton", no_write)
    assert resolve_data(str(folder), cache, progress=False) == beton
    assert f"using {beton}" in capsys.readouterr().err
    monkeypatch.undo()

    image(folder / "dog" / "new.png", seed=99)  # the folder changes: a new beton
    again = resolve_data(str(folder), cache, progress=False)
    assert again != beton and count(again) == 6
    os.utime(folder / "cat" / "0.jpg", ns=(1, 1))  # same files, one rewritten (mtime): new again
    assert resolve_data(str(folder), cache, progress=False) not in (beton, again)


def test_flat_folder_and_passthrough(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        image(flat / f"{i}.png", seed=i)
    (flat / "notes.txt").write_text("not an image")
    beton = resolve_data(str(flat), tmp_path / "cache", progress=False)
    assert count(beton) == 3
    assert resolve_data(beton, tmp_path / "elsewhere") == beton and resolve_data(None, tmp_path) is None


def test_config_folders_are_cached_beside_the_output(folder, tmp_path):
    cfg = resolve_config(Config(data=str(folder), val_data=str(folder), knn_bank=None,
                                output=str(tmp_path / "runs" / "a"), progress=False))
    assert cfg.data == cfg.val_data and cfg.data.startswith(str(tmp_path / "runs" / CACHE_DIR_NAME))
    assert cfg.knn_bank is None and count(cfg.data) == 5


def test_train_with_a_folder_of_broken_files_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"nope")
    assert train_main(["--data", str(bad), "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{bad / 'a.jpg'}: " in err[-2], err  # the report, as fastseed-prep prints it
    assert err[-1] == "error: nothing could be written: all 1 inputs were skipped", err
    assert not (tmp_path / "out").exists() and not list((tmp_path / CACHE_DIR_NAME).iterdir())
