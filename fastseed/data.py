"""FFCV loaders: .beton -> uint8 NHWC views on the device, ready for `fastseed.augment`.

SSL pipeline, per image (numba threads, no Python per sample):
    read -> decode ONCE -> for each view: RandomResizedCrop -> flip -> one flat uint8 buffer
    -> ToTensor -> ToDevice(non_blocking)   (one host-to-device copy carries every view)
FFCV's stock RandomResizedCrop decoder decodes the JPEG again for every view; SEED's small-patch
setting (one 224 + six 96 crops) would decode 7 times. `MultiViewDecoder` decodes once.

Batches live in FFCV's ring of `batches_ahead + 2` buffers: a yielded tensor is overwritten a
few batches later. Consume it (or `.clone()` it) before then; the training loop does.

Randomness: the sample order is `seed + epoch` (FFCV's permutation; DistributedSampler with
`distributed=True`, each rank its own shard). Crops and flips come from numba's per-thread
generators and are not reproducible across runs; the GPU augmentation takes a torch generator.

Replayed crops (a teacher cache, `fastseed.cache`): `BoxDecoder` cuts given boxes instead of
drawing them, from a table of one row per image that it reads by address (`_address_view`), so
Python can put each epoch's boxes into it between epochs. `replay_loader` yields
`(views, labels, keys)`: each image's crop of the epoch and the teacher keys stored for it;
`box_loader` yields every stored crop of chosen images (the cache build).

Mid-epoch resume: `loader.epoch = e` picks the permutation of epoch e for the next `iter()`,
and `loader.resume(epoch, batch)` additionally skips the first `batch` batches of that epoch
without reading them. `len(loader)` is always the full epoch.
"""
from __future__ import annotations

import os
import queue
import sys
from dataclasses import replace

import numpy as np
import torch

from fastseed._ffcv import keep_torch_threads
from fastseed.errors import BetonError


def _ignore_numba_teardown(unraisable, _previous=sys.unraisablehook):
    """numba's dispatcher finalizer raises a harmless KeyError for FFCV's generated functions at
    interpreter exit, printed as 'Exception ignored ... Traceback'. Drop exactly that one."""
    tb = unraisable.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if (isinstance(unraisable.exc_value, KeyError) and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith(os.path.join("numba", "core", "dispatcher.py"))):
        return
    _previous(unraisable)


sys.unraisablehook = _ignore_numba_teardown

JPEG_MODE = 0  # RGBImageField's IMAGE_MODES['jpg']
RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (torchvision's default)


def check_beton(path: str | os.PathLike, fields=("image", "label")) -> str:
    """Raise FileNotFoundError / BetonError naming `path` unless it is a readable beton with
    `fields`. FFCV itself would fail later with an unrelated-looking numpy or numba error."""
    keep_torch_threads()
    from ffcv.types import CURRENT_VERSION, FieldDescType, HeaderType
    from ffcv.utils import decode_null_terminated_string

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"beton not found: {path} (write one with fastseed-prep SRC {path})")
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise BetonError(f"{path} is not an FFCV .beton ({size} bytes, shorter than a header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    descs_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    if (header["version"] != CURRENT_VERSION or not 0 < header["num_fields"] < 64
            or not descs_end <= header["alloc_table_ptr"] <= size):
        raise BetonError(f"{path} is not an FFCV .beton (format version {CURRENT_VERSION}); "
                         "write it with fastseed-prep")
    descs = np.fromfile(path, dtype=FieldDescType, count=int(header["num_fields"]), offset=HeaderType.itemsize)
    names = [decode_null_terminated_string(d["name"]) for d in descs]
    missing = [f for f in fields if f not in names]
    if missing:
        raise BetonError(f"{path} has fields {names}, needs {list(fields)}; write it with fastseed-prep")
    if header["num_samples"] == 0:
        raise BetonError(f"{path} holds no samples")
    return path


