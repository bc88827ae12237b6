"""python -m tah.engine: the engine's demo (a tiny random model, 4 staggered requests, stats)."""

from .core import _demo

_demo()
