"""Sequence mixers. Importing this package registers every mixer in `MIXERS`."""

from lm.mixers.registry import MIXERS, build_mixer, parse_mixer_spec, register_mixer

# Mixer modules register themselves on import (kept in this order for the `longconv mixers` table).
from lm.mixers import attention, baseconv, based, hyena, multihyena, sgconv, longconv, h3  # noqa: E402,F401

__all__ = ["MIXERS", "build_mixer", "parse_mixer_spec", "register_mixer"]
