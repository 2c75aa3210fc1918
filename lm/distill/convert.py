"""Trained model → distilled model: fit every long filter, save and load distilled runs.

A distilled run directory is a copy of the source run's ``config.yaml``, ``tokenizer/`` and the one
checkpoint it was distilled from (``checkpoints/<step>/``), plus::

    distilled/modal.npz     per layer and filter: pole_re, pole_im, res_re, res_im, h0 (fp32)
                            keys "layer{i}/{filter name}/{field}"
    distilled/meta.json     {"source_run", "source_step", "order", "length", "layers": {i: {name: {
                            "channels", "order"}}}, "settings", "summary"}
    distilled/report.json   per-filter reports (order, relative ℓ2 error, σ_{2d+1}, ‖h − ĥ‖₁)

Filters are fitted over the model's ``max_len`` (the whole filter the model ever applies). The modal
part fits h[1:]; h0 = h[0] is stored as is, and the mixer's skip D is added at decode time, so the
distilled feedthrough is h0 + D (Laughing-Hyena convention). Filters that are already finite-state
short FIRs (H3's shift filter) are not distilled; their twins keep them exactly.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.distill.fit import DistillError, FilterReport, fit_filters, fit_filters_by_order, summarize
from lm.distill.modal import ModalParams
from lm.distill.recurrent import RecurrentError, twin_for

FIELDS = ModalParams._fields


def long_filter_banks(lm, length: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """{layer: {name: h (length, channels) float64}} for every long filter that needs distilling."""
    length = int(length or lm.cfg.max_len)
    banks: dict[int, dict[str, np.ndarray]] = {}
    for i, block in enumerate(lm.blocks):
        mixer = block.mixer
        if not hasattr(mixer, "long_filters"):
            continue
        try:
            twin = twin_for(mixer)
        except RecurrentError as e:
            raise DistillError(f"layer {i}: {e}") from None
        fir = set(twin.fir(mixer)) if twin.fir else set()
        layer = {name: np.asarray(h, np.float64) for name, h in mixer.long_filters(length).items() if name not in fir}
        if layer:
            banks[i] = layer
    if not banks:
        kinds = sorted({type(b.mixer).__name__ for b in lm.blocks})
        raise DistillError(f"the model has no long filters to distill (mixers: {', '.join(kinds)})")
    return banks


def distill_model(lm, order: int | None = 16, *, target: float | None = None, hankel_tol: float | None = None,
                  refine_steps: int = 0, lr: float = 1e-2, length: int | None = None, max_order: int | None = None,
                  progress=None) -> tuple[dict[int, dict[str, ModalParams]], dict[int, dict[str, list[FilterReport]]]]:
    """Fit every long filter of ``lm``. Returns ({layer: {name: ModalParams}}, {layer: {name: reports}})."""
    if order is None and target is None and hankel_tol is None:
        raise DistillError("give an order, a target relative error, or a hankel_tol")
    if order is not None and (isinstance(order, bool) or int(order) != order or int(order) <= 0):
        raise DistillError(f"order must be a positive integer (number of complex modes); got {order!r}")
    banks = long_filter_banks(lm, length)
    modal: dict[int, dict[str, ModalParams]] = {}
    reports: dict[int, dict[str, list[FilterReport]]] = {}
    for i, layer in banks.items():
        modal[i], reports[i] = {}, {}
        for name, h in layer.items():
            kwargs = {"max_order": max_order} if max_order else {}
            params, reps = fit_filters(h, order, target=target, hankel_tol=hankel_tol, refine_steps=refine_steps,
                                       lr=lr, **kwargs)
            modal[i][name], reports[i][name] = params, reps
            if progress:
                progress(i, name, summarize(reps))
    return modal, reports


def distill_model_by_order(lm, orders, *, refine_steps=(0,), lr: float = 1e-2, progress=None,
                           ) -> dict[tuple[int, int], tuple[dict[int, dict[str, ModalParams]], dict[int, dict[str, list[FilterReport]]]]]:
    """`distill_model(lm, d, refine_steps=r)` for every order d in ``orders`` and r in ``refine_steps``:
    {(d, r): (modal, reports)}, sharing each filter's Hankel decomposition (`fit_filters_by_order`)."""
    out: dict = {}
    for i, layer in long_filter_banks(lm).items():
        for name, h in layer.items():
            for key, (params, reps) in fit_filters_by_order(h, orders, refine_steps=refine_steps, lr=lr).items():
                modal, reports = out.setdefault(key, ({}, {}))
                modal.setdefault(i, {})[name] = params
                reports.setdefault(i, {})[name] = reps
                if progress:
                    progress(i, name, key, summarize(reps))
    return out


