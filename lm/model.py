"""The LM backbone: embed → N × [norm → mixer → norm → MLP] → norm → head, built from `ModelConfig`.

Tokens are (batch, length) int32; hidden states (batch, length, d_model); logits fp32
(batch, length, vocab_size). Parameters are fp32; ``dtype`` sets the activation/compute dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import ConfigError
from lm.params import count_params, param_labels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class ModelConfig:
    """Architecture of an LM. ``mixer`` is a spec ``{"name": ..., **options}`` (see `longconv mixers`);
    ``layer_mixers`` overrides it for given layer indices (hybrids, e.g. attention at layers 1 and 8).

    mlp: "glu" (SwiGLU), "mlp" (GELU), "none" (mixer-only blocks) or "identity" (Zoology's quirk:
    the second half-block adds LayerNorm(x) to x). ``mlp_ratio`` sets the hidden width (for "glu" the
    width is rounded to a multiple of 8 from ``mlp_ratio * d_model * 2/3``).

    dropout: on every residual branch and on the embeddings; ``embed_dropout``, if set, replaces it on the
    embeddings (token + position) only (Zoology: embedding dropout 0.1, residual dropout 0).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    max_len: int = 256
    mixer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "hyena"})
    layer_mixers: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    mlp: Literal["glu", "mlp", "none", "identity"] = "mlp"
    mlp_ratio: float = 4.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_embeddings: bool = True
    pos_embedding: Literal["none", "learned"] = "none"
    dropout: float = 0.0
    embed_dropout: float | None = None
    init_std: float = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"

    @property
    def embed_dropout_rate(self) -> float:
        """The dropout rate on the embeddings: ``embed_dropout``, or ``dropout`` where that is unset."""
        return self.dropout if self.embed_dropout is None else self.embed_dropout

    def validate(self) -> None:
        from lm.mixers import parse_mixer_spec

        for name in ("vocab_size", "d_model", "n_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'model.{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("dropout", "embed_dropout"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ConfigError(f"config key 'model.{name}' must be in [0, 1), got {rate}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"config key 'model.mlp_ratio' must be > 0, got {self.mlp_ratio}")
        parse_mixer_spec(self.mixer, "model.mixer")
        normalised = {}
        for key, spec in self.layer_mixers.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"config key 'model.layer_mixers.{key}': layer index must be an integer") from None
            if not 0 <= idx < self.n_layers:
                raise ConfigError(
                    f"config key 'model.layer_mixers.{key}': layer index out of range for n_layers={self.n_layers}"
                )
            parse_mixer_spec(spec, f"model.layer_mixers.{key}")
            normalised[idx] = spec
        self.layer_mixers = normalised

    def mixer_spec(self, layer_idx: int) -> dict[str, Any]:
        """The mixer spec used at ``layer_idx``."""
        return self.layer_mixers.get(layer_idx, self.mixer)

    @property
    def d_mlp(self) -> int:
        """Hidden width of the MLP."""
        if self.mlp == "glu":
            return 8 * max(1, round(self.mlp_ratio * self.d_model * 2 / 3 / 8))
        return int(self.mlp_ratio * self.d_model)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]


def _linear(d_in: int, d_out: int, std: float, dtype, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=dtype,
                      kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.d_model, epsilon=1e-5, dtype=cfg.compute_dtype, rngs=rngs)
    return nnx.LayerNorm(cfg.d_model, epsilon=1e-5, dtype=cfg.compute_dtype, rngs=rngs)


