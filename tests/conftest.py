"""Test setup: CPU only, deterministic, float64 available for references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
