"""pytest plugin of the GPU check's test steps (`-p gpu_pytest`, benchmarks/gpu/ on PYTHONPATH).

- A time limit per test, FASTSEED_TEST_TIMEOUT_S seconds (the GPU image has pytest but not
  pytest-timeout): SIGALRM fails the test that ran past it and the run goes on with the next.
  The alarm is seen when Python runs again: a test stuck inside one CUDA call is ended by the
  step's cap instead, with the tests before it already recorded.
- Each test's outcome appended as one JSON line to FASTSEED_TEST_RESULTS as soon as it is known
  ({"run", "step", "test", "outcome", "s"}): a step killed at its cap keeps every finished test.
- torch.compile's cache artifacts (compile_cache.py): loaded before the first test, saved after
  each one.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

import compile_cache

TIMEOUT, RESULTS = "FASTSEED_TEST_TIMEOUT_S", "FASTSEED_TEST_RESULTS"


class TestTimeLimit(Exception):
    pass


def pytest_sessionstart(session):
    compile_cache.load_once()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get(TIMEOUT) or 0)
    if limit <= 0:
        yield
        return

    def expire(signum, frame):
        raise TestTimeLimit(f"{item.nodeid} ran past its {limit:.0f} s limit ({TIMEOUT})")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_started: dict[str, float] = {}


def pytest_runtest_logstart(nodeid, location):
    _started[nodeid] = time.monotonic()


def pytest_runtest_logreport(report):
    # one line per test: its call, or the setup that failed or skipped it
    final = report.when == "call" or (report.when == "setup" and not report.passed) or (
        report.when == "teardown" and report.failed)
    if final and os.environ.get(RESULTS):
        line = {"run": os.environ.get("FASTSEED_CHECK_RUN"), "step": os.environ.get("FASTSEED_CHECK_STEP"),
                "test": report.nodeid, "outcome": report.outcome if report.when != "teardown" else "error",
                "s": round(time.monotonic() - _started.get(report.nodeid, time.monotonic()), 2)}
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)  # "path:line: Error: message"
            text = crash.message if crash else str(report.longrepr or "").strip()
            line["error"] = text.splitlines()[0][:300] if text else None
        with open(os.environ[RESULTS], "a") as f:
            f.write(json.dumps(line) + "\n")
    if report.when == "teardown":
        compile_cache.save(os.environ.get("FASTSEED_CHECK_STEP") or "pytest")
