"""fastseed-prep: sources -> beton round trips, the skip report, exit codes, atomic writes."""
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from fastseed.data_prep import PrepReport, main, subset_indices, write_beton
from fastseed.data_prep.sources import fashion_mnist
from fastseed.errors import PrepError


def read_beton(path):
    """All (images, labels) of a raw-stored beton, exact pixels, without an FFCV loader."""
    from ffcv.reader import Reader
    r = Reader(str(path))
    mm = np.memmap(str(path), np.uint8, mode="r")
    image_field, label_field = (f"f{r.field_names.index(n)}" for n in ("image", "label"))
    images = []
    for m in r.metadata[image_field]:
        assert m["mode"] == 1, "expected raw storage"
        size = int(m["height"]) * int(m["width"]) * 3
        images.append(np.array(mm[m["data_ptr"]:m["data_ptr"] + size]).reshape(m["height"], m["width"], 3))
    return images, np.asarray(r.metadata[label_field])


def test_npz_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 20, 24, 3), dtype=np.uint8)
    labels = rng.integers(0, 5, 37)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    report = write_beton(str(tmp_path / "a.npz"), str(tmp_path / "a.beton"), progress=False)
    assert (report.written, report.skipped) == (37, [])
    got, got_labels = read_beton(tmp_path / "a.beton")
    np.testing.assert_array_equal(np.stack(got), images)
    np.testing.assert_array_equal(got_labels, labels)


def test_npz_grayscale_stored_as_rgb(tmp_path):
    images = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    np.savez(tmp_path / "g.npz", images=images, labels=np.arange(4))
    write_beton(str(tmp_path / "g.npz"), str(tmp_path / "g.beton"), progress=False)
    got, _ = read_beton(tmp_path / "g.beton")
    np.testing.assert_array_equal(np.stack(got), np.repeat(images[..., None], 3, axis=3))


def test_fashion_mnist_subset_round_trip(tmp_path):
    report = write_beton("fashion-mnist:test", str(tmp_path / "f.beton"), subset=50, progress=False)
    assert report.written == 50
    src = fashion_mnist("test")
    idx = subset_indices(len(src), 50)
    assert len(set(src.labels[idx].tolist())) > 5  # a random subset, not the first 50 of one class
    got, labels = read_beton(tmp_path / "f.beton")
    np.testing.assert_array_equal(np.stack(got), np.repeat(src.images[idx][..., None], 3, axis=3))
    np.testing.assert_array_equal(labels, src.labels[idx])


def test_cifar_pickle_dir(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    batches = []
    for i in (1, 2):
        data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 6).tolist()
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        batches.append((data, labels))
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": batches[0][0][:2], b"labels": batches[0][1][:2]}, f)
    assert write_beton(str(d), str(tmp_path / "c.beton"), progress=False).written == 12
    got, labels = read_beton(tmp_path / "c.beton")
    want = np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.stack(got), want)
    np.testing.assert_array_equal(labels, sum((b[1] for b in batches), []))
    assert write_beton(str(d / "test_batch"), str(tmp_path / "t.beton"), progress=False).written == 2


