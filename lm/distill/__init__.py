"""Distillation of long-convolution filters into modal SSMs, and their O(1)-per-token recurrent twins.

- `lm.distill.modal`: modal filter math (materialise ĥ, prefill methods, the real 2x2 recurrent step);
- `lm.distill.fit`: Hankel SVD, ESPRIT poles, least-squares residues, optax refinement, order selection;
- `lm.distill.recurrent`: recurrent twins of the mixers (prefill in parallel, O(1) step);
- `lm.distill.convert`: trained model -> distilled model, distilled checkpoints;
- `lm.distill.command`: the `longconv distill` subcommand.
"""

from lm.distill.fit import DistillError, FilterReport, fit_filter, fit_filters, hankel_singular_values
from lm.distill.modal import ModalParams, ModalState, materialize, prefill, prefill_state, step

__all__ = [
    "DistillError", "FilterReport", "ModalParams", "ModalState", "fit_filter", "fit_filters",
    "hankel_singular_values", "materialize", "prefill", "prefill_state", "step",
]
