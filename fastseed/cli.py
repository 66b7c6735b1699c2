"""Entry points: `fastseed-train`, `fastseed-eval`, `fastseed-prep`, `fastseed-cache`, `fastseed-export`,
`fastseed-embed`.

Bad input (missing data, unknown arch, a teacher checkpoint that does not fit) ends with one
line on stderr naming the problem and what to do, exit code 2, and nothing written over.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fastseed.config import Config, demo, fit_workers, official
from fastseed.folders import resolve_config

USAGE_ERROR = 2


def _pair(text: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def _floats(text: str) -> float | tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastseed-train",
        description="Self-supervised distillation (SEED, SimReg) and MoCo-v2. With no --data, runs the "
                    "embedded demo: Fashion-MNIST, ImageNet EfficientNet-Lite0 teacher, ResNet-18 student.",
        argument_default=argparse.SUPPRESS)
    from fastseed.augment import PRESETS
    a = p.add_argument
    a("--method", choices=["seed", "simreg", "moco"])
    a("--recipe", choices=["fastseed", "official"],
      help="fastseed: fastseed's defaults (per-step warm-up and cosine); official: the method's official "
           "lr, epochs, weight decay, per-epoch schedule (README, Defaults). Flags given win over either")
    a("-a", "--arch", help="student: any timm model name (default resnet18), or a comma list to distil them "
                           "all in one run: one loader, augmentation, teacher forward and queue")
    a("-k", "--teacher-arch", dest="teacher_arch", help="teacher arch (resnet50, resnet50w2, efficientnet_lite0, ...)")
    a("--teacher-ssl", dest="teacher_ssl", help="teacher checkpoint format (default auto-detect)")
    a("--distill", help="teacher checkpoint (MoCo, SwAV, SimCLR, BYOL, DINO, timm, fastseed)")
    a("--teacher-no-head", dest="teacher_use_head", action="store_const", const=False,
      help="distil the teacher's backbone feature instead of its projection")
    a("--trust-checkpoint", dest="trust_checkpoint", action="store_const", const=True,
      help="let --distill/--resume files hold arbitrary Python objects; unpickling them runs code "
           "from the file: only for files you trust")
    a("--data", help="train .beton (from fastseed-prep), or an image folder (written once to a cached .beton "
                     "beside --output)")
    a("--teacher-cache", dest="teacher_cache",
      help="train from a fastseed-cache file of --data: each image's stored crop of the epoch and the teacher's "
           "stored key (no teacher forward). Its header names the teacher: -k/--distill may be left out; "
           "given, they must match it")
    a("--val-data", dest="val_data", help="val .beton (or image folder) for k-NN monitoring")
    a("--knn-bank", dest="knn_bank", help="labelled .beton used as the k-NN memory bank (default --data)")
    a("--output", help="output directory (checkpoints, metrics.jsonl)")
    a("--resume", help="checkpoint path, or 'auto' for OUTPUT/checkpoint_last.pt (several students: 'auto', or "
                       "the earlier run's OUTPUT)")
    a("--device", help="auto, cuda or cpu")
    a("--lr", type=_floats, help="learning rate (default 0.03 x batch/256); with several students one for all "
                                 "or a comma list, one per student")
    a("-b", "--batch-size", dest="batch_size", type=int, help="global batch size")
    a("--epochs", type=int)
    a("--max-steps", dest="max_steps", type=int, help="stop after this many steps")
    a("--temp", type=float, help="student temperature (MoCo: InfoNCE temperature)")
    a("--distill-t", dest="distill_t", type=float, help="teacher temperature")
    a("--queue-size", "--moco-k", dest="queue_size", type=int, help="queue length K")
    a("--moco-m", dest="moco_m", type=float)
    a("--dim", type=int, help="embedding dim (MoCo head; SEED uses the teacher's)")
    a("--simreg-target", dest="simreg_target", choices=["backbone", "projection"])
    a("--res", type=int, help="crop resolution")
    a("--teacher-res", dest="teacher_res", type=int, help="resize the crop to this for the teacher")
    a("--aug", choices=["auto", *PRESETS],
      help="augmentation preset (default auto: SimReg weak, MoCo moco_v2, SEED by teacher format: swav, "
           "simclr, else moco_v2)")
    a("--crop-scale", dest="crop_scale", type=_pair,
      help="RandomResizedCrop scale, e.g. 0.2,1 (default: the --aug preset's)")
    a("--small-crops", dest="small_crops", type=int, help="SEED small-patch: number of small crops (6)")
    a("--small-res", dest="small_res", type=int)
    a("--small-enqueue", dest="small_enqueue", choices=["first", "all"],
      help="keys entering the small-crop queue: first (official: crop 0 of each image, at the large "
           "queue's pointer) or all (every small crop)")
    a("--workers", type=int, help="FFCV decode threads (default: the CPU cores this process may use)")
    a("--wd", "--weight-decay", dest="weight_decay", type=float)
    a("--momentum", type=float)
    a("--warmup-epochs", dest="warmup_epochs", type=float)
    a("--optimizer", choices=["sgd", "lars", "adamw"])
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    a("--compile", choices=["auto", "on", "off"])
    a("--compile-mode", dest="compile_mode")
    a("--no-channels-last", dest="channels_last", action="store_const", const=False)
    a("--fsdp", action="store_const", const=True, help="FSDP2 (fully_shard) instead of DDP under torchrun")
    a("--seed", type=int)
    a("--log-every", dest="log_every", type=int)
    a("--ckpt-every", dest="ckpt_every", type=int, help="checkpoint every N steps (and every epoch end)")
    a("--knn-every", dest="knn_every", type=int, help="k-NN monitor every N epochs (0: at the end only)")
    a("--profile", action="store_const", const=True, help="profile a few steps and write reports")
    a("--no-progress", dest="progress", action="store_const", const=False)
    a("--table", dest="final_table", action="store_const", const=True,
      help="k-NN of raw pixels, teacher, student at init and distilled student at the end")
    return p


def config_from_args(argv: list[str] | None) -> Config:
    args = vars(train_parser().parse_args(argv))
    if args.pop("recipe", "fastseed") == "official":
        base = official(args.get("method", "seed"))
    else:
        base = demo() if "data" not in args else Config()
    if "teacher_cache" in args and "teacher_arch" not in args:
        # the cache names its teacher: no -k needed (one given is checked against it)
        from fastseed.cache import TeacherCache
        args["teacher_arch"] = TeacherCache.open(args["teacher_cache"]).header["teacher"]["arch"]
    return base.replace(**args)


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return USAGE_ERROR


def _known_errors():
    from fastseed.cache import CacheError
    from fastseed.data import BetonError
    from fastseed.data_prep import PrepError
    from fastseed.models import ConfigError
    from fastseed.teachers import CheckpointReadError, TeacherLoadError
    from fastseed.train import TrainingError
    return (ConfigError, TeacherLoadError, CheckpointReadError, TrainingError, PrepError, BetonError,
            CacheError, FileNotFoundError)


def demo_data_jobs(cfg: Config) -> list[tuple[str, str | None, int | None]]:
    """(source, beton, --subset) of each beton the demo writes (benchmarks/gpu_wheels.py carries
    only the Fashion-MNIST images these read)."""
    return [("fashion-mnist:train", cfg.data, 32_000), ("fashion-mnist:test", cfg.val_data, None),
            ("fashion-mnist:train", cfg.knn_bank, 10_000)]


def prepare_demo_data(cfg: Config) -> None:
    """Write the demo's Fashion-MNIST betons once; later runs reuse them."""
    from fastseed.data_prep import write_beton
    for source, path, subset in demo_data_jobs(cfg):
        if path and not Path(path).exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            print(f"fastseed-prep {source} {path}" + (f" --subset {subset}" if subset else ""), file=sys.stderr)
            write_beton(source, path, subset=subset, compress_probability=0.0, progress=False)