def image_sizes(path) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) int64 of every image of a beton, from its metadata (nothing decoded)."""
    keep_torch_threads()
    from ffcv.reader import Reader
    reader = Reader(check_beton(path))
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]  # FFCV names metadata fields by position
    return meta["height"].astype(np.int64), meta["width"].astype(np.int64)


def _image_reader(mem_read):
    """A compiled `read(field, storage_state, temp) -> (h, w, 3) uint8`: the sample's whole image,
    decoded into `temp` (JPEG) or viewed in place (raw). Shared by the crop decoders below."""
    from ffcv.libffcv import imdecode
    from ffcv.pipeline.compiler import Compiler

    imdecode_c = Compiler.compile(imdecode)
    jpg = JPEG_MODE

    def read(field, storage_state, temp):
        data = mem_read(field["data_ptr"], storage_state)
        height, width = np.uint32(field["height"]), np.uint32(field["width"])
        if field["mode"] == jpg:
            image = temp[:3 * height * width]
            imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
            return image.reshape(height, width, 3)
        return data.reshape(height, width, 3)

    return Compiler.compile(read)


def _hflip(out):
    """Mirror an (s, s, 3) crop in place (compiled into the decoders)."""
    s = out.shape[1]
    for r in range(out.shape[0]):
        for c in range(s // 2):
            for k in range(3):
                t = out[r, c, k]
                out[r, c, k] = out[r, s - 1 - c, k]
                out[r, s - 1 - c, k] = t


def _views_state_and_memory(previous_state, metadata, view_bytes: int):
    """A crop decoder's `declare_state_and_memory`: its output, one flat uint8 buffer of
    `view_bytes` per sample, and the scratch it decodes each full image into (the largest in
    the beton)."""
    from ffcv.pipeline.allocation_query import AllocationQuery
    u8 = np.dtype("<u1")
    shape = (int(view_bytes),)
    max_pixels = np.uint64(metadata["width"].max()) * np.uint64(metadata["height"].max())
    return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
            (AllocationQuery(shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)))


def _crop_draws():
    """numba functions drawing RandomResizedCrop boxes from a counter-based generator: each
    draw is a hash (splitmix64) of (seed, epoch, sample, view, draw number), so the crops of an
    epoch depend on nothing else: not on the decode threads, not on what was decoded before,
    not on a restart of the process. A resumed run (after a kill, a preemption, torchrun's
    restart) draws exactly the crops the uninterrupted run would have drawn."""
    import numba

    golden, m1, m2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    s30, s27, s31, s11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

    @numba.njit(inline="always")
    def mix(x):
        x = (x ^ (x >> s30)) * m1
        x = (x ^ (x >> s27)) * m2
        return x ^ (x >> s31)

    @numba.njit(inline="always")
    def uniform(key, n):
        """The n-th draw of stream `key`, uniform in [0, 1) with 53 random bits."""
        return np.float64(mix(key + np.uint64(n + 1) * golden) >> s11) * (1.0 / 9007199254740992.0)

    @numba.njit(inline="always")
    def stream(seed, epoch, sample, view):
        return mix(mix(mix(mix(seed) ^ epoch) ^ np.uint64(sample)) ^ np.uint64(view))

    @numba.njit(inline="always")
    def random_crop(key, height, width, scale, log_ratio):
        """torchvision's RandomResizedCrop.get_params (as FFCV's get_random_crop), on `key`'s
        draws: 10 tries of area share ~ U(scale) and log-aspect ~ U(log ratio), the first box
        that fits at y ~ U{0..H-h}, x ~ U{0..W-w}; else the whole image clamped to the ratio
        range, centred. Draws 0-29 at most; the flip uses draw 40."""
        area = height * width
        for t in range(10):
            target = area * (scale[0] + (scale[1] - scale[0]) * uniform(key, 3 * t))
            aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * uniform(key, 3 * t + 1))
            w = int(round(np.sqrt(target * aspect)))
            h = int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                u = uniform(key, 3 * t + 2)
                return int(u * (height - h + 1)), int(uniform(key, 30 + t) * (width - w + 1)), h, w
        in_ratio = width / height
        lo, hi = np.exp(log_ratio[0]), np.exp(log_ratio[1])
        if in_ratio < lo:
            w, h = width, int(round(width / lo))
        elif in_ratio > hi:
            h, w = height, int(round(height * hi))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    return stream, uniform, random_crop


def _multi_view_decoder():
    """Built lazily: importing ffcv pulls numba and OpenCV."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.libffcv import resize_crop
    from ffcv.pipeline.compiler import Compiler

    # A subclass of the field's default decoder, so FFCV uses it as the decoder of the pipeline.
    class MultiViewDecoder(SimpleRGBImageDecoder):
        """Decode each image once, then cut `len(sizes)` RandomResizedCrops (view v: sizes[v]
        px square, area share in scales[v]), each flipped with probability 1/2. Per sample
        the output is one flat uint8 buffer: view v's (s, s, 3) pixels at offsets[v]. The
        crops are drawn from (seed, epoch, sample, view) alone (`_crop_draws`): `state` holds
        (seed, epoch), read by address, and the loader sets the epoch before each pass."""

        def __init__(self, sizes, scales, flip=True, seed: int = 0):
            super().__init__()
            self.sizes = np.asarray(sizes, np.int64)
            self.scales = np.asarray(scales, np.float64).reshape(len(sizes), 2)
            self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes ** 2)]).astype(np.int64)
            self.flip = flip
            self.state = np.array([seed, 0], np.uint64)

        def declare_state_and_memory(self, previous_state):
            return _views_state_and_memory(previous_state, self.metadata, self.offsets[-1])

        def generate_code(self):
            my_range = Compiler.get_iterator()
            read_c, resize_crop_c = _image_reader(self.memory_read), Compiler.compile(resize_crop)
            hflip_c, state_c = Compiler.compile(_hflip), _address_view(self.state)
            stream, uniform, random_crop = _crop_draws()
            sizes, scales, offsets, flip = self.sizes, self.scales, self.offsets, self.flip
            log_ratio = np.log(np.asarray(RATIO))

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                state = state_c()
                for dst_ix in my_range(len(batch_indices)):
                    sample = batch_indices[dst_ix]
                    image = read_c(metadata[sample], storage_state, temp_storage[dst_ix])
                    height, width = image.shape[0], image.shape[1]
                    for v in range(len(sizes)):
                        s = sizes[v]
                        out = destination[dst_ix][offsets[v]:offsets[v + 1]].reshape(s, s, 3)
                        key = stream(state[0], state[1], sample, v)
                        i, j, h, w = random_crop(key, height, width, scales[v], log_ratio)
                        resize_crop_c(image, i, i + h, j, j + w, out)
                        if flip and uniform(key, 40) < 0.5:
                            hflip_c(out)
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiViewDecoder


