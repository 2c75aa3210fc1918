"""Recurrent twins of the mixers and a token-by-token decoder for the whole LM.

Every mixer twin has two pure functions over a mixer module:

    prefill(mixer, x (B, T, D), convs, cap) -> (y (B, T, D), state)     parallel over T (no token loop)
    step(mixer, x_t (B, D), state, convs, pos) -> (y_t (B, D), state)    one token

``convs`` maps each long-filter name of the mixer (the keys of ``mixer.long_filters``) to a *conv
backend* that realises ``y = h ∗ z + D ⊙ z`` for that filter bank:

- `ModalConv` (the distilled, O(1) path): prefill outputs by FFT with the materialised modal filter ĥ
  (the same ĥ the recurrence realises, so there is no discontinuity at the prompt boundary), the state by
  a parallel prefill method (`lm.distill.modal.PREFILL_METHODS`), then `modal.step` per token with
  feedthrough ĥ_0 + D. Cost per token O(C·d), independent of the prompt length.
- `CacheConv` (the undistilled baseline): keeps every past filter input in a (B, cap, C) buffer and
  recomputes y_t = Σ_{s≤t} h_{t-s} z_s + D z_t over the cache each token: O(cap·C) per token.

Mixer states also hold the short-conv FIR tail (the last K-1 in-projected inputs, oldest first).
Attention layers use a KV cache (capacity ``cap``) with the mixer's `project_qkv` / `attend` / `output`.

Supported mixers: hyena (safari and paper conventions, any order: each filter stage keeps its own modal
state and the stages run in sequence within a step), multihyena (per-head matrix state: the head's modal
params are repeated over the N² entries of k_t ⊗ v_t, i.e. S ∈ ℝ^{2×M×N×N×d}), longconv, sgconv and h3
when their modules expose the documented pieces, and attention. `Decoder` runs the LM:
``prefill(tokens) -> (logits, cache)``, ``step(token, cache) -> (logits, cache)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv.reference import fftconv_xla
from lm.distill import modal
from lm.distill.modal import PREFILL_METHODS, ModalParams


class RecurrentError(ValueError):
    """A model cannot be decoded recurrently (missing distilled filters, unsupported mixer, ...)."""


# ----------------------------------------------------------------------------------------------------
# Conv backends
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ModalConv:
    """Distilled filter bank: modal params (C, d) plus the mixer's skip D (C,) or None."""

    params: ModalParams
    skip: Any = None
    method: str = "chunked"

    def prefill(self, z, cap: int | None = None):
        return modal.prefill(self.params, z.astype(jnp.float32), self.method, self.skip)

    def step(self, z_t, state, pos):
        return modal.step(self.params, state, z_t.astype(jnp.float32), self.skip)


@dataclasses.dataclass
class CacheConv:
    """Exact filter bank h (L, C) with skip; decoding recomputes the convolution over an input cache."""

    h: Any
    skip: Any = None

    def prefill(self, z, cap: int | None = None):
        t_len = z.shape[1]
        y = fftconv_xla(z.astype(jnp.float32), self.h[:t_len], self.skip)
        cap = t_len if cap is None else cap
        if cap > self.h.shape[0]:
            raise RecurrentError(f"conv cache capacity {cap} exceeds the filter length {self.h.shape[0]} (max_len)")
        buf = jnp.zeros((z.shape[0], cap, z.shape[2]), jnp.float32).at[:, :t_len].set(z.astype(jnp.float32))
        return y, buf

    def step(self, z_t, buf, pos):
        z_t = z_t.astype(jnp.float32)
        buf = jax.lax.dynamic_update_slice(buf, z_t[:, None, :], (0, pos, 0))
        cap, length = buf.shape[1], self.h.shape[0]
        # taps[s] = h[pos - s] (0 for s > pos) as one contiguous slice of the reversed, zero-padded filter
        g = jnp.concatenate([jnp.flip(self.h, axis=0), jnp.zeros((cap, self.h.shape[1]), self.h.dtype)], axis=0)
        taps = jax.lax.dynamic_slice(g, (length - 1 - pos, 0), (cap, self.h.shape[1]))
        y = jnp.einsum("bsc,sc->bc", buf, taps)
        if self.skip is not None:
            y = y + self.skip * z_t
        return y, buf


