"""Teacher-embedding cache: the frozen teacher's keys for R stored crops of every image, computed
once (`fastseed-cache`), then replayed with their crops (`fastseed.data.replay_loader`) so the
teacher leaves the training loop (as FKD stores a teacher's outputs with their crop boxes, and
SimReg's --use_cache reads cached teacher features).

Build (`build_cache`). Image i gets R RandomResizedCrop boxes with flips (`data.random_boxes`:
area share in `crop_scale`, aspect 3/4-4/3, flip p 1/2), drawn for the block of DRAW_BLOCK
images holding i from numpy's default_rng([seed, i // DRAW_BLOCK]): the same boxes whatever
the chunking, the ranks or the resumes. Each box of the decoded image is resized to
`teacher_res` (INTER_AREA, as the training crops), mirrored as drawn, normalised with the
teacher's mean/std, and the teacher runs on it as training runs it (`targets.live_targets`: the
same weights, bf16 weights + autocast on CUDA, channels-last, torch.compile per --compile). The
key stored is t / ||t|| (in fp32), rounded to bf16 or fp16. With teacher_res == res (the usual
224/224) this is the view the live teacher sees before colour augmentation; with a larger
teacher_res the cached teacher sees its crop at that size, where the live teacher upsamples
the student's crop.

Replay. In epoch e image i uses its crop r = (o_i + e) mod R, o_i ~ U{0..R-1} from
default_rng([seed, SLOT_STREAM]): every image visits its R crops in turn, one per epoch, from
a random phase; r depends on (seed, e, i) only, so a resumed run replays the same crops. The
student's colour augmentation is still drawn live (`fastseed.augment`), so a cached key is the
teacher's embedding of the un-coloured crop.

File (little-endian; every offset is in the header):
    0          b"FSTCACHE", u32 format version, u32 header length
    16         header: UTF-8 JSON (identity below, layout, informational entries)
    chunks     u32 [ceil(N / chunk), 2]: (1 once chunk c is durably on disk, crc32 of its boxes
               then its keys): a kill leaves a record 0, damage a crc that does not match
    boxes      u16 [N, R, 4]: (y, x, h, w | FLIP_BIT if mirrored) in the decoded image, 8 B/crop
    keys       [N, R, D] bf16 or fp16 (stored as 16-bit words): the L2-normalised embeddings
ImageNet-1k (1,281,167 images) at R = 10, D = 128, bf16: keys 3.28 GB + boxes 0.10 GB.
Identity (what must match to resume a build or reuse a cache): the beton (size, sha256 of its
header, field descriptors, per-sample metadata and allocation table, sample count), the
teacher (arch, checkpoint format and sha256, embedding dim, head or backbone, mean/std), the
target the build asked for (head or backbone), the teacher resolution, precision and compile
setting, R, seed, crop scale and ratio, D, dtype.

Atomic and resumable. The build writes OUTPUT.part (created with its whole header under a
temporary name, then renamed). After chunk c's boxes and keys: fsync, write its record, fsync.
A rerun after a kill continues with the chunks not recorded; its loader batches never straddle
a chunk, so the file is bit-identical to an uninterrupted build on the same machine. A part
file or an OUTPUT of another identity is refused (one line naming the field; nothing deleted).
Once every chunk is recorded and matches its crc32, the part file is renamed to OUTPUT.
Under torchrun every rank takes every world-th chunk still to do and writes it in place in the
one part file (disjoint byte ranges; rank 0 creates it before and renames it after, between
barriers): there is no merge step, a part file resumes under any number of ranks, and at train
time every rank reads the one file (the rows of its shard).

Reading (the API for the training loop):
    cache = TeacherCache.open(path)            # CacheError: not a cache, truncated, incomplete
    cache.verify()                             # optional, reads it all: CacheError on a bad crc32
    cache.check(beton=cfg.data, teacher=teacher_record(info, teacher, mean_std), target="head",
                teacher_res=..., crop_scale=cfg.crop_scale, small_crops=cfg.small_crops)
    loader = fastseed.data.replay_loader(cfg.data, cache, batch_size=..., res=cfg.res, ...)
    for views, labels, keys in loader: ...     # keys (B, D) on the device: the teacher targets
    cache.keys(indices, epoch)                 # the same keys for any rows, for any epoch
Training (`fastseed-train --teacher-cache`) does exactly this: `targets.cached_targets` opens,
checks and verifies the cache, `train.build_loader` makes the replay loader, and the keys it
yields are the targets (`targets.CachedTargets`). `identity` (a sha256 of the identity fields)
is recorded in every checkpoint: resuming asks for the same cache.
SEED's small-patch variant (--small-crops) is refused: a cache of its six small crops too would
be 7x the size (ImageNet R=10: 23 GB), and caching only the global crop would leave the teacher
in the loop for the small ones.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastseed._ffcv import keep_torch_threads
from fastseed.augment import Normalize
from fastseed.config import Config
from fastseed.data import FLIP_BIT, RATIO, box_loader, check_beton, image_sizes, random_boxes
from fastseed.errors import CacheError
from fastseed.methods import resolve_preset, teacher_target
from fastseed.runtime import Env, teacher_dtype, use_compile

MAGIC = b"FSTCACHE"
VERSION = 1
PREFIX = 16                  # magic, version, header length
HEADER_END = 16384           # the header's JSON fits below this
ALIGN = 4096
DRAW_BLOCK = 4096            # images per box draw: default_rng([seed, i // DRAW_BLOCK])
SLOT_STREAM = 1 << 32        # default_rng([seed, SLOT_STREAM]) draws the per-image phase o_i
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = {"head": "projection-head embeddings (SEED; SimReg --simreg-target projection)",
           "backbone": "pooled backbone features (SimReg's default; --teacher-no-head)"}
IDENTITY = ("beton", "teacher", "target", "teacher_res", "precision", "compile", "crops", "seed", "crop_scale",
            "ratio", "dim", "dtype")


# ---------------------------------------------------------------- identity
def beton_identity(path) -> dict:
    """Size, sample count and sha256 of everything in a beton but the sample data: the header,
    field descriptors, per-sample metadata (data pointers, sizes, labels) and allocation table."""
    keep_torch_threads()
    from ffcv.reader import Reader

    path = check_beton(path)
    reader = Reader(path)
    meta_end = reader.header.nbytes + reader.field_descriptors.nbytes + reader.metadata.nbytes
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(meta_end))
        f.seek(int(reader.header["alloc_table_ptr"]))
        digest.update(f.read())
    return {"size": os.path.getsize(path), "num_samples": int(reader.num_samples), "sha256": digest.hexdigest()}


def teacher_record(teacher_info: dict, teacher, mean_std) -> dict:
    """What identifies a teacher's keys: from the teacher's `info()`, the teacher (a
    fastseed.teachers TeacherBundle) and (mean, std). `head` False: pooled backbone features
    (SimReg's default)."""
    return {"arch": teacher_info["arch"], "format": teacher_info["format"], "sha256": teacher_info["sha256"],
            "dim": int(teacher_info["dim"]), "head": not isinstance(teacher.model.head, nn.Identity),
            "mean": [float(v) for v in mean_std[0]], "std": [float(v) for v in mean_std[1]]}


def _difference(have: dict, want: dict, keys) -> str | None:
    """'field: A in the file, B in this run' for the first differing entry, or None."""
    for key in keys:
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _difference(a, b, sorted(set(a) | set(b)))
            if inner:
                return f"{key}.{inner}"
        elif a != b:
            return f"{key}: {_short(a)} in the file, {_short(b)} in this run"
    return None


def _short(value) -> str:
    return value[:12] if isinstance(value, str) and len(value) == 64 else json.dumps(value)


# ---------------------------------------------------------------- layout
def _align(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def layout(num_samples: int, crops: int, dim: int, chunk: int) -> dict:
    """Byte offsets of the regions and the file size."""
    chunks = HEADER_END
    boxes = _align(chunks + math.ceil(num_samples / chunk) * 8)
    keys = _align(boxes + num_samples * crops * 8)
    return {"chunks": chunks, "boxes": boxes, "keys": keys, "size": keys + num_samples * crops * dim * 2}


def _records(fd: int, header: dict) -> np.ndarray:
    """u32 (chunks, 2): (done, crc32) per chunk, read from the file."""
    count = math.ceil(header["beton"]["num_samples"] / header["chunk"])
    return np.frombuffer(os.pread(fd, count * 8, header["layout"]["chunks"]), "<u4").reshape(count, 2)


def draw_boxes(heights, widths, crops: int, seed: int, crop_scale) -> np.ndarray:
    """uint16 (N, crops, 4): every image's stored boxes (see the module docstring)."""
    blocks = [random_boxes(heights[b:b + DRAW_BLOCK], widths[b:b + DRAW_BLOCK], crops, crop_scale,
                           np.random.default_rng([seed, b // DRAW_BLOCK]))
              for b in range(0, len(heights), DRAW_BLOCK)]
    return np.concatenate(blocks) if blocks else np.zeros((0, crops, 4), np.uint16)


def slot_phase(num_samples: int, crops: int, seed: int) -> np.ndarray:
    """o_i: image i replays crop (o_i + epoch) mod R."""
    return np.random.default_rng([seed, SLOT_STREAM]).integers(0, crops, num_samples)


# ---------------------------------------------------------------- reading
def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX)
        if len(prefix) < PREFIX or prefix[:8] != MAGIC:
            raise CacheError(f"{path} is not a fastseed teacher cache (no {MAGIC.decode()} magic); "
                             "build one with fastseed-cache")
        version, length = np.frombuffer(prefix[8:], "<u4")
        if version != VERSION:
            raise CacheError(f"{path} has cache format version {version}, this fastseed reads {VERSION}: "
                             "rebuild it with fastseed-cache")
        if not 0 < length <= HEADER_END - PREFIX or size < PREFIX + length:
            raise CacheError(f"{path}: header of {length} bytes in a {size}-byte file; the file is damaged: "
                             "rebuild it")
        try:
            header = json.loads(f.read(int(length)).decode())
        except ValueError as e:
            raise CacheError(f"{path}: unreadable header ({type(e).__name__}); the file is damaged: "
                             "rebuild it") from None
    missing = [k for k in (*IDENTITY, "chunk", "layout") if not isinstance(header, dict) or k not in header]
    if missing:
        raise CacheError(f"{path}: header lacks {', '.join(missing)}; the file is damaged: rebuild it")
    return header


class TeacherCache:
    """A complete cache file, memory-mapped read-only. `boxes` (N, R, 4) uint16 and the keys
    (N, R, D) are views of the file; `header` is its JSON."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.num_samples, self.crops, self.dim = header["beton"]["num_samples"], header["crops"], header["dim"]
        self.seed, self.dtype = header["seed"], DTYPES[header["dtype"]]
        off, n, r = header["layout"], self.num_samples, self.crops
        mm = np.memmap(path, np.uint8, mode="r")
        self.boxes = mm[off["boxes"]:off["boxes"] + n * r * 8].view(np.uint16).reshape(n, r, 4)
        self._keys = mm[off["keys"]:off["size"]].view(np.int16).reshape(n, r, self.dim)
        self._phase = slot_phase(n, r, self.seed)
        self._slots = (None, None)

    @property
    def identity(self) -> str:
        """sha256 of the header's identity fields: two caches with the same one replay the same
        crops with the same keys (a checkpoint records it; resuming asks for the same)."""
        return hashlib.sha256(json.dumps({k: self.header[k] for k in IDENTITY}, sort_keys=True).encode()).hexdigest()

    @classmethod
    def open(cls, path) -> "TeacherCache":
        """Raise FileNotFoundError / CacheError unless `path` is a whole cache: magic, version,
        header, size and every chunk recorded (`verify` also reads the data)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"teacher cache {path} not found; build it with fastseed-cache")
        header = _read_header(path)
        size, want = path.stat().st_size, header["layout"]["size"]
        if size != want:
            raise CacheError(f"{path} is truncated or damaged ({size} bytes, its header says {want}): rebuild it")
        with open(path, "rb") as f:
            done = int((_records(f.fileno(), header)[:, 0] == 1).sum())
        total = math.ceil(header["beton"]["num_samples"] / header["chunk"])
        if done != total:
            raise CacheError(f"{path} is incomplete ({done} of {total} chunks written): rerun fastseed-cache "
                             "to finish it")
        return cls(path, header)

    def verify(self) -> None:
        """Raise CacheError naming the first chunk whose boxes and keys do not match their crc32."""
        chunk = self.header["chunk"]
        with open(self.path, "rb") as f:
            records = _records(f.fileno(), self.header)
        for c, (_, crc) in enumerate(records):
            rows = slice(c * chunk, min((c + 1) * chunk, self.num_samples))
            if _crc(self.boxes[rows], self._keys[rows]) != crc:
                raise CacheError(f"{self.path} is damaged: images {rows.start}-{rows.stop - 1} do not match their "
                                 "checksum: rebuild it")

    # -- what a run checks
    def check_beton(self, path) -> None:
        """The beton the cache was built from (identity), and every stored box inside its image."""
        have, want = self.header["beton"], beton_identity(path)
        if have != want:
            raise CacheError(f"{self.path} was built from another beton than {path} "
                             f"({_difference(have, want, sorted(have))}): rebuild it with "
                             f"fastseed-cache --data {path}")
        heights, widths = image_sizes(path)
        y, x, h, w = (self.boxes[..., k].astype(np.int64) for k in range(4))
        w = w & (FLIP_BIT - 1)
        inside = (h >= 1) & (w >= 1) & (y + h <= heights[:, None]) & (x + w <= widths[:, None])
        if not inside.all():
            i, r = (int(v[0]) for v in np.nonzero(~inside))
            raise CacheError(f"{self.path} is damaged: box {self.boxes[i, r].tolist()} of image {i}, crop {r} "
                             "lies outside the image: rebuild it")

    def check(self, *, beton=None, teacher: dict | None = None, target: str | None = None,
              teacher_res: int | None = None, crop_scale=None, small_crops: int = 0) -> None:
        """Raise CacheError unless the cache fits a run with these settings (None: not checked).
        `teacher`: the fields of `teacher_record` to compare (a run that does not load its
        teacher gives the arch and checkpoint sha256 only); `target`: what the run distils,
        "head" (the projection head's embedding) or "backbone" (the pooled feature)."""
        if small_crops:
            raise CacheError("--small-crops cannot train from a teacher cache: it holds one global crop per image "
                             "and epoch (the six small crops too would make it 7x larger); drop one or the other")
        if teacher is not None:
            fields = [k for k in ("sha256", "arch", "format", "dim", "head", "mean", "std") if k in teacher]
            diff = _difference(self.header["teacher"], teacher, fields)
            if diff:
                raise CacheError(f"{self.path} holds keys of another teacher (teacher.{diff}): pass the teacher it "
                                 "was built with, or rebuild it with fastseed-cache")
        if target is not None:
            self._check_target(target)
        for name, value in (("teacher_res", teacher_res), ("crop_scale", crop_scale)):
            have = self.header[name]
            if value is not None and json.loads(json.dumps(value)) != have:
                raise CacheError(f"{self.path} was built with {name} {_short(have)}, this run asks {_short(value)}: "
                                 f"pass --{name.replace('_', '-')} {','.join(map(str, np.atleast_1d(have)))} "
                                 "or rebuild the cache")
        if beton is not None:
            self.check_beton(beton)

    def _check_target(self, target: str) -> None:
        """The stored keys are what the run distils. A teacher without a head (a bundled one)
        gives its backbone feature to a build that asked for the head: those keys fit either
        target; keys built for the backbone of a teacher that may have a head fit only it."""
        stored = "head" if self.header["teacher"]["head"] else "backbone"
        if stored == target or (target == "head" and self.header["target"] == "head"):
            return
        raise CacheError(f"{self.path} holds the teacher's {TARGETS[stored]}, this run distils its "
                         f"{TARGETS[target]}: rebuild the cache with this run's --method, --simreg-target and "
                         "--teacher-no-head")

    # -- what the loader reads
    def slots(self, epoch: int) -> np.ndarray:
        """(N,) the crop each image replays in `epoch`: (o_i + epoch) mod R."""
        if self._slots[0] != epoch:
            self._slots = (epoch, (self._phase + epoch) % self.crops)
        return self._slots[1]

    def epoch_boxes(self, epoch: int) -> np.ndarray:
        """(N, 4) uint16: every image's box of `epoch`."""
        return self.boxes[np.arange(self.num_samples), self.slots(epoch)]

    def keys(self, indices, epoch: int) -> torch.Tensor:
        """(len(indices), D) CPU tensor in the cache's dtype: the stored keys of those images'
        crops of `epoch`."""
        idx = np.asarray(indices, np.int64)
        return torch.from_numpy(self._keys[idx, self.slots(epoch)[idx]]).view(self.dtype)


# ---------------------------------------------------------------- building
def plan(cfg: Config, env: Env, record: dict, beton: dict, *, crops: int, dtype: str, chunk: int) -> dict:
    """The header of the cache this build writes."""
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[teacher_dtype(cfg, env.device)]
    header = {"format": "fastseed teacher cache", "beton": beton, "teacher": record,
              "target": teacher_target(cfg), "teacher_res": cfg.teacher_res or cfg.res,
              "precision": precision, "compile": use_compile(cfg, env), "crops": crops, "seed": cfg.seed,
              "crop_scale": list(cfg.crop_scale), "ratio": list(RATIO),
              "dim": record["dim"], "dtype": dtype, "chunk": chunk,
              "layout": layout(beton["num_samples"], crops, record["dim"], chunk),
              "source": {"beton": os.path.abspath(cfg.data), "checkpoint": cfg.distill},
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    return json.loads(json.dumps(header))  # as it reads back (tuples -> lists)


def _crc(*arrays: np.ndarray) -> int:
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a), crc)
    return crc


def _create_part(part: Path, header: dict) -> None:
    """Write the header and zeroed chunk records, size the file (sparse), fsync, then rename
    into place: a part file always has a whole header."""
    text = json.dumps(header).encode()
    if PREFIX + len(text) > HEADER_END:
        raise CacheError(f"cache header of {len(text)} bytes is too long (paths?); use shorter paths")
    tmp = part.with_name(f".{part.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + np.array([VERSION, len(text)], "<u4").tobytes() + text)
            f.truncate(header["layout"]["size"])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, part)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _same_build(path: Path, have: dict, want: dict, advice: str) -> None:
    diff = _difference(have, want, IDENTITY)
    if diff:
        raise CacheError(f"{path} is another build ({diff}): {advice}")


def open_part(part: Path, header: dict) -> dict:
    """Create the part file, or take up the one there if it is this build. Returns its header
    (its chunk size wins over this run's)."""
    if not part.exists():
        _create_part(part, header)
        return header
    have = _read_header(part)
    _same_build(part, have, header, "rerun with the settings it was started with to finish it, or delete it "
                                    "to start over")
    if part.stat().st_size != have["layout"]["size"]:
        raise CacheError(f"{part} is truncated or damaged: delete it to start over")
    with open(part, "rb") as f:
        done = _records(f.fileno(), have)[:, 0]
    print(f"resuming {part}: {int(done.sum())} of {len(done)} chunks already written", file=sys.stderr)
    return have


def _batch_images(chunk: int, crops: int, batch_size: int) -> int:
    """Images per loader batch: the largest divisor of `chunk` with at most batch_size crops, so
    that no batch straddles two chunks (a resumed build batches exactly as an uninterrupted one)."""
    cap = max(1, batch_size // crops)
    return max(d for d in range(1, min(cap, chunk) + 1) if chunk % d == 0)


def todo(done: np.ndarray, num_samples: int, chunk: int, rank: int, world: int) -> np.ndarray:
    """This rank's images: every world-th chunk not yet done, ascending."""
    chunks = np.flatnonzero(done == 0)[rank::world]
    return np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, num_samples)) for c in chunks]
                          or [np.zeros(0, np.int64)]).astype(np.int64)