def check_inputs(cfg: Config) -> None:
    from fastseed.data import BetonError, check_beton
    from fastseed.models import ConfigError, create_student
    from fastseed.teachers import BUNDLED
    if cfg.data is None:
        raise FileNotFoundError("no --data: pass a .beton written by fastseed-prep")
    for name, path in (("--data", cfg.data), ("--val-data", cfg.val_data), ("--knn-bank", cfg.knn_bank)):
        if path:
            try:
                check_beton(path)
            except (FileNotFoundError, BetonError) as e:
                raise ConfigError(f"{name}: {e}") from None
    from fastseed.students import student_configs
    for c in student_configs(cfg):  # a bad -a / --lr list, an unknown arch -> ConfigError before anything is written
        create_student(c.arch)
    if (cfg.method in ("seed", "simreg") and cfg.distill is None and cfg.teacher_arch not in BUNDLED
            and cfg.teacher_cache is None):
        raise FileNotFoundError(f"teacher {cfg.teacher_arch} needs weights: pass --distill CHECKPOINT, "
                                f"or use a bundled teacher with -k {BUNDLED[0]}")
    if cfg.method in ("seed", "simreg") and cfg.distill is not None and not Path(cfg.distill).is_file():
        raise FileNotFoundError(f"--distill {cfg.distill} does not exist")


