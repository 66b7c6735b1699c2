"""Reproduce SEED's claim on real Fashion-MNIST: a distilled small student beats the same
student trained with MoCo-v2 from scratch, at equal student epochs.

Runs, all through ``fastseed.train.train(Config(...))``:

1. teacher: ResNet-50 trained with ``method='moco'`` (a fastseed checkpoint);
2. students (ResNet-18, MobileNetV3-Large) trained with ``method='moco'`` from scratch;
3. the same students distilled with SEED from that ResNet-50 (``distill=<its checkpoint>``);
4. ... and with SimReg from it;
5. the same students distilled with SEED from the bundled ImageNet EfficientNet-Lite0.

Every encoder is then evaluated with ``fastseed.evaluate`` on frozen features: weighted k-NN
(k=20 and k=1, T=0.07) and a linear-probe grid, train split as the bank, test split as the
query set; raw pixels are the floor. The eval images are decoded once (two FFCV loaders) and
reused for every model.

    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --size tiny   # CPU, CI (~2-3 min)
    .venv/bin/python benchmarks/reproduce_fashion_mnist.py --size full   # one GPU

Finished runs are skipped when the script is started again with the same settings (a run
stopped half-way resumes from its checkpoint), so ``--size full`` may be split over several
invocations. Results: ``--out`` (default ``benchmarks/results/reproduce_<size>.json``) and the
same name with ``.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _bench.tables import markdown as md_table

from fastseed.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
STUDENTS = ("resnet18", "mobilenetv3_large_100")
TEACHER_ARCH = "resnet50"
LITE = "efficientnet_lite0"

# Every size: images (train subset for SSL, labelled bank = train subset, test subset), the
# resolution students and the MoCo teacher train at, the resolution the Lite0 teacher sees
# (its ImageNet features are poor at 32 px), batch, epochs, and the linear-probe epochs.
SIZES = {
    # CI on a 2-core CPU (~3-4 min, mostly fixed per-run costs: FFCV JIT, model builds): checks
    # the whole pipeline, proves nothing about the claim.
    "tiny": dict(train=512, test=300, res=32, lite_res=48, batch=32, teacher_epochs=1, student_epochs=1,
                 teacher_max_steps=2, student_max_steps=2, queue=256, lr=0.05, warmup_epochs=0.0,
                 teacher_warmup_epochs=0.0, linear_epochs=10, workers=2),
    # A first data point on a 2-core CPU (~1 h): short schedules, small data.
    "cpu": dict(train=4096, test=2000, res=32, lite_res=48, batch=64, teacher_epochs=3, student_epochs=2,
                teacher_max_steps=None, student_max_steps=None, queue=2048, lr=0.1, warmup_epochs=0.25,
                teacher_warmup_epochs=0.5, linear_epochs=50, workers=2),
    # One H100/H200: all 60k train images, the whole 10k test split.
    "full": dict(train=60000, test=10000, res=32, lite_res=64, batch=256, teacher_epochs=100, student_epochs=20,
                 teacher_max_steps=None, student_max_steps=None, queue=4096, lr=0.1, warmup_epochs=1.0,
                 teacher_warmup_epochs=5.0, linear_epochs=100, workers=16),
}
# Shared by every run (small-data MoCo: a queue well below the dataset, faster momentum).
COMMON = dict(crop_scale=(0.35, 1.0), weight_decay=5e-4, temp=0.2, moco_m=0.99, distill_t=0.02,
              simreg_target="backbone", head="mlp", clip_grad=None, teacher_precision="student")


# ---------------------------------------------------------------- data
def prepare_data(work: Path, s: dict) -> dict:
    from fastseed.data_prep import write_beton

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = {"train": data / f"fashion_mnist_train_{s['train']}.beton",
             "test": data / f"fashion_mnist_test_{s['test']}.beton"}
    for split, path in paths.items():
        if not path.is_file():
            n = s[split]
            write_beton(f"fashion-mnist:{split}", str(path), subset=None if n >= (60000 if split == "train" else 10000)
                        else n, compress_probability=0.0, progress=False)
    return {k: str(v) for k, v in paths.items()}


def cached_eval_batches(path: str, res: int, dev: torch.device, workers: int, batch: int = 1000) -> list:
    """Every (uint8 NHWC images, labels) batch of the eval loader, kept in memory: one FFCV
    loader (and its JIT compile) per split for all the models evaluated."""
    from fastseed.data import eval_loader

    loader = eval_loader(path, batch_size=batch, res=res, device=dev, num_workers=workers)
    # copies: FFCV reuses its output buffers between batches
    return [(x.clone(), torch.as_tensor(y).reshape(-1).to(dev, torch.long).clone()) for x, y in loader]


# ---------------------------------------------------------------- training
def run_configs(s: dict, data: dict, work: Path, device: str) -> dict:
    """name -> Config of every training run, the teacher first."""
    from fastseed.config import Config

    base = Config(data=data["train"], val_data=None, res=s["res"], workers=s["workers"], batch_size=s["batch"],
                  lr=s["lr"], queue_size=s["queue"], device=device, log_every=20, ckpt_every=1000, knn_every=0,
                  progress=False, **COMMON)
    teacher_ckpt = str(work / "teacher_moco_resnet50" / "checkpoint_last.pt")
    runs = {"teacher_moco_resnet50": base.replace(
        method="moco", arch=TEACHER_ARCH, epochs=s["teacher_epochs"], max_steps=s["teacher_max_steps"],
        warmup_epochs=s["teacher_warmup_epochs"], output=str(work / "teacher_moco_resnet50"))}
    student = dict(epochs=s["student_epochs"], max_steps=s["student_max_steps"], warmup_epochs=s["warmup_epochs"])
    for arch in STUDENTS:
        variants = {
            "moco": dict(method="moco"),
            "seed_moco_rn50": dict(method="seed", teacher_arch=TEACHER_ARCH, distill=teacher_ckpt,
                                   teacher_ssl="fastseed"),
            "simreg_moco_rn50": dict(method="simreg", teacher_arch=TEACHER_ARCH, distill=teacher_ckpt,
                                     teacher_ssl="fastseed"),
            "seed_lite0": dict(method="seed", teacher_arch=LITE, distill=None, teacher_res=s["lite_res"]),
        }
        for v, kw in variants.items():
            name = f"{arch}/{v}"
            runs[name] = base.replace(arch=arch, output=str(work / arch / v), **student, **kw)
    return runs


def _json_cfg(cfg) -> dict:
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def train_all(runs: dict, log=print) -> dict:
    """Train every run not already done with these settings; name -> {'step', 'train_s'}."""
    from fastseed.train import train

    done = {}
    for name, cfg in runs.items():
        marker = Path(cfg.output) / "done.json"
        want = _json_cfg(cfg)
        if marker.is_file():
            rec = json.loads(marker.read_text())
            if rec.get("config") == want:
                log(f"[{name}] done before: step {rec['step']}, {rec['train_s']:.0f} s")
                done[name] = rec
                continue
            marker.unlink()
            ckpt = Path(cfg.output) / "checkpoint_last.pt"
            if ckpt.exists():
                ckpt.unlink()  # other settings: start over
        log(f"[{name}] training: method={cfg.method} arch={cfg.arch} epochs={cfg.epochs}"
            + (f" (max {cfg.max_steps} steps)" if cfg.max_steps else "")
            + (f" teacher={cfg.teacher_arch}" if cfg.method != "moco" else ""))
        t0 = time.perf_counter()
        out = train(cfg.replace(resume="auto"))
        rec = {"config": want, "step": out["step"], "train_s": time.perf_counter() - t0}
        marker.write_text(json.dumps(rec))
        log(f"[{name}] {out['step']} steps in {rec['train_s']:.0f} s")
        done[name] = rec
    return done


# ---------------------------------------------------------------- evaluation
class _Encoder(torch.nn.Module):
    """resize (normalised float NCHW), encode; ``norm`` is the uint8 -> float transform."""

    def __init__(self, model, mean, std, res=None):
        super().__init__()
        from fastseed.augment import Normalize
        self.norm, self.model, self.res = Normalize(mean, std), model, res

    def forward(self, x):
        from fastseed.models import resize
        return self.model(resize(x, self.res))


def evaluate_encoder(encoder, bank, test, dev, linear_epochs: int) -> dict:
    from fastseed.evaluate import extract_features, knn_classify, linear_probe

    if encoder is None:  # raw pixels
        ftr, ytr = torch.cat([x.flatten(1).float() for x, _ in bank]), torch.cat([y for _, y in bank])
        fte, yte = torch.cat([x.flatten(1).float() for x, _ in test]), torch.cat([y for _, y in test])
    else:
        encoder = encoder.to(dev).eval()
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        norm = encoder.norm
        ftr, ytr = extract_features(encoder, bank, device=dev, transform=norm, dtype=dtype)
        fte, yte = extract_features(encoder, test, device=dev, transform=norm, dtype=dtype)
    knn = knn_classify(ftr, ytr, fte, yte, ks=(1, 20), temperature=0.07, num_classes=10)
    probe = linear_probe(ftr, ytr, fte, yte, epochs=linear_epochs, num_classes=10)
    return {"knn@20": knn["knn_top1@20"], "knn@1": knn["knn_top1@1"], "linear_top1": probe["linear_top1"],
            "linear_lr": probe["lr"], "feature_dim": int(ftr.shape[1])}


def evaluate_all(runs: dict, trained: dict, s: dict, data: dict, dev: torch.device, log=print) -> list[dict]:
    from fastseed.evaluate import load_student
    from fastseed.teachers import load_teacher

    t0 = time.perf_counter()
    bank = cached_eval_batches(data["train"], s["res"], dev, s["workers"])
    test = cached_eval_batches(data["test"], s["res"], dev, s["workers"])
    log(f"eval images decoded: {sum(len(y) for _, y in bank)} bank, {sum(len(y) for _, y in test)} test "
        f"({time.perf_counter() - t0:.0f} s)")

    rows = []

    def add(name, label, encoder, epochs, method, teacher, step=None):
        t = time.perf_counter()
        r = evaluate_encoder(encoder, bank, test, dev, s["linear_epochs"])
        rows.append({"name": name, "label": label, "method": method, "teacher": teacher, "epochs": epochs,
                     "step": step, **r})
        log(f"[{name}] kNN@20 {r['knn@20']:.2f}  kNN@1 {r['knn@1']:.2f}  linear {r['linear_top1']:.2f} "
            f"({time.perf_counter() - t:.0f} s)")

    add("raw_pixels", f"raw pixels ({s['res']} px)", None, None, None, None)
    for name, cfg in runs.items():
        model, meta = load_student(str(Path(cfg.output) / "checkpoint_last.pt"))
        enc = _Encoder(model, meta["mean"], meta["std"])
        if name.startswith("teacher"):
            add(name, "teacher: ResNet-50, MoCo-v2 (fastseed)", enc, cfg.epochs, "moco", None, meta["step"])
            lite = load_teacher(LITE, None).model  # backbone only: pooled features, as the SEED runs use it
            add("teacher_lite0", f"teacher: EfficientNet-Lite0, ImageNet (bundled, {s['lite_res']} px)",
                _Encoder(lite, (0.5,) * 3, (0.5,) * 3, s["lite_res"]), None, "supervised ImageNet", None)
            continue
        arch, variant = name.split("/")
        teacher = {"moco": None, "seed_moco_rn50": "MoCo RN-50", "simreg_moco_rn50": "MoCo RN-50",
                   "seed_lite0": "Lite0"}[variant]
        label = {"moco": "MoCo-v2 from scratch", "seed_moco_rn50": "SEED ← MoCo RN-50",
                 "simreg_moco_rn50": "SimReg ← MoCo RN-50", "seed_lite0": "SEED ← Lite0"}[variant]
        add(name, f"{arch}: {label}", enc, cfg.epochs, cfg.method, teacher, meta["step"])
    return rows


def gaps(rows: list[dict]) -> dict:
    by = {r["name"]: r for r in rows}
    out = {}
    for arch in STUDENTS:
        seed, moco = by.get(f"{arch}/seed_moco_rn50"), by.get(f"{arch}/moco")
        if seed and moco:
            out[arch] = {m: seed[m] - moco[m] for m in ("knn@20", "knn@1", "linear_top1")}
    return out


def markdown(result: dict) -> str:
    s = result["sizes"]
    lines = [f"Fashion-MNIST reproduction, size `{result['size']}` — {result['device']}, torch {result['torch']}, "
             f"commit `{result['commit']}`, {result['wall_s'] / 60:.1f} min.",
             f"Train subset {s['train']} images (also the k-NN bank and the probe's training set), test "
             f"{s['test']}; {s['res']} px (Lite0 teacher at {s['lite_res']} px); batch {s['batch']}; teacher "
             f"{s['teacher_epochs']} epochs, students {s['student_epochs']} epochs"
             + (f" (capped at {s['teacher_max_steps']}/{s['student_max_steps']} steps)"
                if s["student_max_steps"] else "")
             + f"; linear probe {s['linear_epochs']} epochs, best of {len(result['linear_lrs'])} lrs.", "",
             md_table(["encoder", "kNN@20", "kNN@1", "linear top-1", "epochs"],
                      [[r["label"], f"{r['knn@20']:.2f}", f"{r['knn@1']:.2f}", f"{r['linear_top1']:.2f}",
                        "" if r["epochs"] is None else str(r["epochs"])] for r in result["rows"]]), ""]
    for arch, g in result["gap_seed_minus_moco"].items():
        lines.append(f"SEED←MoCo-RN50 minus MoCo-from-scratch, {arch}: kNN@20 {g['knn@20']:+.2f}, "
                     f"kNN@1 {g['knn@1']:+.2f}, linear {g['linear_top1']:+.2f} points.")
    return "\n".join(lines) + "\n"


def reproduce(size: str, out: Path, work: Path, device: str = "auto", overrides: dict | None = None,
              log=print) -> dict:
    from fastseed.evaluate import LINEAR_LRS

    s = {**SIZES[size], **(overrides or {})}
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, s)
    runs = run_configs(s, data, work, str(dev))
    trained = train_all(runs, log)
    rows = evaluate_all(runs, trained, s, data, dev, log)
    result = {"size": size, **provenance(dev), "sizes": s,
              "common": {k: list(v) if isinstance(v, tuple) else v for k, v in COMMON.items()},
              "linear_lrs": list(LINEAR_LRS), "students": list(STUDENTS),
              "train_s": {k: v["train_s"] for k, v in trained.items()},
              "rows": rows, "gap_seed_minus_moco": gaps(rows)}
    result["wall_s"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    log(markdown(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/reproduce_<size>.json); "
                                            "the table goes next to it as .md")
    p.add_argument("--work", type=Path, help="betons and checkpoints (default output/reproduce_<size>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--teacher-epochs", type=int)
    p.add_argument("--student-epochs", type=int)
    p.add_argument("--workers", type=int)
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("teacher_epochs", a.teacher_epochs), ("student_epochs", a.student_epochs),
                                   ("workers", a.workers)) if v is not None}
    out = a.out or ROOT / "benchmarks" / "results" / f"reproduce_{a.size}.json"
    work = a.work or ROOT / "output" / f"reproduce_{a.size}"
    reproduce(a.size, out, work, a.device, overrides, log=lambda m: print(m, file=sys.stderr, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
