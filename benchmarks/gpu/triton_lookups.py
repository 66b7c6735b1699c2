"""Triton's file cache with every kernel lookup logged: which entry, which kernel, hit or miss.

The GPU check runs its steps with TRITON_CACHE_MANAGER=triton_lookups:LoggedCache and
FASTSEED_TRITON_LOOKUPS=FILE; the steps' processes (pytest, fastseed-train, Inductor's compile
workers) inherit both, so its summary can say which kernels the carried cache served and which
were compiled there. Neither variable enters Triton's cache key, and the class only adds a log
line to FileCacheManager (same in triton 3.6 and 3.8).
"""
import json
import os

from triton.runtime.cache import FileCacheManager

LOG = "FASTSEED_TRITON_LOOKUPS"


class LoggedCache(FileCacheManager):
    def __init__(self, key, override=False, dump=False):
        super().__init__(key, override=override, dump=dump)
        self.logged = not (override or dump) and bool(os.environ.get(LOG))  # the cache proper, not debug dirs

    def get_group(self, filename):
        group = super().get_group(filename)
        if self.logged:
            # triton.compile reads the group of f"{kernel}.json" and compiles unless that file is in it
            line = json.dumps({"entry": self.key, "kernel": filename.removesuffix(".json"),
                               "hit": filename in (group or {})})
            with open(os.environ[LOG], "a") as f:  # one short append per line: processes do not interleave
                f.write(line + "\n")
        return group
