"""longconv: gated-convolution language models, MQAR recall evaluation and modal-SSM distillation."""

__version__ = "0.1.0"
