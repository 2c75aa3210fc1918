"""Break the code on purpose and check that the tests notice (mutation testing; not part of CI).

    python scripts/mutation_check.py                 # every mutation below
    python scripts/mutation_check.py --list          # names, files and tests
    python scripts/mutation_check.py pallas-runs-xla temperature-ignored

Each mutation replaces one exact snippet of one source file in a temporary copy of the repository (the
files `git ls-files` lists, plus untracked ones that are not ignored), runs the tests that guard it there
with pytest and prints a table: "caught" (a test failed), "MISSED" (all passed), "STALE" (the snippet is
no longer in the file: update the mutation), "error" (pytest could not run, e.g. no test selected).
Exit status 1 unless every mutation is caught. Add a mutation with every test that guards a claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file to change, relative to the repository root
    old: str  # exact snippet (must occur once)
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, "-k expr"


MUTATIONS = [
    Mutation("pallas-runs-xla", "kernels/fftconv/api.py",
             '"pallas": _pallas}', '"pallas": _xla}',
             ("tests/test_fftconv_dispatch.py",)),
    Mutation("matmul-runs-xla", "kernels/fftconv/api.py",
             '"xla-matmul": _xla_matmul,', '"xla-matmul": _xla,',
             ("tests/test_fftconv_dispatch.py",)),
    Mutation("partial-never-chunked", "kernels/fftconv/conv.py",
             "c = chunk_size(seqlen, ksize) if freq_mask is None else None", "c = None",
             ("tests/test_fftconv_dispatch.py",)),
    Mutation("auto-ignores-partial-rows", "kernels/fftconv/api.py",
             '"partial" if partial else "dense"', '"dense"',
             ("tests/test_gpu_check.py", "-k", "auto_reads")),
    Mutation("winners-without-baseline", "kernels/fftconv/gpu_check.py",
             "sorted(best.items()) if (n, dtype, mode) in xla_ms]", "sorted(best.items())]",
             ("tests/test_gpu_check.py", "-k", "winners")),
    Mutation("check-finite-ignored", "kernels/fftconv/api.py",
             "    if check_finite:\n", "    if False:\n",
             ("tests/test_fftconv.py", "-k", "finite")),
    Mutation("check-finite-silent-under-jit", "kernels/fftconv/api.py",
             "jax.debug.callback(functools.partial(_raise_on_false, names), finite)", "pass",
             ("tests/test_fftconv.py", "-k", "finite")),
    Mutation("fftconv-list-input-unnamed", "kernels/fftconv/api.py",
             "            _check_array(name, x)\n", "            pass\n",
             ("tests/test_fftconv.py", "-k", "validation")),
    Mutation("char-vocab-off-by-one", "lm/data/tokenizers.py",
             "self.vocab_size = offset + len(chars)", "self.vocab_size = offset + len(chars) + 1",
             ("tests/test_data.py", "-k", "shakespeare")),
    Mutation("mqar-eval-always-1", "lm/mqar/runner.py",
             "return acc_sum / n, loss_sum / n", "return 1.0, loss_sum / n",
             ("tests/test_mqar.py", "-k", "known_answers")),
    Mutation("mqar-eval-ignores-padding-weight", "lm/mqar/runner.py",
             "return (row_acc * w).sum(), (loss * w).sum()", "return row_acc.sum(), loss.sum()",
             ("tests/test_mqar.py", "-k", "known_answers")),
    Mutation("mqar-d-models-unchecked", "lm/mqar/runner.py",
             "        bad = [d for d in self.d_models if d < 1]\n", "        bad = []\n",
             ("tests/test_mqar.py", "-k", "config_errors")),
    Mutation("distill-zero-residues", "lm/distill/convert.py",
             "modal[i][name], reports[i][name] = params, reps",
             "modal[i][name], reports[i][name] = params._replace(res_re=0 * params.res_re, res_im=0 * params.res_im), reps",
             ("tests/test_generate.py", "-k", "original")),
    Mutation("temperature-ignored", "lm/generate.py",
             "filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)",
             "filter_logits(logits, cfg.top_k, cfg.top_p)",
             ("tests/test_generate.py", "-k", "temperature")),
    Mutation("hankel-svd-signed-order", "lm/distill/fit.py",
             'idx = np.argsort(-np.abs(w), kind="stable")', 'idx = np.argsort(-w, kind="stable")',
             ("tests/test_distill_quality.py", "-k", "hankel_svd")),
    Mutation("shared-svd-wrong-channel", "lm/distill/fit.py",
             "max_hankel=max_hankel, svds=svds)", "max_hankel=max_hankel, svds=[svds[0]] * len(svds))",
             ("tests/test_distill_quality.py", "-k", "by_order")),
    Mutation("filter-mse-summed", "lm/distill/fit.py",
             "mse=float(np.mean((h - hhat) ** 2)))", "mse=float(np.sum((h - hhat) ** 2)))",
             ("tests/test_distill_quality.py", "-k", "by_order")),
    Mutation("delta-budget-not-prefix", "lm/distill/quality.py",
             "        budget = target * k / len(chosen)", "        budget = target",
             ("tests/test_distill_quality.py", "-k", "select_orders")),
    Mutation("delta-budget-ignored", "lm/distill/quality.py",
             "        if delta({**chosen, layer: cands[hi]}) <= budget:\n            chosen[layer] = cands[hi]",
             "        chosen[layer] = cands[0]",
             ("tests/test_distill_quality.py", "-k", "target_delta")),
    Mutation("agreement-never-diverged-as-0", "lm/distill/quality.py",
             "first = np.where(same.all(1), a.shape[1], np.argmin(same, axis=1))", "first = np.argmin(same, axis=1)",
             ("tests/test_distill_quality.py", "-k", "agreement_stats")),
    Mutation("agreement-candidate-is-reference", "lm/distill/quality.py",
             'cand = generate_ids(candidate_decoder, prompts, new_tokens, greedy)["ids"]',
             'cand = generate_ids(reference_decoder, prompts, new_tokens, greedy)["ids"]',
             ("tests/test_distill_quality.py", "-k", "greedy_agreement")),
    Mutation("sparse-digits-not-rounded-out", "kernels/fftconv/conv.py",
             'min_keep = _pallas().sparse_min_keep(monarch.fft_size(seqlen + ksize - 1)) if impl == "pallas" else (1, 1)',
             "min_keep = (1, 1)",
             ("tests/test_fftconv_lowering.py", "-k", "tensor_core")),
    Mutation("sparse-outer-groups-rounded-out", "kernels/fftconv/pallas.py",
             "return (monarch.MIN_DOT if len(monarch.plan_factors(n)) == 2 else 1, monarch.MIN_DOT)",
             "return (monarch.MIN_DOT, monarch.MIN_DOT)",
             ("tests/test_fftconv_impls.py", "-k", "outer_groups")),
    Mutation("direct-toeplitz-no-band", "kernels/fftconv/toeplitz.py",
             "(lag >= 0) & (lag < ksize)", "(lag >= 0)", ("tests/test_fftconv_direct.py",)),
    Mutation("direct-bias-unbroadcast-in-hbl", "kernels/fftconv/toeplitz.py",
             "bias.astype(jnp.float32)[:, None, None]", "bias.astype(jnp.float32)",
             ("tests/test_fftconv_direct.py",)),
    Mutation("direct-default-precision", "kernels/fftconv/toeplitz.py",
             "                            precision=jax.lax.Precision.HIGHEST)", "                            )",
             ("tests/test_fftconv_direct.py",)),
    Mutation("mosaic-runs-xla", "kernels/fftconv/api.py",
             '"mosaic": _mosaic}', '"mosaic": _xla}', ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-twiddle-not-conjugated", "kernels/fftconv/mosaic.py",
             "self.inv_s[:ROWS] = (w_re * self.tw_re + w_im * self.tw_im).astype(dt)",
             "self.inv_s[:ROWS] = (w_re * self.tw_re - w_im * self.tw_im).astype(dt)",
             ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-bias-not-in-spectrum", "kernels/fftconv/mosaic.py",
             "    if bias is not None:\n        kf = kf + bias", "    if False:\n        kf = kf + bias",
             ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-no-post-gate", "kernels/fftconv/mosaic.py",
             'return {"y": y * tile("post") if post else y}', 'return {"y": y}', ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-pre-gate-ignored", "kernels/fftconv/mosaic.py",
             'x = tile("u") * tile("pre") if pre else tile("u")', 'x = tile("u")', ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-prefetch-wrong-sequence", "kernels/fftconv/mosaic.py",
             "                fetch(i + 1, 1 - slot)", "                fetch(i, 1 - slot)",
             ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-fp32-operands", "kernels/fftconv/mosaic.py",
             '_OPERAND = {"bf16": jnp.bfloat16,', '_OPERAND = {"bf16": jnp.float32,',
             ("tests/test_fftconv_mosaic.py",)),
    Mutation("mosaic-backward-filter-not-conjugated", "kernels/fftconv/mosaic.py",
             "dx = ops.inverse(*ops.filtered(dz_re, dz_im, conjugate=True))\n"
             "        out[\"du\"] = dx * tile(\"pre\") if",
             "dx = ops.inverse(*ops.filtered(dz_re, dz_im))\n        out[\"du\"] = dx * tile(\"pre\") if",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-window-bwd-filter-not-conjugated", "kernels/fftconv/mosaic.py",
             "dx = ops.inverse(*ops.filtered(dz_re, dz_im, conjugate=True))          # rows 0-31",
             "dx = ops.inverse(*ops.filtered(dz_re, dz_im))          # rows 0-31",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-dk-spectrum-not-conjugated", "kernels/fftconv/mosaic.py",
             "acc_s[1] = acc_s[1] + (x_re * dz_im - x_im * dz_re)",
             "acc_s[1] = acc_s[1] + (x_re * dz_im + x_im * dz_re)",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-dk-one-program-only", "kernels/fftconv/mosaic.py",
             "dspec = acc.sum(axis=1)", "dspec = acc[:, 0]", ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-dbias-wrong-lag", "kernels/fftconv/mosaic.py",
             "dk_full[:, 0].astype(bias.dtype)", "dk_full[:, 1].astype(bias.dtype)",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-dpre-uses-pre", "kernels/fftconv/mosaic.py",
             'if pre else dx\n        if pre:\n            out["dpre"] = dx * u',
             'if pre else dx\n        if pre:\n            out["dpre"] = dx * tile("pre")',
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-backward-never-runs", "kernels/fftconv/mosaic.py",
             'if unsupported(seqlen, precision, u.dtype, gates, "backward", k.shape[0]):', "if True:",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-window-chunk0-unmasked", "kernels/fftconv/mosaic.py",
             "            x = x * jnp.maximum(ops.second_half, (chunk > 0).astype(jnp.float32))\n",
             "            pass\n", ("tests/test_fftconv_mosaic.py", "-k", "overlap_save")),
    Mutation("mosaic-window-previous-is-own-chunk", "kernels/fftconv/mosaic.py",
             "-1: first_row + i - jnp.asarray(chunk > 0, jnp.int32),", "-1: first_row + i,",
             ("tests/test_fftconv_mosaic.py", "-k", "overlap_save")),
    Mutation("mosaic-window-stores-first-half", "kernels/fftconv/mosaic.py",
             'outputs=(("y", 1 if geo.window else 0),)', 'outputs=(("y", 0),)',
             ("tests/test_fftconv_mosaic.py", "-k", "overlap_save")),
    Mutation("mosaic-never-overlap-save", "kernels/fftconv/mosaic.py",
             "if chunk <= OVERLAP_SAVE_MAX_CHUNK and 4 * chunk <= seqlen:", "if False:",
             ("tests/test_fftconv_mosaic.py", "-k", "overlap_save or windows")),
    Mutation("mosaic-window-bwd-last-next-unmasked", "kernels/fftconv/mosaic.py",
             "        dz = dz * jnp.maximum(first_half, (chunk < chunks - 1).astype(jnp.float32))", "        pass",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-window-bwd-x-not-halved", "kernels/fftconv/mosaic.py",
             "x_re, x_im = ops.transform(0, x * first_half)", "x_re, x_im = ops.transform(0, x)",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-window-bwd-dpost-first-half", "kernels/fftconv/mosaic.py",
             '(("dpost", 1),) * post, transforms=2 + post', '(("dpost", 0),) * post, transforms=2 + post',
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("mosaic-window-next-is-own-chunk", "kernels/fftconv/mosaic.py",
             "1: first_row + i + jnp.asarray(chunk < launch.chunks - 1, jnp.int32)}", "1: first_row + i}",
             ("tests/test_fftconv_mosaic.py", "-k", "gradients")),
    Mutation("auto-never-direct", "kernels/fftconv/api.py",
             "seqlen <= _toeplitz.AUTO_MAX_LEN\n", "seqlen < 0\n",
             ("tests/test_fftconv_direct.py",)),
    Mutation("auto-direct-ignores-matrix-size", "kernels/fftconv/api.py",
             "\n            and _toeplitz.matrix_bytes(seqlen, channels) <= _toeplitz.MAX_MATRIX_BYTES):", "):",
             ("tests/test_fftconv_direct.py",)),
    Mutation("auto-direct-without-channels", "kernels/fftconv/api.py",
             "channels=k.shape[1],\n", "\n", ("tests/test_fftconv_direct.py",)),
    Mutation("auto-direct-at-any-batch", "kernels/fftconv/api.py",
             "            and batch >= _toeplitz.AUTO_MIN_BATCH_PER_LEN * seqlen\n", "",
             ("tests/test_fftconv_direct.py",)),
    Mutation("auto-direct-without-batch", "kernels/fftconv/api.py",
             '\n                                                                      batch=u.shape[layout.index("b")])',
             ")", ("tests/test_fftconv_direct.py",)),
    Mutation("sigterm-not-mapped", "lm/cli.py",
             "    with sigterm_as_interrupt():\n        return int(module.main(args) or 0)",
             "    return int(module.main(args) or 0)",
             ("tests/test_cli.py", "-k", "sigterm")),
    Mutation("sigterm-handler-not-restored", "lm/signals.py",
             "        signal.signal(signal.SIGTERM, previous)\n        raise KeyboardInterrupt",
             "        raise KeyboardInterrupt",
             ("tests/test_cli.py", "-k", "sigterm")),
    Mutation("bf16x3-split-by-round-trip", "kernels/fftconv/precision.py",
             "    a = a.astype(jnp.float32)\n    bits =",
             "    hi = a.astype(jnp.bfloat16)\n    return hi, (a.astype(jnp.float32) - hi.astype(jnp.float32)).astype(jnp.bfloat16)\n    bits =",
             ("tests/test_fftconv_precision.py", "-k", "excess")),
    Mutation("inner-planes-always-fp32", "kernels/fftconv/pallas.py",
             "    low_precision_planes: bool = True", "    low_precision_planes: bool = False",
             ("tests/test_fftconv_impls.py", "-k", "operand_dtype")),
    Mutation("stacked-spectrum-not-regrouped", "kernels/fftconv/pallas.py",
             ".transpose(0, 2, 1, 3).reshape(channels // cb, k0 * cb, k1)", ".reshape(channels // cb, k0 * cb, k1)",
             ("tests/test_fftconv_impls.py", "-k", "stacked")),
    Mutation("overlap-save-ignores-previous-chunk", "kernels/fftconv/pallas.py",
             "prev = (has_history * gated(xp_ref, prep_ref, at),)", "prev = (0.0 * gated(xp_ref, prep_ref, at),)",
             ("tests/test_fftconv_impls.py", "-k", "overlap_save")),
    Mutation("overlap-save-keeps-first-half", "kernels/fftconv/pallas.py",
             'c["g0r"], c["g0i"] = c["g0r"][half:], c["g0i"][half:]', 'c["g0r"], c["g0i"] = c["g0r"][:half], c["g0i"][:half]',
             ("tests/test_fftconv_impls.py", "-k", "overlap_save")),
    Mutation("overlap-save-bwd-ignores-next-chunk", "kernels/fftconv/pallas.py",
             "dz_after = (i < nchunks - 1).astype(jnp.float32) *", "dz_after = 0.0 *",
             ("tests/test_fftconv_impls.py", "-k", "overlap_save")),
    Mutation("overlap-save-bwd-dk-without-history", "kernels/fftconv/pallas.py",
             "xr, xi = spectrum(x, c, precision, prev=x_before)", "xr, xi = spectrum(x, c, precision, prev=0 * x_before)",
             ("tests/test_fftconv_impls.py", "-k", "overlap_save")),
    Mutation("partial-overlap-save-off", "kernels/fftconv/pallas.py",
             "    overlap_save: bool = True", "    overlap_save: bool = False",
             ("tests/test_fftconv_impls.py", "-k", "overlap_save")),
    Mutation("fused3-level1-not-transposed", "kernels/fftconv/pallas.py",
             "    a = tuple(jnp.transpose(p.reshape(k0, n1, n2), (1, 0, 2)).reshape(n1, k0 * n2) for p in a)",
             "    a = tuple(p.reshape(n1, k0 * n2) for p in a)",
             ("tests/test_fftconv_impls.py", "-k", "three_level")),
    Mutation("mqar-vmap-drops-stopped-members", "lm/mqar/runner.py",
             'drop_stopped = member_loop_for(tc.member_loop) == "map"', "drop_stopped = True",
             ("tests/test_mqar_vmap.py", "-k", "equals_runs and vmap")),
    Mutation("mqar-frozen-members-checkpointed", "lm/mqar/runner.py",
             "if len(active) < len(runs) and not drop_stopped:", "if False:",
             ("tests/test_mqar_vmap.py", "-m", "slow", "-k", "frozen")),
    Mutation("mqar-step-not-deferred", "lm/mqar/runner.py",
             "            with interrupts_deferred():\n                params, opt_state, rest, loss = train_step(",
             "            if True:\n                params, opt_state, rest, loss = train_step(",
             ("tests/test_mqar_vmap.py", "-k", "stop_signal")),
    Mutation("mqar-eval-not-deferred", "lm/mqar/runner.py",
             "                seg_steps += 1\n                ends_eval =",
             "                seg_steps += 1\n            if True:\n                ends_eval =",
             ("tests/test_mqar_vmap.py", "-k", "stop_signal")),
    Mutation("deferred-signal-dropped", "lm/signals.py",
             "        for signum, frame in pending:\n            previous[signum](signum, frame)", "",
             ("tests/test_mqar_vmap.py", "-k", "stop_signal")),
    Mutation("mqar-no-periodic-checkpoint", "lm/mqar/runner.py",
             "                if checkpoint is not None and active and time.perf_counter() - saved_at",
             "                if False and time.perf_counter() - saved_at",
             ("tests/test_mqar_vmap.py", "-k", "killed")),
    Mutation("mqar-checkpoint-interval-fingerprinted", "lm/mqar/runner.py",
             'NOT_FINGERPRINTED = ("checkpoint_every_s",)', "NOT_FINGERPRINTED = ()",
             ("tests/test_mqar.py", "-k", "resume_skips")),
    Mutation("train-step-not-deferred", "lm/train.py",
             "                    with interrupts_deferred():\n", "                    if True:\n",
             ("tests/test_train.py", "-k", "stop_signal_while and sigterm")),
    Mutation("mqar-compile-counted-as-step-time", "lm/mqar/runner.py",
             "                        startup = now - t_entry\n                    else:\n",
             "                        startup = now - t_entry\n                    if True:\n",
             ("tests/test_mqar_vmap.py", "-k", "compilation")),
    Mutation("mqar-eval-compile-counted", "lm/mqar/runner.py",
             "(time.perf_counter() - te if evaluated else None)", "(time.perf_counter() - te)",
             ("tests/test_mqar_vmap.py", "-k", "compilation")),
    Mutation("mqar-workers-ignored", "lm/mqar/runner.py",
             "    return shares if len(shares) > 1 else []", "    return []",
             ("tests/test_mqar_workers.py", "-k", "apart")),
    Mutation("mqar-workers-not-pinned", "lm/mqar/workers.py",
             "        os.sched_setaffinity(0, cpus)  # before", "        pass  # before",
             ("tests/test_mqar_workers.py", "-k", "apart")),
    Mutation("mqar-worker-sigterm-kills", "lm/mqar/workers.py",
             "        with sigterm_as_interrupt():\n            runner.train_groups(",
             "        if True:\n            runner.train_groups(",
             ("tests/test_mqar_workers.py", "-k", "sigterm")),
    Mutation("mqar-worker-error-swallowed", "lm/mqar/workers.py",
             "    if errors or failed:", "    if False:",
             ("tests/test_mqar_workers.py", "-k", "failing")),
    Mutation("dropped-interrupt-not-kept", "lm/signals.py",
             '            _kept.append(str(unraisable.exc_value or ""))', "            previous(unraisable)",
             ("tests/test_signals.py", "-k", "next_deferred")),
    Mutation("kept-interrupt-not-raised", "lm/signals.py",
             "    if _kept:\n        message = _kept[0]", "    if False:\n        message = _kept[0]",
             ("tests/test_signals.py", "-k", "next_deferred")),
    Mutation("kept-hook-swallows-other-errors", "lm/signals.py",
             "        else:\n            previous(unraisable)", "        else:\n            pass",
             ("tests/test_signals.py", "-k", "other")),
    Mutation("second-signal-held-back", "lm/signals.py",
             "        if repeat_acts_now and any(s == signum for s, _ in pending):", "        if False:",
             ("tests/test_signals.py", "-k", "twice")),
    Mutation("loops-second-signal-held-back", "lm/signals.py",
             "        if repeat_acts_now and any(s == signum for s, _ in pending):", "        if False:",
             ("tests/test_train.py", "tests/test_mqar_vmap.py", "-k", "twice")),
    Mutation("train-saves-a-donated-state", "lm/train.py",
             "            if any(leaf.is_deleted() for leaf", "            if False and any(leaf.is_deleted() for leaf",
             ("tests/test_train.py", "-k", "stop_signal_while and twice")),
    Mutation("train-cli-interrupt-traceback", "lm/train.py",
             "    except KeyboardInterrupt:\n        print(f\"interrupted: rerun", "    except ZeroDivisionError:\n        print(f\"interrupted: rerun",
             ("tests/test_train.py", "-k", "exits_130")),
    Mutation("mqar-loop-drops-gc-interrupts", "lm/mqar/runner.py",
             "    with interrupts_kept():  # a Ctrl-C", "    if True:  # a Ctrl-C",
             ("tests/test_mqar_vmap.py", "-k", "stop_signal and dropped")),
    Mutation("train-loop-drops-gc-interrupts", "lm/train.py",
             "with jax.set_mesh(self.mesh), interrupts_kept():", "with jax.set_mesh(self.mesh):",
             ("tests/test_train.py", "-k", "stop_signal_while and dropped")),
    Mutation("heap-trimmed-above-2gb", "lm/host_memory.py",
             "(m_trim_threshold, never)", "(m_trim_threshold, 2**31 - 1)",
             ("tests/test_mqar_vmap.py", "-k", "never_trims")),
    Mutation("heap-kept-freed-memory-off", "lm/host_memory.py",
             "return all(mallopt(option, value) == 1 for option, value in settings)", "return True",
             ("tests/test_mqar_vmap.py", "-k", "keep_freed")),
    Mutation("workers-parent-drops-gc-interrupts", "lm/mqar/workers.py",
             "    with interrupts_kept():  # a Ctrl-C dropped", "    if True:  # a Ctrl-C dropped",
             ("tests/test_mqar_workers.py", "-k", "dropped_in_a_gc")),
    Mutation("workers-parent-waits-without-timeout", "lm/mqar/workers.py",
             "ready = wait(open_conns, timeout=1.0)", "ready = wait(open_conns)",
             ("tests/test_mqar_workers.py", "-k", "dropped_in_a_gc")),
    Mutation("embed-dropout-ignored", "lm/model.py",
             "return self.dropout if self.embed_dropout is None else self.embed_dropout", "return self.dropout",
             ("tests/test_model.py", "-k", "embed_dropout")),
    Mutation("mqar-drops-embed-dropout", "lm/mqar/runner.py",
             "embed_dropout=m.embed_dropout if m.embed_dropout is not None else md.embed_dropout,",
             "embed_dropout=None,", ("tests/test_mqar.py", "-k", "fingerprints")),
    Mutation("baseconv-filter-init-ignored", "lm/mixers/baseconv.py",
             "hidden=cfg.filter_hidden, init=cfg.filter_init, rngs=rngs)", "hidden=cfg.filter_hidden, rngs=rngs)",
             ("tests/test_mixers_conv.py", "-k", "filter_init")),
    Mutation("zoology-filter-init-ignored", "lm/mixers/filters.py",
             "self.fc2 = FilterLinear(hidden, channels, init=init, rngs=rngs)",
             "self.fc2 = FilterLinear(hidden, channels, rngs=rngs)",
             ("tests/test_mixers_conv.py", "-k", "filter_init")),
    Mutation("baseconv-filter-kind-ignored", "lm/mixers/baseconv.py",
             'if ksize == -1 and cfg.filter_kind == "relu_mlp":', "if ksize == -1:",
             ("tests/test_mixers_attn.py", "-k", "sine_window")),
    Mutation("baseconv-sine-window-frequency", "lm/mixers/baseconv.py",
             "num_inner_mlps=2, w=1.0, train_pos_emb=False", "num_inner_mlps=2, w=14.0, train_pos_emb=False",
             ("tests/test_mixers_attn.py", "-k", "sine_window")),
    Mutation("baseconv-sine-window-no-window", "lm/mixers/baseconv.py",
             "num_inner_mlps=2, w=1.0, train_pos_emb=False, init",
             "num_inner_mlps=2, w=1.0, train_pos_emb=False, modulate=False, init",
             ("tests/test_mixers_attn.py", "-k", "sine_window")),
    Mutation("cpu-name-without-generation", "kernels/fftconv/bench.py",
             "details = [f\"family {fields['cpu family']} model {fields.get('model', '?')}\"]", "details = []",
             ("tests/test_bench_machine.py",)),
    Mutation("plot-curves-first-record-wins", "scripts/plot_mqar_curves.py",
             "for r in read_results(path) if", "for r in reversed(read_results(path)) if",
             ("tests/test_mqar.py", "-k", "plot_mqar_curves")),
    Mutation("fingerprint-hashes-unset-embed-dropout", "lm/mqar/runner.py",
             'if model["embed_dropout"] in (None, model["dropout"]):', "if False:",
             ("tests/test_mqar.py", "-k", "fingerprints")),
    Mutation("fingerprint-embed-dropout-equal-to-dropout-differs", "lm/mqar/runner.py",
             'if model["embed_dropout"] in (None, model["dropout"]):', 'if model["embed_dropout"] is None:',
             ("tests/test_mqar.py", "-k", "fingerprints")),
    Mutation("optimizer-vectors-never-decay", "lm/optim.py",
             'cfg.weight_decay if cfg.weight_decay_on == "all" else 0.0', "0.0",
             ("tests/test_sharding.py", "-k", "weight_decay_on")),
    Mutation("optimizer-weight-decay-on-unchecked", "lm/optim.py",
             "    cfg.validate()\n    sched = lr_schedule(cfg, total_steps)", "    sched = lr_schedule(cfg, total_steps)",
             ("tests/test_sharding.py", "-k", "weight_decay_on")),
    Mutation("mqar-decay-all-leaves-filters", "lm/mqar/runner.py",
             'filter_weight_decay=tc.weight_decay if tc.weight_decay_on == "all" else 0.0', "filter_weight_decay=0.0",
             ("tests/test_mqar.py", "-k", "weight_decay_on")),
    Mutation("mqar-decay-all-ignored", "lm/mqar/runner.py",
             "weight_decay_on=tc.weight_decay_on,", "",
             ("tests/test_mqar.py", "-k", "weight_decay_on")),
    Mutation("fingerprint-hashes-default-weight-decay-on", "lm/mqar/runner.py",
             'DEFAULTS_NOT_FINGERPRINTED = {"weight_decay_on": "matrices"}', "DEFAULTS_NOT_FINGERPRINTED = {}",
             ("tests/test_mqar.py", "-k", "fingerprints")),
    Mutation("fingerprint-ignores-weight-decay-on", "lm/mqar/runner.py",
             'DEFAULTS_NOT_FINGERPRINTED = {"weight_decay_on": "matrices"}',
             'DEFAULTS_NOT_FINGERPRINTED = {"weight_decay_on": "matrices"}\nNOT_FINGERPRINTED += ("weight_decay_on",)',
             ("tests/test_mqar.py", "-k", "fingerprints")),
]


def repo_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                         check=True)
    return [f for f in out.stdout.decode().split("\0") if f and (REPO / f).is_file()]


def copy_repo(dest: pathlib.Path) -> None:
    for rel in repo_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)


def run_one(m: Mutation, timeout: float) -> tuple[str, str, float]:
    """(outcome, first failing test, seconds) of one mutation in a fresh copy of the repository."""
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = pathlib.Path(tmp) / "repo"
        copy_repo(root)
        path = root / m.path
        text = path.read_text()
        if text.count(m.old) != 1:
            return "STALE", "", 0.0
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(root), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        # -n 0: one process (with xdist, -x ends a failing run as "interrupted", exit status 2)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *m.tests]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "error (timeout)", "", time.perf_counter() - t0
        seconds = time.perf_counter() - t0
    outcome = {0: "MISSED", 1: "caught"}.get(proc.returncode, f"error (pytest exit {proc.returncode})")
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return outcome, failed[0] if failed else "", seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation {unknown[0]!r}; see --list")
    chosen = [known[n] for n in args.names] or MUTATIONS
    if args.list:
        for m in chosen:
            print(f"{m.name:34s} {m.path:28s} {' '.join(m.tests)}")
        return 0
    print("| mutation | file | tests | result | first failing test | s |\n|---|---|---|---|---|---|", flush=True)
    all_caught = True
    for m in chosen:
        outcome, failed, seconds = run_one(m, args.timeout)
        all_caught &= outcome == "caught"
        print(f"| {m.name} | {m.path} | {' '.join(m.tests)} | {outcome} | {failed} | {seconds:.0f} |", flush=True)
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