@dataclasses.dataclass
class FIRConv:
    """Exact short FIR bank: taps (K, C) (tap s multiplies z_{t-s}) with skip; state = last K-1 inputs."""

    taps: Any
    skip: Any = None

    def prefill(self, z, cap: int | None = None):
        t_len, k = z.shape[1], self.taps.shape[0]
        y = fftconv_xla(z.astype(jnp.float32), self.taps[:t_len], self.skip)
        tail = jnp.pad(z.astype(jnp.float32), ((0, 0), (k, 0), (0, 0)))[:, -k:] if k > 1 else z[:, :0]
        return y, tail[:, 1:] if k > 1 else tail

    def step(self, z_t, tail, pos):
        z_t = z_t.astype(jnp.float32)
        window = jnp.concatenate([tail, z_t[:, None]], axis=1)  # oldest first, (B, K, C)
        y = jnp.einsum("bkc,kc->bc", window, jnp.flip(self.taps, axis=0))
        if self.skip is not None:
            y = y + self.skip * z_t
        return y, window[:, 1:]


# ----------------------------------------------------------------------------------------------------
# Short conv FIR state
# ----------------------------------------------------------------------------------------------------


def short_conv_prefill(conv, p):
    """Full short conv output and its tail state: the last K-1 inputs (B, K-1, C), zero padded in front."""
    y = conv(p)
    k = conv.kernel_size
    if k == 1:
        return y, jnp.zeros((p.shape[0], 0, p.shape[2]), p.dtype)
    tail = jnp.pad(p, ((0, 0), (k - 1, 0), (0, 0)))[:, -(k - 1):]
    return y, tail


def short_conv_step(conv, p_t, tail):
    """y_t = bias + Σ_j kernel[j] · window[j] with window = (tail, p_t) (PyTorch cross-correlation order)."""
    dt = conv.dtype
    window = jnp.concatenate([tail.astype(dt), p_t.astype(dt)[:, None]], axis=1)  # (B, K, C)
    y = jnp.einsum("bkc,kc->bc", window, conv.kernel[...].astype(dt)) + conv.bias[...].astype(dt)
    return y, window[:, 1:]


# ----------------------------------------------------------------------------------------------------
# Mixer twins
# ----------------------------------------------------------------------------------------------------


def _hyena_chain(mixer, parts, conv_fn):
    """The Hyena gate/filter chain on split projections (works with or without a time axis)."""
    n = mixer.n_filters
    states = {}
    if mixer.cfg.convention == "safari":
        x0, gates, v = parts[0], parts[1:-1], parts[-1]
        for o, gate in enumerate(reversed(gates)):
            z = gate.astype(jnp.float32) * v.astype(jnp.float32)
            y, states[f"filter_{o}"] = conv_fn(f"filter_{o}", z)
            v = y * x0.astype(jnp.float32) if o == n - 1 else y
    else:
        v, gates = parts[0], parts[1:]
        for o, gate in enumerate(gates):
            y, states[f"filter_{o}"] = conv_fn(f"filter_{o}", v.astype(jnp.float32))
            v = y * gate.astype(jnp.float32)
    return v.astype(mixer.dtype), states


def hyena_prefill(mixer, x, convs, cap):
    p = mixer.in_proj(x.astype(mixer.dtype))
    u, tail = short_conv_prefill(mixer.short_conv, p)
    parts = jnp.split(u, mixer.cfg.order + 1, axis=-1)
    v, states = _hyena_chain(mixer, parts, lambda name, z: convs[name].prefill(z, cap))
    return mixer.out_proj(v), {"short": tail, "convs": states}


def hyena_step(mixer, x_t, state, convs, pos):
    p = mixer.in_proj(x_t.astype(mixer.dtype))
    u, tail = short_conv_step(mixer.short_conv, p, state["short"])
    parts = jnp.split(u, mixer.cfg.order + 1, axis=-1)
    v, states = _hyena_chain(mixer, parts, lambda name, z: convs[name].step(z, state["convs"][name], pos))
    return mixer.out_proj(v), {"short": tail, "convs": states}


def _outer(k, v, heads):
    """k ⊗ v per head, flattened head-major to (..., M·N²) (the `headwise_outer_conv` channel order)."""
    n = k.shape[-1] // heads
    kh = k.reshape(*k.shape[:-1], heads, n, 1).astype(jnp.float32)
    vh = v.reshape(*v.shape[:-1], heads, 1, n).astype(jnp.float32)
    return (kh * vh).reshape(*k.shape[:-1], heads * n * n)


def _contract_q(q, y, heads):
    n = q.shape[-1] // heads
    qh = q.reshape(*q.shape[:-1], heads, n).astype(jnp.float32)
    yh = y.reshape(*y.shape[:-1], heads, n, n)
    return jnp.einsum("...mi,...mij->...mj", qh, yh).reshape(q.shape)


