"""What only shows on the GPU machine: CUDA devices, a compiled step, 16 cores.

The CUDA tests are skipped without a device (run them there: `make gpu-check` does). The
device bugs are also proven here: the k-NN path runs with its images on the meta device,
which, like CUDA, is not where a module built on the CPU keeps its buffers.
"""
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

from fastseed.config import Config
from fastseed.runtime import Env
from fastseed.students import build_method
from fastseed.train import prepare, train_step

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
META = torch.device("meta")
MEAN_STD = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def meta_batches(n=2, res=16):
    images = torch.empty(n, res, res, 3, dtype=torch.uint8, device=META)
    return [(images, torch.zeros(n, dtype=torch.long, device=META))]


def test_knn_monitor_normalizes_on_the_images_device(monkeypatch):
    import fastseed.evaluate as E
    seen = []
    monkeypatch.setattr(E, "knn_classify", lambda ftr, ytr, fte, yte, **kw: seen.append((ftr.device, ftr.shape)))
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).to(META)
    monitor = E.KnnMonitor(Config(workers=1, val_data="val.beton"), META, MEAN_STD, None)
    monitor.loaders = [meta_batches(), meta_batches()]
    monitor(encoder)
    assert seen == [(META, (2, 4 * 14 * 14))]


def test_evaluate_checkpoint_normalizes_on_the_images_device(monkeypatch, tmp_path):
    """fastseed-eval's path: the checkpoint's mean/std meet the images where they are."""
    import fastseed.evaluate as E
    ckpt = {"fastseed": {"arch": "resnet10t", "method": "seed", "step": 0, "mean": MEAN_STD[0], "std": MEAN_STD[1]},
            "student": timm.create_model("resnet10t", num_classes=0).state_dict(), "config": {"res": 16}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    seen = []
    monkeypatch.setattr(E, "eval_loader", lambda path, **kw: meta_batches())
    monkeypatch.setattr(E, "knn_classify", lambda ftr, ytr, fte, yte, **kw: seen.append(ftr.device) or {})
    E.evaluate_checkpoint(str(tmp_path / "ckpt.pt"), "bank.beton", "val.beton", device="meta")
    assert seen == [META]


def test_moco_key_encoder_is_channels_last_and_compiled(monkeypatch):
    """The key encoder is a copy of the student: the same layout, compiled when the student is."""
    calls = []

    def fake_compile(model, **kw):  # records what the compiled function runs
        def compiled(*args):
            calls.append(model)
            return model(*args)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    cfg = Config(method="moco", arch="resnet10t", dim=16, queue_size=64, compile="on", device="cpu", workers=1)
    from fastseed.methods.moco import MoCo
    method = build_method(cfg, Env(), 16, MoCo.make_queues(dim=16, queue_size=64))
    convs = [p for p in method.key_encoder.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    method.targets([x, x])
    assert calls and all(m is method.key_encoder for m in calls)
    assert not any("_orig_mod" in k or "_encode_key" in k for k in method.state_dict())


def test_workers_fit_the_cores_numba_may_use():
    """On one core, the default and a request for 8 threads both give 1 (with a note for the
    request), and numba accepts it: FFCV's loader passes the number to numba.set_num_threads."""
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); import numba; "
            "from fastseed.cli import config_from_args; "
            "n = [config_from_args(['--data', 'x.beton', *a]).workers for a in ([], ['--workers', '8'])]; "
            "[numba.set_num_threads(w) for w in n]; print(n)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[1,", "1]"]
    assert proc.stderr.splitlines() == ["note: --workers 8 is more than the 1 CPU cores this process may use: using 1"]


class SyntheticLoader:
    """uint8 NHWC batches already on the GPU: the step alone, no data loading."""

    def __init__(self, batch, res, views, steps=4):
        g = torch.Generator("cuda").manual_seed(0)
        self.batches = [([torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8, device="cuda",
                                        generator=g) for _ in range(views)],
                         torch.zeros(batch, dtype=torch.long, device="cuda")) for _ in range(steps)]

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("method,arch", [("seed", "resnet10t"), ("moco", "resnet10t"), ("simreg", "resnet10t"),
                                         ("seed", "resnet10t,mobilenetv3_small_050")])
@pytest.mark.parametrize("compile_", ["off", "on"])
def test_step_has_no_host_sync(method, arch, compile_, teacher_ckpt, tmp_path):
    cfg = Config(method=method, arch=arch, teacher_arch="resnet10t", distill=str(teacher_ckpt), res=64,
                 batch_size=64, queue_size=1024, device="cuda", compile=compile_, output=str(tmp_path),
                 progress=False)
    run = prepare(cfg, loader=SyntheticLoader(64, 64, 2 if method == "moco" else 1))
    run.students.train()
    batches = list(run.loader)
    for i, (views, _) in enumerate(batches[:2]):  # warm-up: compile, cuDNN autotune, lazy inits
        train_step(run, views, i)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, (views, _) in enumerate(batches[2:], start=2):
            losses = train_step(run, views, i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(losses) == len(arch.split(",")) and all(torch.isfinite(v).item() for v in losses)
    if method != "simreg":
        assert run.queues.queue.ptr.item() == 4 * 64 % 1024
