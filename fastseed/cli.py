"""Entry points: `fastseed-train`, `fastseed-eval`, `fastseed-prep`, `fastseed-cache`, `fastseed-export`,
`fastseed-embed`.

Bad input (missing data, unknown arch, a teacher checkpoint that does not fit) ends with one
line on stderr naming the problem and what to do, exit code 2, and nothing written over.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

from fastseed.augment import PRESETS
from fastseed.cache import TeacherCache, build_cache
from fastseed.checkpoint import find_resume
from fastseed.config import Config, fit_workers
from fastseed.configfile import demo, read_settings, recipe_file, recipe_names, to_yaml
from fastseed.data import check_beton, image_sizes
from fastseed.data_prep import main as data_prep_main
from fastseed.data_prep import write_beton
from fastseed.errors import BetonError, ConfigError, FastseedError
from fastseed.evaluate import evaluate_checkpoint
from fastseed.export import FORMATS, embed, export, export_timm_state_dict
from fastseed.folders import cache_dir_beside, resolve_config, resolve_data
from fastseed.logs import SINKS
from fastseed.methods import METHODS, method_class, official, recipe
from fastseed.models import create_student
from fastseed.profile import profile
from fastseed.runtime import setup_env
from fastseed.students import student_configs
from fastseed.targets import live_targets, resolve_teacher_res, teacher_side
from fastseed.teachers import SSL_CHOICES, check_res
from fastseed.teachers.several import SUMMARY_LOSSES, teacher_archs, teacher_configs
from fastseed.teachers.bundled import BUNDLED
from fastseed.train import train

USAGE_ERROR = 2


def _pair(text: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def _floats(text: str) -> float | tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


def _ints(text: str) -> int | tuple[int, ...]:
    values = tuple(int(v) for v in text.split(","))
    return values[0] if len(values) == 1 else values


POOLS = ("cls", "mean", "cls+mean")


def _pools(text: str) -> str:
    """`--teacher-pool`: one of POOLS, or a comma list of them (one per teacher)."""
    bad = [p for p in text.split(",") if p not in POOLS]
    if bad:
        raise argparse.ArgumentTypeError(f"invalid choice: {bad[0]!r} (choose from {', '.join(POOLS)}, or a comma "
                                         "list of them, one per teacher)")
    return text


def _flags(p, specs) -> None:
    """Add (names, kwargs) flag specs to `p`, each setting once (the first spec of a dest wins)."""
    seen = {a.dest for a in p._actions}
    for names, kwargs in specs:
        if kwargs["dest"] not in seen:
            seen.add(kwargs["dest"])
            p.add_argument(*names, **kwargs)


def _teacher_args(p) -> None:
    g = p.add_argument_group("teacher").add_argument
    g("-k", "--teacher-arch", dest="teacher_arch", help="teacher arch (resnet50, resnet50w2, efficientnet_lite0, ...), "
      "or a comma list of teachers to distil into one student (docs/teachers-several.md)")
    g("--teacher-ssl", dest="teacher_ssl", help=f"teacher checkpoint format: {', '.join(SSL_CHOICES)} (default auto; "
      "several teachers: one for all or one each)")
    g("--distill", help="teacher checkpoint (MoCo, SwAV, SimCLR, BYOL, DINO, timm, fastseed); several teachers: one "
      "per teacher, comma-separated, empty or bundled for a bundled one")
    g("--teacher-no-head", dest="teacher_use_head", action="store_const", const=False,
      help="distil the teacher's backbone feature instead of its projection")
    g("--teacher-res", dest="teacher_res", type=_ints, help="resize the crop to this for the teacher (default --res; "
      "DINOv2/DINOv3 teachers: 224, their release's; several teachers: one for all or one each)")
    g("--teacher-pool", dest="teacher_pool", type=_pools, metavar="{cls,mean,cls+mean}",
      help="DINOv2/DINOv3 embedding: the normed CLS token (default), the mean of the patch tokens, or both "
           "concatenated (DINOv2's linear evaluation); several teachers: one for all or one each")
    g("--trust-checkpoint", dest="trust_checkpoint", action="store_const", const=True,
      help="let --distill/--resume files hold arbitrary Python objects; unpickling them runs code "
           "from the file: only for files you trust")


def _runtime_args(p) -> None:
    g = p.add_argument_group("runtime").add_argument
    g("--device", help="auto (cuda when there is one), cuda or cpu")
    g("--precision", choices=["auto", "bf16", "fp16", "fp32"],
      help="the students' autocast: auto is bf16 on CUDA and fp32 on a CPU")
    g("--teacher-precision", choices=["auto", "student", "bf16", "fp16", "fp32"],
      help="the frozen teacher's autocast (default auto: the students' on CUDA; on a CPU bf16 where it has "
           "AMX tiles, else fp32; student: the students' everywhere); its keys reach the losses in the "
           "students' dtype")
    g("--compile", choices=["auto", "on", "off"], help="torch.compile the students and the teacher (auto: on CUDA)")
    g("--compile-mode", dest="compile_mode", help="torch.compile's mode, e.g. max-autotune or reduce-overhead")
    g("--channels-last", dest="channels_last", action="store_const", const=True,
      help="channels-last memory format for the students and the teacher (default auto: the teacher always; "
           "a student on CUDA, and on a CPU where it has depthwise convolutions or inputs above 64 px)")
    g("--no-channels-last", dest="channels_last", action="store_const", const=False,
      help="the plain NCHW format for the students and the teacher")
    g("--workers", type=int, help="FFCV decode threads (default: the CPU cores this process may use)")
    g("--seed", type=int, help="seeds the students' init, the data order, the crops and the augmentation")
    g("--no-progress", dest="progress", action="store_const", const=False,
      help="no progress bar (default: a bar on the main rank)")


def _augment_args(p, what: str) -> None:
    g = p.add_argument_group("augmentation").add_argument
    g("--aug", choices=["auto", *PRESETS],
      help=f"augmentation preset {what} (default auto: the method's official one for the teacher's format)")
    g("--crop-scale", dest="crop_scale", type=_pair,
      help="RandomResizedCrop scale, e.g. 0.2,1 (default: the --aug preset's)")


TRAIN_GROUPS = (  # --help's sections, in order: (title, the flags' dests)
    ("run", ("config", "print_config", "recipe", "method", "arch", "dim")),
    ("data", ("data", "val_data", "knn_bank", "res", "teacher_cache", "workers")),
    ("teacher", ("teacher_arch", "teacher_ssl", "distill", "teacher_use_head", "teacher_res", "teacher_pool",
                 "teacher_weights", "teacher_drop", "summary_loss", "trust_checkpoint", "teacher_precision")),
    ("objective (fastseed/methods)", ()),  # the methods' own flags
    ("optimiser and schedule", ("lr", "base_lr", "lr_scaling", "batch_size", "epochs", "max_steps", "optimizer",
                                "weight_decay", "momentum", "warmup_epochs", "warmup_cap", "clip_grad")),
    ("augmentation", ("aug", "crop_scale", "mixup")),
    ("checkpoint and logging", ("output", "resume", "ckpt_every", "log", "log_every", "knn_every", "final_table",
                                "profile", "progress")),
    ("distributed (under torchrun)", ("fsdp", "dist_timeout")),
    ("runtime", ("device", "precision", "compile", "compile_mode", "channels_last", "seed")),
)


def train_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """`fastseed-train`'s parser: its flags in TRAIN_GROUPS's sections, each help ending with the
    default of a run with --data and the default method (`_show_defaults`). Every flag's default is
    argparse.SUPPRESS, so the recipe (and a --config file) decide what a flag left out means."""
    p = argparse.ArgumentParser(
        prog="fastseed-train",
        description="Self-supervised distillation (SEED, SimReg, patch tokens) and MoCo-v2. With no --data, runs "
                    "the embedded demo: Fashion-MNIST, ImageNet EfficientNet-Lite0 teacher, ResNet-18 student. "
                    "Precedence: flags > --config FILE > --recipe > the method's defaults.",
        usage="%(prog)s [--config FILE] [--data BETON] [-a ARCH] [-k TEACHER] [--distill CKPT] [options]",
        argument_default=argparse.SUPPRESS)
    flat = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)  # collects, then sorted
    a = flat.add_argument
    a("--config", metavar="FILE", help="a YAML file of settings (keys: Config's fields, e.g. a run's "
      "OUTPUT/config.yaml); flags given win over it")
    a("--print-config", dest="print_config", action="store_true",
      help="print the run's resolved settings as YAML (what OUTPUT/config.yaml will hold) and exit")
    a("--method", choices=list(METHODS), help="the objective: seed, simreg, dense (patch tokens) or moco")
    a("--recipe", metavar="NAME|FILE",
      help=f"settings to start from: {', '.join(recipe_names())} (fastseed/recipes/), or a YAML file; "
           "fastseed: the method's fastseed defaults; official: the method's paper recipe")
    a("-a", "--arch", help="student: any timm model name, or a comma list to distil them all in one run: one "
                           "loader, augmentation, teacher forward and queue")
    a("--data", help="train .beton (from fastseed-prep), or an image folder (written once to a cached .beton "
                     "beside --output)")
    a("--teacher-cache", dest="teacher_cache",
      help="train from a fastseed-cache file of --data: each image's stored crop of the epoch and the teacher's "
           "stored key (no teacher forward). Its header names the teacher: -k/--distill may be left out; "
           "given, they must match it")
    a("--val-data", dest="val_data", help="val .beton (or image folder) for k-NN monitoring")
    a("--knn-bank", dest="knn_bank", help="labelled .beton used as the k-NN memory bank (default --data)")
    a("--output", help="output directory (checkpoints, metrics.jsonl, config.yaml)")
    a("--resume", help="checkpoint path (a file, or an FSDP2 run's .dcp folder), or 'auto' for OUTPUT's "
                       "checkpoint_last.pt or .dcp (several students: 'auto', or the earlier run's OUTPUT)")
    a("--lr", type=_floats, help="peak learning rate (none: --base-lr scaled to the batch); with several students "
                                 "one for all or a comma list, one per student")
    a("--base-lr", dest="base_lr", type=float, help="the lr at batch 256 when --lr is not given")
    a("--lr-scaling", dest="lr_scaling", choices=["linear", "sqrt"],
      help="how --base-lr scales to the batch: linear (x batch/256, SEED and MoCo) or sqrt (x sqrt(batch/256), "
           "SimReg's LARS default)")
    a("-b", "--batch-size", dest="batch_size", type=int, help="global batch size, over every rank")
    a("--epochs", type=int, help="epochs over --data; the schedule spans them (or --max-steps)")
    a("--max-steps", dest="max_steps", type=int, help="stop after this many steps; the schedule ends there")
    a("--dim", type=int, help="embedding dim (MoCo head; the teacher's for a method with a teacher)")
    a("--res", type=int, help="the students' crop side (default: the largest side --data stores, at most 224)")
    a("--wd", "--weight-decay", dest="weight_decay", type=float, help="weight decay")
    a("--momentum", type=float, help="SGD and LARS momentum")
    a("--warmup-epochs", dest="warmup_epochs", type=float, help="linear warm-up, in epochs")
    a("--warmup-cap", dest="warmup_cap", type=float,
      help="the warm-up never exceeds this share of the run's steps (1: as --warmup-epochs says)")
    a("--optimizer", choices=["sgd", "lars", "adamw"], help="fused SGD or AdamW, or LARS (timm's)")
    a("--clip-grad", dest="clip_grad", type=float,
      help="clip each student's gradient to this global L2 norm (0 or none: no clipping)")
    a("--mixup", action="store_const", const=True,
      help="mix each batch with a permutation of itself (lambda ~ U(0,1) per step) before the teacher and the "
           "students see it")
    a("--fsdp", action="store_const", const=True, help="FSDP2 (fully_shard) instead of DDP")
    a("--dist-timeout", dest="dist_timeout", type=float,
      help="seconds a collective may wait for the other ranks before the run fails")
    a("--log-every", dest="log_every", type=int, help="log loss, lr and images/s every N steps")
    a("--log", help=f"metric sinks: auto (jsonl, and tensorboard when installed) or a comma list of {', '.join(SINKS)}")
    a("--ckpt-every", dest="ckpt_every", type=int, help="checkpoint every N steps (and every epoch end)")
    a("--knn-every", dest="knn_every", type=int, help="k-NN monitor every N epochs (0: at the end only)")
    a("--profile", action="store_const", const=True, help="profile a few steps and write reports")
    a("--table", dest="final_table", action="store_const", const=True,
      help="k-NN of raw pixels, teacher, student at init and distilled student at the end")
    a("--teacher-weights", dest="teacher_weights", type=_floats,
      help="several teachers: each one's loss weight, comma-separated (default: equal)")
    a("--teacher-drop", dest="teacher_drop", type=float,
      help="several teachers: at each step drop each teacher's loss with this probability, keeping at least one "
           "(after UNIC's teacher dropping; the draw is a function of --seed and the step)")
    a("--summary-loss", dest="summary_loss", choices=list(SUMMARY_LOSSES),
      help="several teachers: each one's loss, cosine (SimReg's 2 - 2 cos) or cos-smoothl1 (UNIC's "
           "0.5 (1 - cos) + 0.5 smooth-L1)")
    _teacher_args(flat)
    _augment_args(flat, "")
    _runtime_args(flat)
    actions = {act.dest: act for act in flat._actions}
    for title, dests in TRAIN_GROUPS:
        g = p.add_argument_group(title)
        if not dests:
            _flags(g, [f for m in METHODS.values() for f in m.flags])
        for dest in dests:
            for act in [x for x in flat._actions if x.dest == dest]:
                g._add_action(act)  # the group shares the parser's lists of actions and options
    missing = set(actions) - {d for _, ds in TRAIN_GROUPS for d in ds}
    assert not missing, f"flags in no --help group: {missing}"
    if with_defaults:
        _show_defaults(p)
    return p


def _show_defaults(p: argparse.ArgumentParser) -> None:
    """End each flag's help with its default in a run with --data and the default method
    (`recipe(Config.method)`): what leaving the flag out gives."""
    cfg = recipe(Config.method)
    shown = {None: "none", True: "on", False: "off"}
    for act in p._actions:
        if act.help in (None, argparse.SUPPRESS) or act.dest in ("help", "config", "print_config") \
                or "(default" in act.help:  # the help says it already (in words: auto, the preset's, ...)
            continue
        if act.dest == "recipe":
            value = "fastseed"
        elif act.dest in ("progress", "channels_last") or not hasattr(cfg, act.dest):
            value = {"progress": "on", "channels_last": "auto"}.get(act.dest, "the method's")
        else:
            value = getattr(cfg, act.dest)
        text = shown.get(value, value) if isinstance(value, (bool, type(None))) else value
        if isinstance(text, tuple):
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in text)
        act.help = f"{act.help} (default: {text})"


def config_from_args(argv: list[str] | None, notes: list[str] | None = None) -> Config:
    """The run's Config from the command line; what was chosen for the user goes to `notes`.

    Precedence, lowest first: the method's recipe (`--recipe fastseed`, the default: the method's
    fastseed defaults over the demo without --data, over Config() with it; `official`: the paper's),
    a recipe file's settings (`--recipe FILE`), a `--config FILE`'s, the flags given."""
    return config_and_flags(argv, notes)[0]


def config_and_flags(argv: list[str] | None, notes: list[str] | None = None) -> tuple[Config, dict]:
    """`config_from_args`, and the parsed flags (the entry point reads --print-config there)."""
    args = vars(train_parser().parse_args(argv))
    flags = dict(args)
    args.pop("print_config", None)
    name = args.pop("recipe", "fastseed")
    recipe_file_settings = read_settings(recipe_file(name)) if name not in ("fastseed", "official") else {}
    files = {**recipe_file_settings, **(read_settings(args.pop("config")) if "config" in args else {})}
    method = args.get("method", files.get("method", Config.method))
    start = demo() if "data" not in args and "data" not in files else Config()
    if name == "official":
        base = official(method)
    elif recipe_file_settings:  # a recipe file states its settings over Config's defaults
        base = start.replace(method=method)
    else:
        base = recipe(method, start)
    base = base.replace(**files)
    if "teacher_cache" in args and "teacher_arch" not in args:
        # the cache names its teacher: no -k needed (one given is checked against it)
        args["teacher_arch"] = TeacherCache.open(args["teacher_cache"]).header["teacher"]["arch"]
    data = args.get("data", files.get("data"))
    if "res" not in args and "res" not in files and data and Path(data).is_file():
        args["res"] = res_from_data(data, notes if notes is not None else [])
    return _config(base, args), flags


def res_from_data(beton: str, notes: list[str], most: int = Config.res) -> int:
    """The student's side when --res is not given: the largest side the beton stores, at most
    224 (64-px images are not upsampled to 224 px, 12x the pixels of each step for nothing)."""
    try:
        heights, widths = image_sizes(beton)
    except (FileNotFoundError, BetonError):
        return most  # check_inputs says what is wrong with the file
    largest = int(max(heights.max(initial=0), widths.max(initial=0)))
    side = min(most, largest) or most
    notes.append(f"--res not given: training at {side} px (the largest side in {beton} is {largest} px)")
    return side


def _config(base: Config, args: dict) -> Config:
    """`base` with `args` applied; a method's flags that no Config field holds go to `method_args`."""
    fields = {f.name for f in dataclasses.fields(Config)}
    own = {k: v for k, v in args.items() if k not in fields}
    return base.replace(**{k: v for k, v in args.items() if k in fields},
                        method_args={**base.method_args, **own})


