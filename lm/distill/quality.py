"""Distillation quality on held-out text, and the order per layer that a loss budget allows.

- `HeldOutEvaluator`: token-weighted validation loss of a model and KL(original‖model) per token on
  fixed validation batches (the original's log-probabilities are computed once).
- `select_orders_for_delta`: per-layer modal order such that the distilled model's validation loss is
  at most ``target`` nats/token above the original's (algorithm in its docstring).
- `greedy_agreement`: free-running greedy decoding of two decoders from the same prompts, compared
  token by token.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lm.distill.fit import DistillError


def validation_batches(cfg, tokenizer, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """The run's validation split as NumPy batches {"inputs", "targets", "mask"} (B, T), in order (whole
    split unless ``max_batches``; the last batch is padded and masked)."""
    from lm.data import build_data
    from lm.train import resolve_data_paths

    data = build_data(resolve_data_paths(cfg.data), tokenizer=tokenizer)
    return [{k: np.asarray(v) for k, v in b.items()} for b in data.val_batches(max_batches=max_batches, pad=True)]


def _batch_scores_fn(graphdef):
    """Jitted (state, inputs, targets, mask, ref_logp) -> (Σ masked CE, Σ masked KL(ref‖model),
    log-probs (B, T, V)) for models of structure ``graphdef``; ref_logp (B, T, V) or None (KL 0)."""

    @jax.jit
    def scores(state, inputs, targets, mask, ref_logp):
        logits = nnx.merge(graphdef, state)(inputs).astype(jnp.float32)
        logq = jax.nn.log_softmax(logits)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        kl = jnp.zeros(()) if ref_logp is None else jnp.sum(jnp.sum(jnp.exp(ref_logp) * (ref_logp - logq), -1) * mask)
        return jnp.sum(ce * mask), kl, logq

    return scores


class HeldOutEvaluator:
    """Loss and KL(original‖candidate) on fixed batches. ``original``: the undistilled model (eval mode).

    ``base_loss``: the original's token-weighted loss (nats/token); `evaluate(model)` returns
    {"loss", "delta_loss" (model − original), "kl" (nats/token)}.
    """

    def __init__(self, original, batches: Sequence[dict[str, np.ndarray]]):
        if not batches:
            raise DistillError("no validation batches to evaluate on")
        self.batches = list(batches)
        self.tokens = int(sum(float(b["mask"].sum()) for b in self.batches))
        self._ref_logp: list[np.ndarray] = []
        self._compiled: list[tuple] = []  # (graphdef, jitted scores): graphdefs compare by ==, not by hash
        total = 0.0
        scores, state = self._scores(original)
        for b in self.batches:
            s, _, logp = scores(state, *self._arrays(b), None)
            total += float(s)
            self._ref_logp.append(np.asarray(logp))
        self.base_loss = total / self.tokens

    def _scores(self, model):
        """(jitted scores, state) for ``model``, reusing the compilation of an equal structure (every model
        from `replace_filters` has the same structure, whatever the order)."""
        graphdef, state = nnx.split(model)
        for known, fn in self._compiled:
            if known == graphdef:
                return fn, state
        self._compiled.append((graphdef, _batch_scores_fn(graphdef)))
        return self._compiled[-1][1], state

    @staticmethod
    def _arrays(b):
        return jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]), jnp.asarray(b["mask"], jnp.float32)

    def evaluate(self, model) -> dict[str, float]:
        scores, state = self._scores(model)
        loss = kl = 0.0
        for b, ref in zip(self.batches, self._ref_logp):
            s, k, _ = scores(state, *self._arrays(b), jnp.asarray(ref))
            loss, kl = loss + float(s), kl + float(k)
        loss /= self.tokens
        return {"loss": loss, "delta_loss": loss - self.base_loss, "kl": kl / self.tokens}


def select_orders_for_delta(delta_of: Callable[[dict[int, int]], float], layers: Sequence[int],
                            orders: Sequence[int], target: float) -> dict:
    """Per-layer order from the candidate ``orders`` so that ``delta_of(assignment) <= target``.

    ``delta_of({layer: order})`` is the validation Δ loss (nats/token) of the model distilled with that
    order in each layer. Algorithm (greedy over layers, bisection within a layer):

    1. Start with the largest order in every layer; if its Δ exceeds ``target``, stop: no assignment
       from the candidates is known to reach the target (``reached`` False, all layers at the largest).
    2. For layer k = 1 … n (in ``layers`` order), with the layers before it at their chosen orders and
       those after it at the largest, bisect the sorted candidates for the smallest order whose Δ is
       ≤ ``target`` · k / n (a prefix budget, so early layers cannot spend the whole budget). If none
       passes, the layer keeps the largest order.

    Every accepted assignment has Δ ≤ target, so the result does. Bisection assumes Δ falls with the
    order of one layer; ~log₂(len(orders)) evaluations per layer. Returns {"orders": {layer: order},
    "delta": Δ of the result, "reached": bool, "evaluations": [{"orders", "delta"}, …]}.
    """
    cands = sorted({int(d) for d in orders})
    if not cands or cands[0] < 1:
        raise DistillError(f"orders must be positive integers; got {list(orders)}")
    if not layers:
        raise DistillError("no layers to choose orders for")
    if not target > 0:
        raise DistillError(f"target Δ loss must be > 0 nats/token; got {target}")
    cache: dict[tuple, float] = {}
    log = []

    def delta(assign):
        key = tuple(sorted(assign.items()))
        if key not in cache:
            cache[key] = float(delta_of(dict(assign)))
            log.append({"orders": dict(assign), "delta": cache[key]})
        return cache[key]

    chosen = {int(i): cands[-1] for i in layers}
    if delta(chosen) > target:
        return {"orders": chosen, "delta": delta(chosen), "reached": False, "evaluations": log}
    for k, layer in enumerate(chosen, start=1):
        budget = target * k / len(chosen)
        lo, hi = 0, len(cands) - 1  # hi: the largest order, kept if nothing passes
        while lo < hi:
            mid = (lo + hi) // 2
            if delta({**chosen, layer: cands[mid]}) <= budget:
                hi = mid
            else:
                lo = mid + 1
        if delta({**chosen, layer: cands[hi]}) <= budget:
            chosen[layer] = cands[hi]
    return {"orders": chosen, "delta": delta(chosen), "reached": True, "evaluations": log}


def distill_for_delta(lm, evaluator: HeldOutEvaluator, fits: dict, target: float) -> tuple[dict, dict, dict]:
    """Per-layer orders for a Δ-loss budget from precomputed fits {order: (modal, reports)} (one entry per
    candidate order, as from `lm.distill.convert.distill_model_by_order`), by `select_orders_for_delta`
    with Δ measured by ``evaluator`` on the model whose filters are replaced by the modal ones.

    Returns (modal, reports) of the chosen orders and a JSON-ready selection summary: orders per layer,
    whether the target was reached, loss / Δ / KL of the result, the recurrent state size (complex
    numbers per sequence) against order 16 everywhere, and every evaluated assignment.
    """
    from lm.distill.convert import modal_state_size, replace_filters

    cands = sorted(fits)
    layers = sorted(fits[cands[0]][0])
    results: dict[tuple, dict] = {}

    def pick(assign, which):
        return {i: fits[assign[i]][which][i] for i in layers}

    def delta_of(assign):
        results[tuple(sorted(assign.items()))] = evaluator.evaluate(replace_filters(lm, pick(assign, 0)))
        return results[tuple(sorted(assign.items()))]["delta_loss"]

    sel = select_orders_for_delta(delta_of, layers, cands, target)
    chosen = sel["orders"]
    selection = {"target_delta": target, "candidates": cands, "orders": {str(i): d for i, d in chosen.items()},
                 "reached": sel["reached"], "val_tokens": evaluator.tokens, "base_loss": evaluator.base_loss,
                 **results[tuple(sorted(chosen.items()))],
                 "state_complex": modal_state_size(lm, chosen),
                 "state_complex_order16": modal_state_size(lm, {i: 16 for i in layers}),
                 "evaluations": [{"orders": {str(i): d for i, d in e["orders"].items()}, "delta": e["delta"]}
                                 for e in sel["evaluations"]]}
    return pick(chosen, 0), pick(chosen, 1), selection


def agreement_stats(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Token-by-token comparison of two (prompts, n) generations: the fraction of equal tokens, and per
    prompt the first position where they differ (n if never)."""
    a, b = np.asarray(reference), np.asarray(candidate)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"generations must have the same (prompts, tokens) shape; got {a.shape} and {b.shape}")
    same = a == b
    first = np.where(same.all(1), a.shape[1], np.argmin(same, axis=1))
    return {"agreement": float(same.mean()), "first_divergence": first.tolist(),
            "first_divergence_median": float(np.median(first)), "prompts": int(a.shape[0]), "tokens": int(a.shape[1])}


