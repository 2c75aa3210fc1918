"""MQAR data: the multi-query associative recall task of Zoology, vectorised.

Same task as ``zoology/data/multiquery_ar.py::multiquery_ar`` (paper tag of HazyResearch/zoology);
each option below is listed with Zoology's name and default.

=====================  ==============  ===========================================================
option                 Zoology default meaning
=====================  ==============  ===========================================================
``vocab_size`` V       (required)      keys come from ``1 … V/2 − 1`` (0 is the filler token),
                                       values from ``V/2 … V − 1``
``num_examples`` N     (required)      rows
``input_seq_len`` L    (required)      row length; must be even and < V
``seed``               (required)      seed of this generator's own ``np.random.Generator``
                                       (Zoology seeds NumPy's global RNG instead)
``power_a``            0.01            query gap g ∈ {0 … space−1} is drawn with p(g) ∝ a·(g+1)^(a−1);
                                       a = 1 is uniform, a = 0.01 puts most queries near the context
``num_kv_pairs`` P     8               distinct keys (and distinct values) per row
``num_passes``         1               the context ``k1 v1 … kP vP`` is repeated this many times
``random_non_queries`` True            replace every filler 0 in the inputs by a uniform token in
                                       ``0 … V−1`` (the paper's Figure 2 grid sets it to False)
=====================  ==============  ===========================================================

Per row: context ``k1 v1 … kP vP`` (× num_passes, length C = 2·P·num_passes); ``space = (L − C)/2``
query slots; P distinct slots ``g_i`` drawn without replacement with the power law; the query region
(zeros, length L − C + 1) gets ``k_i`` at offset ``2·g_i``; labels are −100 except ``v_i`` at absolute
position ``C + 2·g_i + 1``; inputs are the first L tokens and labels are shifted left by one, so the
scored positions are exactly the query positions ``C + 2·g_i`` and their targets are the values.

Sampling differs bit-wise from Zoology (which loops ``np.random.choice`` over rows) but not in
distribution: uniform sampling without replacement uses rejection of rows with duplicates (or the
argsort of random keys when the pool is small), and weighted sampling without replacement uses the
Gumbel-top-k trick, which yields the same ordered draws as NumPy's successive sampling.
100k rows at L = 512 take about two seconds on one CPU core.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
_CHUNK_ELEMS = 1 << 24  # bound on temporary array sizes (rows × candidates)


class MQARError(ValueError):
    """Invalid MQAR generator parameters; the message says which constraint failed."""


def check_params(vocab_size: int, input_seq_len: int, num_kv_pairs: int, num_passes: int = 1,
                 power_a: float = 0.01, num_examples: int = 1) -> None:
    """Raise MQARError with a clear message if the parameters cannot produce a valid MQAR set."""
    V, L, P = int(vocab_size), int(input_seq_len), int(num_kv_pairs)
    if num_examples < 0:
        raise MQARError(f"num_examples must be >= 0, got {num_examples}")
    if P < 1:
        raise MQARError(f"num_kv_pairs must be >= 1, got {P}")
    if num_passes < 1:
        raise MQARError(f"num_passes must be >= 1, got {num_passes}")
    if L < 2 or L % 2:
        raise MQARError(f"input_seq_len must be even and >= 2 (Zoology asserts L % 2 == 0), got {L}")
    if V <= L:
        raise MQARError(f"vocab_size must exceed input_seq_len (Zoology asserts V > L), got V={V}, L={L}")
    need = 2 * P * num_passes + 2 * P
    if need > L:
        raise MQARError(
            f"{P} key-value pairs do not fit in input_seq_len={L}: the context takes 2*P*num_passes="
            f"{2 * P * num_passes} tokens and the queries need 2*P={2 * P} more ({need} > {L}); "
            f"use a longer sequence or fewer pairs"
        )
    n_keys = V // 2 - 1
    n_values = V - V // 2
    if P > n_keys or P > n_values:
        raise MQARError(
            f"vocab_size={V} is too small for {P} distinct keys and values: keys come from 1..V/2-1 "
            f"({n_keys} tokens), values from V/2..V-1 ({n_values} tokens)"
        )
    if not power_a > 0:
        raise MQARError(f"power_a must be > 0, got {power_a}")


def _distinct_uniform(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
    """(n, k) int64: per row k distinct integers uniform in [low, high), in uniformly random order."""
    pool = high - low
    out = np.empty((n, k), dtype=np.int64)
    if n == 0:
        return out
    # Rejection of whole rows with a repeat is exact (uniform over ordered k-tuples of distinct values)
    # and cheap while a row is likely to be distinct; otherwise use argsort of random keys.
    p_accept = np.exp(-k * (k - 1) / (2.0 * pool))
    if p_accept > 0.2:
        todo = np.arange(n)
        while todo.size:
            draw = rng.integers(0, pool, size=(todo.size, k))
            srt = np.sort(draw, axis=1)
            ok = ~np.any(srt[:, 1:] == srt[:, :-1], axis=1) if k > 1 else np.ones(todo.size, bool)
            out[todo[ok]] = draw[ok]
            todo = todo[~ok]
    else:
        rows = max(1, _CHUNK_ELEMS // pool)
        for start in range(0, n, rows):
            m = min(rows, n - start)
            keys = rng.random((m, pool))
            idx = np.argpartition(keys, k - 1, axis=1)[:, :k] if k < pool else np.argsort(keys, axis=1)
            # argpartition leaves the first k unordered in an input-dependent way; order them by key
            order = np.argsort(np.take_along_axis(keys, idx, axis=1), axis=1)
            out[start:start + m] = np.take_along_axis(idx, order, axis=1)
    return out + low


def _weighted_without_replacement(rng: np.random.Generator, n: int, k: int, p: np.ndarray) -> np.ndarray:
    """(n, k) int64: per row k distinct indices into p, drawn successively ∝ p (Gumbel-top-k)."""
    logp = np.log(p)
    space = p.shape[0]
    out = np.empty((n, k), dtype=np.int64)
    rows = max(1, _CHUNK_ELEMS // space)
    for start in range(0, n, rows):
        m = min(rows, n - start)
        scores = logp[None, :] + rng.gumbel(size=(m, space))
        if k < space:
            idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            idx = np.broadcast_to(np.arange(space), (m, space)).copy()
        order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1)
        out[start:start + m] = np.take_along_axis(idx, order, axis=1)
    return out


def power_law_probs(space: int, power_a: float) -> np.ndarray:
    """Zoology's gap distribution: p(g) ∝ a·(g+1)^(a−1), g = 0 … space−1."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def multiquery_ar(
    vocab_size: int,
    num_examples: int,
    input_seq_len: int,
    seed: int,
    power_a: float = 0.01,
    num_kv_pairs: int = 8,
    random_non_queries: bool = True,
    num_passes: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """MQAR rows as Zoology builds them: ``(inputs, labels)``, both int32 of shape (N, L).

    ``labels`` is −100 (IGNORE_INDEX) everywhere except the P query positions of each row, which hold
    the value paired with the key at that input position. Deterministic in ``seed``.
    """
    check_params(vocab_size, input_seq_len, num_kv_pairs, num_passes, power_a, num_examples)
    V, N, L, P = int(vocab_size), int(num_examples), int(input_seq_len), int(num_kv_pairs)
    rng = np.random.default_rng(seed)

    half = V // 2
    keys = _distinct_uniform(rng, N, P, 1, half)        # 1 … V/2−1
    values = _distinct_uniform(rng, N, P, half, V)      # V/2 … V−1

    C = 2 * P * num_passes
    space = (L - C) // 2
    gaps = _weighted_without_replacement(rng, N, P, power_law_probs(space, power_a))

    inputs = np.zeros((N, L), dtype=np.int32)
    for rep in range(num_passes):
        inputs[:, 2 * P * rep:2 * P * (rep + 1):2] = keys
        inputs[:, 2 * P * rep + 1:2 * P * (rep + 1):2] = values
    # Query region (length L − C + 1 before truncation): k_i at offset 2·g_i; the value would sit at
    # 2·g_i + 1, which becomes the label of input position C + 2·g_i after the one-token shift.
    qpos = C + 2 * gaps
    np.put_along_axis(inputs, qpos, keys.astype(np.int32), axis=1)
    labels = np.full((N, L), IGNORE_INDEX, dtype=np.int32)
    np.put_along_axis(labels, qpos, values.astype(np.int32), axis=1)

    if random_non_queries:
        mask = inputs == 0
        noise = rng.integers(0, V, size=(N, L), dtype=np.int32)  # may be 0 again, as in Zoology
        inputs[mask] = noise[mask]
    return inputs, labels


def scored_positions(labels: np.ndarray, num_kv_pairs: int) -> np.ndarray:
    """(N, P) int32 positions of the labelled (query) tokens of each row, in increasing order.

    Every MQAR row has exactly ``num_kv_pairs`` labels; a row with another count raises MQARError.
    """
    mask = labels != IGNORE_INDEX
    counts = mask.sum(axis=1)
    if np.any(counts != num_kv_pairs):
        bad = int(np.flatnonzero(counts != num_kv_pairs)[0])
        raise MQARError(f"row {bad} has {int(counts[bad])} labelled positions, expected {num_kv_pairs}")
    # stable argsort of ~mask puts the True positions first, in increasing order
    return np.argsort(~mask, axis=1, kind="stable")[:, :num_kv_pairs].astype(np.int32)
