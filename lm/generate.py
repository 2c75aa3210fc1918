"""`longconv generate`: sample text from a trained or distilled run.

    longconv generate --run runs/ts_hyena-d16 --prompt "ROMEO:"                      # recurrent (distilled)
    longconv generate --run runs/ts_hyena --prompt "ROMEO:" --path conv --top-k 10    # conv over a cache
    longconv generate --run runs/ts_attention --prompt "ROMEO:" --path attention      # KV cache

Decoding paths (`lm.distill.recurrent.Decoder`):
- ``recurrent``: distilled modal filters; the prompt is prefilled in parallel (FFT for the outputs, a
  parallel prefill method for the state), then every token costs O(d_model · d) per layer, flat in the
  prompt length. Needs a run written by `longconv distill` (or a model with no long filters).
- ``conv``: the model's own long filters; past filter inputs are cached and the convolution is recomputed
  over the cache for every new token (O(T) per token; the baseline). Prompt + new tokens ≤ max_len.
- ``attention``: KV cache, for models whose mixers are all attention (or filter-free).
- ``auto`` (default): recurrent for a distilled run, conv otherwise.
Attention layers in hybrid models always use a KV cache.

Sampling: ``--temperature`` (0 = greedy), ``--top-k``, ``--top-p`` (nucleus), ``--max-new-tokens``,
``--stop`` strings (generation ends when one appears; it is cut from the output) and the tokenizer's
end-of-document token (unless ``--no-stop-eod``), ``--seed``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

PATHS = ("auto", "recurrent", "conv", "attention")


class GenerateError(ValueError):
    """Bad generation request (unknown path, budget beyond the cache, empty prompt, ...)."""


@dataclasses.dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise GenerateError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerateError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise GenerateError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits, top_k: int | None = None, top_p: float | None = None):
    """Mask logits (B, V) outside the top-k set and outside the smallest nucleus of mass top_p."""
    neg = jnp.finfo(jnp.float32).min
    logits = logits.astype(jnp.float32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        keep_sorted = before < top_p  # always keeps the most likely token
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg)
    return logits


def sample(key, logits, cfg: SamplingConfig):
    """Next tokens (B,) from logits (B, V)."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_ids(decoder, prompt_ids, max_new_tokens: int, sampling: SamplingConfig | None = None, *, seed: int = 0,
                 stop_ids=(), stop_fn=None, cap: int | None = None) -> dict:
    """Prefill ``prompt_ids`` (list of ints or (B, T)) and sample up to ``max_new_tokens``.

    Returns {"ids": (B, n) new tokens, "prefill_s", "decode_s", "tokens_per_s", "stopped"}. ``stop_ids``
    end generation when every row has produced one (batch 1: at once); ``stop_fn(ids_row) -> bool``
    is checked after every token (batch 1).
    """
    sampling = sampling or SamplingConfig()
    sampling.validate()
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise GenerateError("the prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise GenerateError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = prompt.shape[1] + max_new_tokens
    if cap is None:
        cap = total
    elif cap < total:
        raise GenerateError(f"cap {cap} is smaller than prompt ({prompt.shape[1]}) + max_new_tokens "
                            f"({max_new_tokens}) = {total}: the caches would overflow")
    limit = decoder.cache_limit()
    if limit is not None and total > limit:
        raise GenerateError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} exceeds what "
                            f"the {decoder.mode} path can hold ({limit} = model max_len); use the recurrent path "
                            "(a distilled run) or a shorter budget")
    key = jax.random.key(seed)
    t0 = time.perf_counter()
    logits, cache = decoder.prefill(prompt, cap=cap)
    last = logits[:, -1]
    jax.block_until_ready(last)
    t1 = time.perf_counter()
    out = []
    stopped = False
    stop_ids = set(int(s) for s in stop_ids)
    done = np.zeros(prompt.shape[0], bool)
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        tok = sample(sub, last, sampling)
        tok_np = np.asarray(tok)
        out.append(tok_np)
        done |= np.isin(tok_np, list(stop_ids)) if stop_ids else False
        if done.all() or (stop_fn is not None and stop_fn(np.stack(out, 1)[0])):
            stopped = True
            break
        if i + 1 < max_new_tokens:  # the last token's logits are never used
            last, cache = decoder.step(tok, cache)
    jax.block_until_ready(last)
    t2 = time.perf_counter()
    ids = np.stack(out, 1) if out else np.zeros((prompt.shape[0], 0), np.int32)
    n = ids.shape[1]
    return {"ids": ids, "prefill_s": t1 - t0, "decode_s": t2 - t1,
            "tokens_per_s": (n * prompt.shape[0] / (t2 - t1)) if n and t2 > t1 else float("nan"), "stopped": stopped}


