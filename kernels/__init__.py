"""longconv kernels: sequence ops that know nothing of language models."""
