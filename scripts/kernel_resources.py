#!/usr/bin/env python
"""Registers, stack frame and spill bytes of every Pallas fftconv kernel, compiled for sm_90 on a CPU.

Exports the Pallas forward (and with --backward the gradient) for "cuda" at the benchmark shapes and each
precision, captures every `pallas_call`'s Triton IR (TTIR), compiles it with the Triton from PyPI for
sm_90 and reads `ptxas -v`: the numbers that explained every slow case measured on an H200
(../shared/measurements/h200-2026-11-28.md: HIGHEST fp32 dots spill kilobytes per thread).

Toolchain (too heavy for CI; a Python 3.12 venv with the jax the GPU machines run):

    python3.12 -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install "jax==0.11.2" triton ml_dtypes numpy
    JAX_PLATFORMS=cpu /tmp/kvenv/bin/python scripts/kernel_resources.py --out /tmp/kr [--lens 1024 4096]
        [--precisions bf16 fp32] [--num-warps 4] [--tuning fused_stack=4 num_warps=8] [--partial]
        [--fail-on-spill]

Prints one row per kernel (L, precision, kernel, grid, registers, stack, spill stores/loads, shared
memory); --fail-on-spill exits 1 if any kernel spills. Uses private JAX hooks (the Triton lowering entry
point and jax >= 0.11's GPU-info table), so a JAX upgrade may need this script adjusted; jaxlib's
bundled Triton may also differ from PyPI's (confirm once on a GPU with XLA_FLAGS=--xla_dump_to=DIR).
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {256: (16, 768), 512: (16, 768), 1024: (16, 768), 2048: (16, 768), 4096: (16, 768), 8192: (8, 768), 16384: (8, 768),
          65536: (2, 768), 262144: (1, 384), 1048576: (1, 96)}  # L: (B, H) as measured on the H200


def patch_h200():
    """Make the Triton lowering size its kernels for an H200 (jax >= 0.11 has a GPU-info table)."""
    try:
        from jax._src.pallas.triton import gpu_info, pallas_call_registration as reg
    except ImportError:
        return False
    h200 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H200)
    gpu_info.get_gpu_info = lambda: h200
    reg.gpu_info_lib.get_gpu_info = lambda: h200
    return True


def capture_ttir(out: Path):
    """Wrap the Triton lowering so each lowered kernel's TTIR is written to `out`; returns the log list."""
    from jax._src.pallas.triton import pallas_call_registration as reg

    captured = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def wrapped(*args, **kwargs):
        result = lower(*args, **kwargs)
        path = out / f"kernel_{len(captured)}.ttir"
        path.write_text(result.module.operation.get_asm(enable_debug_info=False))
        # the registration computes the kernel's num_warps (from its CompilerParams) before lowering it
        warps = sys._getframe(1).f_locals.get("num_warps")
        captured.append({"path": path, "grid": tuple(result.grid), "num_warps": warps})
        return result

    reg.lowering.lower_jaxpr_to_triton_module = wrapped
    return captured


def export_case(seqlen, precision, backward, ksize):
    import jax
    import jax.numpy as jnp
    from jax import export

    from kernels.fftconv import conv, pallas

    batch, channels = SHAPES[seqlen]
    jax.clear_caches()
    pallas._compiler_params = functools.partial(pallas._compiler_params, "gpu") if not isinstance(
        pallas._compiler_params, functools.partial) else pallas._compiler_params

    def fwd(u, k, pre, post, bias):
        return conv.fftconv_matmul(u, k, bias, pre, post, impl="pallas", interpret=False, precision=precision)

    fn = fwd
    if backward:
        fn = jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4))
    act = jax.ShapeDtypeStruct((batch, seqlen, channels), jnp.bfloat16)
    args = (act, jax.ShapeDtypeStruct((ksize, channels), jnp.float32), act, act,
            jax.ShapeDtypeStruct((channels,), jnp.float32))
    export.export(jax.jit(fn), platforms=["cuda"],
                  disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)


def compile_ttir(path: Path, num_warps: int):
    """Compile one TTIR for sm_90; return shared memory and ptxas' register/stack/spill figures."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))
    ptx = path.with_suffix(f".nw{num_warps}.ptx")
    ptx.write_text(kernel.asm["ptx"])
    from triton.backends.nvidia.compiler import get_ptxas

    log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull],
                         capture_output=True, text=True).stderr

    def number(pattern):
        match = re.search(pattern, log)
        return int(match.group(1)) if match else None

    return dict(shared=kernel.metadata.shared, registers=number(r"Used (\d+) registers"),
                stack=number(r"(\d+) bytes stack frame"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the TTIR/PTX files")
    parser.add_argument("--lens", type=int, nargs="*", default=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="*", default=["bf16", "fp16", "tf32", "bf16x3", "fp32"])
    parser.add_argument("--num-warps", type=int, default=None,
                        help="compile every kernel with this many warps (default: each kernel's own CompilerParams)")
    parser.add_argument("--backward", action="store_true", help="export the gradient too")
    parser.add_argument("--tuning", nargs="*", default=[], metavar="FIELD=INT",
                        help="kernels.fftconv.pallas.Tuning changes, e.g. fused_stack=4 num_warps=8")
    parser.add_argument("--partial", action="store_true", help="filters of K = L/16 (gpu_check's partial mode)")
    parser.add_argument("--fail-on-spill", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not patch_h200():
        print("note: this jax has no GPU-info table; kernels are lowered with its default GPU limits")
    captured = capture_ttir(out)
    from kernels.fftconv import pallas

    pallas.TUNING = pallas.Tuning(**{k: int(v) for k, v in (item.split("=") for item in args.tuning)})
    spilled = []
    print("| L | precision | kernel | grid | warps | regs | stack B | spill stores B | spill loads B | shared B |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seqlen in args.lens:
        for precision in args.precisions:
            start = len(captured)
            export_case(seqlen, precision, args.backward, max(1, seqlen // 16) if args.partial else seqlen)
            for index, item in enumerate(captured[start:]):
                path = item["path"].rename(out / f"L{seqlen}_{precision}_{index}.ttir")
                try:
                    warps = args.num_warps or item["num_warps"] or 4
                    res = compile_ttir(path, warps)
                except Exception as err:  # report and go on: one bad kernel should not hide the others
                    print(f"| {seqlen} | {precision} | {path.name} | {item['grid']} | compile failed: "
                          f"{str(err).splitlines()[0][:120]} ||||||")
                    spilled.append(path.name)
                    continue
                if res["spill_stores"] or res["spill_loads"]:
                    spilled.append(path.name)
                print(f"| {seqlen} | {precision} | {path.stem} | {item['grid']} | {warps} | {res['registers']} | {res['stack']} | "
                      f"{res['spill_stores']} | {res['spill_loads']} | {res['shared']} |", flush=True)
    if spilled:
        print(f"spilling or failed kernels: {', '.join(spilled)}")
    return 1 if spilled and args.fail_on_spill else 0


if __name__ == "__main__":
    sys.exit(main())