def _entry_point(main):
    """An entry point's contract: bad input (a FastseedError, a missing file) ends as one
    `error: ...` line and exit code 2, Ctrl-C as exit code 130; anything else is a bug."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            return 130
        except KNOWN_ERRORS as e:
            return _fail(str(e).strip("'\""))
    return run


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return USAGE_ERROR


KNOWN_ERRORS = (FastseedError, FileNotFoundError)  # one line, exit 2; anything else is a bug


def demo_data_jobs(cfg: Config) -> list[tuple[str, str | None, int | None]]:
    """(source, beton, --subset) of each beton the demo writes (benchmarks/gpu/gpu_wheels.py carries
    only the Fashion-MNIST images these read)."""
    return [("fashion-mnist:train", cfg.data, 32_000), ("fashion-mnist:test", cfg.val_data, None),
            ("fashion-mnist:train", cfg.knn_bank, 10_000)]


def prepare_demo_data(cfg: Config) -> None:
    """Write the demo's Fashion-MNIST betons once; later runs reuse them."""
    for source, path, subset in demo_data_jobs(cfg):
        if path and not Path(path).exists():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            print(f"fastseed-prep {source} {path}" + (f" --subset {subset}" if subset else ""), file=sys.stderr)
            write_beton(source, path, subset=subset, compress_probability=0.0, progress=False)