def modal_state_size(lm, orders: dict[int, int]) -> int:
    """Complex numbers of recurrent modal state per sequence when layer i uses order ``orders[i]``:
    Σ_layers Σ_filters (channels × the mixer's repeat, e.g. N² per MultiHyena head) × order."""
    total = 0
    for i, layer in long_filter_banks(lm, 4).items():
        mixer = lm.blocks[i].mixer
        twin = twin_for(mixer)
        for name, h in layer.items():
            repeat = twin.channel_repeat(mixer) if twin.channel_repeat and (
                not twin.repeat_names or name in twin.repeat_names) else 1
            total += h.shape[1] * repeat * int(orders[i])
    return total


# ----------------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------------


def save_modal(path: str | pathlib.Path, modal: dict[int, dict[str, ModalParams]]) -> None:
    arrays = {}
    for i, layer in modal.items():
        for name, p in layer.items():
            for field, value in zip(FIELDS, p):
                arrays[f"layer{i}/{name}/{field}"] = np.asarray(value, np.float32)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def load_modal(path: str | pathlib.Path) -> dict[int, dict[str, ModalParams]]:
    import jax.numpy as jnp

    path = pathlib.Path(path)
    if not path.is_file():
        raise DistillError(f"no distilled filters at {path}")
    with np.load(path) as data:
        grouped: dict[int, dict[str, dict[str, np.ndarray]]] = {}
        for key in data.files:
            try:
                layer, name, field = key.split("/")
                idx = int(layer.removeprefix("layer"))
            except ValueError:
                raise DistillError(f"{path}: unexpected entry {key!r}") from None
            grouped.setdefault(idx, {}).setdefault(name, {})[field] = data[key]
    out = {}
    for i, layer in grouped.items():
        out[i] = {}
        for name, fields in layer.items():
            missing = [f for f in FIELDS if f not in fields]
            if missing:
                raise DistillError(f"{path}: layer {i} filter {name!r} lacks {missing}")
            out[i][name] = ModalParams(*[jnp.asarray(fields[f], jnp.float32) for f in FIELDS])
    return out


def check_modal_fits(lm, modal: dict[int, dict[str, ModalParams]]) -> None:
    """Raise DistillError unless ``modal`` has exactly the long filters of ``lm`` with matching channels."""
    banks = {i: {n: h.shape[1] for n, h in layer.items()} for i, layer in long_filter_banks(lm, 4).items()}
    for i, layer in banks.items():
        if i not in modal:
            raise DistillError(f"distilled filters do not match the model: layer {i} ({type(lm.blocks[i].mixer).__name__}) "
                               "has long filters but none were distilled")
        for name, channels in layer.items():
            if name not in modal[i]:
                raise DistillError(f"distilled filters do not match the model: layer {i} lacks filter {name!r} "
                                   f"(has {sorted(modal[i])})")
            got = modal[i][name].channels
            if got != channels:
                raise DistillError(f"distilled filters do not match the model: layer {i} filter {name!r} has "
                                   f"{got} channels, the model expects {channels}")
    extra = sorted(set(modal) - set(banks))
    if extra:
        raise DistillError(f"distilled filters do not match the model: layer {extra[0]} has no long filters")


def report_dict(reports: dict[int, dict[str, list[FilterReport]]]) -> dict[str, Any]:
    return {str(i): {n: {"summary": summarize(r), "filters": [x.as_dict() for x in r]} for n, r in layer.items()}
            for i, layer in reports.items()}


