"""Attention, Based linear attention and BaseConv against float64 NumPy references of their formulas."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm.mixers  # noqa: F401  (registers every mixer)
from lm.config import ConfigError
from lm.mixers import attention as attn_mod
from lm.mixers import based as based_mod
from lm.mixers import baseconv as baseconv_mod
from lm.mixers.registry import build_mixer

B, L, D = 2, 12, 16


def _np(a):
    return np.asarray(a, dtype=np.float64)


def _randomize(module, seed=0, scale=0.3):
    """Replace every parameter by N(0, scale²) so references see non-trivial weights."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            var[...] = jnp.asarray(rng.normal(scale=scale, size=var[...].shape), jnp.float32)


def _x(seed=1, shape=(B, L, D)):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------------------------------------- attention
def _np_rope(x, pos, base=10000.0):
    """Rotate-half RoPE as complex multiplication of (x_i, x_{i+D/2}) pairs by exp(i·pos·θ_i)."""
    d = x.shape[-1]
    theta = base ** (-2.0 * np.arange(d // 2) / d)
    z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * np.exp(1j * pos[None, :, None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def _np_attention(mod, x, window=None, rotary=True):
    x = _np(x)
    bsz, seqlen, d = x.shape
    h = mod.num_heads
    hd = d // h
    qkv = x @ _np(mod.qkv.kernel[...]) + _np(mod.qkv.bias[...])
    qkv = qkv.reshape(bsz, seqlen, 3, h, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    pos = np.arange(seqlen, dtype=np.float64)
    if rotary:
        q, k = _np_rope(q, pos), _np_rope(k, pos)
    s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    t_idx, s_idx = np.arange(seqlen)[:, None], np.arange(seqlen)[None, :]
    visible = s_idx <= t_idx
    if window is not None:
        visible &= t_idx - s_idx < window
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", p, v).reshape(bsz, seqlen, d)
    return o @ _np(mod.out.kernel[...]) + _np(mod.out.bias[...])


def _attention(dtype=jnp.float32, **opts):
    cfg = attn_mod.AttentionConfig(**opts)
    return attn_mod.Attention(cfg, d_model=D, max_len=64, n_layers=2, dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("num_heads,rotary,window", [(1, True, None), (2, True, None), (4, False, None),
                                                     (2, True, 5), (1, False, 1)])
def test_attention_matches_numpy(num_heads, rotary, window):
    mod = _attention(num_heads=num_heads, rotary=rotary, window=window)
    _randomize(mod)
    x = _x()
    y = mod(x)
    ref = _np_attention(mod, x, window=window, rotary=rotary)
    np.testing.assert_allclose(_np(y), ref, rtol=1e-4, atol=1e-4)


def test_attention_decode_pieces_reproduce_forward():
    """The pieces a KV-cache decoder uses: last-token query at its absolute position over cached k, v."""
    mod = _attention(num_heads=2, window=6)
    _randomize(mod)
    x = _x()
    y = mod(x)
    pos = jnp.arange(L)
    _, k, v = mod.project_qkv(x, pos)
    q_last, _, _ = mod.project_qkv(x[:, -1:], pos[-1:])
    # a cache with two empty slots (position -1) appended must not change the result
    k = jnp.concatenate([k, jnp.zeros_like(k[:, :2])], axis=1)
    v = jnp.concatenate([v, jnp.full_like(v[:, :2], 1e3)], axis=1)
    k_pos = jnp.concatenate([pos, -jnp.ones(2, pos.dtype)])
    o = mod.attend(q_last, k, v, mod.attention_mask(pos[-1:], k_pos))
    np.testing.assert_allclose(_np(mod.output(o))[:, 0], _np(y)[:, -1], rtol=1e-5, atol=1e-5)


def test_rope_is_relative():
    """Shifting every position by the same offset leaves RoPE attention unchanged."""
    mod = _attention(num_heads=2)
    _randomize(mod)
    x = _x()
    pos = jnp.arange(L)
    outs = []
    for shift in (0, 37):
        q, k, v = mod.project_qkv(x, pos + shift)
        outs.append(_np(mod.attend(q, k, v, mod.attention_mask(pos + shift, pos + shift))))
    # per-row positions (B, L): row b shifted by 5·b
    pos_b = pos[None, :] + 5 * jnp.arange(B)[:, None]
    q, k, v = mod.project_qkv(x, pos_b)
    outs.append(_np(mod.attend(q, k, v, mod.attention_mask(pos_b, pos_b))))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(outs[0], _np(mod.attend(*mod.project_qkv(x, pos[::-1]), mod.attention_mask(pos, pos))))


@pytest.mark.parametrize("window", [1, 3, 5])
def test_sliding_window_masks_exactly_the_window(window):
    mod = _attention(num_heads=2, window=window)
    _randomize(mod)
    x = _x(shape=(1, L, D))
    jac = jax.jacrev(lambda inp: mod(inp)[0])(x)[:, :, 0]  # (t, out, s, in)
    dep = np.abs(_np(jac)).sum(axis=(1, 3))  # (t, s)
    for t in range(L):
        for s in range(L):
            if t - window < s <= t:
                assert dep[t, s] > 0, (t, s)
            else:
                assert dep[t, s] == 0, (t, s)


def test_attention_dropout_only_in_training():
    mod = _attention(num_heads=2, dropout=0.5)
    ref = _attention(num_heads=2)
    _randomize(mod)
    _randomize(ref)
    x = _x()
    assert not np.allclose(_np(mod(x)), _np(ref(x)))
    mod.eval()
    np.testing.assert_allclose(_np(mod(x)), _np(ref(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [None, 1, 4])
def test_forward_uses_dot_product_attention_and_matches_the_written_out_path(window, monkeypatch):
    """Without dropout the forward is `jax.nn.dot_product_attention` (causal + local window); it equals
    the written-out scores/mask/softmax path (a dropout module in eval mode) for every window."""
    calls = []
    sdpa = jax.nn.dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    fast = _attention(num_heads=2, window=window)
    written = _attention(num_heads=2, window=window, dropout=0.5)
    _randomize(fast)
    _randomize(written)
    written.eval()
    x = _x()
    y_fast = fast(x)
    assert calls and calls[0]["is_causal"] and calls[0]["local_window_size"] == (None if window is None else (window - 1, 0))
    n_calls = len(calls)
    y_written = written(x)
    assert len(calls) == n_calls  # the dropout module never calls it
    np.testing.assert_allclose(_np(y_fast), _np(y_written), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,dtype,head_dim,expected", [
    ("gpu", jnp.bfloat16, 64, "cudnn"), ("gpu", jnp.float16, 128, "cudnn"), ("gpu", jnp.float32, 64, None),
    ("gpu", jnp.bfloat16, 12, None), ("gpu", jnp.bfloat16, 256, None), ("cpu", jnp.bfloat16, 64, None),
    ("tpu", jnp.bfloat16, 64, None)])
def test_sdpa_implementation_picks_cudnn_only_where_it_applies(backend, dtype, head_dim, expected):
    assert attn_mod.sdpa_implementation(dtype, head_dim, backend) == expected


# ---------------------------------------------------------------------------------------------- Based
def _np_phi(x):
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return np.concatenate([np.ones_like(x[..., :1]), x / d ** 0.25, outer / (math.sqrt(2) * math.sqrt(d))], -1)


@pytest.mark.parametrize("d", [4, 8, 16])
def test_taylor_feature_map_inner_product(d):
    rng = np.random.default_rng(d)
    q, k = rng.normal(size=(50, d)), rng.normal(size=(50, d))
    dots = (q * k).sum(-1)
    expected = 1 + dots / math.sqrt(d) + dots ** 2 / (2 * d)
    phi = np.asarray(based_mod.taylor_feature_map(jnp.asarray(q, jnp.float32)), np.float64)
    phk = np.asarray(based_mod.taylor_feature_map(jnp.asarray(k, jnp.float32)), np.float64)
    assert phi.shape == (50, 1 + d + d * d)
    np.testing.assert_allclose((phi * phk).sum(-1), expected, rtol=1e-5)
    np.testing.assert_allclose((_np_phi(q) * _np_phi(k)).sum(-1), expected, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(based_mod.taylor_kernel(jnp.asarray(dots), d)), expected, rtol=1e-5)


def _np_based(mod, x):
    x = _np(x)
    bsz, seqlen, _ = x.shape
    h, f, hd = mod.num_heads, mod.feature_dim, mod.head_dim
    q = (x @ _np(mod.proj_q.kernel[...])).reshape(bsz, seqlen, h, f)
    k = (x @ _np(mod.proj_k.kernel[...])).reshape(bsz, seqlen, h, f)
    v = (x @ _np(mod.proj_v.kernel[...])).reshape(bsz, seqlen, h, hd)
    a = np.einsum("bthf,bshf->bhts", _np_phi(q), _np_phi(k))
    a = a * np.tril(np.ones((seqlen, seqlen)))
    y = np.einsum("bhts,bshe->bthe", a, v) / (a.sum(-1).transpose(0, 2, 1)[..., None] + mod.cfg.eps)
    return y.reshape(bsz, seqlen, h * hd) @ _np(mod.proj_o.kernel[...])


@pytest.mark.parametrize("impl,chunk,heads,feat", [("quadratic", 128, 1, 8), ("quadratic", 128, 2, 4),
                                                   ("chunked", 5, 2, 4), ("chunked", 4, 1, 8),
                                                   ("auto", 5, 2, 4)])
def test_based_matches_numpy(impl, chunk, heads, feat):
    cfg = based_mod.BasedConfig(feature_dim=feat, num_heads=heads, impl=impl, chunk_size=chunk)
    mod = based_mod.Based(cfg, d_model=D, max_len=64, n_layers=2, rngs=nnx.Rngs(0))
    _randomize(mod)
    x = _x(seed=3, shape=(B, 13, D))
    np.testing.assert_allclose(_np(mod(x)), _np_based(mod, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- BaseConv
def _np_short_conv(conv, u):
    """PyTorch Conv1d(padding=K-1)[:L] semantics from ShortConv's (K, C) kernel and bias."""
    w, b = _np(conv.kernel[...]), _np(conv.bias[...])
    ksize = w.shape[0]
    up = np.pad(u, ((0, 0), (ksize - 1, 0), (0, 0)))
    seqlen = u.shape[1]
    return b + sum(w[j] * up[:, j:j + seqlen] for j in range(ksize))


def _np_causal_conv(h, u):
    """Σ_{s<=t} h_s u_{t-s} per channel; h (L, C)."""
    seqlen = u.shape[1]
    y = np.zeros_like(u)
    for t in range(seqlen):
        for s in range(t + 1):
            y[:, t] += h[s] * u[:, t - s]
    return y


def _baseconv(dtype=jnp.float32, layer_idx=0, **opts):
    cfg = baseconv_mod.BaseConvConfig(**opts)
    return baseconv_mod.BaseConv(cfg, d_model=D, max_len=64, layer_idx=layer_idx, n_layers=4, dtype=dtype,
                                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize("ksize", [1, 3, 4])
def test_baseconv_short_matches_formula(ksize):
    mod = _baseconv(kernel_size=ksize)
    _randomize(mod)
    x = _x()
    u = _np(x)
    proj = u @ _np(mod.projection.kernel[...]) + _np(mod.projection.bias[...])
    ref = _np_short_conv(mod.conv, u) * proj + u
    np.testing.assert_allclose(_np(mod(x)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("filter_kind", ["relu_mlp", "sine_window"])
def test_baseconv_long_matches_formula(filter_kind):
    mod = _baseconv(kernel_size=-1, filter_kind=filter_kind)
    _randomize(mod)
    x = _x()
    u = _np(x)
    h = _np(mod.filter(L))
    assert h.shape == (L, D)
    proj = u @ _np(mod.projection.kernel[...]) + _np(mod.projection.bias[...])
    ref = (_np_causal_conv(h, u) + u) * proj + u  # the implicit long conv carries its own unit skip
    np.testing.assert_allclose(_np(mod(x)), ref, rtol=1e-4, atol=1e-4)


def test_baseconv_sine_window_filter_is_zoologys_earlier_implicit_filter():
    """filter_kind "sine_window": h = window ⊙ (a3 Wout), a_{i+1} = sin(ω ⊙ (a_i W_i + b_i)), a_0 = z,
    with one ω (width 16) for every sine, z = [t̂, cos, sin] frozen (no gradient), window exp(-|δ_c| t̂) with
    δ from ln(0.01)/1.5 to ln(0.01)/0.3 over the channels: Zoology's ImplicitLongConvolution before its
    rewrite (Hyena's filter), evaluated here in float64 numpy."""
    mod = _baseconv(kernel_size=-1, filter_kind="sine_window", filter_init="normal")
    f = mod.filter
    assert f.width == 16 and len(f.layers) == 3 and not isinstance(f.pos_emb, nnx.Param)
    assert np.all(_np(f.freq[...]) == 1.0)  # the reference's sine frequency (Hyena's LM uses 14)
    _randomize(mod)
    t_hat = np.linspace(0.0, 1.0, 64)
    angle = 1e-4 * 2 * np.pi * np.arange(64) / 64  # the one band of emb_dim 3
    h = np.stack([t_hat, np.cos(angle), -np.sin(angle)], axis=-1)
    omega = _np(f.freq[...]).astype(np.float64)
    for layer in f.layers:
        h = np.sin(omega * (h @ _np(layer.kernel[...]) + _np(layer.bias[...])))
    h = h @ _np(f.out.kernel[...])
    deltas = np.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, D)
    h = h * np.exp(-t_hat[:, None] * np.abs(deltas)[None, :])
    np.testing.assert_allclose(_np(f(L)), h[:L], rtol=1e-4, atol=1e-5)


def test_baseconv_kernel_sizes_follow_layer_index():
    pattern = [3, -1, 3, -1]
    kinds = [_baseconv(kernel_sizes=pattern, layer_idx=i).kernel_size for i in range(6)]
    assert kinds == [3, -1, 3, -1, 3, -1]


def test_baseconv_based_variant_matches_formula():
    mod = _baseconv(variant="based", kernel_size=3, expand=4)
    _randomize(mod)
    x = _x()
    u = _np(x)
    z = u @ _np(mod.in_proj.kernel[...]) + _np(mod.in_proj.bias[...])
    u1, u2 = np.split(z, 2, axis=-1)
    c = _np_short_conv(mod.conv, u1)
    ref = ((c / (1 + np.exp(-c))) * u2) @ _np(mod.out_proj.kernel[...]) + _np(mod.out_proj.bias[...])
    assert u1.shape[-1] == 2 * D
    np.testing.assert_allclose(_np(mod(x)), ref, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- configs / dtypes
@pytest.mark.parametrize("spec", [
    {"name": "attention", "num_heads": 3},            # 16 % 3 != 0
    {"name": "attention", "num_heads": 2, "window": 0},
    {"name": "attention", "num_heads": 2, "windw": 4},  # unknown option
    {"name": "attention", "dropout": 1.0},
    {"name": "based", "num_heads": 3},
    {"name": "based", "impl": "fast"},
    {"name": "based", "feature_dim": 0},
    {"name": "baseconv", "kernel_size": 0},
    {"name": "baseconv", "kernel_size": -2},
    {"name": "baseconv", "kernel_sizes": [3, 0]},
    {"name": "baseconv", "variant": "hyena"},
    {"name": "baseconv", "variant": "based", "kernel_size": -1},
])
def test_config_errors_are_clear(spec):
    with pytest.raises(ConfigError):
        build_mixer(spec, d_model=D, max_len=64, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("spec", [
    {"name": "attention", "num_heads": 2},
    {"name": "attention", "num_heads": 2, "window": 4, "rotary": False},
    {"name": "based", "feature_dim": 8, "num_heads": 2},
    {"name": "based", "feature_dim": 4, "impl": "chunked", "chunk_size": 16},
    {"name": "baseconv", "kernel_size": 3},
    {"name": "baseconv", "kernel_size": -1},
    {"name": "baseconv", "variant": "based"},
])
def test_bf16_small_configs(spec):
    mod = build_mixer(spec, d_model=32, max_len=64, layer_idx=1, n_layers=2, dtype=jnp.bfloat16,
                      rngs=nnx.Rngs(0))
    x = _x(shape=(2, 64, 32)).astype(jnp.bfloat16)
    y = mod(x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    params = nnx.state(mod, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    with pytest.raises(ValueError, match="max_len"):
        mod(jnp.zeros((1, 65, 32), jnp.bfloat16))
