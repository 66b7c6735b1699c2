"""benchmarks/_bench, the helpers the benchmark scripts share: a grid resumes from its results
file, rows carry their provenance, the one markdown table writer, the alternating timer; and
that no script under benchmarks/ imports another script or edits sys.path."""
import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from _bench.rows import Grid, command_line, read_rows, stamped  # noqa: E402  (benchmarks/ is not a package)
from _bench.tables import markdown, mean_sd, span  # noqa: E402
from _bench.timing import alternate  # noqa: E402


def test_a_grid_runs_only_the_cells_its_file_lacks(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    cells = [{"dataset": d, "seed": s} for d in ("a", "b") for s in (0, 1)]
    ran = []

    def run(cells_to_run, stop_after=None):
        grid = Grid(out, key=lambda r: (r["dataset"], r["seed"]))
        for i, cell in enumerate(grid.todo(cells_to_run)):
            if i == stop_after:
                break  # a grid stopped half-way
            ran.append((cell["dataset"], cell["seed"]))
            grid.add({**cell, "score": 10 * cell["seed"]})
        return grid

    run(cells, stop_after=2)
    assert ran == [("a", 0), ("a", 1)] and len(read_rows(out)) == 2
    grid = run(cells)  # started again over the same file: only the missing cells
    assert ran == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    assert [(r["dataset"], r["seed"]) for r in grid.rows] == ran and read_rows(out) == grid.rows
    assert run(cells).rows == grid.rows and len(ran) == 4  # a third start runs nothing
    printed = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert printed == grid.rows  # each row's line also went to stderr as it was written


def test_read_rows_of_a_missing_file_is_empty_and_blank_lines_are_skipped(tmp_path):
    assert read_rows(tmp_path / "absent.jsonl") == []
    (tmp_path / "r.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_rows(tmp_path / "r.jsonl") == [{"a": 1}, {"a": 2}]


def test_rows_carry_provenance(tmp_path):
    row = stamped({"dataset": "a", "knn": 70.5}, "cpu")
    assert list(row)[:2] == ["dataset", "knn"]  # the row's own fields first, as the scripts wrote them
    for field in ("device", "cpu_count", "commit", "torch", "triton", "numba", "python", "date"):
        assert field in row
    assert row["device"].startswith("CPU")
    grid = Grid(tmp_path / "rows.jsonl", key=lambda r: r["dataset"])
    grid.add(row)
    assert read_rows(tmp_path / "rows.jsonl") == [row]


def test_command_line_names_the_script_from_the_repository_root(monkeypatch):
    assert command_line("benchmarks/x.py", ["--size", "tiny"]) == "benchmarks/x.py --size tiny"
    monkeypatch.setattr(sys, "argv", ["/abs/path/x.py", "--out", "r.jsonl"])
    assert command_line("benchmarks/x.py") == "benchmarks/x.py --out r.jsonl"


def test_markdown_table():
    text = markdown(["dataset", "seeds", "k-NN %"], [["fashion-mnist", 3, "70.05"], ["mnist-5k", None, 1.5]], "lrr")
    assert text == ("| dataset | seeds | k-NN % |\n"
                    "|---|---:|---:|\n"
                    "| fashion-mnist | 3 | 70.05 |\n"
                    "| mnist-5k | - | 1.5 |")
    assert markdown(["a", "b"], []) == "| a | b |\n|---|---|"
    with pytest.raises(ValueError, match="2 columns"):
        markdown(["a", "b"], [], "lrr")


def test_mean_sd_and_span():
    assert mean_sd([27.0, 29.0, 27.79]) == "27.93 ± 1.01"
    assert mean_sd([70.05]) == "70.05 ± -"
    assert span([70.05, 68.5, 71.0]) == "68.50-71.00"


def test_alternate_takes_turns_and_times_each_contender():
    calls = []

    def contender(name):
        def call():
            calls.append(name)
            return len(calls)
        return call

    timed = alternate({"a": contender("a"), "b": contender("b")}, 3)
    assert calls == ["a", "b",  # the warm-up, untimed
                     "a", "b", "b", "a", "a", "b"]  # the order flips every other round
    assert timed.results == {"a": [3, 6, 7], "b": [4, 5, 8]}
    for times in (timed.seconds, timed.cpu_seconds):
        assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())

    calls.clear()
    warm = []
    alternate({"a": contender("a"), "b": contender("b"), "c": contender("c")}, 2, flip=False,
              warmup={"a": lambda: warm.append("a"), "b": lambda: warm.append("b"), "c": lambda: warm.append("c")})
    assert warm == ["a", "b", "c"] and calls == ["a", "b", "c", "a", "b", "c"]


def _scripts() -> list[Path]:
    return sorted(p for p in BENCHMARKS.rglob("*.py") if "results" not in p.relative_to(BENCHMARKS).parts)


def test_no_script_imports_another_or_edits_sys_path():
    """The benchmark scripts share code through _bench only: no file under benchmarks/ imports a
    script of benchmarks/ (a module named as one of its *.py files), and none edits sys.path
    (a script run as `python benchmarks/X.py` has benchmarks/ on it already)."""
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")}
    assert {"bench_data", "defaults_study", "stamps"} <= scripts
    found = []
    for path in _scripts():
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.split(".")[0] in scripts]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in scripts:
                found.append(f"{where}:{node.lineno} imports from {node.module}")
            elif isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                found.append(f"{where}:{node.lineno} uses sys.path")
    assert not found, "\n".join(found)


def test_the_gpu_tooling_has_its_own_folder():
    gpu = BENCHMARKS / "gpu"
    assert {p.name for p in gpu.glob("*.py")} == {"gpu_check.py", "gpu_pytest.py", "gpu_rehearse.py",
                                                   "gpu_wheels.py", "compile_cache.py", "triton_lookups.py"}
    assert (gpu / "README.md").is_file()
    assert not any(BENCHMARKS.glob("gpu_*.py"))
