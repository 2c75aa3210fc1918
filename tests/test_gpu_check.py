"""The prepared device run (`scripts/gpu_check.py`) in smoke mode, and the measured table `impl="auto"` reads."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.fftconv import api, fftconv, gpu_check, tuned
from kernels.fftconv.api import default_impl


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    gpu_check.add_arguments(parser)
    return parser.parse_args(["--smoke", "--out", str(tmp_path), "--table", str(tmp_path / "tuned.json"), *extra])


@pytest.mark.slow  # ~30 s quiet, 80 s loaded: a full CPU rehearsal of the GPU script (every plan compiled)
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="smoke mode is the CPU rehearsal")
def test_smoke_run_writes_results_and_table(tmp_path, monkeypatch):
    cleared = []
    real_clear = jax.clear_caches
    monkeypatch.setattr(jax, "clear_caches", lambda: (cleared.append(1), real_clear()))
    assert gpu_check.main(_args(tmp_path, "--write-table")) == 0

    lines = [json.loads(line) for line in (tmp_path / "bench_cpu_smoke.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "machine" and lines[0]["smoke"] and lines[0]["backend"] == "cpu"
    checks = [r for r in lines if r["kind"] == "correctness"]
    bench = [r for r in lines if r["kind"] == "bench"]
    assert checks and all(r["ok"] and r["rel_l2"] <= r["bound"] for r in checks)
    assert {(r["impl"], r["mode"]) for r in checks} >= {("pallas", m) for m in ("dense", "partial", "sparse25")}
    assert {r["precision"] for r in checks if r["impl"] == "pallas"} >= {"fp32", "bf16x3", "bf16"}
    assert {(r["mode"], r["precision"]) for r in checks if r["impl"] == "mosaic"} == {("dense", "bf16"),
                                                                                     ("partial", "bf16")}
    assert {r["group"] for r in bench if r["impl"] == "mosaic"} == {"fwd", "fwdbwd"}
    assert {r["group"] for r in bench} == {"fwd", "fwdbwd"} and all("ms" in r for r in bench)
    assert all(r["ms"] > 0 and r["buffer_sets"] >= 2 for r in bench)
    xla = [r for r in bench if r["impl"] == "xla" and r["mode"] == "dense"]
    assert xla and all(r["speed_vs_jnpfft"] == 1.0 for r in xla)  # jnp.fft measured in the same run
    assert all(r["speed_vs_dense"] for r in bench if r["mode"] != "dense")
    assert len(cleared) >= len(checks) + len(bench)  # caches cleared before every variant
    assert (tmp_path / "bench_cpu_smoke.md").read_text().count("\n| fwd") == len(bench)  # one row each
    assert (tmp_path / "bench_cpu_smoke.png").stat().st_size > 0

    table = tuned.load(tmp_path / "tuned.json")
    assert table and all(r["backend"] == "cpu" and r["device_kind"] == "cpu" for r in table)
    fastest = min((r for r in bench if r["group"] == "fwd" and r["mode"] == "dense" and r["dtype"] == "bfloat16"),
                  key=lambda r: r["ms"])
    assert {(r["fft_n"], r["dtype"], r["impl"]) for r in table} == {(fastest["fft_n"], "bfloat16", fastest["impl"])}


def test_budget_skips_variants_but_still_writes(tmp_path):
    args = _args(tmp_path, "--budget-s", "0")
    rows = gpu_check.benchmark(gpu_check.SMOKE_SHAPES, args, lambda msg: None, t_start=0.0)
    assert rows and all(r.get("skipped") == "time budget" and "ms" not in r for r in rows)
    assert "time budget" in gpu_check.table_md(gpu_check.machine_info(), [], rows)


def test_winners_need_correctness_and_default_precision():
    info = dict(backend="gpu", device_kind="NVIDIA H200")

    def bench(impl, p, ms, dtype="bfloat16", mode="dense", fft_n=2048):
        return dict(kind="bench", group="fwd", mode=mode, impl=impl, precision=p, dtype=dtype, fft_n=fft_n, ms=ms)

    def check(impl, p, ok, dtype="bfloat16"):
        return dict(impl=impl, precision=p, dtype=dtype, ok=ok)

    rows = [bench("xla", None, 1.0), bench("pallas", "bf16", 0.3), bench("pallas", "fp16", 0.1),
            bench("xla-matmul", "bf16", 0.2), bench("xla", None, 2.0, "float32"),
            bench("pallas", "bf16x3", 0.5, "float32"),
            bench("xla", None, 0.8, mode="partial"), bench("pallas", "bf16", 0.2, mode="partial"),
            bench("pallas", "bf16", 0.1, mode="sparse25"),  # sparse: no table rows
            bench("pallas", "bf16", 0.1, mode="partial", fft_n=4096)]  # no jnp.fft row for this case: no winner
    checks = [check("pallas", "bf16", True), check("pallas", "fp16", True), check("xla-matmul", "bf16", False),
              check("pallas", "bf16x3", True, "float32")]
    won = gpu_check.winners(rows, checks, info)
    got = {(r["dtype"], r["mode"], r["impl"], r["precision"], r["fft_n"]) for r in won}
    # fp16 is faster but not bf16's default precision; xla-matmul failed its check; bf16x3 is not fp32's default
    assert got == {("bfloat16", "dense", "pallas", "bf16", 2048), ("float32", "dense", "xla", None, 2048),
                   ("bfloat16", "partial", "pallas", "bf16", 2048)}
    speedups = {(r["dtype"], r["mode"]): r["speedup_vs_xla"] for r in won}
    assert speedups == {("bfloat16", "dense"): pytest.approx(1 / 0.3), ("float32", "dense"): 1.0,
                        ("bfloat16", "partial"): pytest.approx(4.0)}


def test_auto_reads_the_table_and_falls_back_to_xla(tmp_path, monkeypatch):
    path = tmp_path / "tuned.json"
    monkeypatch.setattr(tuned, "TABLE_PATH", path)
    assert tuned.load() == []  # no file: empty table
    assert default_impl(2048, "gpu", dtype=jnp.bfloat16, device_kind="NVIDIA H200") == "xla"
    tuned.write([dict(backend="gpu", device_kind="NVIDIA H200", fft_n=4096, dtype="bfloat16", impl="pallas"),
                 dict(backend="gpu", device_kind="NVIDIA H200", fft_n=4096, dtype="float32", mode="partial",
                      impl="pallas"),
                 dict(backend="cpu", device_kind="cpu", fft_n=512, dtype="float32", impl="xla-matmul")])
    assert default_impl(2048, "gpu", dtype=jnp.bfloat16, device_kind="NVIDIA H200") == "pallas"  # N = 4096
    # K = 128 <= L/4 runs as chunks: the "partial" row of the same FFT size decides, not the dense one
    assert default_impl(2048, "gpu", ksize=128, dtype=jnp.bfloat16, device_kind="NVIDIA H200") == "xla"
    assert default_impl(2048, "gpu", ksize=128, dtype=jnp.float32, device_kind="NVIDIA H200") == "pallas"
    assert default_impl(2048, "gpu", dtype=jnp.float32, device_kind="NVIDIA H200") == "xla"  # dense fp32: no row
    mask = np.ones((2, 2), bool)  # frequency-sparse: the dense row
    assert default_impl(2048, "gpu", ksize=128, dtype=jnp.float32, device_kind="NVIDIA H200", freq_mask=mask) == "xla"
    assert default_impl(2048, "gpu", ksize=1, dtype=jnp.bfloat16, device_kind="NVIDIA H200") == "xla"  # N = 2048
    assert default_impl(2048, "gpu", dtype=jnp.float32, device_kind="NVIDIA H200") == "xla"
    assert default_impl(2048, "gpu", dtype=jnp.bfloat16, device_kind="NVIDIA H100") == "xla"
    assert default_impl(2048, "gpu") == "xla"  # no dtype given: the design default
    monkeypatch.setattr(api, "PALLAS_AUTO_MAX_FFT", 8192)  # the env override still wins on GPU
    assert default_impl(4096, "gpu", dtype=jnp.float32, device_kind="NVIDIA H100") == "pallas"

    if jax.default_backend() == "cpu":  # fftconv(impl="auto") dispatches on the table row
        u = jnp.asarray(np.random.default_rng(0).standard_normal((1, 256, 2)), jnp.float32)
        k = u[0]
        prims = str(jax.make_jaxpr(lambda u, k: fftconv(u, k))(u, k))
        assert "dot_general" in prims and " fft[" not in prims
        prims = str(jax.make_jaxpr(lambda u, k: fftconv(u.astype(jnp.bfloat16), k))(u, k))
        assert "dot_general" not in prims and "fft" in prims


def test_table_rows_need_their_keys(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"rows": [{"backend": "gpu", "impl": "pallas"}]}))
    with pytest.raises(ValueError, match="lacks"):
        tuned.load(path)
    path.write_text(json.dumps({"rows": [dict(backend="gpu", device_kind="x", fft_n=256, dtype="bfloat16",
                                              impl="pallas", mode="sparse")]}))
    with pytest.raises(ValueError, match="mode 'sparse'"):
        tuned.load(path)
    assert isinstance(tuned.load(), list)  # the committed table parses


@pytest.mark.slow  # ~40 s: every launch variant compiled in interpret mode
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="smoke mode is the CPU rehearsal")
def test_kernel_sweep_smoke_times_every_variant_against_the_default(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_kernel_sweep.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--layouts", "hbl", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "kernel_sweep_cpu_smoke.jsonl").read_text().splitlines()][1:]
    by_len = {L: {(r["group"], r["variant"]) for r in rows if r["L"] == L and "ms" in r} for L in (256, 4096)}
    assert {("fwd", v) for v in ("xla", "default", "8 warps", "fused ch 2", "fused stack 2")} <= by_len[256]
    assert ("fwd", "inner ch 1") not in by_len[256] and ("fwdbwd", "3-level fused") not in by_len[256]
    mosaic_runs = {("fwd", v) for v in ("mosaic", "mosaic 16 seqs", "mosaic 2 seqs", "mosaic constants in smem")}
    assert mosaic_runs <= by_len[256] and not mosaic_runs & by_len[4096]  # the Mosaic kernel: L <= 2048
    assert {("fwdbwd", v) for v in ("xla", "default", "mosaic")} <= by_len[256]
    assert {("partial", "mosaic"), ("partial fwdbwd", "mosaic")} <= by_len[4096]  # overlap-save windows
    assert {("fwd", v) for v in ("xla", "default", "fp32 planes", "inner ch 1", "3-level fused")} <= by_len[4096]
    assert {("fwdbwd", v) for v in ("xla", "default", "3-level fused")} <= by_len[4096]
    partial = ("xla", "default", "overlap-add partial")
    assert {(g, v) for g in ("partial", "partial fwdbwd") for v in partial} <= by_len[4096]
    assert all(r["ok"] for r in rows if "ms" in r)
    assert (tmp_path / "kernel_sweep_cpu_smoke.png").stat().st_size > 0


def test_check_lens_choose_the_correctness_lengths(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(gpu_check, "correctness", lambda lens, *a, **k: seen.append(lens) or [])
    monkeypatch.setattr(gpu_check, "benchmark", lambda *a, **k: [])
    monkeypatch.setattr(gpu_check, "plot", lambda *a: None)
    parser = argparse.ArgumentParser()
    gpu_check.add_arguments(parser)
    assert gpu_check.main(parser.parse_args(["--out", str(tmp_path), "--check-lens", "4096"])) == 0
    assert seen == [[4096]]
    assert gpu_check.main(parser.parse_args(["--out", str(tmp_path)])) == 0
    assert seen[-1] == [1024, 16384]
