"""GPU-only checks of the training step (skipped without CUDA; run them on the GPU machine:
`.venv/bin/pytest tests/test_gpu.py -m gpu`)."""
import pytest
import torch

from fastseed.config import Config
from fastseed.train import prepare, train_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


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


@pytest.mark.parametrize("method,arch", [("seed", "resnet18"), ("moco", "resnet18"), ("simreg", "resnet18"),
                                         ("seed", "resnet18,mobilenetv3_large_100")])
@pytest.mark.parametrize("compile_", ["off", "on"])
def test_step_has_no_host_sync(method, arch, compile_, tmp_path):
    cfg = Config(method=method, arch=arch, teacher_arch="efficientnet_lite0", res=64, batch_size=64,
                 queue_size=1024, device="cuda", compile=compile_, output=str(tmp_path), progress=False)
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
