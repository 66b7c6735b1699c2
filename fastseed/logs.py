"""What a run reports while it trains: metric records sent to sinks, and the progress bar.

A record is a flat dict (`step`, `epoch`, `loss`, `lr`, `img_per_s`, k-NN results, ...); the
`Logger` stamps it with the time and hands it to each sink of `--log`:

    jsonl        OUTPUT/metrics.jsonl, one JSON object a line (always written)
    tensorboard  scalars under OUTPUT/tb (needs the tensorboard package)

`--log auto` (the default) is jsonl, plus tensorboard when it is installed. A sink is a class
with `__init__(out_dir)`, `write(record)` and `close()`, registered in `SINKS`; one that needs a
package raises ConfigError naming it when asked for explicitly. Only the main rank logs.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from fastseed.errors import ConfigError


class JsonlSink:
    def __init__(self, out_dir: Path):
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """Every numeric field of a record with a `step`, as a scalar of that name."""
    requires = "tensorboard"

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out_dir / "tb"))

    def write(self, record: dict) -> None:
        if "step" not in record:
            return
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "time"):
                self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


SINKS = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink}


def _installed(sink) -> bool:
    need = getattr(sink, "requires", None)
    return need is None or importlib.util.find_spec(need) is not None


def sink_names(spec: str) -> list[str]:
    """`--log` (a comma list of SINKS, or auto) as sink names, jsonl first; ConfigError for an
    unknown sink or one whose package is missing."""
    if spec == "auto":
        return [n for n, s in SINKS.items() if _installed(s)]
    names = ["jsonl"] + [n.strip() for n in spec.split(",") if n.strip() not in ("", "jsonl")]
    for n in names:
        if n not in SINKS:
            raise ConfigError(f"unknown --log sink {n!r}: choose from auto, {', '.join(SINKS)}")
        if not _installed(SINKS[n]):
            raise ConfigError(f"--log {n} needs the {SINKS[n].requires} package: pip install {SINKS[n].requires}")
    return names


class Logger:
    """Sends each record to the run's sinks (nothing on ranks other than the main one). The
    sinks open at the first record: a run refused before its first step writes no file."""

    def __init__(self, out_dir: Path, enabled: bool, sinks: str = "auto"):
        self.out_dir, self.names = Path(out_dir), sink_names(sinks) if enabled else []
        self.sinks: list | None = None

    def log(self, record: dict) -> None:
        if self.sinks is None:
            self.sinks = [SINKS[n](self.out_dir) for n in self.names]
        record = {"time": round(time.time(), 3), **record}
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks or ():
            sink.close()


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar on stderr, or None when disabled."""
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)


class Throughput:
    """Steps and images since the last `reset`, and their images per second."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, images: int) -> None:
        self.steps += 1
        self.images += images

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.t0)