def write_distilled_run(src_run: str | pathlib.Path, out_dir: str | pathlib.Path, step: int,
                        modal: dict[int, dict[str, ModalParams]], reports, settings: dict[str, Any],
                        length: int) -> pathlib.Path:
    """Copy the source run's config, tokenizer and checkpoint ``step`` to ``out_dir`` and add distilled/."""
    from lm.checkpoint import find_checkpoint_dir

    src_run, out_dir = pathlib.Path(src_run), pathlib.Path(out_dir)
    if out_dir.resolve() == src_run.resolve():
        raise DistillError("the distilled run must go to a new directory, not the source run")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src_run / "config.yaml", out_dir / "config.yaml")
    if (src_run / "tokenizer").is_dir():
        shutil.copytree(src_run / "tokenizer", out_dir / "tokenizer", dirs_exist_ok=True)
    ckpt_src = find_checkpoint_dir(src_run) / str(step)
    if not ckpt_src.is_dir():
        raise DistillError(f"checkpoint directory {ckpt_src} not found")
    dst = out_dir / "checkpoints" / str(step)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(ckpt_src, dst)
    save_modal(out_dir / "distilled" / "modal.npz", modal)
    meta = {
        "source_run": str(src_run),
        "source_step": int(step),
        "length": int(length),
        "order": max(p.order for layer in modal.values() for p in layer.values()),
        "layers": {str(i): {n: {"channels": p.channels, "order": p.order} for n, p in layer.items()}
                   for i, layer in modal.items()},
        "settings": settings,
        "summary": {str(i): {n: summarize(r) for n, r in layer.items()} for i, layer in reports.items()},
    }
    (out_dir / "distilled" / "meta.json").write_text(json.dumps(meta, indent=1))
    (out_dir / "distilled" / "report.json").write_text(json.dumps(report_dict(reports)))
    return out_dir


def is_distilled(run_dir: str | pathlib.Path) -> bool:
    return (pathlib.Path(run_dir) / "distilled" / "modal.npz").is_file()


def load_distilled(run_dir: str | pathlib.Path):
    """(cfg, lm, tokenizer, step, modal, meta) of a distilled run; errors are DistillError/CheckpointError."""
    from lm.checkpoint import load_run

    run_dir = pathlib.Path(run_dir)
    if not is_distilled(run_dir):
        raise DistillError(f"{run_dir} is not a distilled run (no distilled/modal.npz); run `longconv distill`")
    cfg, lm, tokenizer, step = load_run(run_dir)
    modal = load_modal(run_dir / "distilled" / "modal.npz")
    check_modal_fits(lm, modal)
    meta_path = run_dir / "distilled" / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return cfg, lm, tokenizer, step, modal, meta


# ----------------------------------------------------------------------------------------------------
# The materialised model: the LM with its long filters REPLACED by the modal ĥ
# ----------------------------------------------------------------------------------------------------


class FixedFilter(nnx.Module):
    """A stand-in for a filter module: ``__call__(seqlen)`` returns a fixed (L, C) filter's prefix."""

    def __init__(self, h):
        self.h = nnx.Variable(jnp.asarray(h, jnp.float32))

    def __call__(self, seqlen: int):
        h = self.h[...]
        if seqlen > h.shape[0]:
            raise ValueError(f"materialised filter has length {h.shape[0]} < requested {seqlen}")
        return h[:seqlen]

    def regularized(self, seqlen: int):  # LongConv's long_filters() entry point
        return self(seqlen)


# mixer class -> (attribute holding the filter module, filter names in channel order)
FILTER_ATTRS = {
    "Hyena": ("filter", lambda m: [f"filter_{o}" for o in range(m.n_filters)]),
    "MultiHyena": ("filter", lambda m: ["filter"]),
    "LongConv": ("kernel", lambda m: ["kernel"]),
    "SGConv": ("kernel", lambda m: ["kernel"]),
    "H3": ("ssm", lambda m: ["ssm"]),
}


def replace_filters(lm, modal: dict[int, dict[str, ModalParams]], length: int | None = None):
    """Return a copy of ``lm`` whose long filters are the materialised modal filters (eval mode).

    Its ordinary forward pass is the distilled model's exact parallel forward: the reference that
    prefill + recurrent decoding must reproduce token by token.
    """
    from lm.distill.modal import materialize

    check_modal_fits(lm, modal)
    length = int(length or lm.cfg.max_len)
    graphdef, state = nnx.split(lm)
    new = nnx.merge(graphdef, state)  # shares arrays; only filter modules are swapped
    for i, layer in modal.items():
        mixer = new.blocks[i].mixer
        name = type(mixer).__name__
        if name not in FILTER_ATTRS:
            raise DistillError(f"cannot replace the filters of mixer {name}")
        attr, names = FILTER_ATTRS[name]
        h = jnp.concatenate([materialize(layer[n], length) for n in names(mixer)], axis=1)
        setattr(mixer, attr, FixedFilter(h))
    new.eval()
    return new