def train_main(argv: list[str] | None = None) -> int:
    try:
        cfg = config_from_args(argv)
        if cfg.data == demo().data:
            prepare_demo_data(cfg)
        cfg = resolve_config(cfg)
        check_inputs(cfg)
        from fastseed.train import train
        t0 = time.time()
        if cfg.profile:
            from fastseed.profile import profile
            profile(cfg)
            return 0
        out = train(cfg)
    except KeyboardInterrupt:
        return 130
    except _known_errors() as e:
        return _fail(str(e).strip("'\""))
    if out["results"]:
        print_table(out["results"], cfg)
    from fastseed.students import student_configs
    ckpts = ", ".join(str(c.out_dir / "checkpoint_last.pt") for c in student_configs(cfg))
    print(f"done: {out['step']} steps in {time.time() - t0:.0f} s; checkpoint {ckpts}, "
          f"metrics {cfg.out_dir / 'metrics.jsonl'}")
    if out["failed"]:
        return _fail(" | ".join(out["failed"]))
    return 0


def print_table(results: dict, cfg: Config) -> None:
    """Raw pixels, the teacher, then each student at init and distilled (`-a` order)."""
    from fastseed.students import student_configs
    archs = [c.arch for c in student_configs(cfg)]
    rows = [("raw pixels", "raw_pixels"), (f"teacher ({cfg.teacher_arch})", "teacher")]
    if len(archs) == 1:
        rows += [(f"student at init ({cfg.arch})", "student_init"), (f"student distilled ({cfg.method})", "student")]
    else:
        rows += [row for a in archs for row in ((f"{a} at init", f"student_init/{a}"),
                                                (f"{a} distilled ({cfg.method})", f"student/{a}"))]
    key = f"knn_top1@{cfg.knn_k}"
    width = max(34, *(len(label) for label, _ in rows))
    print(f"\nk-NN top-1 (k={cfg.knn_k}, T={cfg.knn_t}) on {cfg.val_data}")
    print(f"| {'features':<{width}} | {'top-1 %':>7} |")
    print(f"|{'-' * (width + 2)}|{'-' * 9}|")
    for label, name in rows:
        if name in results:
            print(f"| {label:<{width}} | {results[name][key]:7.2f} |")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastseed-eval", description="k-NN (and linear probe) of a checkpoint's "
                                "student backbone; prints JSON.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--train-data", help="labelled .beton: the k-NN bank / probe train set")
    p.add_argument("--val-data")
    p.add_argument("--export", metavar="PATH", help="write the distilled backbone (no head) as a timm state "
                   "dict: timm.create_model(arch, num_classes=0).load_state_dict(torch.load(PATH))")
    p.add_argument("--res", type=int, default=None, help="eval resolution (default: the checkpoint's)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 20, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--linear", action="store_true", help="also a linear probe on frozen features")
    p.add_argument("--trust-checkpoint", action="store_true", help="let the checkpoint hold arbitrary Python "
                   "objects; unpickling them runs code from the file: only for files you trust")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    return p


