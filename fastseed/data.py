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


class BetonError(ValueError):
    """A file that is not a usable .beton; the message names it and says what to do."""


def check_beton(path: str | os.PathLike, fields=("image", "label")) -> str:
    """Raise FileNotFoundError / BetonError naming `path` unless it is a readable beton with
    `fields`. FFCV itself would fail later with an unrelated-looking numpy or numba error."""
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


def _multi_view_decoder():
    """Built lazily: importing ffcv pulls numba and OpenCV."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    # A subclass of the field's default decoder, so FFCV uses it as the decoder of the pipeline.
    class MultiViewDecoder(SimpleRGBImageDecoder):
        """Decode each image once, then cut `len(sizes)` RandomResizedCrops (view v: sizes[v]
        px square, area share in scales[v]), each flipped with probability 1/2. Per sample
        the output is one flat uint8 buffer: view v's (s, s, 3) pixels at offsets[v]."""

        def __init__(self, sizes, scales, flip=True):
            super().__init__()
            self.sizes = np.asarray(sizes, np.int64)
            self.scales = np.asarray(scales, np.float64).reshape(len(sizes), 2)
            self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes ** 2)]).astype(np.int64)
            self.flip = flip

        def declare_state_and_memory(self, previous_state):
            max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
            shape = (int(self.offsets[-1]),)
            u8 = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=u8),
                    (AllocationQuery(shape, u8), AllocationQuery((max_pixels * np.uint64(3),), u8)))

        def generate_code(self):
            mem_read, my_range = self.memory_read, Compiler.get_iterator()
            imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
            get_crop_c = Compiler.compile(get_random_crop)
            sizes, scales, offsets, flip = self.sizes, self.scales, self.offsets, self.flip
            ratio = np.asarray(RATIO)
            jpg = JPEG_MODE

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                for dst_ix in my_range(len(batch_indices)):
                    field = metadata[batch_indices[dst_ix]]
                    data = mem_read(field["data_ptr"], storage_state)
                    height, width = np.uint32(field["height"]), np.uint32(field["width"])
                    if field["mode"] == jpg:
                        image = temp_storage[dst_ix][:3 * height * width]
                        imdecode_c(data, image, height, width, height, width, 0, 0, 1, 1, False, False)
                        image = image.reshape(height, width, 3)
                    else:
                        image = data.reshape(height, width, 3)
                    for v in range(len(sizes)):
                        s = sizes[v]
                        out = destination[dst_ix][offsets[v]:offsets[v + 1]].reshape(s, s, 3)
                        i, j, h, w = get_crop_c(height, width, scales[v], ratio)
                        resize_crop_c(image, i, i + h, j, j + w, out)
                        if flip and np.random.rand() < 0.5:
                            for r in range(s):
                                for c in range(s // 2):
                                    for k in range(3):
                                        t = out[r, c, k]
                                        out[r, c, k] = out[r, s - 1 - c, k]
                                        out[r, s - 1 - c, k] = t
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiViewDecoder


class BetonLoader:
    """An FFCV `Loader` plus what fastseed needs around it: the (views, labels) split, the
    epoch setter and the mid-epoch skip. Iterate it like a DataLoader."""

    def __init__(self, path, *, batch_size, image_pipeline, split, device, num_workers, order,
                 seed, distributed, drop_last, os_cache, batches_ahead):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.transforms import ToDevice, ToTensor

        path = check_beton(path)
        self.device = torch.device(device)
        # On CPU the FFCV buffer is already where it must be: no ToDevice copy.
        to_device = [] if self.device.type == "cpu" else [ToDevice(self.device, non_blocking=True)]
        self.loader = Loader(
            path, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, order=order,
            distributed=distributed, seed=seed, drop_last=drop_last, batches_ahead=batches_ahead,
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

        loader = self.loader
        Compiler.set_num_threads(loader.num_workers)
        order = loader.next_traversal_order()[:len(loader) * self.batch_size]
        order = order[self._skip * self.batch_size:]
        loader.next_epoch += 1
        self._skip = 0
        if loader.code is None:
            loader.generate_code()
        epoch = EpochIterator(loader, order)
        try:
            for images, labels in epoch:
                # labels are tiny: copy them, so that a kept label tensor is not overwritten by FFCV's
                # buffer reuse a few batches later (images are consumed at once by the augmentation)
                yield self._split(images), labels.view(-1).clone()
        finally:
            _stop(epoch)


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
    `small_scale`, aspect 3/4-4/3) of the one decoded image, flipped with p 1/2. RANDOM order.

    The views are slices of one buffer: contiguous per sample (NHWC), with a sample stride of
    all views together; `torch.cat(views[:num_global])` makes one batch for one augment call.
    """
    from ffcv.loader import OrderOption

    if num_global < 1 or num_small < 0:
        raise ValueError(f"need num_global >= 1 and num_small >= 0, got {num_global}, {num_small}")
    sizes = [res] * num_global + [small_res] * num_small
    scales = [scale] * num_global + [small_scale] * num_small
    for s in scales:
        if not 0 < s[0] <= s[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {s}")
    decoder = _multi_view_decoder()(sizes, scales, flip=flip)
    offsets = decoder.offsets.tolist()

    def split(flat):
        return [flat[:, offsets[v]:offsets[v + 1]].view(-1, s, s, 3) for v, s in enumerate(sizes)]

    loader = BetonLoader(path, batch_size=batch_size, image_pipeline=[decoder], split=split,
                         device=device, num_workers=num_workers, order=OrderOption.RANDOM, seed=seed,
                         distributed=distributed, drop_last=drop_last, os_cache=os_cache,
                         batches_ahead=batches_ahead)
    loader.sizes = sizes
    return loader


def eval_loader(path, *, batch_size: int, res: int, device="cpu", num_workers: int = 2,
                distributed: bool = False, crop_ratio: float = 224 / 256, os_cache: bool = True,
                batches_ahead: int = 3) -> BetonLoader:
    """k-NN / linear-probe images: yields `(images, labels)`, images uint8 (B, res, res, 3) on
    `device`: the central square of side `crop_ratio` x the short side, resized to `res` (the
    usual resize-256 / center-crop-224). SEQUENTIAL order, last partial batch kept, no
    augmentation. With `distributed=True` each rank gets an interleaved shard (padded by
    DistributedSampler to equal length, as torch does)."""
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import OrderOption

    return BetonLoader(path, batch_size=batch_size,
                       image_pipeline=[CenterCropRGBImageDecoder((res, res), ratio=crop_ratio)],
                       split=lambda images: images, device=device, num_workers=num_workers,
                       order=OrderOption.SEQUENTIAL, seed=0, distributed=distributed, drop_last=False,
                       os_cache=os_cache, batches_ahead=batches_ahead)
