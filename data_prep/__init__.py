"""`fastseed-prep`: images (folders, arrays, Fashion-MNIST, CIFAR) -> FFCV .beton files."""
from .sources import PrepError, open_source, subset_indices
from .write import PrepReport, main, write_beton

__all__ = ["PrepError", "PrepReport", "main", "open_source", "subset_indices", "write_beton"]