@torch.no_grad()
def fill(part: Path, header: dict, beton, teacher, *, device, amp, workers: int, batch_size: int, rank: int = 0,
         world: int = 1, progress: bool = True, on_chunk=None) -> int:
    """Compute and write this rank's chunks still to do (`beton`: the file of the header's
    identity); returns how many images it wrote. `on_chunk(c)` is called once chunk c is durable."""

    n, crops, dim, chunk = header["beton"]["num_samples"], header["crops"], header["dim"], header["chunk"]
    off, res, store = header["layout"], header["teacher_res"], DTYPES[header["dtype"]]
    fd = os.open(part, os.O_RDWR)
    try:
        indices = todo(_records(fd, header)[:, 0], n, chunk, rank, world)
        if len(indices) == 0:
            return 0
        boxes = draw_boxes(*image_sizes(beton), crops, header["seed"], header["crop_scale"])
        loader = box_loader(beton, boxes, size=res, indices=indices, device=device, num_workers=workers,
                            batch_size=_batch_images(chunk, crops, batch_size))
        normalize = Normalize(*(header["teacher"][k] for k in ("mean", "std"))).to(device)
        bar = _progress(len(indices), rank, world, progress)
        start = 0
        for views, _ in loader:
            idx = indices[start:start + len(views)]
            start += len(views)
            first, end = int(idx[0]), int(idx[-1]) + 1
            c = first // chunk
            rows = slice(c * chunk, min((c + 1) * chunk, n))
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                t = teacher(normalize(views.flatten(0, 1)))
            keys = F.normalize(t.float(), dim=1).to(store).view(len(idx), crops, dim).view(torch.int16).cpu().numpy()
            os.pwrite(fd, keys, off["keys"] + first * crops * dim * 2)
            if first == rows.start:  # batches never straddle chunks: a chunk's first batch starts its crc
                crc = _crc(boxes[rows])
            crc = zlib.crc32(keys, crc)
            if end == rows.stop:  # the batch closed chunk c: make it durable, then record it
                os.pwrite(fd, boxes[rows], off["boxes"] + rows.start * crops * 8)
                os.fsync(fd)
                os.pwrite(fd, np.array([1, crc], "<u4"), off["chunks"] + c * 8)
                os.fsync(fd)
                if on_chunk is not None:
                    on_chunk(c)
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
    finally:
        os.close(fd)
    return len(indices)