def check_inputs(cfg: Config) -> None:
    """Everything that can be checked before a run writes anything: the betons, the students,
    the teacher's weights; FileNotFoundError / ConfigError naming the first that is wrong."""
    if cfg.data is None:
        raise FileNotFoundError("no --data: pass a .beton written by fastseed-prep")
    for name, path in (("--data", cfg.data), ("--val-data", cfg.val_data), ("--knn-bank", cfg.knn_bank)):
        if path:
            try:
                check_beton(path)
            except (FileNotFoundError, BetonError) as e:
                raise ConfigError(f"{name}: {e}") from None
    for c in student_configs(cfg):  # a bad -a / --lr list, an unknown arch -> ConfigError before anything is written
        create_student(c.arch)
    needs_teacher = method_class(cfg.method).needs_teacher
    for t in teacher_configs(cfg) if needs_teacher else ():  # -k a,b: each teacher as if alone
        if t.distill is None and t.teacher_arch not in BUNDLED and t.teacher_cache is None:
            raise FileNotFoundError(f"teacher {t.teacher_arch} needs weights: pass --distill CHECKPOINT, "
                                    f"or use a bundled teacher with -k {BUNDLED[0]}")
        if t.distill is not None and not Path(t.distill).is_file():
            raise FileNotFoundError(f"--distill {t.distill} does not exist")
        check_res(t.teacher_arch, teacher_side(t))  # a ViT teacher's side: a multiple of its patch
    if cfg.teacher_cache is not None and cfg.teacher_pool != "cls":
        raise ConfigError("a teacher cache holds CLS embeddings: drop --teacher-pool or --teacher-cache")