# Boxes, as the cache stores them and `_box_decoder` replays them: uint16 (y, x, h, w) of a crop of
# the decoded image, with the horizontal flip in the top bit of w (sides stay below 2**15).
FLIP_BIT = 1 << 15


def random_boxes(heights, widths, count: int, scale, rng: np.random.Generator, ratio=RATIO) -> np.ndarray:
    """`count` RandomResizedCrop boxes with flips per image, uint16 (n, count, 4) in the FLIP_BIT
    format. torchvision's get_params, vectorised: 10 tries of area share ~ U(scale) and
    log-aspect ~ U(log ratio), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)),
    the first that fits at y ~ U{0..H-h}, x ~ U{0..W-w}; else the whole image clamped to the
    ratio range, centred. Flip with p 1/2. The draws consume `rng` in a fixed pattern per call."""
    hh = np.asarray(heights, np.int64).reshape(-1, 1, 1)
    ww = np.asarray(widths, np.int64).reshape(-1, 1, 1)
    if hh.size and max(hh.max(), ww.max()) >= FLIP_BIT:
        raise ValueError(f"images up to {FLIP_BIT - 1} px a side can have stored boxes; "
                         "rewrite the beton with fastseed-prep --max-res")
    shape = (hh.shape[0], count, 10)
    area = (hh * ww) * rng.uniform(scale[0], scale[1], shape)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), shape))
    w = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= ww) & (h > 0) & (h <= hh)
    first = fits.argmax(-1)[..., None]
    w, h, found = (np.take_along_axis(a, first, -1)[..., 0] for a in (w, h, fits))
    H, W = hh[..., 0], ww[..., 0]
    y = (rng.random(found.shape) * (H - h + 1)).astype(np.int64)
    x = (rng.random(found.shape) * (W - w + 1)).astype(np.int64)
    # fallback: the largest centred box within the ratio range
    wide, tall = W / H > ratio[1], W / H < ratio[0]
    fw = np.where(wide, np.rint(H * ratio[1]), W).astype(np.int64)
    fh = np.where(tall, np.rint(W / ratio[0]), H).astype(np.int64)
    w, h = np.where(found, w, fw), np.where(found, h, fh)
    y, x = np.where(found, y, (H - h) // 2), np.where(found, x, (W - w) // 2)
    flip = rng.random(found.shape) < 0.5
    return np.stack([y, x, h, w | np.where(flip, FLIP_BIT, 0)], -1).astype(np.uint16)


def _address_view(table: np.ndarray):
    """A compiled `view() -> ndarray` of `table` that reads it through its address. numba freezes
    an array captured by compiled code as a constant (a copy taken at compile time), so a table
    that changes after FFCV compiled its pipeline (the boxes of each epoch) is captured by
    address and shape instead, and viewed at every call: contents rewritten in place are seen
    by the next batch. The caller keeps `table` alive and never reallocates it."""
    import numba
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def pointer(typingctx, address):
        """integer address -> void* (LLVM inttoptr)"""
        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], cgutils.voidptr_t)
        return (types.voidptr(address), codegen) if isinstance(address, types.Integer) else None

    if not table.flags.c_contiguous:
        raise ValueError("a table read by address must be C-contiguous")
    address, shape, dtype = table.ctypes.data, table.shape, table.dtype.type
    return numba.njit(lambda: numba.carray(pointer(address), shape, dtype))