def _all_attention(lm) -> bool:
    from lm.distill.recurrent import twin_for

    return all(not twin_for(b.mixer).has_filters for b in lm.blocks)


def build_decoder(run_dir, path: str = "auto", prefill_method: str = "chunked", step: int | None = None):
    """(decoder, tokenizer, info) for a run directory and a decoding path (see module docstring)."""
    from lm.checkpoint import load_run
    from lm.distill.convert import is_distilled, load_distilled
    from lm.distill.recurrent import Decoder

    if path not in PATHS:
        raise GenerateError(f"unknown path {path!r}; choose one of {PATHS}")
    distilled = is_distilled(run_dir)
    if path == "auto":
        path = "recurrent" if distilled else "conv"
    modal = None
    if distilled:
        cfg, lm, tokenizer, ckpt_step, modal, _ = load_distilled(run_dir)
    else:
        cfg, lm, tokenizer, ckpt_step = load_run(run_dir, step)
    if path == "recurrent":
        if modal is None and not _all_attention(lm):
            raise GenerateError(f"{run_dir} is not a distilled run: the recurrent path needs modal filters; run "
                                f"`longconv distill --run {run_dir}` first (or use --path conv)")
        decoder = Decoder(lm, "recurrent", modal, prefill_method)
    elif path == "attention":
        if not _all_attention(lm):
            kinds = sorted({type(b.mixer).__name__ for b in lm.blocks})
            raise GenerateError(f"the attention path needs an attention-only model; this one has {kinds} "
                                "(use --path conv or recurrent)")
        decoder = Decoder(lm, "convcache")
    else:
        decoder = Decoder(lm, "convcache")
    return decoder, tokenizer, {"path": path, "step": ckpt_step, "distilled": distilled}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory (trained, or distilled by `longconv distill`)")
    parser.add_argument("--prompt", default="\n", help="prompt text")
    parser.add_argument("--path", choices=PATHS, default="auto", help="decoding path (see `lm.generate` docs)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="token budget")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--no-stop-eod", action="store_true", help="do not stop at the end-of-document token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (undistilled runs)")
    parser.add_argument("--prefill-method", default="chunked", help="vandermonde | chunked | scan | fft")
    parser.add_argument("--json", action="store_true", help="print a JSON object with text and timings")


def generate_text(run_dir, prompt: str, *, path: str = "auto", max_new_tokens: int = 200,
                  sampling: SamplingConfig | None = None, stop: tuple[str, ...] = (), stop_eod: bool = True,
                  seed: int = 0, prefill_method: str = "chunked", step: int | None = None) -> dict:
    decoder, tok, info = build_decoder(run_dir, path, prefill_method, step)
    ids = tok.encode(prompt)
    if not ids:
        raise GenerateError("the prompt encodes to no tokens")

    def stop_fn(row):
        return bool(stop) and any(s in tok.decode(row.tolist()) for s in stop)

    res = generate_ids(decoder, ids, max_new_tokens, sampling, seed=seed,
                       stop_ids=(tok.eod_id,) if stop_eod else (), stop_fn=stop_fn if stop else None)
    new = res["ids"][0].tolist()
    if stop_eod and new and new[-1] == tok.eod_id:
        new = new[:-1]
    text = tok.decode(new)
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return {"prompt": prompt, "text": text, "new_tokens": len(res["ids"][0]), "path": info["path"],
            "step": info["step"], "prefill_s": res["prefill_s"], "decode_s": res["decode_s"],
            "tokens_per_s": res["tokens_per_s"]}


def main(args: argparse.Namespace) -> int:
    from lm.checkpoint import CheckpointError
    from lm.config import ConfigError
    from lm.distill.fit import DistillError
    from lm.distill.recurrent import RecurrentError

    try:
        out = generate_text(args.run, args.prompt, path=args.path, max_new_tokens=args.max_new_tokens,
                            sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), stop=tuple(args.stop),
                            stop_eod=not args.no_stop_eod, seed=args.seed, prefill_method=args.prefill_method,
                            step=args.step)
    except (GenerateError, DistillError, RecurrentError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
    else:
        print(out["prompt"] + out["text"])
        print(f"[{out['path']} path, step {out['step']}: {out['new_tokens']} tokens, "
              f"{out['tokens_per_s']:.1f} tok/s, prefill {out['prefill_s'] * 1e3:.0f} ms]", file=sys.stderr)
    return 0
