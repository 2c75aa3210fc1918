#!/usr/bin/env python
"""Benchmark every fftconv implementation against jnp.fft (same as `longconv bench`).

    python scripts/bench_fftconv.py                 # CPU default: L = 256 … 16384, a few minutes
    python scripts/bench_fftconv.py --max-len 1048576 --peak-gbps 3350   # on a GPU
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.fftconv import bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.main(parser.parse_args()))
