"""What a run reports while it trains: metric records sent to sinks, and the progress bar.

A record is a flat dict (`step`, `epoch`, `loss`, `lr`, `img_per_s`, k-NN results, ...); the
`Logger` stamps it with the time and hands it to each sink of `--log`:

    jsonl        OUTPUT/metrics.jsonl, one JSON object a line (always written)
    tensorboard  scalars under OUTPUT/tb (the tensorboard package)
    mlflow       an MLflow run: MLFLOW_TRACKING_URI, else OUTPUT/mlflow.db (extra `fastseed[mlflow]`)
    wandb        a Weights & Biases run under OUTPUT/wandb, offline without an API key (`fastseed[wandb]`)

`--log auto` (the default) is jsonl, plus tensorboard when it is installed. A sink is a `Sink`
registered in `SINKS`; one whose package is missing is refused in one line naming it when asked
for. Only the main rank logs; a resumed run goes on in the same MLflow or W&B run.
"""
from __future__ import annotations

import importlib.util
import json
import netrc
import os
import re
import secrets
import sys
import time
from pathlib import Path

from fastseed.errors import ConfigError


class Sink:
    """A metric sink: opened at the run's first record with the output folder and the run's
    settings (`settings_of`: names to plain values), then `write(record)` per record and
    `close(status)` once: "FINISHED", "FAILED" (an exception ended the run) or "KILLED" (a
    preemption signal: the run resumes from its checkpoint). `needs()`: the (module, pip
    package) pairs it imports; `sink_names` refuses it in one line when one is missing."""

    @classmethod
    def needs(cls) -> list[tuple[str, str]]:
        return []

    def __init__(self, out_dir: Path, params: dict):
        self.out_dir = out_dir

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self, status: str = "FINISHED") -> None:
        pass