def _box_decoder():
    """Built lazily: importing ffcv pulls numba and OpenCV."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.libffcv import resize_crop
    from ffcv.pipeline.compiler import Compiler

    class BoxDecoder(SimpleRGBImageDecoder):
        """Replay stored boxes: sample i gets V = table.shape[1] views, view v the box table[i, v]
        (FLIP_BIT format) of its decoded image resized to size x size with INTER_AREA (as the
        RandomResizedCrop decoders), mirrored when flagged. One flat uint8 (V*size*size*3)
        buffer per sample. The table (one row per sample of the beton) is read by address: the
        caller may rewrite it between epochs, and must keep that array alive and in place."""

        def __init__(self, table: np.ndarray, size: int):
            super().__init__()
            self.table, self.size = table, int(size)

        def declare_state_and_memory(self, previous_state):
            if self.table.shape[0] != len(self.metadata):
                raise ValueError(f"box table has {self.table.shape[0]} rows for {len(self.metadata)} images")
            return _views_state_and_memory(previous_state, self.metadata,
                                           self.table.shape[1] * self.size * self.size * 3)

        def generate_code(self):
            my_range = Compiler.get_iterator()
            read_c, resize_crop_c = _image_reader(self.memory_read), Compiler.compile(resize_crop)
            hflip_c, table_c = Compiler.compile(_hflip), _address_view(self.table)
            s, views, flip_bit, mask = self.size, self.table.shape[1], FLIP_BIT, FLIP_BIT - 1

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                boxes = table_c()
                for dst_ix in my_range(len(batch_indices)):
                    sample = batch_indices[dst_ix]
                    image = read_c(metadata[sample], storage_state, temp_storage[dst_ix])
                    out = destination[dst_ix].reshape(views, s, s, 3)
                    for v in range(views):
                        y, x = np.int64(boxes[sample, v, 0]), np.int64(boxes[sample, v, 1])
                        h, w = np.int64(boxes[sample, v, 2]), np.int64(boxes[sample, v, 3])
                        resize_crop_c(image, y, y + h, x, x + (w & mask), out[v])
                        if w & flip_bit:
                            hflip_c(out[v])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return BoxDecoder


class BetonLoader:
    """An FFCV `Loader` plus what fastseed needs around it: the (views, labels) split, the
    epoch setter and the mid-epoch skip. Iterate it like a DataLoader."""

    def __init__(self, path, *, batch_size, image_pipeline, split, device, num_workers, order,
                 seed, distributed, drop_last, os_cache, batches_ahead, indices=None):
        keep_torch_threads()
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        path = check_beton(path)
        self.device = torch.device(device)
        # On CPU the FFCV buffer is already where it must be: no ToDevice copy.
        to_device = [] if self.device.type == "cpu" else [ToDevice(self.device, non_blocking=True)]
        self.loader = Loader(
            path, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, order=order,
            distributed=distributed, seed=seed, drop_last=drop_last, batches_ahead=batches_ahead, indices=indices,
            pipelines={"image": [*image_pipeline, ToTensor(), *to_device],
                       "label": [IntDecoder(), ToTensor(), *to_device]})
        self.path, self.batch_size, self._split, self._skip = path, batch_size, split, 0

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return int(self.loader.reader.num_samples)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next `iter()` yields (FFCV permutes with seed + epoch)."""
        return self.loader.next_epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.loader.next_epoch = int(value)

    def resume(self, epoch: int, batch: int = 0) -> None:
        """The next `iter()` yields epoch `epoch` from its batch `batch` on (the skipped batches
        are not read). Only the next iteration is shortened."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"batch {batch} is outside epoch of {len(self)} batches")
        self.epoch, self._skip = epoch, batch

    def __iter__(self):
        from ffcv.loader.epoch_iterator import EpochIterator
        from ffcv.pipeline.compiler import Compiler

        loader, size = self.loader, self.batch_size
        Compiler.set_num_threads(loader.num_workers)
        self._begin(loader.next_epoch)
        try:
            order = loader.next_traversal_order()[:len(loader) * size]
            order = order[self._skip * size:]
            loader.next_epoch += 1
            self._skip = 0
            if loader.code is None:
                loader.generate_code()
            epoch = EpochIterator(loader, order)
            try:
                for b, (images, labels) in enumerate(epoch):
                    yield self._batch(images, labels, order[b * size:(b + 1) * size])
            finally:
                _stop(epoch)
        finally:
            self._end()

    def _begin(self, epoch: int) -> None:
        """Runs before FFCV's thread starts on `epoch` (nothing is decoding then)."""

    def _end(self) -> None:
        """Runs once FFCV's thread of the pass has stopped."""

    def _batch(self, images, labels, indices):
        """What a batch yields; `indices` are its samples' rows in the beton, in batch order."""
        # labels are tiny: copy them, so that a kept label tensor is not overwritten by FFCV's
        # buffer reuse a few batches later (images are consumed at once by the augmentation)
        return self._split(images), labels.view(-1).clone()


