"""End-to-end runs of the training loop on real Fashion-MNIST images (tiny, CPU)."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from fastseed.checkpoint import atomic_save, read_checkpoint
from fastseed.config import Config
from fastseed.errors import TrainingError
from fastseed.optim import lr_at
from fastseed.train import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(fmnist):
    return SimpleNamespace(train=fmnist("train", 512), test=fmnist("test", 256))


def tiny(data, teacher_ckpt, out, **kw) -> Config:
    cfg = Config(method="seed", arch="resnet10t", teacher_arch="resnet10t", distill=str(teacher_ckpt),
                 data=str(data.train), val_data=str(data.test), res=32, workers=2,
                 epochs=1, batch_size=32, lr=0.1, warmup_epochs=0, queue_size=256, distill_t=1e-4,
                 output=str(out), log_every=1, ckpt_every=1000, knn_every=0, progress=False, device="cpu")
    return cfg.replace(**kw)


def read_metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_tiny_seed_run_learns_and_writes_outputs(data, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    # K = 2 batches: after step 2 the queue holds only real teacher keys, so the loss is
    # comparable from there on (before, random queue rows make it artificially easy)
    # a real teacher: a random network's features are all alike (cosine 0.997), nothing to learn
    result = train(tiny(data, teacher_ckpt, out, epochs=3, queue_size=64, teacher_arch="efficientnet_lite0",
                        distill=None))
    steps = [r for r in read_metrics(out) if "loss" in r]
    assert result["step"] == 48 == len(steps)  # 3 x 512 images / 32, drop_last
    losses = [r["loss"] for r in steps]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[2:6]) / 4, sum(losses[-4:]) / 4
    assert last < 0.85 * first, losses
    ckpt = read_checkpoint(out / "checkpoint_last.pt")
    assert ckpt["fastseed"]["step"] == 48 and ckpt["fastseed"]["teacher"]["format"] == "bundled"
    assert "teacher" not in " ".join(ckpt["student"]) and ckpt["buffers"]["queue.keys"].shape == (64, 1280)
    assert 0 <= result["results"]["student"]["knn_top1@20"] <= 100


def test_kept_labels_survive_ffcv_buffer_reuse(data):
    """FFCV reuses its batch buffers a few batches later: labels kept across a whole pass (as
    k-NN does) must still be the labels of their batch."""
    from fastseed.data import eval_loader
    from fastseed.evaluate import KnnMonitor
    loader = eval_loader(str(data.test), batch_size=16, res=28)  # 16 batches >> ring size
    kept = [y for _, y in loader]
    fresh = [y.clone() for _, y in loader]
    assert all(torch.equal(a, b) for a, b in zip(kept, fresh))
    # and end to end: raw-pixel k-NN with the val set as its own bank is exact at k=1
    cfg = Config(workers=2, data=str(data.test), val_data=str(data.test), res=28)
    r = KnnMonitor(cfg, torch.device("cpu"), ((0.5,) * 3, (0.5,) * 3), None, batch_size=16)(None)
    assert r["knn_top1@1"] == 100.0, r


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(99, 100, 10, 1.0) < 0.001


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save({"a": Unpicklable()}, path)
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_save_names_tensors_that_alias_under_two_dtypes(tmp_path):
    """torch.save refuses them without naming any; the error names both and keeps the old file."""
    path = tmp_path / "ckpt.pt"
    atomic_save({"a": 1}, path)
    w = torch.zeros(4)
    with pytest.raises(TrainingError, match=r"student\.w=float32, buffers\.rng\[1\]=int32\. ckpt\.pt is untouched"):
        atomic_save({"student": {"w": w}, "buffers": {"rng": [torch.ones(2), w.view(torch.int32)]}}, path)
    assert torch.load(path) == {"a": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, teacher_ckpt, tmp_path):
    out = tmp_path / "nan"
    train(tiny(data, teacher_ckpt, out, max_steps=3))
    good = (out / "checkpoint_last.pt").read_bytes()
    with pytest.raises(TrainingError, match=r"NaN/inf (at|by) step \d+"):
        train(tiny(data, teacher_ckpt, out, lr=float("nan"), resume="auto", log_every=2, ckpt_every=2))
    assert (out / "checkpoint_last.pt").read_bytes() == good


def test_out_of_memory_at_start_suggests_largest_batch(data, teacher_ckpt, tmp_path, monkeypatch):
    """Simulated device memory of 8 images: the message names batch 8 and leaves no checkpoint."""
    import fastseed.train as T
    real_step = T.train_step

    def small_memory_step(run, views, step, batch=None):
        if views[0].shape[0] > 8:
            raise torch.OutOfMemoryError("simulated")
        return real_step(run, views, step, batch)

    monkeypatch.setattr(T, "train_step", small_memory_step)
    out = tmp_path / "oom"
    with pytest.raises(TrainingError, match=r"largest batch that fits is 8: rerun with --batch-size 8"):
        train(tiny(data, teacher_ckpt, out, max_steps=2))
    assert not (out / "checkpoint_last.pt").exists()


@pytest.mark.parametrize("method", ["seed-small-patch", "moco", "simreg"])
def test_every_method_runs_through_the_loop(data, teacher_ckpt, tmp_path, method):
    kw = {"seed-small-patch": dict(method="seed", small_crops=2, small_res=16),
          "moco": dict(method="moco", dim=32), "simreg": dict(method="simreg")}[method]
    out = tmp_path / method
    result = train(tiny(data, teacher_ckpt, out, max_steps=3, val_data=None, **kw))
    assert result["step"] == 3
    ckpt = read_checkpoint(out / "checkpoint_last.pt")
    buffers = ckpt["buffers"]
    if method == "seed-small-patch":
        assert int(buffers["queue.ptr"]) == int(buffers["small_queue.ptr"]) == 3 * 32 % 256
    if method == "moco":
        assert any(k.startswith("key_encoder.") for k in buffers) and buffers["queue.keys"].shape == (256, 32)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)


def test_knn_monitor_each_epoch_and_tensorboard(data, teacher_ckpt, tmp_path):
    out = tmp_path / "monitor"
    train(tiny(data, teacher_ckpt, out, epochs=3, batch_size=128, knn_every=1, log_every=2))
    records = read_metrics(out)
    monitors = [r for r in records if "knn_top1@20" in r and not r.get("final")]
    assert [r["epoch"] for r in monitors] == [1, 2]  # epoch 3's k-NN is the final one
    assert all(0 <= r["knn_top1@20"] <= 100 for r in monitors)
    final = [r for r in records if r.get("final")]
    assert len(final) == 1 and "student/knn_top1@20" in final[0]
    try:
        import tensorboard  # noqa: F401  (optional dependency)
    except ImportError:
        return
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_teacher_precision_auto_follows_the_students_on_cuda_and_amx_on_a_cpu(monkeypatch):
    import fastseed.runtime as runtime
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.teacher_dtype(Config(), cuda) == torch.bfloat16
    assert runtime.teacher_dtype(Config(precision="fp32"), cuda) is None
    assert runtime.teacher_dtype(Config(precision="fp32", teacher_precision="bf16"), cuda) == torch.bfloat16
    for amx, want in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(runtime, "has_amx", lambda amx=amx: amx)
        assert runtime.teacher_dtype(Config(), cpu) is want
        assert runtime.teacher_dtype(Config(teacher_precision="fp32"), cpu) is None
        assert runtime.amp_dtype(Config(), cpu) is None  # the students stay fp32 on a CPU
        assert runtime.teacher_dtype(Config(teacher_precision="student"), cpu) is None  # as before auto
    assert runtime.teacher_dtype(Config(teacher_precision="student", precision="fp16"), cuda) == torch.float16


def test_bf16_teacher_feeds_fp32_students_and_its_own_knn_row(data, teacher_ckpt, tmp_path, monkeypatch):
    """--teacher-precision bf16 beside fp32 students: the teacher runs in bf16, its keys reach the
    loss and the queue in fp32, and the final table scores the teacher at its own precision."""
    import fastseed.targets as targets
    seen = []
    load = targets.load_run_teacher

    def spied(*args, **kwargs):
        bundle = load(*args, **kwargs)
        bundle.model.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        return bundle

    monkeypatch.setattr(targets, "load_run_teacher", spied)
    out = tmp_path / "bf16"
    result = train(tiny(data, teacher_ckpt, out, max_steps=3, teacher_precision="bf16", precision="fp32",
                        final_table=True))
    assert result["step"] == 3 and seen and set(seen) == {torch.bfloat16}
    ckpt = read_checkpoint(out / "checkpoint_last.pt")
    assert ckpt["buffers"]["queue.keys"].dtype == torch.float32
    assert 0 < result["results"]["teacher"]["knn_top1@20"] <= 100
    assert all(math.isfinite(r["loss"]) for r in read_metrics(out) if "loss" in r)


def test_mlflow_wandb_and_tensorboard_sinks_record_a_run_and_its_resume(data, teacher_ckpt, tmp_path, monkeypatch):
    """--log jsonl,tensorboard,mlflow,wandb end to end: MLflow's local store holds every logged
    step's loss and the settings, the W&B offline run directory is written, and a resumed run
    goes on in the same MLflow and W&B runs."""
    for sink in ("mlflow", "wandb", "tensorboard"):
        pytest.importorskip(sink)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B has no key, so it runs offline
    out = tmp_path / "run"
    cfg = tiny(data, teacher_ckpt, out, log="tensorboard,mlflow,wandb", max_steps=3, final_table=False)
    train(cfg)
    train(cfg.replace(max_steps=5, resume="auto"))
    losses = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    assert sorted(losses) == [1, 2, 3, 4, 5]

    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fastseed").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == (out / "mlflow_run_id").read_text().strip()
    assert runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "loss")}
    assert history == pytest.approx(losses)
    assert runs[0].data.params["method"] == "seed" and runs[0].data.params["batch_size"] == "32"

    run_id = (out / "wandb_run_id").read_text().strip()
    offline = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2, offline  # the run and its resume, one W&B id: `wandb sync` merges them
    assert all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline)
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_a_missing_sink_package_is_one_line_naming_it(data, teacher_ckpt, tmp_path, monkeypatch):
    from fastseed import logs
    from fastseed.errors import ConfigError
    real = logs.importlib.util.find_spec
    monkeypatch.setattr(logs.importlib.util, "find_spec", lambda m: None if m == "wandb" else real(m))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"^--log wandb needs wandb: pip install 'fastseed\[wandb\]'$"):
        train(tiny(data, teacher_ckpt, out, log="wandb", max_steps=1))
    assert not out.exists() or not any(out.iterdir())