def scalars(record: dict) -> dict:
    """A record's numeric fields other than step and time (bools are flags, not metrics)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time")}


def _read_id(path: Path) -> str | None:
    return path.read_text().strip() or None if path.is_file() else None


def _write_id(path: Path, run_id: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


class JsonlSink(Sink):
    def __init__(self, out_dir: Path, params: dict):
        super().__init__(out_dir, params)
        self.file = open(out_dir / "metrics.jsonl", "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self, status: str = "FINISHED") -> None:
        self.file.close()


class TensorBoardSink(Sink):
    """Every numeric field of a record with a `step`, as a scalar of that name; the settings as
    the text `config`."""

    @classmethod
    def needs(cls):
        return [("tensorboard", "tensorboard")]

    def __init__(self, out_dir: Path, params: dict):
        super().__init__(out_dir, params)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out_dir / "tb"))
        self.writer.add_text("config", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items()))

    def write(self, record: dict) -> None:
        if "step" not in record:
            return
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MlflowSink(Sink):
    """Each record's numeric fields as MLflow metrics at its step, the settings as the run's
    parameters, the run named after the output folder. The store: MLFLOW_TRACKING_URI when set
    (a tracking server, a database), else a SQLite file OUTPUT/mlflow.db that
    `mlflow ui --backend-store-uri sqlite:///OUTPUT/mlflow.db` opens; the experiment:
    MLFLOW_EXPERIMENT_NAME, else "fastseed". A resumed run goes on in the same MLflow run (its id
    in OUTPUT/mlflow_run_id); a setting changed on resume keeps the value it started with there.
    Metric names keep MLflow's characters (letters, digits, _ - . / space :), others become _."""
    ID_FILE = "mlflow_run_id"

    @classmethod
    def needs(cls):
        local = not os.environ.get("MLFLOW_TRACKING_URI", "sqlite").startswith(("http", "databricks", "file"))
        return [("mlflow", "mlflow-skinny")] + ([("sqlalchemy", "sqlalchemy"), ("alembic", "alembic")] if local else [])

    def __init__(self, out_dir: Path, params: dict):
        super().__init__(out_dir, params)
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str((out_dir / "mlflow.db").resolve())
        self.client = MlflowClient(tracking_uri=uri)
        run_id, have = _read_id(out_dir / self.ID_FILE), {}
        if run_id is not None:
            try:
                have = self.client.get_run(run_id).data.params
            except MlflowException:  # the id of another store: a run of its own here
                run_id = None
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fastseed")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(exp_id, run_name=Path(out_dir).resolve().name).info.run_id
            _write_id(out_dir / self.ID_FILE, run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        new = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=new[i:i + 100])

    def write(self, record: dict) -> None:
        from mlflow.entities import Metric
        stamp, step = int(record.get("time", time.time()) * 1000), int(record.get("step", 0))
        metrics = [Metric(re.sub(r"[^\w\-./ :]", "_", k), float(v), stamp, step) for k, v in scalars(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class WandbSink(Sink):
    """Each record's numeric fields to Weights & Biases at its step, the settings as the run's
    config, the run named after the output folder, its files under OUTPUT/wandb. Mode:
    WANDB_MODE when set; else online when an API key is known (WANDB_API_KEY or `wandb login`),
    offline otherwise (no network needed; `wandb sync OUTPUT/wandb/offline-run-*` uploads it
    later). Project: WANDB_PROJECT, else "fastseed". A resumed run goes on in the same W&B run
    (its id in OUTPUT/wandb_run_id)."""
    ID_FILE = "wandb_run_id"

    @classmethod
    def needs(cls):
        return [("wandb", "wandb")]

    @staticmethod
    def mode() -> str:
        if os.environ.get("WANDB_MODE"):
            return os.environ["WANDB_MODE"]
        if os.environ.get("WANDB_API_KEY"):
            return "online"
        try:
            return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
        except (OSError, netrc.NetrcParseError):
            return "offline"

    def __init__(self, out_dir: Path, params: dict):
        super().__init__(out_dir, params)
        import wandb
        run_id = _read_id(out_dir / self.ID_FILE)
        if run_id is None:
            run_id = secrets.token_hex(4)  # W&B run ids: letters and digits
            _write_id(out_dir / self.ID_FILE, run_id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastseed"), dir=str(out_dir),
                              name=Path(out_dir).resolve().name, id=run_id, resume="allow", mode=self.mode(),
                              config=params)

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record["step"])) if "step" in record else self.run.log(values)

    def close(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


SINKS = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink, "mlflow": MlflowSink, "wandb": WandbSink}
# setup.py's extras that install a sink's packages
EXTRAS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def missing(sink: type[Sink]) -> list[str]:
    """The pip packages of `sink` that are not installed."""
    return [pkg for module, pkg in sink.needs() if importlib.util.find_spec(module) is None]


def sink_names(spec: str) -> list[str]:
    """`--log` (a comma list of SINKS, or auto) as sink names, jsonl first; ConfigError for an
    unknown sink or one whose package is missing. auto: jsonl, and tensorboard when installed
    (MLflow and W&B write only when asked for)."""
    if spec == "auto":
        return [n for n in ("jsonl", "tensorboard") if not missing(SINKS[n])]
    names = ["jsonl"] + [n.strip() for n in spec.split(",") if n.strip() not in ("", "jsonl")]
    for n in names:
        if n not in SINKS:
            raise ConfigError(f"unknown --log sink {n!r}: choose from auto, {', '.join(SINKS)}")
        packages = missing(SINKS[n])
        if packages:
            extra = f"pip install 'fastseed[{EXTRAS[n]}]'" if n in EXTRAS else "pip install " + " ".join(packages)
            raise ConfigError(f"--log {n} needs {', '.join(packages)}: {extra}")
    return names


class Logger:
    """Sends each record to the run's sinks (nothing on ranks other than the main one). The
    sinks open at the first record: a run refused before its first step writes no file."""

    def __init__(self, out_dir: Path, enabled: bool, sinks: str = "auto", params: dict | None = None):
        self.out_dir, self.names = Path(out_dir), sink_names(sinks) if enabled else []
        self.params, self.sinks = params or {}, None

    def log(self, record: dict) -> None:
        if self.sinks is None:
            self.sinks = [SINKS[n](self.out_dir, self.params) for n in self.names]
        record = {"time": round(time.time(), 3), **record}
        for sink in self.sinks:
            sink.write(record)

    def close(self, status: str = "FINISHED") -> None:
        """`status`: Sink.close's."""
        for sink in self.sinks or ():
            sink.close(status)


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
