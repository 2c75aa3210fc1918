"""BaseConv (zoology `base_conv.py`) and the Based-repo gated short-conv variant.

variant "zoology" (default):
    y = conv(u) ⊙ (W u + b) + u            (use_act: SiLU(conv(u)) ⊙ SiLU(W u + b) + u)
  - kernel_size k > 0: conv = causal depthwise short conv of width k with bias (`layers.ShortConv`,
    PyTorch Conv1d init);
  - kernel_size -1: conv(u) = h ∗ u + u, the implicit long convolution of zoology's
    `ImplicitLongConvolution` (its FFT conv adds the unit skip), computed by `kernels.fftconv` in fp32.
    Zoology has had two filters under that name, ``filter_kind``: "relu_mlp" (since its Based-era rewrite,
    `filters.ZoologyImplicitFilter`: Linear(emb → hidden), ReLU, Linear(hidden → C) over fixed positional
    features) and "sine_window" (the earlier one, adapted from Hyena: `filters.HyenaImplicitFilter` of width
    ``filter_hidden`` with sines of frequency 1, 2 inner layers, a bias-free output layer, frozen positional
    features and Hyena's exponential window). Which one made Zoology's Figure 2 is not recorded. ``filter_init``
    "normal" is Zoology's LM: its `_init_weights` sets every nn.Linear, the filter MLP's too, to N(0, 0.02²)
    with zero bias, so the filter starts near 0 and conv(u) near u; "torch" (PyTorch's Linear default)
    starts it at O(0.3) per tap.
  - `kernel_sizes: [3, -1, 3, -1]` picks kernel_sizes[layer_idx % len] (zoology's per-layer list; the
    MQAR Figure 2 config uses it with 4 layers) and overrides `kernel_size`.
variant "based" (based `BaseConv`, the "BaseConv (k 3, expand 4)" layers of Based-360M):
    [u1, u2] = W_in u + b_in (d -> expand·d, halves of expand·d/2);  y = W_out(SiLU(ShortConv_k(u1)) ⊙ u2) + b_out
  No residual inside (the block adds it). Only short kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from kernels.fftconv import fftconv
from lm.config import ConfigError
from lm.mixers.filters import HyenaImplicitFilter, ZoologyImplicitFilter
from lm.mixers.layers import ShortConv, check_seqlen, dense, out_proj_std
from lm.mixers.registry import register_mixer


@dataclasses.dataclass
class BaseConvConfig:
    kernel_size: int = 3                    # > 0: short depthwise conv; -1: implicit long conv
    kernel_sizes: list[int] | None = None   # per-layer pattern, indexed by layer_idx % len (overrides kernel_size)
    variant: Literal["zoology", "based"] = "zoology"
    use_act: bool = False                   # zoology: SiLU on both factors
    expand: int = 2                         # based variant: in_proj width expand·d_model, gate width expand·d/2
    filter_emb_dim: int = 3                 # implicit filter: positional features (odd, >= 3)
    filter_hidden: int = 16                 # implicit filter: MLP width
    filter_init: Literal["torch", "normal"] = "torch"  # implicit filter MLP init (see the module docstring)
    filter_kind: Literal["relu_mlp", "sine_window"] = "relu_mlp"  # implicit filter (see the module docstring)
    init_std: float = 0.02
    scaled_out_init: bool = True            # based variant: out_proj std init_std / sqrt(2·n_layers)

    def validate(self) -> None:
        sizes = [self.kernel_size] if self.kernel_sizes is None else list(self.kernel_sizes)
        if self.kernel_sizes is not None and not sizes:
            raise ConfigError("baseconv: kernel_sizes must be a non-empty list or null")
        for k in sizes:
            if k != -1 and k < 1:
                raise ConfigError(f"baseconv: kernel size must be a positive width or -1 (implicit long conv), got {k}")
        if self.variant not in ("zoology", "based"):
            raise ConfigError(f"baseconv: variant must be 'zoology' or 'based', got {self.variant!r}")
        if self.variant == "based" and any(k == -1 for k in sizes):
            raise ConfigError("baseconv: variant 'based' supports only short kernels (kernel_size > 0)")
        if self.expand < 1:
            raise ConfigError(f"baseconv: expand must be >= 1, got {self.expand}")
        if self.filter_emb_dim < 3 or self.filter_emb_dim % 2 == 0:
            raise ConfigError(f"baseconv: filter_emb_dim must be odd and >= 3, got {self.filter_emb_dim}")
        if self.filter_hidden < 1:
            raise ConfigError(f"baseconv: filter_hidden must be >= 1, got {self.filter_hidden}")
        if self.filter_init not in ("torch", "normal"):
            raise ConfigError(f"baseconv: filter_init must be 'torch' or 'normal', got {self.filter_init!r}")
        if self.filter_kind not in ("relu_mlp", "sine_window"):
            raise ConfigError(f"baseconv: filter_kind must be 'relu_mlp' or 'sine_window', got {self.filter_kind!r}")


@register_mixer("baseconv", BaseConvConfig, "BaseConv: conv(u) ⊙ (W u + b) + u, short or implicit long conv")
class BaseConv(nnx.Module):
    def __init__(self, cfg: BaseConvConfig, *, d_model: int, max_len: int, layer_idx: int = 0, n_layers: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        cfg.validate()
        ksize = cfg.kernel_size if cfg.kernel_sizes is None else int(cfg.kernel_sizes[layer_idx % len(cfg.kernel_sizes)])
        self.variant, self.kernel_size, self.use_act = cfg.variant, ksize, cfg.use_act
        self.d_model, self.max_len, self.layer_idx, self.n_layers = d_model, max_len, layer_idx, n_layers
        self.dtype = dtype
        if cfg.variant == "zoology":
            self.projection = dense(d_model, d_model, dtype=dtype, rngs=rngs, std=cfg.init_std)
            if ksize == -1 and cfg.filter_kind == "relu_mlp":
                self.filter = ZoologyImplicitFilter(d_model, max_len, emb_dim=cfg.filter_emb_dim,
                                                    hidden=cfg.filter_hidden, init=cfg.filter_init, rngs=rngs)
            elif ksize == -1:
                self.filter = HyenaImplicitFilter(d_model, max_len, emb_dim=cfg.filter_emb_dim, width=cfg.filter_hidden,
                                                  num_inner_mlps=2, w=1.0, train_pos_emb=False, init=cfg.filter_init,
                                                  rngs=rngs)
            else:
                self.conv = ShortConv(d_model, ksize, dtype=dtype, rngs=rngs)
        else:
            if (cfg.expand * d_model) % 2:
                raise ConfigError(f"baseconv: expand·d_model must be even for the based variant, "
                                  f"got {cfg.expand}·{d_model}")
            self.d_inner = cfg.expand * d_model // 2
            std_out = out_proj_std(n_layers, cfg.init_std) if cfg.scaled_out_init else cfg.init_std
            self.in_proj = dense(d_model, 2 * self.d_inner, dtype=dtype, rngs=rngs, std=cfg.init_std)
            self.conv = ShortConv(self.d_inner, ksize, dtype=dtype, rngs=rngs)
            self.out_proj = dense(self.d_inner, d_model, dtype=dtype, rngs=rngs, std=std_out)

    def __call__(self, x):
        seqlen = x.shape[1]
        check_seqlen(seqlen, self.max_len, "baseconv")
        u = x.astype(self.dtype)
        if self.variant == "based":
            u1, u2 = jnp.split(self.in_proj(u), 2, axis=-1)
            return self.out_proj(jax.nn.silu(self.conv(u1)) * u2)
        proj = self.projection(u)
        if self.use_act:
            proj = jax.nn.silu(proj)
        if self.kernel_size == -1:
            h = self.filter(seqlen)
            skip = jnp.ones((self.d_model,), jnp.float32)
            if self.use_act:
                conv = jax.nn.silu(fftconv(u, h, skip))
                return conv * proj + u
            # (h ∗ u + u) ⊙ proj in one fp32 pass
            return fftconv(u, h, skip, post_gate=proj) + u
        conv = self.conv(u)
        if self.use_act:
            conv = jax.nn.silu(conv)
        return conv * proj + u
