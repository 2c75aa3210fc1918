#!/usr/bin/env python
"""The prepared device run for fftconv: correctness vs float64 + benchmark table, ≤ 5 minutes.

    python scripts/gpu_check.py                      # on the GPU: writes results/fftconv/bench_<device>.*
    python scripts/gpu_check.py --write-table        # ... and records the winners in kernels/fftconv/tuned.json
    python scripts/gpu_check.py --smoke --out /tmp/x # tiny sizes on CPU (interpret mode), < 1 minute

See kernels/fftconv/gpu_check.py for what is measured and how.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.fftconv import gpu_check  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_check.add_arguments(parser)
    sys.exit(gpu_check.main(parser.parse_args()))
