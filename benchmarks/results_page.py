"""docs/results.md, generated from benchmarks/results/*.jsonl: one section per results file, a
table of its rows' key figures, each row with the device, commit and date it records.

    python benchmarks/results_page.py            # writes docs/results.md
    python benchmarks/results_page.py --check    # exit 1 when docs/results.md is not the page

The page is a function of the files alone (files by name, rows in file order, fixed number
formats), so tests/test_docs.py builds it in memory and compares it with docs/results.md. A file
that `SECTIONS` does not describe still gets a section: the scalar fields whose values differ
between its rows. Every figure in README.md and docs/ links to the file its rows are in; this page
is where those rows' provenance is read.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _bench.rows import read_rows
from _bench.tables import markdown

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
PROVENANCE = ("device", "commit", "date")
NOT_FIGURES = set(PROVENANCE) | {"torch", "triton", "numba", "python", "cpu_count", "size", "uptime"}

Getter = Callable[[dict], object]


@dataclass
class Table:
    columns: list[tuple[str, str | Getter]]  # (header, field name, dotted into dicts, or a function of the row)
    where: Callable[[dict], bool] = lambda row: True
    title: str = ""


@dataclass
class Section:
    title: str
    script: str  # the benchmark that writes the file
    about: str   # what a row is
    tables: list[Table] = field(default_factory=list)


def mib(key: str) -> Getter:
    return lambda row: None if get(row, key) is None else get(row, key) / 2**20


KNN = [("k-NN top-1 @20", "knn_top1@20"), ("k-NN top-1 @1", "knn_top1@1")]

SECTIONS: dict[str, Section] = {
    "cache_cpu": Section(
        "Teacher cache: speed", "bench_cache.py",
        "one configuration: the cache's build rate, the replay loader against the live-crop loader, and "
        "training images/s from the cache against the live teacher (median of alternating windows)",
        [Table([("teacher", "teacher"), ("px", "res"), ("teacher px", "teacher_res"), ("batch", "batch"),
                ("queue", "queue"), ("build crops/s", "build_crops_per_s"), ("replay / live loader", "replay_vs_live"),
                ("train img/s live", "train_live_images_per_s"), ("train img/s cache", "train_cache_images_per_s"),
                ("ratio (median)", "train_ratio_median"), ("break-even epochs", "break_even_epochs")])]),
    "cache_quality_cpu": Section(
        "Teacher cache: quality", "cache_quality.py",
        "one run: a resnet10t distilled by SEED from the live teacher (crops –) or from a cache of R crops",
        [Table([("dataset", "dataset"), ("crops R", "crops"), ("seed", "seed"), ("epochs", "epochs"), *KNN])]),
    "data_cpu": Section(
        "Data pipeline", "bench_data.py",
        "one configuration: fastseed's FFCV loader and batched augmentation against a torchvision loader",
        [Table([("px", "res"), ("images", "images"), ("batch", "batch"), ("CPU augment", "cpu_augment"),
                ("fastseed img/s", "fastseed_images_per_s"), ("torchvision img/s", "torchvision_images_per_s"),
                ("speed-up", "speedup")])]),
    "dense_quality_cpu": Section(
        "Patch-token loss: quality", "dense_quality.py",
        "one run: a ResNet-18 distilled from EfficientNet-Lite0 with SEED, the patch-token loss, or both",
        [Table([("dataset", "dataset"), ("objective", "objective"), ("seed", "seed"), ("px", "res"),
                ("teacher px", "teacher_res"), ("steps", "steps"), *KNN])]),
    "export_cpu": Section(
        "Deployed students", "bench_export.py",
        "one student, backend and batch at 224 px: latency, throughput, and the backend's k-NN top-1 at 32 px",
        [Table([("student", "arch"), ("backend", "backend"), ("batch", "batch"),
                ("ms / batch (median)", "ms_per_batch"), ("ms (min)", "min_ms"), ("img/s", "images_per_s"),
                ("k-NN top-1 @20", "knn_top1@20")])]),
    "gpu_check_h200": Section(
        "GPU check", "gpu/gpu_check.py",
        "the steps of a GPU check, and the rows its kernel steps measured",
        [Table([("step", "step"), ("status", "status"), ("s", "wall_s"), ("expected s", "expected_s"),
                ("cap s", "cap_s")],
               where=lambda row: "status" in row, title="Steps"),
         Table([("op", "row.op"), ("D", "row.D"), ("dtype", "row.dtype"), ("loss rel err", "row.loss_rel_err"),
                ("grad cos", "row.grad_cos"), ("enqueue max abs diff", "row.max_abs_diff"), ("ok", "row.ok")],
               where=lambda row: row.get("step") == "b-correctness" and "row" in row,
               title="Correctness against float64 (b-correctness)"),
         Table([("B", "row.B"), ("K", "row.K"), ("D", "row.D"), ("impl", "row.impl"), ("eager µs", "row.us"),
                ("CUDA graph µs", "row.graph_us"), ("peak extra MiB", mib("row.peak_extra_bytes")),
                ("loss rel err", "row.loss_rel_err"), ("grad cos", "row.grad_cos")],
               where=lambda row: row.get("step") == "c-kernels" and "row" in row,
               title="Fused loss, forward + backward (c-kernels)")]),
    "multi_cpu": Section(
        "Several students in one run", "bench_multi.py",
        "one session: a joint run of three students against their three solo runs one after the other",
        [Table([("teacher", "teacher"), ("px", "res"), ("batch", "batch"), ("rounds", "rounds"),
                ("joint img/s", "joint_images_per_s"), ("solo sequence img/s", "solo_sequence_images_per_s"),
                ("ratio (median)", "ratio_median"), ("min", "ratio_min"), ("max", "ratio_max")])]),
    "recipes_cpu": Section(
        "Recipes at equal steps", "recipes.py",
        "one run: a ResNet-18 distilled from EfficientNet-Lite0 for 128 steps of 64 with one recipe",
        [Table([("dataset", "dataset"), ("recipe", "recipe"), ("seed", "seed"), ("method", "method"), *KNN])]),
    "recipes_lightly_cpu": Section(
        "LightlyTrain at equal steps", "recipes_lightly.py",
        "one LightlyTrain run on the subsets, teacher, student and step count of the recipes above",
        [Table([("dataset", "dataset"), ("method", "method"), ("seed", "seed"), ("LightlyTrain", "lightly_train"),
                ("optimizer", "optimizer"), ("lr", "lr"), *KNN])]),
    "recipes_speed_cpu": Section(
        "Training speed beside LightlyTrain", "recipes_speed.py",
        "one fresh process of a tool at 128 or 256 steps; the steady rate is 128 × 64 / (t(256) − t(128)) "
        "per repetition (the .md beside the file)",
        [Table([("tool", "tool"), ("recipe", "recipe"), ("repetition", "rep"), ("steps", "steps"), ("s", "train_s"),
                ("load before", "load_before")])]),
    "teachers_cpu": Section(
        "DINOv2 teacher forward", "bench_teachers.py",
        "fastseed's DINOv2 forward against timm's on the same weights",
        [Table([("teacher", "teacher"), ("px", "res"), ("batch", "batch"), ("fastseed img/s", "fastseed_images_per_s"),
                ("timm img/s", "timm_images_per_s"), ("min cosine", "min_cosine_fastseed_vs_timm")])]),
}


def get(row: dict, key: str | Getter):
    if callable(key):
        return key(row)
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def cell(value) -> str:
    """A value as the page writes it: floats to 4 significant digits (3 below 1, 6 decimals for a
    cosine between 0.99 and 1), no exponent from 1,000 up; None as –; text cut at 100 characters."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:.0f}"
        if 0.99 <= value < 1:
            return f"{value:.6f}"
        return f"{value:.4g}" if abs(value) >= 1 else f"{value:.3g}"
    if isinstance(value, (list, dict)):
        value = json.dumps(value)
    text = str(value).replace("\n", " ")
    text = text if len(text) <= 100 else text[:99] + "…"
    return text.replace("|", "\\|")