@_entry_point
def train_main(argv: list[str] | None = None) -> int:
    notes = []
    cfg, flags = config_and_flags(argv, notes)
    if flags.get("print_config"):  # before anything is written or checked on disk
        print(to_yaml(cfg), end="")
        return 0
    if cfg.data == demo().data:
        prepare_demo_data(cfg)
    cfg = resolve_config(cfg)
    check_inputs(cfg)
    for note in notes:
        print(note, file=sys.stderr)
    t0 = time.time()
    if cfg.profile:
        profile(cfg)
        return 0
    out = train(cfg)
    if out["preempted"]:
        print(f"stopped by {out['preempted']} at step {out['step']}: every student is checkpointed; "
              "rerun the same command with --resume auto to go on", file=sys.stderr)
        return 0
    if out["results"]:
        print_table(out["results"], cfg)
    ckpts = ", ".join(str(find_resume(c.replace(resume="auto"))) for c in student_configs(cfg))
    print(f"done: {out['step']} steps in {time.time() - t0:.0f} s; checkpoint {ckpts}, "
          f"metrics {cfg.out_dir / 'metrics.jsonl'}")
    if out["failed"]:
        return _fail(" | ".join(out["failed"]))
    return 0


def print_table(results: dict, cfg: Config) -> None:
    """Raw pixels, the teacher, then each student at init and distilled (`-a` order)."""
    archs = [c.arch for c in student_configs(cfg)]
    rows = [("raw pixels", "raw_pixels"), (f"teacher ({cfg.teacher_arch})", "teacher")]
    rows += [(f"teacher {i + 1} ({a})", f"teacher/{i}") for i, a in enumerate(teacher_archs(cfg))]  # -k a,b
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