def multihyena_prefill(mixer, x, convs, cap):
    p = mixer.in_proj(x.astype(mixer.dtype))
    u, tail = short_conv_prefill(mixer.short_conv, p)
    q, k, v = jnp.split(u, 3, axis=-1)
    y, st = convs["filter"].prefill(_outer(k, v, mixer.num_heads), cap)
    out = _contract_q(q, y, mixer.num_heads).astype(mixer.dtype)
    return mixer.out_proj(out), {"short": tail, "convs": {"filter": st}}


def multihyena_step(mixer, x_t, state, convs, pos):
    p = mixer.in_proj(x_t.astype(mixer.dtype))
    u, tail = short_conv_step(mixer.short_conv, p, state["short"])
    q, k, v = jnp.split(u, 3, axis=-1)
    y, st = convs["filter"].step(_outer(k, v, mixer.num_heads), state["convs"]["filter"], pos)
    out = _contract_q(q, y, mixer.num_heads).astype(mixer.dtype)
    return mixer.out_proj(out), {"short": tail, "convs": {"filter": st}}


def _longconv_out(mixer, y):
    from lm.mixers.layers import glu

    y = jax.nn.gelu(y.astype(mixer.dtype), approximate=False)
    y = mixer.out_proj(y)
    return glu(y) if mixer.cfg.glu else y


def _tile(mixer, u):
    c = getattr(mixer.cfg, "channels", 1)
    return jnp.tile(u, (1,) * (u.ndim - 1) + (c,)) if c > 1 else u


def longconv_prefill(mixer, x, convs, cap):
    name = next(iter(convs))
    y, st = convs[name].prefill(_tile(mixer, x.astype(mixer.dtype)), cap)
    return _longconv_out(mixer, y), {"convs": {name: st}}


def longconv_step(mixer, x_t, state, convs, pos):
    name = next(iter(convs))
    y, st = convs[name].step(_tile(mixer, x_t.astype(mixer.dtype)), state["convs"][name], pos)
    return _longconv_out(mixer, y), {"convs": {name: st}}


def attention_prefill(mixer, x, convs, cap):
    t_len = x.shape[1]
    positions = jnp.arange(t_len)
    q, k, v = mixer.project_qkv(x, positions)
    o = mixer.attend(q, k, v, mixer.attention_mask(positions, positions))
    cap = t_len if cap is None else cap
    kc = jnp.zeros((x.shape[0], cap) + k.shape[2:], k.dtype).at[:, :t_len].set(k)
    vc = jnp.zeros((x.shape[0], cap) + v.shape[2:], v.dtype).at[:, :t_len].set(v)
    return mixer.output(o), {"k": kc, "v": vc}


def attention_step(mixer, x_t, state, convs, pos):
    q, k, v = mixer.project_qkv(x_t[:, None], jnp.reshape(pos, (1,)))
    kc = jax.lax.dynamic_update_slice(state["k"], k.astype(state["k"].dtype), (0, pos, 0, 0))
    vc = jax.lax.dynamic_update_slice(state["v"], v.astype(state["v"].dtype), (0, pos, 0, 0))
    slots = jnp.arange(kc.shape[1])
    k_pos = jnp.where(slots <= pos, slots, -1)
    o = mixer.attend(q, kc, vc, mixer.attention_mask(jnp.reshape(pos, (1,)), k_pos))
    return mixer.output(o)[:, 0], {"k": kc, "v": vc}


def h3_prefill(mixer, x, convs, cap):
    x = x.astype(mixer.dtype)
    q, k, v = mixer.q_proj(x), mixer.k_proj(x), mixer.v_proj(x)
    kbar, st_shift = convs["shift"].prefill(k, cap)
    if mixer.cfg.head_dim == 1:
        y, st = convs["ssm"].prefill(kbar * v.astype(jnp.float32), cap)
        y = y * q.astype(jnp.float32)
    else:
        y, st = convs["ssm"].prefill(_outer(kbar, v, mixer.num_heads), cap)
        y = _contract_q(q, y, mixer.num_heads)
    return mixer.out_proj(y.astype(mixer.dtype)), {"convs": {"shift": st_shift, "ssm": st}}


