"""LightlyTrain's side of the recipe study (benchmarks/recipes_lightly.py describes it): fastseed's
teacher shaped for LightlyTrain's three teacher interfaces, the train subset as a PNG folder, and
one `lightly_train.pretrain` run. LightlyTrain is not a dependency of fastseed: only its venv
(recipes_lightly.py's) imports this module, with fastseed from the checkout (PYTHONPATH=.)."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from _bench.data import mnist_5k_npz

os.environ.setdefault("LIGHTLY_TRAIN_EVENTS_DISABLED", "1")  # no telemetry (and no network here)

METHODS = ("distillation", "distillationv2", "distillationv1")
TRANSFORMS = ("crop-flip", "own")
RES, TEACHER_RES, TEACHER, STUDENT = 32, 48, "efficientnet_lite0", "resnet18"  # the grey sets'
CROP_SCALE, WORKERS = (0.6, 1.0), 2
MEAN, STD = (0.5,) * 3, (0.5,) * 3  # the bundled teacher's; the student's inputs, the k-NN's and the probe's


def transform_args(transforms: str, res: int) -> dict:
    """`lightly_train.pretrain`'s transform_args: "own" sets only the image size and the
    normalisation (the rest is the method's default); "crop-flip" is fastseed's demo crops."""
    own = {"image_size": (res, res), "normalize": {"mean": MEAN, "std": STD}}
    if transforms == "own":
        return own
    if transforms == "crop-flip":
        return {**own, "random_resize": {"min_scale": CROP_SCALE[0], "max_scale": CROP_SCALE[1]},
                "random_flip": {"horizontal_prob": 0.5, "vertical_prob": 0.0}, "color_jitter": None,
                "random_gray_scale": None, "gaussian_blur": None}
    raise ValueError(f"unknown transforms {transforms!r}: {', '.join(TRANSFORMS)}")


class TeacherAtSide(nn.Module):
    """A frozen fastseed teacher backbone on its inputs resized to `res`, shaped for LightlyTrain's
    three teacher interfaces: v1 calls it (pooled [B, D]) and reads `embed_dim`; v2 calls
    `get_intermediate_layers` and reads `embed_dim`; v3 wants a ModelWrapper (forward_features,
    forward_pool, feature_dim, get_model). It stays in eval mode."""

    def __init__(self, backbone: nn.Module, res: int):
        super().__init__()
        self.backbone, self.res, self.embed_dim = backbone, res, backbone.num_features
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> TeacherAtSide:
        return super().train(False)  # BatchNorm keeps its ImageNet statistics whoever asks

    def _resized(self, x: torch.Tensor) -> torch.Tensor:
        from fastseed.models import resize
        return resize(x, self.res)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self._resized(x))

    def forward_features(self, x: torch.Tensor) -> dict:
        return {"features": self.backbone.forward_features(self._resized(x))}

    def forward_pool(self, out: dict) -> dict:
        return {"pooled_features": out["features"].mean((2, 3), keepdim=True)}

    def feature_dim(self) -> int:
        return self.embed_dim

    def get_model(self) -> nn.Module:
        return self

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1, reshape: bool = True, **_) -> tuple:
        """v2's call: the last feature map [B, D, h, w], the only map of width D (n = 1 only)."""
        if n != 1 or not reshape:
            raise ValueError(f"the teacher has one map of width {self.embed_dim}: n_teacher_blocks must be 1 "
                             f"and reshape True (got n={n}, reshape={reshape})")
        return (self.forward_features(x)["features"],)


def png_folder(dataset: str, size: dict, work: Path) -> Path:
    """The train subset as PNGs (00000.png ...), written once: the images of the train beton.
    The grey sets: from the same source and the same seeded draw (`write_beton`'s
    `subset_indices`); stamps: read back from its train beton (`stamps_betons(work)`)."""
    import numpy as np
    from PIL import Image

    from fastseed.data import image_sizes

    folder = work / f"{dataset}_train_png"
    if folder.is_dir():
        return folder
    tmp = work / f".{folder.name}.tmp"
    tmp.mkdir(exist_ok=True)
    if dataset == "stamps":
        beton = work / "stamps_train.beton"
        heights, widths = image_sizes(beton)
        n = 0
        for n, image in enumerate(beton_images(beton), 1):
            Image.fromarray(image).save(tmp / f"{n - 1:05d}.png")
        if n != len(heights):
            raise SystemExit(f"{n} images read, the train beton holds {len(heights)}")
        tmp.rename(folder)
        return folder
    from fastseed.data_prep.sources import open_source, subset_indices
    if dataset == "fashion-mnist":
        source = "fashion-mnist:train"
    else:
        source = str(work / "mnist5k_train.npz")
        if not Path(source).exists():
            mnist_5k_npz(work)
    src = open_source(source)
    indices = subset_indices(len(src), size["train"])
    heights, widths = image_sizes(work / f"{dataset}_train.beton")
    for j, i in enumerate(indices):
        image = src.load(int(i))[0]
        if image.shape[:2] != (heights[j], widths[j]):
            raise SystemExit(f"image {j} is {image.shape[:2]} here but {heights[j]}x{widths[j]} in the beton")
        Image.fromarray(np.ascontiguousarray(image)).save(tmp / f"{j:05d}.png")
    if len(indices) != len(heights):
        raise SystemExit(f"{len(indices)} images drawn, the train beton holds {len(heights)}")
    tmp.rename(folder)
    return folder


def beton_images(path: Path, batch: int = 256):
    """Every image of a beton whose images share one size, in order, as uint8 [H, W, 3] arrays
    (stored pixels, nothing resized)."""
    import numpy as np
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import OrderOption

    from fastseed.data import BetonLoader

    loader = BetonLoader(str(path), batch_size=batch, image_pipeline=[SimpleRGBImageDecoder()],
                         split=lambda images: images, device="cpu", num_workers=WORKERS,
                         order=OrderOption.SEQUENTIAL, seed=0, distributed=False, drop_last=False, os_cache=True,
                         batches_ahead=2)
    for images, _ in loader:
        for image in images.numpy():
            yield np.array(image)  # a copy: FFCV reuses its batch buffers


def _patch_teacher(method: str, teacher) -> dict:
    """method_args handing `teacher` to `method` (see the docstring: how each takes it)."""
    if method == "distillation":
        return {"teacher": teacher}
    if method == "distillationv1":
        from lightly_train._methods.distillation import distillation as v1
        v1.get_teacher = lambda *args, **kwargs: teacher
        return {"teacher": f"fastseed/{TEACHER}"}  # a name, for its logs; not loaded
    if method == "distillationv2":
        from lightly_train._methods.distillationv2 import distillationv2 as v2
        v2.get_teacher = lambda *args, **kwargs: teacher
        return {"teacher": f"fastseed/{TEACHER}", "n_teacher_blocks": 1}
    raise ValueError(f"unknown method {method!r}: {', '.join(METHODS)}")


def train_lightly(method: str, data: Path, out: Path, size: dict, seed: int, n_train: int, teacher,
                  precision: str = "auto", *, res: int = RES, transforms: str = "crop-flip") -> dict:
    """One LightlyTrain run of `size["steps"]` steps of `size["batch"]`; returns its timing and the
    epochs it was given. `precision`: its `pretrain` argument (auto is 32-true on a CPU)."""
    import lightly_train
    import timm

    method_args = _patch_teacher(method, teacher)
    torch.manual_seed(seed)
    student = timm.create_model(STUDENT, pretrained=False, num_classes=0)
    epochs = math.ceil(size["steps"] / (n_train // size["batch"]))
    t = time.perf_counter()
    lightly_train.pretrain(
        out=str(out), data=str(data), model=student, method=method, method_args=method_args,
        epochs=epochs, batch_size=size["batch"], num_workers=WORKERS, accelerator="cpu", devices=1, seed=seed,
        overwrite=True, trainer_args={"max_steps": size["steps"]}, precision=precision,
        transform_args=transform_args(transforms, res))
    train_s = time.perf_counter() - t
    return {"epochs": epochs, "train_s": round(train_s, 1),
            "images_per_s": round(size["steps"] * size["batch"] / train_s, 1)}