def provenance(stem: str, rows: list[dict]) -> list[tuple]:
    """(device, commit, date) of each row: its own fields, or, for a GPU check's rows, those of
    the environment step of the check that wrote them (or of the last one before it)."""
    if not stem.startswith("gpu_check"):
        return [tuple(row.get(k) for k in PROVENANCE) for row in rows]
    envs = {}
    for row in rows:
        result = row.get("result") if isinstance(row.get("result"), dict) else {}
        if row.get("step") == "a-environment" and "gpu" in result:
            envs[row.get("run")] = {"device": result["gpu"], "commit": result.get("commit")}
    out, env = [], {}
    for row in rows:
        env = envs.get(row.get("run"), env)
        run = str(row.get("run", ""))
        date = run[:19].replace("T", " ") if len(run) >= 19 else None
        out.append((env.get("device"), env.get("commit"), date))
    return out


def generic(rows: list[dict]) -> Section:
    """A section for a file `SECTIONS` does not know: the scalar fields that differ between rows."""
    seen: dict[str, set] = {}
    for row in rows:
        for k, v in row.items():
            if k not in NOT_FIGURES and not isinstance(v, (list, dict)):
                seen.setdefault(k, set()).add(json.dumps(v))
    varying = [k for k, vs in seen.items() if len(vs) > 1] or list(seen)[:6]
    return Section("", "", "", [Table([(k, k) for k in varying[:10]])])