def h3_step(mixer, x_t, state, convs, pos):
    x_t = x_t.astype(mixer.dtype)
    q, k, v = mixer.q_proj(x_t), mixer.k_proj(x_t), mixer.v_proj(x_t)
    kbar, st_shift = convs["shift"].step(k, state["convs"]["shift"], pos)
    if mixer.cfg.head_dim == 1:
        y, st = convs["ssm"].step(kbar * v.astype(jnp.float32), state["convs"]["ssm"], pos)
        y = y * q.astype(jnp.float32)
    else:
        y, st = convs["ssm"].step(_outer(kbar, v, mixer.num_heads), state["convs"]["ssm"], pos)
        y = _contract_q(q, y, mixer.num_heads)
    return mixer.out_proj(y.astype(mixer.dtype)), {"convs": {"shift": st_shift, "ssm": st}}


@dataclasses.dataclass(frozen=True)
class Twin:
    prefill: Callable
    step: Callable
    has_filters: bool = True
    channel_repeat: Callable | None = None  # mixer -> int: repeat factor of filter channels (multihyena N²)
    fir: Callable | None = None  # mixer -> {name: taps (K, C)}: filters kept as exact FIR state (not distilled)
    repeat_names: tuple = ()  # filters whose channels `channel_repeat` applies to (default: all)


TWINS: dict[str, Twin] = {
    "Hyena": Twin(hyena_prefill, hyena_step),
    "MultiHyena": Twin(multihyena_prefill, multihyena_step, channel_repeat=lambda m: m.head_size**2),
    "LongConv": Twin(longconv_prefill, longconv_step),
    "SGConv": Twin(longconv_prefill, longconv_step),
    "H3": Twin(h3_prefill, h3_step, channel_repeat=lambda m: m.cfg.head_dim**2,
               fir=lambda m: {"shift": m.shift[...]}, repeat_names=("ssm",)),
    "Attention": Twin(attention_prefill, attention_step, has_filters=False),
}


def register_twin(class_name: str, twin: Twin) -> None:
    TWINS[class_name] = twin


def twin_for(mixer) -> Twin:
    name = type(mixer).__name__
    if name not in TWINS:
        raise RecurrentError(f"no recurrent twin for mixer {name}; supported: {sorted(TWINS)}")
    return TWINS[name]


def expand_modal(params: ModalParams, repeat: int) -> ModalParams:
    """Repeat each channel's modes ``repeat`` times (head-major), e.g. a MultiHyena head over N² entries."""
    if repeat == 1:
        return params
    return ModalParams(*[jnp.repeat(a, repeat, axis=0) for a in params])


def _convs_for(mixer, mode: str, modal_layer: dict | None, method: str, filters_layer: dict | None):
    twin = twin_for(mixer)
    if not twin.has_filters:
        return {}
    skips = mixer.long_filter_skips() if hasattr(mixer, "long_filter_skips") else {}
    fir = twin.fir(mixer) if twin.fir else {}

    def rep(name):
        if twin.channel_repeat is None or (twin.repeat_names and name not in twin.repeat_names):
            return 1
        return twin.channel_repeat(mixer)

    def expand(a, name, axis):
        r = rep(name)
        return None if a is None else (jnp.repeat(a, r, axis=axis) if r > 1 else a).astype(jnp.float32)

    convs = {name: FIRConv(taps.astype(jnp.float32), expand(skips.get(name), name, 0)) for name, taps in fir.items()}
    if mode == "recurrent":
        missing = [n for n in mixer.long_filters(1) if n not in fir and n not in (modal_layer or {})]
        if missing:
            raise RecurrentError(f"mixer {type(mixer).__name__} has long filters {missing} without distilled "
                                 "modal filters")
        for name, p in modal_layer.items():
            if name not in fir:
                convs[name] = ModalConv(expand_modal(p, rep(name)), expand(skips.get(name), name, 0), method)
        return convs
    if mode == "convcache":
        for name, h in (filters_layer or {}).items():
            if name not in fir:
                convs[name] = CacheConv(expand(h, name, 1), expand(skips.get(name), name, 0))
        return convs
    raise RecurrentError(f"unknown decode mode {mode!r}; choose 'recurrent' or 'convcache'")


# ----------------------------------------------------------------------------------------------------
# The whole LM
# ----------------------------------------------------------------------------------------------------


def _block_residual(block, x, y):
    x = x + y
    if block.mlp is not None:
        x = x + block.mlp(block.mlp_norm(x))
    elif block.mlp_kind == "identity":
        x = x + block.mlp_norm(x)
    return x