def _progress(total: int, rank: int, world: int, enabled: bool):
    if not (enabled and rank == 0):
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="teacher cache" + (f" (rank 0 of {world})" if world > 1 else ""), unit="img",
                dynamic_ncols=True, file=sys.stderr)


def finish(part: Path, output: Path) -> TeacherCache:
    """Check that every chunk of a part file is recorded and matches its crc32, then rename it
    to `output` (atomic) and return it opened."""
    cache = TeacherCache.open(part)  # raises if a chunk is missing (a rank failed)
    cache.verify()
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, output)
    dirfd = os.open(output.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)
    return TeacherCache.open(output)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def build_cache(cfg: Config, output, source, env: Env, *, crops: int = 10, dtype: str = "bf16", chunk: int = 2520,
                batch_size: int = 256, progress: bool = True, on_chunk=None) -> TeacherCache:
    """Build (or finish, or find up to date) the cache of `source`'s teacher on `cfg.data` at
    `output`; see the module docstring. `source` is the run's live target source
    (`fastseed.targets.live_targets`: the teacher exactly as training builds it, its weights,
    dtype, channels-last and compile; its `teacher`, `info` and `mean_std` are read). Every rank
    of a torchrun job calls it; rank 0 gets the opened cache, the others None."""
    if crops < 1 or chunk < 1 or batch_size < 1:
        raise CacheError(f"--crops, --chunk and --batch-size must be positive, got {crops}, {chunk}, {batch_size}")
    if dtype not in DTYPES:
        raise CacheError(f"--dtype {dtype}: choose {' or '.join(DTYPES)}")
    output = Path(output)
    if not output.parent.is_dir():
        raise CacheError(f"--output {output}: folder {output.parent} does not exist")
    part = output.with_name(output.name + ".part")
    teacher, info, mean_std = source.teacher, source.info, source.mean_std
    cfg = resolve_preset(cfg, info["format"])  # the crop scale of the teacher's preset, or --crop-scale
    header = plan(cfg, env, teacher_record(info, teacher, mean_std), beton_identity(cfg.data),
                  crops=crops, dtype=dtype, chunk=chunk)
    if output.exists():
        cache = TeacherCache.open(output)
        _same_build(output, cache.header, header, "choose another --output, or delete it to rebuild")
        cache.verify()
        _log(env, f"{output} is up to date (verified)")
        return cache if env.main else None
    if env.main:
        header = open_part(part, header)
    _barrier(env.world)
    if not env.main:
        header = _read_header(part)
    fill(part, header, cfg.data, teacher, device=env.device, amp=teacher_dtype(cfg, env.device), workers=cfg.workers,
         batch_size=batch_size, rank=env.rank, world=env.world, progress=progress, on_chunk=on_chunk)
    _barrier(env.world)
    cache = finish(part, output) if env.main else None
    _barrier(env.world)
    return cache


def _log(env, message: str) -> None:
    if env.main:
        print(message, file=sys.stderr)