@pytest.fixture(scope="module")
def messy_folder(tmp_path_factory):
    """An ImageFolder with every kind of awkward input; returns (root, {name: expected outcome})."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(2)
    (root / "a").mkdir()
    (root / "b").mkdir()
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "a" / "ok.jpg", quality=95)
    Image.fromarray(rgb).save(root / "a" / "ok.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "a" / "cmyk.jpg")
    Image.fromarray(rgb[..., 0]).save(root / "b" / "gray.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "b" / "gray16.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "b" / "rgba.png")
    (root / "b" / "zero.jpg").write_bytes(b"")
    (root / "b" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    full = (root / "a" / "ok.jpg").read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "b" / "notes.txt").write_text("not an image extension: ignored")
    return root


def test_messy_folder_report(messy_folder, tmp_path):
    out = tmp_path / "m.beton"
    report = write_beton(str(messy_folder), str(out), progress=False)
    skipped = {os.path.basename(p): reason for p, reason in report.skipped}
    assert report.written == 6, report
    assert set(skipped) == {"zero.jpg", "garbage.jpg", "truncated.jpg"}, report
    assert "truncated" in skipped["truncated.jpg"].lower()
    text = str(report)
    assert text.startswith("6 written, 3 skipped")
    assert all(f"{p}: {r}" in text for p, r in report.skipped)
    from ffcv.reader import Reader
    r = Reader(str(out))
    assert r.metadata[f"f{r.field_names.index('label')}"].tolist() == [0, 0, 0, 1, 1, 1]


def test_messy_folder_conversions_exact(messy_folder, tmp_path):
    out = tmp_path / "raw.beton"
    write_beton(str(messy_folder), str(out), compress_probability=0.0, progress=False)
    images, labels = read_beton(out)
    # sorted order: a/cmyk.jpg a/ok.jpg a/ok.png | b/gray.png b/gray16.png b/rgba.png
    rgb = np.asarray(Image.open(messy_folder / "a" / "ok.png"))
    np.testing.assert_array_equal(images[2], rgb)
    np.testing.assert_array_equal(images[3], np.repeat(rgb[..., :1], 3, axis=2))
    np.testing.assert_array_equal(images[4], np.repeat(rgb[..., :1], 3, axis=2))  # 16-bit scaled, not clipped
    np.testing.assert_array_equal(images[5], rgb)  # alpha dropped
    assert all(im.shape == (30, 40, 3) for im in images)


def test_cli_exit_codes(messy_folder, tmp_path, capsys):
    assert main([str(messy_folder), str(tmp_path / "ok.beton"), "--no-progress", "--workers", "1"]) == 0
    assert "6 written, 3 skipped" in capsys.readouterr().out

    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "zero.jpg").write_bytes(b"")
    assert main([str(tmp_path / "bad"), str(tmp_path / "none.beton"), "--no-progress"]) == 2
    cap = capsys.readouterr()
    assert "0 written, 1 skipped" in cap.out and "nothing could be written" in cap.err
    assert len(cap.err.strip().splitlines()) == 1
    assert not (tmp_path / "none.beton").exists()

    assert main([str(tmp_path / "missing"), str(tmp_path / "m.beton")]) == 2
    err = capsys.readouterr().err
    assert "source not found" in err and "Traceback" not in err
    assert main(["fashion-mnist:validation", str(tmp_path / "m.beton")]) == 2
    assert "fashion-mnist:train" in capsys.readouterr().err
    assert main(["fashion-mnist:test", str(tmp_path / "nodir" / "m.beton")]) == 2
    assert "output folder does not exist" in capsys.readouterr().err


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "d.beton"
    out.write_bytes(b"previous content")
    import fastseed.data_prep.write as w

    def boom(*a, **k):
        with open(a[0], "wb") as f:  # a half-written temporary file
            f.write(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(w, "_write", boom)
    with pytest.raises(RuntimeError):
        write_beton("fashion-mnist:test", str(out), subset=10, progress=False)
    assert out.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.beton"]  # no temporary left behind


def test_source_errors(tmp_path):
    np.savez(tmp_path / "f.npz", images=np.zeros((2, 4, 4), np.float32), labels=np.zeros(2))
    with pytest.raises(PrepError, match="uint8"):
        write_beton(str(tmp_path / "f.npz"), str(tmp_path / "o.beton"), progress=False)
    np.savez(tmp_path / "n.npz", pixels=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(PrepError, match="'images' and 'labels'"):
        write_beton(str(tmp_path / "n.npz"), str(tmp_path / "o.beton"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="class folders"):
        write_beton(str(tmp_path / "empty"), str(tmp_path / "o.beton"), progress=False)
    assert isinstance(PrepError("x"), ValueError)
    assert str(PrepReport(3, [("p", "r")], "o")) == "3 written, 1 skipped\n  p: r"