@_entry_point
def eval_main(argv: list[str] | None = None) -> int:
    args = eval_parser().parse_args(argv)
    if not args.export and not (args.train_data and args.val_data):
        return _fail("pass --train-data and --val-data to evaluate, and/or --export PATH")
    if args.export:
        meta = export_timm_state_dict(args.checkpoint, args.export, args.trust_checkpoint)
        print(f"wrote {args.export}: {meta['arch']} backbone, step {meta['step']}", file=sys.stderr)
        if not (args.train_data and args.val_data):
            return 0
    result = evaluate_checkpoint(args.checkpoint, args.train_data, args.val_data, res=args.res, ks=args.k,
                                 temperature=args.temperature, linear=args.linear, device=args.device,
                                 batch_size=args.batch_size, workers=fit_workers(args.workers),
                                 trust=args.trust_checkpoint)
    print(json.dumps(result, indent=2))
    return 0


def prep_main(argv: list[str] | None = None) -> int:
    return data_prep_main(argv)


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
    # a cache stores keys, not tokens: not the methods that distil tokens by default (dense)
    with_teacher = [m for m in METHODS.values() if m.needs_teacher and not m.teacher_tokens(Config(method=m.name))]
    a("--method", choices=[m.name for m in with_teacher],
      help="the method the keys are for: it decides what of the teacher they hold (head or backbone)")
    _flags(p, [f for m in with_teacher for f in m.target_flags])
    _teacher_args(p)
    _augment_args(p, "whose crop scale the boxes are drawn with; the colour ops never reach the teacher")
    a("--crops", type=int, default=10, help="R: crops stored per image (default 10)")
    a("--dtype", choices=["bf16", "fp16"], default="bf16", help="stored key dtype (default bf16)")
    a("-b", "--batch-size", dest="batch_size", type=int, default=256,
      help="at most this many crops per teacher forward (256)")
    a("--chunk", type=int, default=2520,
      help="images per progress record (2520): a kill loses at most one record's work")
    _runtime_args(p)
    return p


