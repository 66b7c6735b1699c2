"""A distilled student out of fastseed: ONNX, timm, safetensors and TorchScript files that say
how to feed them, `load_encoder` for Python code, and `embed` for a folder or beton of images.

Every file carries the student's preprocessing and provenance (`metadata`): input resolution,
mean/std, channel order and layout, the center crop, the arch, the method and teacher it was
distilled from, the step and the commit. ONNX keeps them in the model's metadata_props (one
JSON value per key), TorchScript in an extra file `fastseed.json`, timm and safetensors in a
`config.json` beside the weights in the layout timm reads (`pretrained_cfg`, as a Hugging Face
timm repository has it), so `timm.create_model("local-dir:OUTPUT")` loads the folder too.

Preprocessing is what `fastseed-eval` and the k-NN monitor feed the student: the central square
of 224/256 of the short side, resized to the resolution with area interpolation (FFCV's
CenterCropRGBImageDecoder), RGB, scaled to [0, 1], then (x - mean) / std, NCHW float32.

Nothing is half-written: every file goes to a temp file beside its target and is renamed into
place only once complete (and, for ONNX, once it has passed its check).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastseed.checkpoint import RUN_STATE, atomic_save, find_resume, read_checkpoint
from fastseed.config import Config
from fastseed.errors import ExportError
from fastseed.evaluate import load_student
from fastseed.methods import head_of

FORMATS = ("onnx", "timm", "safetensors", "torchscript")
WEIGHT_FILES = {"timm": "pytorch_model.bin", "safetensors": "model.safetensors"}
CROP_RATIO = 224 / 256  # fastseed.data.eval_loader's center crop
ONNX_OPSET = 18
# Max abs difference ONNX Runtime vs PyTorch, in units of max(1, the largest |feature|): 1e-4
# for features of magnitude up to 1. fp32 rounding is relative: a student whose features reach
# 65 (EfficientNet-B0 distilled on Fashion-MNIST) is 8e-4 from float64 in PyTorch itself, so an
# absolute 1e-4 would refuse a correct export. fp16 keeps 11 significant bits (relative step
# 1e-3); over a deep net the rounding adds up to about 1% of the features' scale.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}
EXPORT_EXTRA = {"onnx": ("onnx", "onnxruntime", "onnxscript"), "safetensors": ("safetensors",)}


def require_extra(fmt: str) -> None:
    """The optional packages format `fmt` needs (setup.py extra `export`), or one-line advice."""
    for name in EXPORT_EXTRA.get(fmt, ()):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ExportError(f"--format {fmt} needs the optional package {name}: "
                              "pip install -e '.[export]' installs it") from None


# ---------------------------------------------------------------- reading a student
@dataclass
class Student:
    backbone: nn.Module
    head: nn.Module | None  # the method's head (SEED/MoCo projection, SimReg predictor)
    meta: dict              # the checkpoint's 'fastseed' entry, its 'config' under 'config'
    res: int

    @property
    def module(self) -> nn.Module:
        return (self.backbone if self.head is None else nn.Sequential(self.backbone, self.head)).eval()


def checkpoint_file(path: str | os.PathLike, arch: str | None = None) -> Path:
    """A checkpoint file or DCP folder (an FSDP2 run's checkpoint_last.dcp), or the one of `arch`
    in a run folder (a run of several students writes OUTPUT/<arch>/checkpoint_last.pt, a run of
    one OUTPUT/checkpoint_last.pt; under FSDP2, .dcp folders)."""
    path = Path(path)
    if not path.is_dir() or (path / RUN_STATE).is_file():
        return path
    if arch is not None:
        found = _last_checkpoint(path / arch)
        if found is None:
            raise ExportError(f"{path} has no student {arch} ({path / arch / 'checkpoint_last.pt'} does not exist)")
        return found
    found = _last_checkpoint(path)
    if found is not None:
        return found
    archs = sorted(p.name for p in path.iterdir() if p.is_dir() and _last_checkpoint(p) is not None)
    if archs:
        raise ExportError(f"{path} holds several students ({', '.join(archs)}): pick one with --arch")
    raise ExportError(f"{path} holds no checkpoint_last.pt: pass a fastseed checkpoint or run folder")


def _last_checkpoint(folder: Path) -> Path | None:
    """A run folder's last checkpoint, as `--resume auto` finds it."""
    return find_resume(Config(output=str(folder), resume="auto"))


def method_head(method: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The method's head (its `make_head`), its sizes read from its weights."""
    if not state:
        raise ExportError(f"a --method {method} checkpoint has no embedding head (a patch-token projector, or a "
                          "head per teacher of several, is never exported): export without --with-head")
    return head_of(method, state).eval()


def read_student(checkpoint: str | os.PathLike, *, arch: str | None = None, with_head: bool = False,
                 trust: bool = False, res: int | None = None) -> Student:
    path = checkpoint_file(checkpoint, arch)
    backbone, meta = load_student(str(path), trust)
    if arch is not None and meta["arch"] != arch:
        raise ExportError(f"{path} holds a {meta['arch']} student, not --arch {arch}")
    head = method_head(meta["method"], read_checkpoint(path, trust)["head"]) if with_head else None
    cfg = meta["config"]
    return Student(backbone.eval(), head, meta, res or cfg.get("eval_res") or cfg.get("res", 224))


def metadata(student: Student) -> dict:
    """What a user needs to feed the exported model and to know where it came from."""
    from fastseed.provenance import git_commit
    meta = student.meta
    with torch.inference_mode():
        dim = student.module(torch.zeros(1, 3, student.res, student.res)).shape[1]
    return {
        "arch": meta["arch"], "output": "backbone+head" if student.head is not None else "backbone",
        "num_features": int(dim), "input_size": [3, student.res, student.res],
        "mean": [float(v) for v in meta["mean"]], "std": [float(v) for v in meta["std"]],
        "channel_order": "RGB", "layout": "NCHW", "pixel_scale": "uint8 / 255, then (x - mean) / std",
        "crop_pct": CROP_RATIO, "crop_mode": "center", "interpolation": "area",
        "method": meta["method"], "teacher": meta.get("teacher"), "step": meta["step"],
        "commit": git_commit(),
    }


def timm_config(student: Student, info: dict) -> dict:
    """config.json as timm reads it (hf-hub:, local-dir:): the arch, and a pretrained_cfg with
    the preprocessing; fastseed's full record under 'fastseed'."""
    import timm
    default = timm.create_model(info["arch"], pretrained=False).pretrained_cfg
    return {
        "architecture": info["arch"], "num_classes": 0, "num_features": info["num_features"],
        "pretrained_cfg": {
            "input_size": info["input_size"], "fixed_input_size": False,
            "interpolation": "box",  # PIL's area filter: FFCV resizes with OpenCV INTER_AREA
            "crop_pct": CROP_RATIO, "crop_mode": "center", "mean": info["mean"], "std": info["std"],
            "num_classes": 0, "first_conv": default.get("first_conv"), "classifier": default.get("classifier"),
        },
        "fastseed": info,
    }


# ---------------------------------------------------------------- writing
def temp_beside(target: Path, suffix: str = "") -> Path:
    return target.with_name(f".{target.name}.tmp{os.getpid()}{suffix}")


def _writable(target: Path) -> None:
    if not target.parent.is_dir():
        raise ExportError(f"cannot write {target}: folder {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK):
        raise ExportError(f"cannot write {target}: folder {target.parent} is not writable")


def export_folder(student: Student, fmt: str, target: Path, info: dict) -> list[Path]:
    """timm / safetensors: OUTPUT/<weights> and OUTPUT/config.json."""
    if student.head is not None:
        raise ExportError(f"--format {fmt} holds a timm backbone only: use --format onnx or torchscript "
                          "for backbone + head")
    if target.exists() and not target.is_dir():
        raise ExportError(f"--format {fmt} writes a folder; {target} is a file")
    _writable(target)
    state = {k: v.contiguous() for k, v in student.backbone.state_dict().items()}
    weights, config = temp_beside(target, ".weights"), temp_beside(target, ".json")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(state, str(weights), metadata={"format": "pt"})
        else:
            torch.save(state, weights)
        config.write_text(json.dumps(timm_config(student, info), indent=2) + "\n")
        target.mkdir(exist_ok=True)
        os.replace(weights, target / WEIGHT_FILES[fmt])
        os.replace(config, target / "config.json")
    finally:
        weights.unlink(missing_ok=True)
        config.unlink(missing_ok=True)
    return [target / WEIGHT_FILES[fmt], target / "config.json"]


def export_torchscript(student: Student, tmp: Path, info: dict) -> None:
    example = torch.zeros(2, 3, student.res, student.res)
    with warnings.catch_warnings():  # torch.jit says it is deprecated; --format torchscript asked for it
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(student.module, example)
        torch.jit.save(traced, str(tmp), _extra_files={"fastseed.json": json.dumps(info)})


def export_onnx_graph(student: Student, tmp: Path, info: dict, fp16: bool = False) -> dict:
    """ONNX with a dynamic batch, and dynamic height/width where the arch allows (torch.export
    keeps them symbolic unless the graph fixes them); returns the input's dims as exported."""
    import onnx
    from torch.export import Dim
    example = torch.zeros(2, 3, student.res, student.res)
    try:
        torch.onnx.export(student.module, (example,), str(tmp), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["features"], external_data=False,
                          dynamic_shapes=({0: Dim("batch"), 2: Dim.AUTO, 3: Dim.AUTO},), verbose=False)
    except Exception as e:  # the exporter's errors are pages long; the innermost cause names the problem
        while e.__cause__ is not None:
            e = e.__cause__
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0]
        raise ExportError(f"{info['arch']} cannot be exported to ONNX ({type(e).__name__}: {first}); "
                          "--format torchscript or timm may still work") from None
    model = onnx.load(str(tmp))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    info = info | {"dynamic_spatial": all(isinstance(d, str) for d in dims[2:]),
                   "precision": "fp16" if fp16 else "fp32"}
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        model = convert_float_to_float16(model, keep_io_types=True)  # float32 in and out
    set_metadata(model, info)
    onnx.save(model, str(tmp))
    return info


def set_metadata(model, info: dict) -> None:
    del model.metadata_props[:]
    for key, value in info.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata an ONNX export carries, values decoded."""
    import onnxruntime as ort
    props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    return {k: json.loads(v) for k, v in props.items()}


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_features(session, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features of normalised NCHW float images through an ONNX Runtime session."""
    out = [session.run(None, {"image": images[i:i + batch_size].numpy()})[0]
           for i in range(0, len(images), batch_size)]
    return torch.from_numpy(np.concatenate(out)).float()


def parity(session, module: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Max abs difference between ONNX Runtime and PyTorch features, over the whole batch and
    over its first image alone (a second batch size: the batch dimension is dynamic), and the
    largest |feature| of PyTorch's."""
    with torch.inference_mode():
        ref = module(images)
    diff = max((onnx_features(session, images) - ref).abs().max().item(),
               (onnx_features(session, images[:1]) - ref[:1]).abs().max().item())
    return diff, ref.abs().max().item()


def beton_images(path: str, res: int, mean, std, n: int, workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` images of a labelled beton as the student sees them (normalised NCHW float32)
    and their labels."""
    from fastseed.augment import Normalize
    from fastseed.data import eval_loader
    norm = Normalize(mean, std)
    images, labels = [], []
    for x, y in eval_loader(path, batch_size=min(n, 256), res=res, num_workers=workers, crop_ratio=CROP_RATIO):
        images.append(norm(x))
        labels.append(torch.as_tensor(y).long().flatten())
        if sum(map(len, images)) >= n:
            break
    return torch.cat(images)[:n].float().contiguous(), torch.cat(labels)[:n]


def quantize_int8(fp32: Path, tmp: Path, calib: torch.Tensor, info: dict) -> None:
    """ONNX Runtime static quantisation (QDQ, int8 weights per channel, uint8 activations),
    activation ranges calibrated on `calib` (normalised images)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib.split(32))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch.numpy()}

    prepared = temp_beside(tmp, ".pre.onnx")
    try:  # ONNX Runtime's recommended pre-processing: shape inference and graph optimisation
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        prepared.unlink(missing_ok=True)
    model = onnx.load(str(tmp))
    set_metadata(model, info | {"precision": "int8", "calibration_images": len(calib)})
    onnx.save(model, str(tmp))


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20) -> float:
    from fastseed.evaluate import knn_classify
    return knn_classify(bank, bank_labels, query, query_labels, ks=(k,))[f"knn_top1@{k}"]


def int8_path(target: Path) -> Path:
    return target.with_name(target.name.removesuffix(".onnx") + ".int8.onnx")


def export_onnx(student: Student, target: Path, info: dict, *, fp16: bool = False, check_data: str | None = None,
                calib_data: str | None = None, images: int = 256, workers: int = 2, log=print) -> list[Path]:
    """ONNX, checked with ONNX Runtime against PyTorch before it is renamed into place; with
    `calib_data`, an int8 copy beside it (OUTPUT.int8.onnx) and the k-NN top-1 it costs."""
    if calib_data is not None and check_data is None:
        raise ExportError("--calib-data needs --check-data: the int8 model's k-NN top-1 is measured on "
                          "--check-data images against a --calib-data bank")
    _writable(target)
    mean, std = info["mean"], info["std"]
    if check_data is not None:
        test, test_labels = beton_images(check_data, student.res, mean, std, images, workers)
        source = f"{len(test)} images of {check_data}"
    else:
        test = torch.randn(8, 3, student.res, student.res, generator=torch.Generator().manual_seed(0))
        source = "8 random inputs (--check-data BETON checks on real images)"
    tmp = temp_beside(target, ".onnx")
    written = [target]
    try:
        info = export_onnx_graph(student, tmp, info, fp16)
        session = onnx_session(tmp)
        diff, scale = parity(session, student.module, test)
        tolerance = TOLERANCE[info["precision"]]
        limit = tolerance * max(1.0, scale)
        log(f"ONNX Runtime vs PyTorch on {source}: max abs difference {diff:.2e} (limit {limit:.2e}: "
            f"{info['precision']}, {tolerance:g} x max(1, largest |feature| {scale:.3g}))")
        if not diff <= limit:
            raise ExportError(f"the ONNX model's features differ from PyTorch's by {diff:.2e} > {limit:.2e}: "
                              f"not written ({target} untouched)")
        if calib_data is not None:
            bank, bank_labels = beton_images(calib_data, student.res, mean, std, images, workers)
            tmp8 = temp_beside(int8_path(target), ".onnx")
            try:
                quantize_int8(tmp, tmp8, bank, info)
                before = knn_top1(onnx_features(session, bank), bank_labels, onnx_features(session, test), test_labels)
                q = onnx_session(tmp8)
                after = knn_top1(onnx_features(q, bank), bank_labels, onnx_features(q, test), test_labels)
                log(f"int8 (calibrated on {len(bank)} images of {calib_data}): k-NN top-1 (k=20, bank: those "
                    f"images) on {source}: {info['precision']} {before:.2f}, int8 {after:.2f} "
                    f"({after - before:+.2f} points)")
                os.replace(tmp8, int8_path(target))
                written.append(int8_path(target))
            finally:
                tmp8.unlink(missing_ok=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def export(checkpoint: str | os.PathLike, fmt: str, output: str | os.PathLike, *, arch: str | None = None,
           with_head: bool = False, trust: bool = False, res: int | None = None, fp16: bool = False,
           check_data: str | None = None, calib_data: str | None = None, images: int = 256,
           workers: int = 2, log=print) -> list[Path]:
    """Write a checkpoint's student in format `fmt` to `output`; returns the paths written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt}: use one of {', '.join(FORMATS)}")
    if fmt != "onnx" and (fp16 or check_data or calib_data):
        raise ExportError("--fp16, --check-data and --calib-data are for --format onnx")
    require_extra(fmt)
    target = Path(output).absolute()
    student = read_student(checkpoint, arch=arch, with_head=with_head, trust=trust, res=res)
    info = metadata(student)
    if fmt == "onnx":
        return export_onnx(student, target, info, fp16=fp16, check_data=check_data, calib_data=calib_data,
                           images=images, workers=workers, log=log)
    if fmt in WEIGHT_FILES:
        return export_folder(student, fmt, target, info)
    _writable(target)
    tmp = temp_beside(target)
    try:
        export_torchscript(student, tmp, info)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return [target]


# ---------------------------------------------------------------- using a student
class Preprocess:
    """One image (PIL, or an HxW / HxWx3 uint8 array, RGB) -> the normalised 3 x res x res float32
    tensor the student expects: fastseed's eval crop (FFCV's CenterCropRGBImageDecoder: the
    central square of `crop_ratio` x the short side, OpenCV area resize), / 255, (x - mean) / std."""

    def __init__(self, res: int, mean, std, crop_ratio: float = CROP_RATIO):
        self.res, self.crop_ratio = res, crop_ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        import cv2

        from fastseed.data_prep.sources import to_rgb8
        array = to_rgb8(np.asarray(image.convert("RGB") if hasattr(image, "convert") else image))
        h, w = array.shape[:2]
        c = int(self.crop_ratio * min(h, w))
        top, left = (h - c) // 2, (w - c) // 2
        crop = cv2.resize(array[top:top + c, left:left + c], (self.res, self.res), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(crop).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"Preprocess(res={self.res}, mean={self.mean.flatten().tolist()}, "
                f"std={self.std.flatten().tolist()}, crop_ratio={self.crop_ratio})")


def load_encoder(path: str | os.PathLike, *, arch: str | None = None, trust: bool = False,
                 with_head: bool = False) -> tuple[nn.Module, Preprocess]:
    """`(module, preprocess)` of a fastseed checkpoint (or run folder, `arch` picking a student)
    or of a timm / safetensors export folder: `module(preprocess(image)[None])` is the image's
    feature. The module is in eval mode, on the CPU."""
    path = Path(path)
    if (path / "config.json").is_file():
        import timm
        config = json.loads((path / "config.json").read_text())
        info = config["fastseed"]
        weights = next((path / f for f in WEIGHT_FILES.values() if (path / f).is_file()), None)
        if weights is None:
            raise ExportError(f"{path} has a config.json but no {' or '.join(WEIGHT_FILES.values())}")
        module = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                                   pretrained_cfg_overlay=dict(file=str(weights))).eval()
        return module, Preprocess(info["input_size"][-1], info["mean"], info["std"], info["crop_pct"])
    student = read_student(path, arch=arch, with_head=with_head, trust=trust)
    return student.module, Preprocess(student.res, student.meta["mean"], student.meta["std"])


def embed(encoder: str | os.PathLike, data: str, output: str | os.PathLike, *, arch: str | None = None,
          trust: bool = False, device: str = "auto", batch_size: int = 256, workers: int = 2,
          progress: bool = True) -> tuple[int, int]:
    """L2-normalised features of every image of the beton `data`, in its order, saved as a
    float32 [N, D] .npy at `output` (written beside, then renamed). bf16 autocast on CUDA.
    Returns (N, D)."""
    import torch.nn.functional as F
    from tqdm import tqdm

    from fastseed.augment import Normalize
    from fastseed.data import eval_loader
    from fastseed.evaluate import extract_features
    target = Path(output).absolute()
    _writable(target)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    module, pre = load_encoder(encoder, arch=arch, trust=trust)
    module = module.to(dev).to(memory_format=torch.channels_last)
    loader = eval_loader(data, batch_size=batch_size, res=pre.res, device=dev, num_workers=workers,
                         crop_ratio=pre.crop_ratio)
    norm = Normalize(pre.mean.flatten().tolist(), pre.std.flatten().tolist()).to(dev)
    feats, _ = extract_features(module, tqdm(loader, desc="embed", unit="batch", disable=not progress,
                                             file=sys.stderr),
                                device=dev, transform=norm,
                                dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    array = F.normalize(feats, dim=1).cpu().numpy().astype(np.float32)
    tmp = temp_beside(target)
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return array.shape


__all__ = ["FORMATS", "ExportError", "Preprocess", "embed", "export", "load_encoder", "metadata",
           "read_onnx_metadata", "read_student"]


def export_timm_state_dict(checkpoint: str, path: str | Path, trust: bool = False) -> dict:
    """The backbone of `checkpoint` as a bare timm state dict at `path` (`fastseed-eval --export`):
    ``timm.create_model(meta['arch'], num_classes=0).load_state_dict(torch.load(path))``."""
    model, meta = load_student(checkpoint, trust)
    atomic_save(model.state_dict(), Path(path))
    return meta
