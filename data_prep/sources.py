"""Readable inputs for `fastseed-prep`: each source is a list of (RGB uint8 image, label).

A source answers `len()`, `load(i) -> (HxWx3 uint8 array, int label)` and `name(i)` (what the
skip report prints). `load` raises on an input it cannot convert; the writer records the
reason and leaves that input out.

Kinds, told apart by `open_source`:
  * an ImageFolder directory (`root/<class>/<image>`; classes sorted, as torchvision does),
    or a flat folder of images (`root/<image>`, all label 0),
  * a `.npz` with `images` (N, H, W[, C]) uint8 and `labels` (N,),
  * `fashion-mnist:train` / `fashion-mnist:test` (idx files, gzipped or not),
  * a CIFAR-10/100 python-pickle directory (training batches) or one of its batch files.
"""
from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from fastseed.errors import PrepError

# torchvision's ImageFolder extensions: other files in a class folder are not images.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# RGBImageField stores height and width as uint16.
MAX_SIDE = 65535

FASHION_MNIST_DIRS = (
    os.environ.get("FASTSEED_FASHION_MNIST", ""),
    "data/fashion-mnist",
    os.path.expanduser("~/.cache/fastseed/fashion-mnist"),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_BATCH_NAMES = ("test_batch", "train", "test")


def to_rgb8(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) uint8 -> contiguous (H, W, 3) uint8; alpha is dropped."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"cannot read shape {array.shape} as an image (need H,W or H,W,C)")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _pil_to_rgb8(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im)
        # 16-bit samples scale down to 8 bits (PIL's convert('RGB') would clip them at 255).
        if im.mode.startswith("I;16") or a.max(initial=0) > 255:
            a = (a.astype(np.uint32) * 255 + 32767) // 65535
        return to_rgb8(np.clip(a, 0, 255).astype(np.uint8))
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        return to_rgb8(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    # RGB, L, LA, P, RGBA, CMYK (Adobe inverted CMYK is handled by the JPEG plugin), YCbCr, 1.
    return to_rgb8(np.asarray(im.convert("RGB")))


def load_image_file(path: str, max_res: int | None = None) -> np.ndarray:
    """Decode one file to (H, W, 3) uint8. JPEGs larger than `max_res` are decoded at a reduced
    DCT scale first (libjpeg draft mode, 2-8x faster), then the writer resizes exactly."""
    with Image.open(path) as im:
        if max_res and im.format == "JPEG" and max(im.size) > max_res:
            ratio = max_res / max(im.size)
            im.draft("RGB", (max(1, int(im.size[0] * ratio)), max(1, int(im.size[1] * ratio))))
        im.load()  # raises OSError on truncated data
        array = _pil_to_rgb8(im)
    if max(array.shape[:2]) > MAX_SIDE and not max_res:
        raise ValueError(f"{array.shape[1]}x{array.shape[0]} px is too large for a beton; use --max-res")
    return array


class ArraySource:
    """In-memory images: (N, H, W[, C]) uint8 and N integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, label: str):
        images = np.asarray(images)
        labels = np.asarray(labels).reshape(-1)
        if images.dtype != np.uint8:
            raise PrepError(f"{label}: images must be uint8, got {images.dtype}")
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3, 4)):
            raise PrepError(f"{label}: images must be (N, H, W) or (N, H, W, 1|3|4), got {images.shape}")
        if len(labels) != len(images):
            raise PrepError(f"{label}: {len(images)} images but {len(labels)} labels")
        if not np.issubdtype(labels.dtype, np.integer):
            raise PrepError(f"{label}: labels must be integers, got {labels.dtype}")
        self.images, self.labels, self.label = images, labels.astype(np.int64), label
        self.max_side = int(max(images.shape[1:3])) if len(images) else 0

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int, max_res: int | None = None) -> tuple[np.ndarray, int]:
        return to_rgb8(self.images[i]), int(self.labels[i])

    def name(self, i: int) -> str:
        return f"{self.label}[{i}]"


class ImageFolderSource:
    """`root/<class>/**/<image>`: class index = position of the class name in sorted order."""

    def __init__(self, root: str):
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            raise PrepError(f"{root}: no class folders; an image folder needs the layout ROOT/CLASS/IMAGE.jpg")
        self.paths, labels = [], []
        for index, cls in enumerate(self.classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
                dirnames.sort()
                for f in sorted(filenames):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        self.paths.append(os.path.join(dirpath, f))
                        labels.append(index)
        if not self.paths:
            raise PrepError(f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) under its class folders")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.max_side = None  # unknown without opening every file

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int, max_res: int | None = None) -> tuple[np.ndarray, int]:
        return load_image_file(self.paths[i], max_res), int(self.labels[i])

    def name(self, i: int) -> str:
        return self.paths[i]


class FlatFolderSource(ImageFolderSource):
    """`root/<image>` with no class folders: every image gets label 0, file names sorted."""

    def __init__(self, root: str):
        self.root, self.classes = root, []
        self.paths = sorted(e.path for e in os.scandir(root)
                            if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not self.paths:
            raise PrepError(f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) and no class folders")
        self.labels = np.zeros(len(self.paths), dtype=np.int64)
        self.max_side = None


def image_folder(root: str) -> ImageFolderSource:
    """ROOT/CLASS/IMAGE as an ImageFolder; a folder of images without class folders as one class."""
    has_classes = any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root))
    return ImageFolderSource(root) if has_classes else FlatFolderSource(root)


def read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PrepError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(data) != expected:
        raise PrepError(f"{path}: idx file is {len(data)} bytes, its header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str) -> ArraySource:
    if split not in FASHION_MNIST_FILES:
        raise PrepError(f"unknown Fashion-MNIST split '{split}'; use fashion-mnist:train or fashion-mnist:test")
    image_file, label_file = FASHION_MNIST_FILES[split]
    for d in filter(None, FASHION_MNIST_DIRS):
        for suffix in (".gz", ""):
            images, labels = (os.path.join(d, f + suffix) for f in (image_file, label_file))
            if os.path.isfile(images) and os.path.isfile(labels):
                return ArraySource(read_idx(images), read_idx(labels), f"fashion-mnist:{split}")
    searched = ", ".join(filter(None, FASHION_MNIST_DIRS))
    raise PrepError(f"Fashion-MNIST files {image_file}[.gz] not found in {searched}; "
                    "set FASTSEED_FASHION_MNIST to the folder holding them")


def _unpickle_cifar(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as e:
            raise PrepError(f"{path}: not a CIFAR python batch ({e})") from None
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    labels = keys.get("labels", keys.get("fine_labels"))
    if "data" not in keys or labels is None:
        raise PrepError(f"{path}: CIFAR batch without 'data' and 'labels'/'fine_labels'")
    data = np.asarray(keys["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data), np.asarray(labels)


def cifar(path: str) -> ArraySource:
    """A CIFAR-10 directory (data_batch_1..5 = train), CIFAR-100 directory (train), or one batch file."""
    if os.path.isdir(path):
        files = sorted(str(p) for p in Path(path).glob("data_batch_*")) or [os.path.join(path, "train")]
    else:
        files = [path]
    parts = [_unpickle_cifar(f) for f in files]
    return ArraySource(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), path)


def is_cifar(path: str) -> bool:
    if os.path.isdir(path):
        return (os.path.isfile(os.path.join(path, "data_batch_1"))
                or (os.path.isfile(os.path.join(path, "train")) and os.path.isfile(os.path.join(path, "meta"))))
    name = os.path.basename(path)
    return name.startswith("data_batch_") or name in CIFAR_BATCH_NAMES


def npz(path: str) -> ArraySource:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"images", "labels"} - set(z.files)
            if missing:
                raise PrepError(f"{path}: .npz needs arrays 'images' and 'labels'; has {sorted(z.files)}")
            return ArraySource(z["images"], z["labels"], path)
    except (OSError, ValueError) as e:
        if isinstance(e, PrepError):
            raise
        raise PrepError(f"{path}: cannot read as .npz ({e})") from None


def open_source(source: str):
    if source.startswith("fashion-mnist:"):
        return fashion_mnist(source.split(":", 1)[1])
    if not os.path.exists(source):
        raise PrepError(f"source not found: {source} (expected an image folder, a .npz file, "
                        "a CIFAR python directory or batch file, or fashion-mnist:train|test)")
    if source.endswith(".npz") and os.path.isfile(source):
        return npz(source)
    if is_cifar(source):
        return cifar(source)
    if os.path.isdir(source):
        return image_folder(source)
    raise PrepError(f"{source}: unknown source type (expected an image folder, a .npz file, "
                    "a CIFAR python directory or batch file, or fashion-mnist:train|test)")


def subset_indices(n: int, subset: int | None, seed: int = 0) -> np.ndarray:
    """`--subset N`: N indices drawn without replacement (seeded), kept in source order, so a
    subset of a class-sorted folder still covers all classes."""
    if subset is None or subset >= n:
        return np.arange(n)
    if subset < 1:
        raise PrepError(f"--subset must be positive, got {subset}")
    return np.sort(np.random.default_rng(seed).choice(n, size=subset, replace=False))