class Decoder:
    """Prefill + token-by-token decoding of an `lm.model.LM`.

    mode "recurrent": long-filter mixers use distilled modal filters ``modal`` ({layer: {filter name:
    ModalParams}}), O(1) per token; mode "convcache": the model's own filters over an input cache.
    Attention layers always use a KV cache. ``cap`` (set at prefill) bounds prompt + generated tokens
    for the cache-based layers; the recurrent state has no such bound.
    """

    def __init__(self, lm, mode: str = "recurrent", modal: dict | None = None, prefill_method: str = "chunked"):
        if mode not in ("recurrent", "convcache"):
            raise RecurrentError(f"unknown decode mode {mode!r}; choose 'recurrent' or 'convcache'")
        if prefill_method not in PREFILL_METHODS:
            raise RecurrentError(f"unknown prefill method {prefill_method!r}; choose one of {PREFILL_METHODS}")
        self.mode, self.method = mode, prefill_method
        self.cfg = lm.cfg
        self.modal = {int(k): v for k, v in (modal or {}).items()}
        for i, block in enumerate(lm.blocks):
            twin = twin_for(block.mixer)
            if mode == "recurrent" and twin.has_filters and i not in self.modal:
                raise RecurrentError(f"layer {i} ({type(block.mixer).__name__}) has long filters but no distilled "
                                     "modal filters; run `longconv distill` first")
        self.blocks_meta = [b for b in lm.blocks]
        # convcache: the model's own long filters, materialised once over max_len (not per token)
        self.filters = {}
        if mode == "convcache":
            for i, b in enumerate(lm.blocks):
                if twin_for(b.mixer).has_filters:
                    self.filters[i] = {n: jnp.asarray(h, jnp.float32)
                                       for n, h in b.mixer.long_filters(lm.cfg.max_len).items()}
        self.graphdef, self.state = nnx.split(lm)
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cap",))
        self._step = jax.jit(self._step_impl, donate_argnames=("cache",))

    def _layers(self, lm, filters):
        out = []
        for i, block in enumerate(lm.blocks):
            convs = _convs_for(block.mixer, self.mode, self.modal.get(i), self.method, filters.get(i))
            out.append((block, twin_for(block.mixer), convs))
        return out

    def _prefill_impl(self, state, filters, tokens, cap):
        lm = nnx.merge(self.graphdef, state)
        x = lm.embed_tokens(tokens)
        caches = []
        for block, twin, convs in self._layers(lm, filters):
            y, st = twin.prefill(block.mixer, block.mixer_norm(x), convs, cap)
            x = _block_residual(block, x, y)
            caches.append(st)
        logits = lm.logits(lm.final_norm(x))
        return logits, {"pos": jnp.asarray(tokens.shape[1], jnp.int32), "layers": caches}

    def _step_impl(self, state, filters, token, cache):
        lm = nnx.merge(self.graphdef, state)
        pos = cache["pos"]
        x = lm.embed_tokens(token[:, None], positions=jnp.reshape(pos, (1,)))[:, 0]
        caches = []
        for (block, twin, convs), st in zip(self._layers(lm, filters), cache["layers"]):
            y, st = twin.step(block.mixer, block.mixer_norm(x), st, convs, pos)
            x = _block_residual(block, x, y)
            caches.append(st)
        logits = lm.logits(lm.final_norm(x))
        return logits, {"pos": pos + 1, "layers": caches}

    def cache_limit(self) -> int | None:
        """Longest prompt + generation this decoder supports (None: unbounded)."""
        has_filters = any(twin_for(b.mixer).has_filters for b in self.blocks_meta)
        if (self.mode == "convcache" and has_filters) or self.cfg.pos_embedding == "learned":
            return self.cfg.max_len
        return None

    def prefill(self, tokens, cap: int | None = None):
        """tokens (B, T) -> (fp32 logits (B, T, V), cache). ``cap``: prompt + tokens to generate
        (capacity of KV / conv caches; default max(T, max_len)). Steps past ``cap`` are not allowed for
        models with cache layers (the caller, e.g. `lm.generate`, checks the budget)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"prompt tokens must be (batch, length >= 1); got shape {tokens.shape}")
        cap = max(tokens.shape[1], self.cfg.max_len) if cap is None else int(cap)
        if cap < tokens.shape[1]:
            raise ValueError(f"cap {cap} is smaller than the prompt length {tokens.shape[1]}")
        return self._prefill(self.state, self.filters, tokens, cap)

    def step(self, token, cache):
        """token (B,) int -> (fp32 logits (B, V), cache). The input cache is donated (updated in place):
        do not reuse it after the call."""
        return self._step(self.state, self.filters, jnp.asarray(token, jnp.int32), cache)


def cache_nbytes(cache) -> int:
    """Bytes held by a decoder cache (all arrays)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)))
