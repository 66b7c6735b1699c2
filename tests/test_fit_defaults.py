"""Defaults that fit the data: `--queue-size auto` (methods/_common.py `auto_queue_size`) and the
warm-up cap (`--warmup-cap`, optim.Schedule), resolved once per run, said once, recorded in the
checkpoint; `--recipe official` keeps the papers' 65,536 keys and warm-up epochs."""
from __future__ import annotations

import pytest

from fastseed.cli import config_from_args
from fastseed.config import Config
from fastseed.errors import ConfigError
from fastseed.methods import official, recipe
from fastseed.methods._common import auto_queue_size
from fastseed.optim import Schedule
from fastseed.students import student_configs
from fastseed.train import prepare


@pytest.mark.parametrize("images,dim,batch,want", [
    (1500, 1280, 64, 512),          # a small photo set: half of it, rounded down to a power of two
    (5000, 1280, 64, 2048),
    (32000, 1280, 128, 4096),       # 2^23 / 1280 = 6553 -> 4096: wide keys, fewer of them
    (32000, 128, 128, 8192),        # 16,000 -> 8,192
    (1281167, 128, 256, 65536),     # ImageNet with SEED's 128-d keys: the paper's queue
    (1281167, 2048, 256, 4096),     # ... with a ResNet-50's 2048-d pooled features
    (100, 128, 256, 256),           # never less than the batch
    (300, 128, 100, 128),           # the batch rounded up to a power of two
])
def test_auto_queue_size_examples(images, dim, batch, want):
    assert auto_queue_size(images, dim, batch) == want


def test_auto_queue_size_rule_holds_over_a_grid():
    for images in (1, 7, 999, 1000, 1024, 4097, 10**5, 10**7):
        for dim in (1, 64, 128, 768, 1280, 4096):
            for batch in (1, 32, 100, 256):
                k = auto_queue_size(images, dim, batch)
                assert k & (k - 1) == 0, (images, dim, batch)             # a power of two
                floor = 1 << max(0, (batch - 1).bit_length())
                assert k >= batch and (k == floor or (k <= max(1, images // 2) and k <= 65536
                                                      and k * dim <= 65536 * 128)), (images, dim, batch, k)
                if k > floor:  # the largest such power: doubling breaks a cap
                    assert 2 * k > images // 2 or 2 * k > 65536 or 2 * k * dim > 65536 * 128


def tiny(teacher, out, **kw) -> Config:
    return Config(**{**dict(method="seed", arch="resnet10t", teacher_arch="resnet10t", distill=str(teacher),
                            data="unused.beton", res=32, device="cpu", compile="off", output=str(out),
                            progress=False, batch_size=64), **kw})


def test_a_run_sizes_its_queue_to_its_data_and_says_so_once(teacher_ckpt, tmp_path, capsys):
    """75 batches of 64 = 4,800 images of 512-d keys: 2,048 keys (half the images: 2,400 -> 2,048)."""
    run = prepare(tiny(teacher_ckpt, tmp_path / "a"), loader=range(75))
    assert run.cfg.queue_size == 2048 and run.students.members[0].cfg.queue_size == 2048
    assert run.queues.queue.keys.shape == (2048, 512)
    err = capsys.readouterr().err
    assert err.count("--queue-size auto: 2048 keys for 4800 images of 512-d keys") == 1
    given = prepare(tiny(teacher_ckpt, tmp_path / "b", queue_size=100), loader=range(75))
    assert given.queues.queue.keys.shape == (100, 512) and "--queue-size auto" not in capsys.readouterr().err
    simreg = prepare(tiny(teacher_ckpt, tmp_path / "c", method="simreg"), loader=range(75))
    assert simreg.queues is None and "--queue-size" not in capsys.readouterr().err  # no queue, nothing to say


def test_official_recipes_keep_the_papers_queue_and_warmup():
    for method in ("seed", "moco"):
        cfg = official(method)
        assert cfg.queue_size == 65536 and cfg.warmup_cap is None
    assert recipe("seed").queue_size == "auto" and recipe("seed").warmup_cap == 0.1


def test_the_warmup_never_exceeds_its_share_of_the_run():
    """5 warm-up epochs of a 2-epoch run of 78 steps each: 15 steps (10 % of 156), not 390."""
    cfg = Config(warmup_epochs=5.0, epochs=2, batch_size=64)
    s = Schedule(cfg, steps_per_epoch=78, total=156)
    assert s.warmup == 15
    assert s(0, 1.0) == pytest.approx(1 / 15) and s(14, 1.0) == pytest.approx(1.0)
    assert s(15, 1.0) == pytest.approx(1.0) and s(100, 1.0) < 1.0
    assert s.note() == ("warm-up: 15 steps, not the 390 of --warmup-epochs 5: at most 10% of the 156-step run "
                        "(--warmup-cap)")
    long = Schedule(cfg.replace(epochs=200), steps_per_epoch=78, total=200 * 78)
    assert long.warmup == 390 and long.note() is None  # 2.5 % of a long run: as asked, nothing said
    off = Schedule(cfg.replace(warmup_cap=None), steps_per_epoch=78, total=156)
    assert off.warmup == 390 and off.note() is None
    epoch = Schedule(cfg.replace(lr_schedule="epoch"), steps_per_epoch=78, total=156)
    assert epoch.note() is None  # the official per-epoch schedule counts its warm-up in epochs
    with pytest.raises(ConfigError, match="--warmup-cap 1.5"):
        Schedule(cfg.replace(warmup_cap=1.5), steps_per_epoch=78, total=156)


def test_the_cli_reads_auto_a_number_or_says_what_is_wrong(capsys):
    seed = ["--data", "x.beton", "--method", "seed"]
    assert config_from_args(seed).queue_size == "auto"
    assert config_from_args([*seed, "--queue-size", "4096"]).queue_size == 4096
    assert config_from_args([*seed, "--queue-size", "auto", "--warmup-cap", "0.2"]).warmup_cap == 0.2
    assert config_from_args([*seed, "--recipe", "official"]).queue_size == 65536
    with pytest.raises(SystemExit):
        config_from_args(["--data", "x.beton", "--queue-size", "lots"])
    assert "'lots' is neither a number of keys nor auto" in capsys.readouterr().err
    for method in ("seed", "moco"):  # checked with the students, before anything is written
        with pytest.raises(ConfigError, match="--queue-size 0: give a number of keys >= 1, or auto"):
            student_configs(Config(method=method, queue_size=0))
