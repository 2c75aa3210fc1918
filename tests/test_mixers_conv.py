"""Convolution mixers (hyena, multihyena, sgconv, longconv, h3) and their filters against independent
float64 NumPy references built from the same parameters."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import ConfigError
from lm.mixers import build_mixer
from lm.mixers.filters import (
    ExplicitLongKernel, HyenaImplicitFilter, S4DLinKernel, SGConvKernel, ZoologyImplicitFilter, interp_plan,
    moving_average, squash,
)
from lm.params import FilterParam, count_params, param_labels

D, L = 16, 24
SMALL_FILTER = {"emb_dim": 5, "filter_order": 16}


def np64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def inp(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def conv_np(x, h):
    """Causal depthwise convolution (B, L, C) * (L_h, C) by explicit sums."""
    y = np.zeros_like(x)
    for t in range(x.shape[1]):
        for s in range(min(t + 1, h.shape[0])):
            y[:, t] += h[s] * x[:, t - s]
    return y


def linear_np(layer, x):
    y = x @ np64(layer.kernel[...])
    return y + np64(layer.bias[...]) if layer.bias is not None else y


def short_conv_np(sc, x):
    """PyTorch Conv1d(groups=C, padding=K-1)[:L] cross-correlation, written directly."""
    w, b = np64(sc.kernel[...]), np64(sc.bias[...])
    k = w.shape[0]
    xp = np.concatenate([np.zeros((x.shape[0], k - 1, x.shape[2])), x], axis=1)
    return b + sum(w[j] * xp[:, j:j + x.shape[1]] for j in range(k))


def gelu_np(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def build(spec, d=D, max_len=64, seed=0):
    m = build_mixer(spec, d_model=d, max_len=max_len, n_layers=2, rngs=nnx.Rngs(seed))
    m.eval()
    return m


def assert_close(y, ref, rtol=2e-4):
    y = np64(y)
    scale = np.abs(ref).max()
    assert scale > 0
    np.testing.assert_allclose(y, ref, atol=rtol * scale, rtol=0)


# ----------------------------------------------------------------------------------------------- Hyena


def hyena_filter_np(f, seqlen):
    """HyenaImplicitFilter in float64 from its parameters: window · FFN(z)."""
    z = np64(f.pos_emb[...])[:seqlen]
    freq = np64(f.freq[...])
    h = z
    for layer in f.layers:
        h = np.sin(freq * linear_np(layer, h))
    h = h @ np64(f.out.kernel[...])
    t_hat = np.linspace(0, 1, f.l_max)[:seqlen, None]
    return h * np.exp(-t_hat * np.abs(np64(f.deltas[...])))


def hyena_np(m, x, convention, order):
    d = m.d_model
    u = short_conv_np(m.short_conv, linear_np(m.in_proj, x))
    parts = [u[..., i * d:(i + 1) * d] for i in range(order + 1)]
    h = hyena_filter_np(m.filter, x.shape[1])
    bias = np64(m.bias[...])
    hs = [h[:, o * d:(o + 1) * d] for o in range(m.n_filters)]
    bs = [bias[o * d:(o + 1) * d] for o in range(m.n_filters)]
    if convention == "safari":
        x0, gates, v = parts[0], parts[1:-1], parts[-1]
        for o, g in enumerate(reversed(gates)):
            w = g * v
            v = conv_np(w, hs[o]) + bs[o] * w
        y = x0 * v
    else:
        y = parts[0]
        for o, g in enumerate(parts[1:]):
            y = g * (conv_np(y, hs[o]) + bs[o] * y)
    return linear_np(m.out_proj, y)


@pytest.mark.parametrize("convention,order,layout", [("safari", 2, "blh"), ("safari", 3, "blh"), ("paper", 2, "blh"),
                                                     ("paper", 1, "blh"), ("safari", 3, "hbl"), ("paper", 2, "hbl")])
def test_hyena_matches_numpy(convention, order, layout):
    m = build({"name": "hyena", "convention": convention, "order": order, "w": 3.0, "layout": layout,
               **SMALL_FILTER})
    assert m.n_filters == (order - 1 if convention == "safari" else order)
    x = inp((2, L, D), 1)
    assert_close(m(x), hyena_np(m, np64(x), convention, order))
    filt = m.long_filters(L)
    assert sorted(filt) == [f"filter_{o}" for o in range(m.n_filters)]
    ref = hyena_filter_np(m.filter, L)
    for o in range(m.n_filters):
        assert filt[f"filter_{o}"].shape == (L, D) and filt[f"filter_{o}"].dtype == jnp.float32
        assert_close(filt[f"filter_{o}"], ref[:, o * D:(o + 1) * D], rtol=1e-5)


def test_hyena_channels_first_layout_runs_the_fused_kernels_with_the_same_gradients():
    """layout "hbl" (in_proj writes (D, B, L), out_proj reads it) is the same function and gradient as
    "blh", and with impl pallas every long conv is the fused kernel pair."""
    from kernels.fftconv import auto_impl

    spec = {"name": "hyena", "order": 3, **SMALL_FILTER}
    x = inp((1, 100, D), 4)
    grads = {}
    for layout in ("blh", "hbl"):
        graphdef, params, rest = nnx.split(build({**spec, "layout": layout}, max_len=100, seed=3), nnx.Param, ...)

        def loss(params, x, graphdef=graphdef, rest=rest):
            return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

        with auto_impl("pallas"):
            text = str(jax.make_jaxpr(jax.grad(loss))(params, x))
            grads[layout] = jax.tree.leaves(jax.grad(loss)(params, x))
        # order 3 = 2 long convolutions: a forward and a backward kernel each
        assert text.count("name=fftconv_fused_bwd") == 2 and text.count("name=fftconv_fused") == 4
    assert len(grads["blh"]) == len(grads["hbl"]) > 0
    for a, b in zip(grads["blh"], grads["hbl"]):
        scale = float(np.abs(np64(a)).max())
        np.testing.assert_allclose(np64(b), np64(a), rtol=0, atol=1e-5 * scale + 1e-12)


def test_hyena_safari_order2_is_gate_conv_gate():
    """Order 2 (safari naming): y = W_o[x⁰ ⊙ (h ∗ (x¹ ⊙ v) + D ⊙ (x¹ ⊙ v))], blocks (x⁰, x¹, v)."""
    m = build({"name": "hyena", **SMALL_FILTER})
    x = np64(inp((1, L, D), 2))
    u = short_conv_np(m.short_conv, linear_np(m.in_proj, x))
    x0, x1, v = u[..., :D], u[..., D:2 * D], u[..., 2 * D:]
    h = np64(m.long_filters(L)["filter_0"])
    dskip = np64(m.long_filter_skips()["filter_0"])
    ref = linear_np(m.out_proj, x0 * (conv_np(x1 * v, h) + dskip * x1 * v))
    assert_close(m(jnp.asarray(x, jnp.float32)), ref)


def test_hyena_filter_features_window_and_prefix():
    f = HyenaImplicitFilter(6, 64, emb_dim=5, width=8, rngs=nnx.Rngs(0))
    z = np64(f.pos_emb[...])
    t = np.arange(64)
    assert z.shape == (64, 5)
    np.testing.assert_allclose(z[:, 0], np.linspace(0, 1, 64), atol=1e-6)
    fk = np.linspace(1e-4, 1, 2)
    np.testing.assert_allclose(z[:, 1:3], np.cos(2 * np.pi * fk[None] * t[:, None] / 64), atol=1e-5)
    np.testing.assert_allclose(z[:, 3:5], -np.sin(2 * np.pi * fk[None] * t[:, None] / 64), atol=1e-5)
    deltas = np.abs(np64(f.deltas[...]))
    np.testing.assert_allclose([deltas[0], deltas[-1]], [math.log(100) / 1.5, math.log(100) / 0.3], rtol=1e-5)
    assert f(64).shape == (64, 6) and f(64).dtype == jnp.float32
    np.testing.assert_allclose(np64(f(10)), np64(f(64))[:10], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="65"):
        f(65)
    # Trainable: z, ω, MLP (FilterParam); frozen: δ and t̂ are not parameters at all.
    params = nnx.state(f, nnx.Param)
    assert all(isinstance(v, FilterParam) for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable)))
    assert "deltas" not in params and "t_hat" not in params and "pos_emb" in params and "freq" in params
    frozen = HyenaImplicitFilter(6, 64, emb_dim=5, width=8, train_freq=False, train_pos_emb=False, rngs=nnx.Rngs(0))
    assert "pos_emb" not in nnx.state(frozen, nnx.Param) and "freq" not in nnx.state(frozen, nnx.Param)
    assert f.freq[...].shape == (8,)  # ONE shared ω for every sine of the MLP


def test_hyena_param_count_formula():
    """Safari order N at d: in (N+1)d²+(N+1)d, short (N+1)d(k+1), filter l_max·e + eW+W + n(W²+W) + W(N-1)d + W,
    bias (N-1)d, out d²+d."""
    d, l_max, e, w, n, k = 64, 128, 33, 64, 2, 3
    for order in (2, 3):
        m = build_mixer({"name": "hyena", "order": order}, d_model=d, max_len=l_max, rngs=nnx.Rngs(0))
        p = order + 1
        nf = order - 1
        expected = (p * d * d + p * d) + p * d * (k + 1) + (l_max * e + e * w + w + n * (w * w + w) + w * nf * d + w) \
            + nf * d + (d * d + d)
        assert count_params(m) == expected
    labels = param_labels(nnx.state(m, nnx.Param))
    flat = {tuple(map(str, k)): v for k, v in nnx.to_flat_state(labels)}
    value = lambda v: v.get_value() if hasattr(v, "get_value") else v
    assert value(flat[("filter", "out", "kernel")]) == "filter"
    assert value(flat[("in_proj", "kernel")]) == "decay"


def test_hyena_dropout_train_vs_eval():
    m = build_mixer({"name": "hyena", "dropout": 0.5, **SMALL_FILTER}, d_model=D, max_len=64, rngs=nnx.Rngs(0))
    x = inp((1, L, D), 3)
    m.eval()
    y_eval = m(x)
    m.train()
    assert not np.allclose(np64(m(x)), np64(y_eval))


# ------------------------------------------------------------------------------------------ MultiHyena


@pytest.mark.parametrize("heads", [4, 16, 2])
def test_multihyena_is_toeplitz_linear_attention(heads):
    m = build({"name": "multihyena", "num_heads": heads, **SMALL_FILTER})
    x = np64(inp((2, L, D), 4))
    u = short_conv_np(m.short_conv, linear_np(m.in_proj, x))
    q, k, v = u[..., :D], u[..., D:2 * D], u[..., 2 * D:]
    h = np64(m.long_filters(L)["filter"])
    dskip = np64(m.long_filter_skips()["filter"])
    assert h.shape == (L, heads)
    n = D // heads
    y = np.zeros_like(x)
    for b in range(2):
        for mh in range(heads):
            sl = slice(mh * n, (mh + 1) * n)
            for t in range(L):
                for s in range(t + 1):
                    w = h[t - s, mh] + (dskip[mh] if s == t else 0.0)
                    y[b, t, sl] += w * (q[b, t, sl] @ k[b, s, sl]) * v[b, s, sl]
    assert_close(m(jnp.asarray(x, jnp.float32)), linear_np(m.out_proj, y))


def test_multihyena_rejects_indivisible_heads():
    with pytest.raises(ConfigError, match="divisible"):
        build({"name": "multihyena", "num_heads": 5})


# ---------------------------------------------------------------------------------------------- SGConv


def test_torch_linear_interpolation_edges():
    """F.interpolate([0, 1, 2], scale_factor=2, mode='linear') = [0, .25, .75, 1.25, 1.75, 2] (half-pixel)."""
    i0, i1, lam = interp_plan(3, 2)
    x = np.array([0.0, 1.0, 2.0])
    np.testing.assert_allclose((1 - lam) * x[i0] + lam * x[i1], [0, 0.25, 0.75, 1.25, 1.75, 2.0])
    i0, i1, lam = interp_plan(3, 4)
    np.testing.assert_allclose((1 - lam) * x[i0] + lam * x[i1],
                               [0, 0, 0.125, 0.375, 0.625, 0.875, 1.125, 1.375, 1.625, 1.875, 2, 2])
    i0, _, _ = interp_plan(3, 2, "nearest")
    np.testing.assert_array_equal(i0, [0, 0, 1, 1, 2, 2])


def sgconv_kernel_np(kern):
    w = np64(kern.kernels[...])
    n_s, d, c = w.shape
    mult = np.linspace(2.0, 3.0, c)
    segs = []
    for i in range(n_s):
        s = 2 ** max(i - 1, 0)
        src = np.maximum((np.arange(d * s) + 0.5) / s - 0.5, 0.0)
        up = np.stack([np.interp(src, np.arange(d), w[i, :, ch]) for ch in range(c)], axis=1)
        segs.append(up * mult ** (n_s - 1 - i))
    return np.concatenate(segs, axis=0)


def test_sgconv_kernel_matches_numpy():
    kern = SGConvKernel(5, 100, kernel_dim=8, decay_min=2.0, decay_max=3.0, rngs=nnx.Rngs(0))
    assert kern.n_scales == 1 + math.ceil(math.log2(100 / 8)) == 5
    assert kern.scale_factors() == [1, 1, 2, 4, 8]  # segment lengths 8, 8, 16, 32, 64
    full = sgconv_kernel_np(kern)
    assert full.shape == (128, 5)
    norm0 = np.linalg.norm(full, axis=0)
    np.testing.assert_allclose(np64(kern.kernel_norm[...]), norm0, rtol=1e-5)
    k = np64(kern(100))
    np.testing.assert_allclose(k, full[:100] / norm0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(np64(kern(100)), axis=0) <= 1 + 1e-6, True)
    # The init norm is stored, never recomputed: scaling the sub-kernels scales the output.
    kern.kernels[...] = 2.0 * kern.kernels[...]
    np.testing.assert_allclose(np64(kern(100)), 2 * full[:100] / norm0, rtol=1e-5, atol=1e-7)
    assert "kernel_norm" not in nnx.state(kern, nnx.Param) and "multiplier" not in nnx.state(kern, nnx.Param)
    # Shorter than the concatenated kernel truncates; longer zero-pads.
    short = SGConvKernel(3, 40, kernel_dim=16, n_scales=1, rngs=nnx.Rngs(1))
    assert short(40).shape == (40, 3) and np.all(np64(short(40))[16:] == 0)


@pytest.mark.parametrize("glu", [False, True])
def test_sgconv_block_matches_numpy(glu):
    m = build({"name": "sgconv", "kernel_dim": 8, "glu": glu})
    x = np64(inp((2, L, D), 5))
    k = np64(m.long_filters(L)["kernel"])
    y = gelu_np(conv_np(x, k) + np64(m.bias[...]) * x)
    y = linear_np(m.out_proj, y)
    if glu:
        y = y[..., :D] / (1 + np.exp(-y[..., D:]))
    assert_close(m(jnp.asarray(x, jnp.float32)), y)


# -------------------------------------------------------------------------------------------- LongConv


@pytest.mark.parametrize("lam,expected", [(0.001, 0.38), (0.002, 0.68), (0.003, 0.87), (0.004, 0.95)])
def test_squash_dead_fraction_and_dead_gradients(lam, expected):
    kern = ExplicitLongKernel(64, 1024, lam=lam, rngs=nnx.Rngs(0))
    k = np64(kern.kernel[...])
    assert abs(k.std() - 0.002) < 5e-5
    dead = np.abs(k) <= lam
    assert abs(dead.mean() - math.erf(lam / (0.002 * math.sqrt(2)))) < 0.01
    assert abs(dead.mean() - expected) < 0.015
    assert np.all(np64(kern.regularized())[dead] == 0)
    w = inp((1024, 64), 6)
    grads = nnx.grad(lambda m: jnp.sum(m.regularized() * w))(kern)
    g = np64(grads.kernel[...])
    assert np.all(g[dead] == 0)
    np.testing.assert_allclose(g[~dead], np64(w)[~dead])


def test_smooth_is_moving_average_then_squash():
    kern = ExplicitLongKernel(3, 50, lam=0.001, smooth=True, ma_window_len=5, rngs=nnx.Rngs(0))
    k = np64(kern.kernel[...])
    ma = np.stack([np.convolve(k[:, c], np.ones(5) / 5, mode="same") for c in range(3)], axis=1)
    np.testing.assert_allclose(np64(moving_average(kern.kernel[...], 5)), ma, atol=1e-8)
    ref = np.sign(ma) * np.maximum(np.abs(ma) - 0.001, 0)
    np.testing.assert_allclose(np64(kern.regularized(30)), ref[:30], atol=1e-8)
    np.testing.assert_allclose(np64(squash(jnp.array([-3.0, -0.5, 0.2, 2.0]), 1.0)), [-2, 0, 0, 1])


def test_kernel_dropout_only_in_training():
    kern = ExplicitLongKernel(4, 32, lam=0.0, kernel_dropout=0.5, rngs=nnx.Rngs(0))
    kern.eval()
    np.testing.assert_array_equal(np64(kern(32)), np64(kern.regularized(32)))
    kern.train()
    assert 0.3 < float(jnp.mean(kern(32) == 0)) < 0.7


@pytest.mark.parametrize("channels,init", [(1, "random"), (2, "double_exp")])
def test_longconv_block_matches_numpy(channels, init):
    m = build({"name": "longconv", "channels": channels, "init": init, "lam": 0.0005})
    x = np64(inp((2, L, D), 7))
    k = np64(m.long_filters(L)["kernel"])
    assert k.shape == (L, channels * D)
    u = np.concatenate([x] * channels, axis=-1)
    y = linear_np(m.out_proj, gelu_np(conv_np(u, k) + np64(m.bias[...]) * u))
    y = y[..., :D] / (1 + np.exp(-y[..., D:]))
    assert_close(m(jnp.asarray(x, jnp.float32)), y)


# -------------------------------------------------------------------------------------------------- H3


def test_s4dlin_kernel_matches_vandermonde():
    kern = S4DLinKernel(3, 8, rngs=nnx.Rngs(0))
    dt = np.exp(np64(kern.log_dt[...]))
    a = -np.exp(np64(kern.log_a_real[...])) + 1j * np64(kern.a_imag[...])
    np.testing.assert_allclose(a[0], -0.5 + 1j * np.pi * np.arange(4), rtol=1e-6)
    assert np.all((dt >= 1e-3 - 1e-9) & (dt <= 1e-1 + 1e-9))
    c = np64(kern.c_re[...]) + 1j * np64(kern.c_im[...])
    t = np.arange(40)
    ref = 2 * np.real(np.einsum("cn,cnt->tc", c * (np.exp(dt[:, None] * a) - 1) / a,
                                np.exp(dt[:, None, None] * a[:, :, None] * t)))
    np.testing.assert_allclose(np64(kern(40)), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("head_dim", [1, 2])
def test_h3_matches_numpy(head_dim):
    m = build({"name": "h3", "d_state": 8, "head_dim": head_dim})
    x = np64(inp((2, L, D), 8))
    q, k, v = linear_np(m.q_proj, x), linear_np(m.k_proj, x), linear_np(m.v_proj, x)
    filt, skips = m.long_filters(L), m.long_filter_skips()
    assert filt["shift"].shape == (L, D) and np.all(np64(filt["shift"])[8:] == 0)
    kbar = conv_np(k, np64(filt["shift"])) + np64(skips["shift"]) * k
    h, dskip = np64(filt["ssm"]), np64(skips["ssm"])
    assert h.shape == (L, D // head_dim)
    y = np.zeros_like(x)
    for mh in range(D // head_dim):
        sl = slice(mh * head_dim, (mh + 1) * head_dim)
        for t in range(L):
            for s in range(t + 1):
                w = h[t - s, mh] + (dskip[mh] if s == t else 0.0)
                y[:, t, sl] += w * np.sum(q[:, t, sl] * kbar[:, s, sl], -1, keepdims=True) * v[:, s, sl]
    assert_close(m(jnp.asarray(x, jnp.float32)), linear_np(m.out_proj, y))


# ------------------------------------------------------------------------------------ shapes and errors


def test_filter_shapes():
    r = nnx.Rngs(0)
    filters = [HyenaImplicitFilter(7, 32, width=8, rngs=r), ZoologyImplicitFilter(7, 32, rngs=r),
               SGConvKernel(7, 32, kernel_dim=4, rngs=r), ExplicitLongKernel(7, 32, rngs=r), S4DLinKernel(7, 4, rngs=r)]
    for f in filters:
        k20, k32 = f(20), f(32)
        assert k20.shape == (20, 7) and k20.dtype == jnp.float32
        np.testing.assert_allclose(np64(k20), np64(k32)[:20], rtol=1e-5, atol=1e-6)  # prefix of the l_max filter


@pytest.mark.parametrize("name", ["hyena", "multihyena", "sgconv", "longconv", "h3"])
def test_long_filters_are_fp32_and_documented(name):
    extra = SMALL_FILTER if name in ("hyena", "multihyena") else {}
    m = build({"name": name, **extra}, max_len=32)
    filters, skips = m.long_filters(20), m.long_filter_skips()
    assert filters and set(filters) == set(skips)
    for key, f in filters.items():
        assert f.ndim == 2 and f.shape[0] == 20 and f.dtype == jnp.float32
        assert skips[key].shape == (f.shape[1],)
    assert m.long_filters.__doc__


@pytest.mark.parametrize("spec,match", [
    ({"name": "hyena", "bogus": 1}, "bogus"),
    ({"name": "hyena", "order": 1}, "order"),
    ({"name": "hyena", "convention": "paper", "order": 0}, "order"),
    ({"name": "hyena", "convention": "other"}, "convention"),
    ({"name": "hyena", "emb_dim": 4}, "emb_dim"),
    ({"name": "multihyena", "emb_dim": 6}, "emb_dim"),
    ({"name": "multihyena", "num_heads": 0}, "num_heads"),
    ({"name": "sgconv", "mode": "sum"}, "mode"),
    ({"name": "sgconv", "interpolation": "cubic"}, "interpolation"),
    ({"name": "longconv", "ma_window_len": 4}, "ma_window_len"),
    ({"name": "longconv", "init": "zeros"}, "init"),
    ({"name": "h3", "d_state": 7}, "d_state"),
    ({"name": "h3", "head_dim": 3}, "divisible"),
])
def test_config_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        build(spec)


@pytest.mark.parametrize("mixer", ["baseconv", "hyena"])
def test_filter_init_normal_is_zoologys_lm_init_of_the_filter_mlp(mixer):
    """Zoology's LM re-initialises every nn.Linear, the implicit filter's MLP included, to N(0, 0.02²) with
    zero bias: ``filter_init: normal``. The default "torch" keeps PyTorch's U(±1/√fan_in). With "normal" the
    long filter starts near 0 (BaseConv's conv(u) = h ∗ u + u near u)."""
    spec = {"name": mixer} | ({"kernel_size": -1} if mixer == "baseconv" else {})

    def linear_params(init):  # {"kernel": [...], "bias": [...]} of the filter MLP's Linear layers
        m = build_mixer(spec | {"filter_init": init}, d_model=64, max_len=64, rngs=nnx.Rngs(0))
        out = {"kernel": [], "bias": []}
        for path, x in jax.tree_util.tree_flatten_with_path(nnx.state(m.filter, FilterParam))[0]:
            name = next(str(k.key) for k in reversed(path) if hasattr(k, "key"))  # the last dict key
            if name in out:
                out[name].append(x)
        return m, out

    m, normal = linear_params("normal")
    assert len(normal["kernel"]) >= 2 and all(abs(float(jnp.std(k)) - 0.02) < 0.004 for k in normal["kernel"])
    assert normal["bias"] and all(float(jnp.max(jnp.abs(b))) == 0.0 for b in normal["bias"])
    _, torch = linear_params("torch")
    for k in torch["kernel"]:  # U(±1/√fan_in): std 1/√(3·fan_in)
        assert abs(float(jnp.std(k)) * math.sqrt(3 * k.shape[0]) - 1.0) < 0.2
    if mixer == "baseconv":
        assert float(jnp.max(jnp.abs(m.filter(64)))) < 0.02