class CropLoader(BetonLoader):
    """A BetonLoader over a `MultiViewDecoder`: tells it the epoch whose crops to draw."""

    def __init__(self, path, crop_state: np.ndarray, **kwargs):
        super().__init__(path, **kwargs)
        self._crop_state = crop_state

    def _begin(self, epoch: int) -> None:
        self._crop_state[1] = epoch


class ReplayLoader(BetonLoader):
    """A BetonLoader over a `BoxDecoder` whose table holds, per image, the stored crop that
    `cache` picks for the epoch; each batch also yields the teacher keys of those crops."""

    def __init__(self, path, cache, table: np.ndarray, **kwargs):
        super().__init__(path, **kwargs)
        self.cache, self._table, self._running = cache, table, False

    def _begin(self, epoch: int) -> None:
        if self._running:  # the table is shared: a second live pass would rewrite its crops
            raise RuntimeError("a replay loader serves one pass at a time: finish or close() the "
                               "previous iterator first")
        self._table[:, 0] = self.cache.epoch_boxes(epoch)
        self._running, self._epoch = True, epoch

    def _end(self) -> None:
        self._running = False

    def _batch(self, images, labels, indices):
        views, labels = super()._batch(images, labels, indices)
        return views, labels, self.cache.keys(indices, self._epoch).to(self.device, non_blocking=True)