@_entry_point
def cache_main(argv: list[str] | None = None) -> int:
    args = vars(cache_parser().parse_args(argv))
    build = {k: args.pop(k) for k in CACHE_ONLY}
    cfg = resolve_teacher_res(resolve_config(_config(Config(), args), beside=build["output"]))
    check_inputs(cfg)
    t0 = time.time()
    env = setup_env(cfg)
    cache = build_cache(cfg, build.pop("output"), live_targets(cfg, env), env, progress=cfg.progress, **build)
    if cache is not None:
        h = cache.header
        print(f"{cache.path}: {cache.num_samples} images x {cache.crops} crops, {cache.dim}-d {h['dtype']} keys of "
              f"{h['teacher']['arch']} at {h['teacher_res']} px, {cache.path.stat().st_size / 1e6:.1f} MB "
              f"({time.time() - t0:.0f} s)")
    return 0


def export_parser() -> argparse.ArgumentParser:
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


@_entry_point
def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    cache = cache_dir_beside(args.output)
    written = export(args.checkpoint, args.format, args.output, arch=args.arch, with_head=args.with_head,
                     trust=args.trust_checkpoint, res=args.res, fp16=args.fp16,
                     check_data=resolve_data(args.check_data, cache), calib_data=resolve_data(args.calib_data, cache),
                     images=args.images, workers=fit_workers(args.workers),
                     log=lambda line: print(line, file=sys.stderr))
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


@_entry_point
def embed_main(argv: list[str] | None = None) -> int:
    args = embed_parser().parse_args(argv)
    data = resolve_data(args.data, cache_dir_beside(args.output), progress=args.progress)
    n, dim = embed(args.checkpoint, data, args.output, arch=args.arch, trust=args.trust_checkpoint,
                   device=args.device, batch_size=args.batch_size, workers=fit_workers(args.workers),
                   progress=args.progress)
    print(f"wrote {args.output}: {n} x {dim} float32, L2-normalised", file=sys.stderr)
    return 0