class MLP(nnx.Module):
    """Channel mixer: GELU MLP or SwiGLU; (B, L, D) -> (B, L, D)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        dt = cfg.compute_dtype
        self.gated = cfg.mlp == "glu"
        self.up = _linear(cfg.d_model, cfg.d_mlp * (2 if self.gated else 1), cfg.init_std, dt, rngs)
        self.down = _linear(cfg.d_mlp, cfg.d_model, out_std, dt, rngs)

    def __call__(self, x):
        h = self.up(x)
        if self.gated:
            a, b = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(a) * b
        else:
            h = jax.nn.gelu(h)
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs):
        from lm.mixers import build_mixer

        self.mixer_norm = _norm(cfg, rngs)
        self.mixer = build_mixer(
            cfg.mixer_spec(layer_idx), d_model=cfg.d_model, max_len=cfg.max_len, layer_idx=layer_idx,
            n_layers=cfg.n_layers, dtype=cfg.compute_dtype, rngs=rngs, where=f"model.layer[{layer_idx}].mixer",
        )
        self.mlp_kind = cfg.mlp
        self.mlp_norm = _norm(cfg, rngs) if cfg.mlp != "none" else None
        self.mlp = MLP(cfg, rngs=rngs) if cfg.mlp in ("glu", "mlp") else None
        self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs) if cfg.dropout > 0 else None

    def _residual(self, x, y):
        return x + (self.dropout(y) if self.dropout is not None else y)

    def __call__(self, x):
        x = self._residual(x, self.mixer(self.mixer_norm(x)))
        if self.mlp is not None:
            x = self._residual(x, self.mlp(self.mlp_norm(x)))
        elif self.mlp_kind == "identity":
            x = self._residual(x, self.mlp_norm(x))
        return x


class LM(nnx.Module):
    """Decoder-only language model; see the module docstring for shapes."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.compute_dtype
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt,
                               embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
        self.pos_embed = (
            nnx.Embed(cfg.max_len, cfg.d_model, dtype=dt, embedding_init=nnx.initializers.normal(cfg.init_std),
                      rngs=rngs)
            if cfg.pos_embedding == "learned" else None
        )
        rate = cfg.embed_dropout_rate
        self.embed_dropout = nnx.Dropout(rate, rngs=rngs) if rate > 0 else None
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = _norm(cfg, rngs)
        self.head = None if cfg.tie_embeddings else _linear(cfg.d_model, cfg.vocab_size, cfg.init_std, dt, rngs,
                                                            use_bias=False)

    def check_tokens(self, tokens) -> None:
        """Raise ValueError unless tokens is an integer (batch, length) array with length <= max_len."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, length); got shape {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}")
        if tokens.shape[1] > self.cfg.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds model max_len {self.cfg.max_len}")

    def embed_tokens(self, tokens, positions=None):
        """Token (+ learned position) embeddings, (B, L) -> (B, L, D); ``positions`` default 0..L-1."""
        x = self.embed(tokens)
        if self.pos_embed is not None:
            if positions is None:
                positions = jnp.arange(tokens.shape[1])
            x = x + self.pos_embed(positions)
        if self.embed_dropout is not None:
            x = self.embed_dropout(x)
        return x

    def hidden(self, tokens):
        """Final-normed hidden states (B, L, D) for tokens (B, L)."""
        self.check_tokens(tokens)
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x)
        return self.final_norm(x)

    def logits(self, hidden):
        """fp32 logits (..., vocab_size) from hidden states (..., D)."""
        if self.head is not None:
            return self.head(hidden).astype(jnp.float32)
        return self.embed.attend(hidden.astype(jnp.float32))

    def __call__(self, tokens):
        return self.logits(self.hidden(tokens))

    def locate_nonfinite(self, tokens) -> str | None:
        """Where the forward pass over ``tokens`` (B, L) first produces NaN/inf, e.g. "layer 2 (hyena mixer,
        blocks.2.mixer)" (layers 0-based, as in ``layer_mixers``); None if all activations are finite.

        Runs eagerly, sub-layer by sub-layer: a debugging aid for the NaN guard, not for a hot loop.
        """
        def nonfinite(x) -> bool:
            return not bool(jnp.isfinite(x).all())

        x = self.embed_tokens(tokens)
        if nonfinite(x):
            return "the token embedding (embed)"
        for i, block in enumerate(self.blocks):
            h = block.mixer_norm(x)
            if nonfinite(h):
                return f"layer {i} (mixer norm, blocks.{i}.mixer_norm)"
            if nonfinite(block.mixer(h)):
                return f"layer {i} ({self.cfg.mixer_spec(i)['name']} mixer, blocks.{i}.mixer)"
            x = block(x)
            if nonfinite(x):
                return f"layer {i} (MLP, blocks.{i}.mlp)"
        x = self.final_norm(x)
        if nonfinite(x):
            return "the final norm (final_norm)"
        return "the output head" if nonfinite(self.logits(x)) else None


def parameter_table(model: nnx.Module) -> list[tuple[str, tuple[int, ...], int, str]]:
    """Rows (path, shape, count, optimizer group) for every trainable parameter."""
    params = nnx.state(model, nnx.Param)
    labels = dict(nnx.to_flat_state(param_labels(params)))
    rows = []
    for path, var in nnx.to_flat_state(params):
        value = var.get_value() if hasattr(var, "get_value") else var.value
        label = labels[path]
        label = label if isinstance(label, str) else getattr(label, "value", label)
        rows.append(("/".join(str(p) for p in path), tuple(value.shape), int(value.size), label))
    return rows


def parameter_report(model: nnx.Module) -> str:
    """Human-readable parameter counts: per top-level module, per optimizer group, and total."""
    rows = parameter_table(model)
    by_module: dict[str, int] = {}
    by_group: dict[str, int] = {}
    for path, _, count, group in rows:
        parts = path.split("/")
        key = "/".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        by_module[key] = by_module.get(key, 0) + count
        by_group[group] = by_group.get(group, 0) + count
    width = max(len(k) for k in by_module) + 2
    lines = [f"{'module':<{width}}{'params':>12}"]
    lines += [f"{k:<{width}}{v:>12,}" for k, v in by_module.items()]
    lines.append("groups: " + ", ".join(f"{g} {c:,}" for g, c in sorted(by_group.items())))
    lines.append(f"{'total':<{width}}{count_params(model):>12,}")
    return "\n".join(lines)