def section_text(path: Path) -> list[str]:
    stem = path.stem
    rows = read_rows(path)
    spec = SECTIONS.get(stem) or generic(rows)
    prov = provenance(stem, rows)
    rel = f"../benchmarks/results/{path.name}"
    beside = path.with_suffix(".md")
    lines = [f"## {title_of(stem)}", ""]
    source = f"[`{path.name}`]({rel})" + (f", with [`{beside.name}`](../benchmarks/results/{beside.name})"
                                          if beside.is_file() else "")
    script = f" (written by `benchmarks/{spec.script}`)" if spec.script else ""
    about = f" A row: {spec.about}." if spec.about else ""
    lines += [f"{source}{script}: {len(rows)} rows.{about}", ""]
    for table in spec.tables:
        picked = [(row, p) for row, p in zip(rows, prov) if table.where(row)]
        if not picked:
            continue
        if table.title:
            lines += [f"### {table.title}", ""]
        headers = [h for h, _ in table.columns] + ["device", "commit", "date"]
        lines += [markdown(headers, [[cell(get(row, key)) for _, key in table.columns] + [cell(v) for v in p]
                                     for row, p in picked]), ""]
    return lines


def page() -> str:
    files = sorted(RESULTS.glob("*.jsonl"))
    lines = ["# Results", "",
             ("<!-- generated by benchmarks/results_page.py from benchmarks/results/*.jsonl: edit those, "
              "then run `make results-page` -->"), "",
             ("Every measured row of `benchmarks/results/`, file by file, with the device, commit and date it "
              "records. The figures in the README and the other pages link here or to the files themselves; "
              "each benchmark's method is in its script's docstring and in "
              "[benchmarks/README.md](../benchmarks/README.md)."), ""]
    lines += [f"- [{title_of(p.stem)}](#{anchor(title_of(p.stem))}): `{p.name}`" for p in files]
    lines.append("")
    for path in files:
        lines += section_text(path)
    others = sorted(p for p in RESULTS.iterdir()
                    if p.suffix in (".md", ".json") and not p.with_suffix(".jsonl").is_file())
    if others:
        lines += ["## Other records", ""]
        lines += [f"- [`{p.name}`](../benchmarks/results/{p.name})" for p in others]
        lines.append("")
    return "\n".join(lines)


def title_of(stem: str) -> str:
    return SECTIONS[stem].title if stem in SECTIONS else stem


def anchor(title: str) -> str:
    """GitHub's anchor of a heading: lower case, spaces to hyphens, punctuation dropped."""
    return "".join(c for c in title.lower().replace(" ", "-") if c.isalnum() or c in "-_")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write docs/results.md from benchmarks/results/*.jsonl.")
    p.add_argument("--check", action="store_true", help="exit 1 when docs/results.md differs from the generated page")
    args = p.parse_args(argv)
    text = page()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is stale: run python benchmarks/results_page.py", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