def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    if not args.export and not (args.train_data and args.val_data):
        return _fail("pass --train-data and --val-data to evaluate, and/or --export PATH")
    try:
        if args.export:
            from fastseed.evaluate import load_student
            from fastseed.train import atomic_save
            model, meta = load_student(args.checkpoint, args.trust_checkpoint)
            atomic_save(model.state_dict(), Path(args.export))
            print(f"wrote {args.export}: {meta['arch']} backbone, step {meta['step']}", file=sys.stderr)
            if not (args.train_data and args.val_data):
                return 0
        from fastseed.evaluate import evaluate_checkpoint
        result = evaluate_checkpoint(args.checkpoint, args.train_data, args.val_data, res=args.res, ks=args.k,
                                     temperature=args.temperature, linear=args.linear, device=args.device,
                                     batch_size=args.batch_size, workers=fit_workers(args.workers),
                                     trust=args.trust_checkpoint)
    except _known_errors() as e:
        return _fail(str(e).strip("'\""))
    print(json.dumps(result, indent=2))
    return 0


def prep_main(argv: list[str] | None = None) -> int:
    from fastseed.data_prep import main
    return main(argv)


CACHE_ONLY = ("output", "crops", "dtype", "batch_size", "chunk")  # not Config fields: the build's own


def cache_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastseed-cache",
        description="Run the frozen teacher once on R stored crops of every image of a beton and write "
                    "their L2-normalised keys and crop boxes to a cache file, for training without the "
                    "teacher in the loop. Resumable: rerun the same command after a kill.",
        argument_default=argparse.SUPPRESS)
    a = p.add_argument
    a("--data", required=True, help="train .beton (from fastseed-prep), or an image folder (written once to a "
                                    "cached .beton beside --output)")
    a("--output", required=True, help="the cache file to write, e.g. train.tcache")
    a("-k", "--teacher-arch", dest="teacher_arch", help="teacher arch (resnet50, efficientnet_lite0, ...)")
    a("--teacher-ssl", dest="teacher_ssl", help="teacher checkpoint format (default auto-detect)")
    a("--distill", help="teacher checkpoint")
    a("--teacher-no-head", dest="teacher_use_head", action="store_const", const=False,
      help="cache the teacher's backbone feature instead of its projection")
    a("--method", choices=["seed", "simreg"], help="the method the keys are for (simreg: backbone features "
      "unless --simreg-target projection)")
    a("--simreg-target", dest="simreg_target", choices=["backbone", "projection"])
    a("--teacher-res", dest="teacher_res", type=int, help="the teacher's input side (default 224)")
    from fastseed.augment import PRESETS
    a("--aug", choices=["auto", *PRESETS],
      help="the augmentation preset whose crop scale the boxes are drawn with (default auto: as fastseed-train "
           "picks it from --method and the teacher's format); the colour ops are never applied to the teacher")
    a("--crop-scale", dest="crop_scale", type=_pair,
      help="RandomResizedCrop scale, e.g. 0.2,1 (default: the --aug preset's)")
    a("--crops", type=int, default=10, help="R: crops stored per image (default 10)")
    a("--seed", type=int, help="draws the crops (default 0)")
    a("--dtype", choices=["bf16", "fp16"], default="bf16", help="stored key dtype (default bf16)")
    a("-b", "--batch-size", dest="batch_size", type=int, default=256,
      help="at most this many crops per teacher forward (256)")
    a("--chunk", type=int, default=2520,
      help="images per progress record (2520): a kill loses at most one record's work")
    a("--workers", type=int)
    a("--device", help="auto, cuda or cpu")
    a("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    a("--compile", choices=["auto", "on", "off"])
    a("--compile-mode", dest="compile_mode")
    a("--no-channels-last", dest="channels_last", action="store_const", const=False)
    a("--no-progress", dest="progress", action="store_const", const=False)
    return p


def cache_main(argv: list[str] | None = None) -> int:
    args = vars(cache_parser().parse_args(argv))
    build = {k: args.pop(k) for k in CACHE_ONLY}
    try:
        cfg = resolve_config(Config().replace(**args), beside=build["output"])
        check_inputs(cfg)
        from fastseed.cache import build_cache
        t0 = time.time()
        cache = build_cache(cfg, build.pop("output"), progress=cfg.progress, **build)
    except KeyboardInterrupt:
        return 130
    except _known_errors() as e:
        return _fail(str(e).strip("'\""))
    if cache is not None:
        h = cache.header
        print(f"{cache.path}: {cache.num_samples} images x {cache.crops} crops, {cache.dim}-d {h['dtype']} keys of "
              f"{h['teacher']['arch']} at {h['teacher_res']} px, {cache.path.stat().st_size / 1e6:.1f} MB "
              f"({time.time() - t0:.0f} s)")
    return 0


def export_parser() -> argparse.ArgumentParser:
    from fastseed.export import FORMATS
    p = argparse.ArgumentParser(
        prog="fastseed-export",
        description="Write a distilled student for deployment, with its preprocessing (resolution, mean/std, "
                    "channel order, crop) and provenance (arch, method, teacher, commit) recorded in the file.",
        epilog="onnx: OUTPUT.onnx, dynamic batch (and height/width where the arch allows), checked with ONNX "
               "Runtime against PyTorch (fails above 1e-4 in fp32); timm, safetensors: a folder OUTPUT with the "
               "weights and a config.json timm reads; torchscript: one traced file.")
    a = p.add_argument
    a("checkpoint", help="fastseed checkpoint, or a run folder (with several students, pick one with --arch)")
    a("--format", required=True, choices=FORMATS)
    a("--output", required=True)
    a("--arch", help="the student of a run of several (OUTPUT/<arch>/checkpoint_last.pt)")
    a("--with-head", action="store_true", help="backbone + the method's head (onnx, torchscript)")
    a("--res", type=int, help="input resolution to record and trace at (default: the checkpoint's)")
    a("--fp16", action="store_true", help="onnx: float16 weights and compute, float32 in and out")
    a("--check-data", help="onnx: labelled .beton (or image folder) whose images check ONNX Runtime against "
                           "PyTorch (default: random inputs)")
    a("--calib-data", help="onnx: also write OUTPUT.int8.onnx, ONNX Runtime static int8 calibrated on these "
                           "images, and print the k-NN top-1 it costs on --check-data")
    a("--images", type=int, default=256, help="images read from --check-data and from --calib-data")
    a("--trust-checkpoint", action="store_true", help="let the checkpoint hold arbitrary Python objects; "
      "unpickling them runs code from the file: only for files you trust")
    a("--workers", type=int, default=2)
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    from fastseed.export import ExportError, export
    from fastseed.folders import cache_dir_beside, resolve_data
    try:
        cache = cache_dir_beside(args.output)
        written = export(args.checkpoint, args.format, args.output, arch=args.arch, with_head=args.with_head,
                         trust=args.trust_checkpoint, res=args.res, fp16=args.fp16,
                         check_data=resolve_data(args.check_data, cache), calib_data=resolve_data(args.calib_data, cache),
                         images=args.images, workers=fit_workers(args.workers),
                         log=lambda line: print(line, file=sys.stderr))
    except KeyboardInterrupt:
        return 130
    except (ExportError, *_known_errors()) as e:
        return _fail(str(e).strip("'\""))
    print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    return 0


def embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastseed-embed", description="L2-normalised features of every image of a "
                                ".beton or image folder (in its order), saved as a float32 [N, D] .npy.")
    a = p.add_argument
    a("--checkpoint", required=True, help="fastseed checkpoint or run folder, or a timm/safetensors export folder")
    a("--data", required=True, help=".beton, or an image folder (written once to a cached .beton beside OUTPUT)")
    a("--output", required=True, help="features .npy")
    a("--arch", help="the student of a run of several")
    a("--trust-checkpoint", action="store_true", help="let the checkpoint hold arbitrary Python objects; "
      "unpickling them runs code from the file: only for files you trust")
    a("--device", default="auto")
    a("--batch-size", type=int, default=256)
    a("--workers", type=int, default=2)
    a("--no-progress", dest="progress", action="store_false")
    return p


def embed_main(argv: list[str] | None = None) -> int:
    args = embed_parser().parse_args(argv)
    from fastseed.export import ExportError, embed
    from fastseed.folders import cache_dir_beside, resolve_data
    try:
        data = resolve_data(args.data, cache_dir_beside(args.output), progress=args.progress)
        n, dim = embed(args.checkpoint, data, args.output, arch=args.arch, trust=args.trust_checkpoint,
                       device=args.device, batch_size=args.batch_size, workers=fit_workers(args.workers),
                       progress=args.progress)
    except KeyboardInterrupt:
        return 130
    except (ExportError, *_known_errors()) as e:
        return _fail(str(e).strip("'\""))
    print(f"wrote {args.output}: {n} x {dim} float32, L2-normalised", file=sys.stderr)
    return 0
