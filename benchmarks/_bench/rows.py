"""Result rows: one JSON line each in a results file, with the provenance of
`fastseed.provenance` (commit, versions, device, date); a grid of runs that resumes from the
rows its file already holds."""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines results file (blank lines skipped); none when it does not exist yet."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that made a results file, as its rows and its .md record it: the script's path
    from the repository root and its arguments (`argv`, else this process's)."""
    return " ".join([script, *(sys.argv[1:] if argv is None else argv)])


def stamped(row: dict, device=None) -> dict:
    """`row` followed by the provenance of the code and machine that measured it."""
    from fastseed.provenance import provenance  # imports torch: not needed to read rows (results_page.py)
    return {**row, **provenance(device)}


class Grid:
    """A resumable grid of runs whose rows go to `out`: `key` names a run by fields that its row
    and its cell (a dict of those fields) both hold; `todo(cells)` yields the cells no row has
    yet, in their order, and `add(row)` appends a finished run's row at once, so a grid stopped
    half-way and started again runs only what is missing.

        grid = Grid(out, key=lambda r: (r["dataset"], r["seed"]))
        for cell in grid.todo({"dataset": d, "seed": s} for d in datasets for s in seeds):
            grid.add(stamped({**cell, **run(cell)}))
    """

    def __init__(self, out: str | Path, key: Callable[[dict], Hashable]):
        self.out, self.key = Path(out), key
        self.rows = read_rows(self.out)
        self.done = {key(r) for r in self.rows}

    def todo(self, cells: Iterable[dict]) -> Iterator[dict]:
        for cell in cells:
            if self.key(cell) not in self.done:
                yield cell

    def add(self, row: dict) -> dict:
        """Append `row` to the file (its line also to stderr) and count its run as done."""
        from fastseed.provenance import append_row
        self.rows.append(row)
        self.done.add(self.key(row))
        print(append_row(self.out, row), file=sys.stderr)
        return row