def greedy_agreement(reference_decoder, candidate_decoder, prompts, new_tokens: int) -> dict:
    """Greedy (temperature 0) generation of ``new_tokens`` from the same prompts (P, T) by each decoder,
    each free-running on its own output; `agreement_stats` of the two generations."""
    from lm.generate import SamplingConfig, generate_ids

    greedy = SamplingConfig(temperature=0.0)
    ref = generate_ids(reference_decoder, prompts, new_tokens, greedy)["ids"]
    cand = generate_ids(candidate_decoder, prompts, new_tokens, greedy)["ids"]
    return {**agreement_stats(ref, cand), "reference_ids": ref.tolist(), "candidate_ids": cand.tolist()}


def validation_prompts(batches: Sequence[dict[str, np.ndarray]], count: int, length: int) -> np.ndarray:
    """``count`` prompts (count, length) from the validation sequences, evenly spaced over the split
    (sequence starts whose first ``length`` positions are all real tokens)."""
    rows = [row[:length] for b in batches for row, m in zip(b["inputs"], b["mask"]) if m[:length].all()
            and len(row) >= length]
    if len(rows) < count:
        raise DistillError(f"only {len(rows)} validation sequences have {length} tokens; asked for {count} prompts")
    pick = np.linspace(0, len(rows) - 1, count).round().astype(int)
    return np.stack([rows[i] for i in pick]).astype(np.int32)
