"""Every error fastseed raises on purpose, under one base.

A `FastseedError` is bad input or a state the run cannot go on from; its message is one line
that names the problem and what to do. The entry points print it as `error: <message>` and exit
with code 2, having written nothing over (fastseed/cli.py). Anything else is a bug.
"""
from __future__ import annotations


class FastseedError(Exception):
    """Base of the errors below: one actionable line, exit 2 at the command line."""


class ConfigError(FastseedError, ValueError):
    """A setting that cannot work; the message says which and what to do."""


class TrainingError(FastseedError, RuntimeError):
    """The run cannot go on (NaN loss, bad resume); the message says what to do."""


class CheckpointReadError(FastseedError, ValueError):
    """A file that cannot be read as a checkpoint, or only by running code from it."""


class TeacherLoadError(FastseedError, ValueError):
    """A teacher checkpoint that cannot be loaded completely and exactly."""


class CacheError(FastseedError, ValueError):
    """A teacher cache file that cannot be used for this run."""


class BetonError(FastseedError, ValueError):
    """A file that is not a readable FFCV dataset with the fields fastseed needs."""


class PrepError(FastseedError, ValueError):
    """A source or output that cannot be written to a beton (fastseed-prep); `report` is the
    fastseed.data_prep.PrepReport of what was done before it stopped, when there is one."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ExportError(FastseedError, ValueError):
    """An export that cannot be made (fastseed-export, fastseed-embed); the message says why and what to do."""