def _stop(epoch) -> None:
    """End FFCV's EpochIterator thread, finished or not. A pass left early (--max-steps, an
    error, a break) would otherwise leave it decoding into its batch ring, then blocked on the
    full queue for the life of the process, holding batches_ahead + 2 batch buffers. It gets no
    more batches, is told to stop, and has room for its last put; after this nothing writes."""
    epoch.iter_ixes = iter(())  # its next batch ends the epoch (it reads the attribute each time)
    epoch.terminate_event.set()  # a put that finds the queue full returns instead of waiting
    while epoch.is_alive():
        try:
            epoch.output_queue.get_nowait()  # room for a put that does not look at the event
        except queue.Empty:
            pass
        epoch.join(0.05)
    epoch.close()


def ssl_loader(path, *, batch_size: int, res: int, scale=(0.2, 1.0), num_global: int = 1,
               num_small: int = 0, small_res: int = 96, small_scale=(0.05, 0.14), device="cpu",
               num_workers: int = 2, seed: int = 0, distributed: bool = False, drop_last: bool = True,
               os_cache: bool = True, flip: bool = True, batches_ahead: int = 3) -> BetonLoader:
    """Training views: yields `(views, labels)`; `views` is a list of `num_global` uint8
    (B, res, res, 3) tensors then `num_small` uint8 (B, small_res, small_res, 3) tensors, all
    on `device`; labels int64 (B,). Each view is a RandomResizedCrop (area share in `scale` /
    `small_scale`, aspect 3/4-4/3) of the one decoded image, flipped with p 1/2, drawn from
    (seed, epoch, sample, view) alone, so a resumed run sees the same crops. RANDOM order.

    The views are slices of one buffer: contiguous per sample (NHWC), with a sample stride of
    all views together; `torch.cat(views[:num_global])` makes one batch for one augment call.
    """
    keep_torch_threads()
    from ffcv.loader import OrderOption

    if num_global < 1 or num_small < 0:
        raise ValueError(f"need num_global >= 1 and num_small >= 0, got {num_global}, {num_small}")
    sizes = [res] * num_global + [small_res] * num_small
    scales = [scale] * num_global + [small_scale] * num_small
    for s in scales:
        if not 0 < s[0] <= s[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {s}")
    decoder = _multi_view_decoder()(sizes, scales, flip=flip, seed=seed)
    offsets = decoder.offsets.tolist()

    def split(flat):
        return [flat[:, offsets[v]:offsets[v + 1]].view(-1, s, s, 3) for v, s in enumerate(sizes)]

    loader = CropLoader(path, decoder.state, batch_size=batch_size, image_pipeline=[decoder], split=split,
                         device=device, num_workers=num_workers, order=OrderOption.RANDOM, seed=seed,
                         distributed=distributed, drop_last=drop_last, os_cache=os_cache,
                         batches_ahead=batches_ahead)
    loader.sizes = sizes
    return loader


def replay_loader(path, cache, *, batch_size: int, res: int, device="cpu", num_workers: int = 2,
                  seed: int = 0, distributed: bool = False, drop_last: bool = True, os_cache: bool = True,
                  batches_ahead: int = 3) -> ReplayLoader:
    """Training views replayed from a teacher cache (`fastseed.cache.TeacherCache`): yields
    `(views, labels, keys)`. `views` is a list of one uint8 (B, res, res, 3) tensor on `device`:
    for each image, the crop `cache` picks for this epoch (its stored box of the decoded image,
    resized to `res`, flipped as stored); `keys` (B, D) on `device`, in the cache's dtype, are
    the teacher's stored L2-normalised embeddings of exactly those crops. Order, epochs,
    `resume` and sharding as `ssl_loader` (RANDOM, seed + epoch). One pass at a time.

    Per epoch, `cache.epoch_boxes(epoch)` is copied into the decoder's table before FFCV's thread
    starts (N x 8 bytes: 10 MB for ImageNet) and `cache.keys(indices, epoch)` gathers each
    batch's keys; the cache must describe this beton (`cache.check_beton`)."""
    keep_torch_threads()
    from ffcv.loader import OrderOption

    cache.check_beton(path)
    table = np.zeros((cache.num_samples, 1, 4), np.uint16)
    return ReplayLoader(path, cache, table, batch_size=batch_size, image_pipeline=[_box_decoder()(table, res)],
                        split=lambda flat: [flat.view(-1, res, res, 3)], device=device, num_workers=num_workers,
                        order=OrderOption.RANDOM, seed=seed, distributed=distributed, drop_last=drop_last,
                        os_cache=os_cache, batches_ahead=batches_ahead)


def box_loader(path, table: np.ndarray, *, size: int, indices, batch_size: int, device="cpu",
               num_workers: int = 2, os_cache: bool = True, batches_ahead: int = 3) -> BetonLoader:
    """The images `indices` (ascending) in that order, each as its V = table.shape[1] boxes of
    `table` (uint16 (N, V, 4), FLIP_BIT format, one row per image of the beton): yields
    `(crops, labels)`, crops uint8 (B, V, size, size, 3) on `device`. Last batch kept. The table
    is read by address while a pass runs (see `_address_view`): keep it alive and in place."""
    keep_torch_threads()
    from ffcv.loader import OrderOption

    views = table.shape[1]
    return BetonLoader(path, batch_size=batch_size, image_pipeline=[_box_decoder()(table, size)],
                       split=lambda flat: flat.view(-1, views, size, size, 3), device=device,
                       num_workers=num_workers, order=OrderOption.SEQUENTIAL, seed=0, distributed=False,
                       drop_last=False, os_cache=os_cache, batches_ahead=batches_ahead,
                       indices=np.asarray(indices, np.uint64))


def eval_loader(path, *, batch_size: int, res: int, device="cpu", num_workers: int = 2,
                distributed: bool = False, crop_ratio: float = 224 / 256, os_cache: bool = True,
                batches_ahead: int = 3, indices=None) -> BetonLoader:
    """k-NN / linear-probe images: yields `(images, labels)`, images uint8 (B, res, res, 3) on
    `device`: the central square of side `crop_ratio` x the short side, resized to `res` (the
    usual resize-256 / center-crop-224). SEQUENTIAL order, last partial batch kept, no
    augmentation. With `distributed=True` each rank gets an interleaved shard (padded by
    DistributedSampler to equal length, as torch does); `indices` reads just those samples, in
    that order."""
    keep_torch_threads()
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import OrderOption

    return BetonLoader(path, batch_size=batch_size,
                       image_pipeline=[CenterCropRGBImageDecoder((res, res), ratio=crop_ratio)],
                       split=lambda images: images, device=device, num_workers=num_workers,
                       order=OrderOption.SEQUENTIAL, seed=0, distributed=distributed, drop_last=False,
                       os_cache=os_cache, batches_ahead=batches_ahead,
                       indices=None if indices is None else np.asarray(indices, np.uint64))
