"""Model FLOPs of a training step: the numerator of model FLOPs utilisation (MFU).

Convention (PaLM, Chowdhery et al. 2022, appendix B): a multiply-add is 2 FLOPs and a training step
costs 3x the forward pass (the backward pass is counted as 2x the forward). Counted, per layer, as the
implementation computes it:

- projections and the MLP: 2 * d_in * d_out per token for every dense layer;
- attention: q.k scores and the probability-weighted sum of values over the full L x L matrix
  (2 * 2 * L * d_model per token; a causal flash kernel skips about half of it, the convention does not);
- Hyena's long convolutions as `kernels.fftconv`'s "xla" implementation (the default on every backend)
  computes them: FFT size N = the power of two >= L + K - 1 (K = L for Hyena's filters), per channel an rfft of the
  input and an irfft of the product per sequence (2.5 * N * log2(N) FLOPs each, half a complex FFT's
  5 N log2 N) and the complex product of N/2 + 1 bins (6 FLOPs each), plus one rfft of the filter per
  step; the D skip (2 FLOPs per element);
- Hyena's depthwise short convolution (2 * K FLOPs per channel and token) and its implicit-filter MLP
  (dense layers over L positions, once per step);
- the output head (2 * d_model * vocab per token).

Not counted: element-wise work (norms, activations, gates, softmax, RoPE, sine), the embedding lookup
and the optimizer update. `train_step_flops` returns the per-component forward counts so a report can
show where the FLOPs go.
"""

from __future__ import annotations

import math

from kernels.fftconv.reference import next_power_of_two
from lm.mixers import parse_mixer_spec
from lm.model import ModelConfig


def rfft_flops(n: int) -> float:
    """FLOPs of a real-input FFT (or its inverse) of length ``n``: 2.5 * n * log2(n)."""
    return 2.5 * n * math.log2(n)


def fftconv_flops(batch: int, seqlen: int, ksize: int, channels: int) -> float:
    """Forward FLOPs of one `fftconv` (input (batch, seqlen, channels), filter (ksize, channels), D skip)
    as its "xla" implementation computes it (`kernels.fftconv.reference.fftconv_xla`)."""
    n = next_power_of_two(seqlen + ksize - 1)
    per_sequence = 2 * rfft_flops(n) + 6 * (n // 2 + 1) + 2 * seqlen
    return channels * (batch * per_sequence + rfft_flops(n))


def dense_flops(rows: int, d_in: int, d_out: int) -> float:
    return 2.0 * rows * d_in * d_out


def _mixer_flops(spec: dict, d_model: int, batch: int, seqlen: int) -> dict[str, float]:
    name, mcfg = parse_mixer_spec(spec)
    tokens = batch * seqlen
    if name == "attention":
        return {"mixer_projections": dense_flops(tokens, d_model, 3 * d_model) + dense_flops(tokens, d_model, d_model),
                "attention": 2 * 2.0 * tokens * seqlen * d_model}
    if name == "hyena":
        width = (mcfg.order + 1) * d_model
        channels = mcfg.n_filters * d_model
        mlp_dims = [mcfg.emb_dim] + [mcfg.filter_order] * (mcfg.num_inner_mlps + 1) + [channels]
        return {
            "mixer_projections": dense_flops(tokens, d_model, width) + dense_flops(tokens, d_model, d_model),
            "short_conv": 2.0 * mcfg.short_filter_order * tokens * width,
            "fftconv": mcfg.n_filters * fftconv_flops(batch, seqlen, seqlen, d_model),
            "filter_mlp": sum(dense_flops(seqlen, a, b) for a, b in zip(mlp_dims[:-1], mlp_dims[1:])),
        }
    raise ValueError(f"flops: mixer {name!r} is not counted (supported: 'attention', 'hyena')")


def forward_flops(cfg: ModelConfig, batch: int, seqlen: int) -> dict[str, float]:
    """Forward FLOPs of ``batch`` sequences of ``seqlen`` tokens, by component (see the module docstring)."""
    if batch < 1 or not 1 <= seqlen <= cfg.max_len:
        raise ValueError(f"flops: need batch >= 1 and 1 <= seqlen <= max_len={cfg.max_len}; "
                         f"got batch={batch}, seqlen={seqlen}")
    tokens = batch * seqlen
    out: dict[str, float] = {}
    for layer in range(cfg.n_layers):
        for key, value in _mixer_flops(cfg.mixer_spec(layer), cfg.d_model, batch, seqlen).items():
            out[key] = out.get(key, 0.0) + value
    if cfg.mlp in ("mlp", "glu"):
        up = cfg.d_mlp * (2 if cfg.mlp == "glu" else 1)
        out["mlp"] = cfg.n_layers * (dense_flops(tokens, cfg.d_model, up) + dense_flops(tokens, cfg.d_mlp, cfg.d_model))
    out["head"] = dense_flops(tokens, cfg.d_model, cfg.vocab_size)
    return out


def train_step_flops(cfg: ModelConfig, batch: int, seqlen: int) -> float:
    """Model FLOPs of one training step on ``batch`` x ``seqlen`` tokens: 3 x the forward count."""
    return 3.0 * sum(forward_flops(cfg, batch, seqlen).values())
