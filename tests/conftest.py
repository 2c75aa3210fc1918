"""Test setup: CPU only, deterministic, float64 available for references.

The pytest workers of one run (and the CLI subprocesses they start) share a persistent XLA compilation
cache in a fresh temporary folder, so a program that several tests build (a tiny model's train step) is
compiled once per run. The folder is removed when the run ends: nothing carries over between runs.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set here in the main process; the workers inherit it
    _OWN_CACHE = tempfile.mkdtemp(prefix="longconv-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
    _OWN_CACHE = None


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
