"""The colour development set (`_bench.stamps`: Debian's tuxpaint-stamps-default cut-outs pasted
onto random backgrounds, its classes, split and composites): writes its train and test betons
and prints each class's sources and images.

    .venv/bin/python benchmarks/stamps.py --work data/stamps --side 64 [--preview stamps.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from _bench.tables import markdown
from _bench.stamps import CLASSES, STAMPS_ROOT, preview, stamps_betons


def main(argv=None) -> tuple[Path, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="data/stamps", help="folder of the betons (default data/stamps, git-ignored)")
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--train-per-image", type=int, default=6)
    p.add_argument("--test-per-image", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=str(STAMPS_ROOT))
    p.add_argument("--preview", default=None, metavar="FILE.png", help="also write a grid of train composites")
    a = p.parse_args(argv)
    train, test = stamps_betons(Path(a.work), side=a.side, train_per_image=a.train_per_image,
                                test_per_image=a.test_per_image, seed=a.seed, root=Path(a.root))
    meta = json.loads((Path(a.work) / "stamps.json").read_text())
    columns = (("train", "sources"), ("test", "sources"), ("train", "images"), ("test", "images"))
    rows = [[name, *(meta[s][name][k] for s, k in columns)] for name in CLASSES]
    rows.append(["all", *(sum(meta[s][n][k] for n in CLASSES) for s, k in columns)])
    print(markdown(["class", "train sources", "test sources", "train images", "test images"], rows, "lrrrr"))
    print(f"train: {train}\ntest: {test}")
    if a.preview:
        preview(Path(a.preview), Path(a.root), a.side, seed=a.seed)
        print(f"preview: {a.preview}")
    return train, test


if __name__ == "__main__":
    main()
