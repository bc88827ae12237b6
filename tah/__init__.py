"""TaH: Think-at-Hard looped transformers over HF causal LMs (library part: no Ray in here).

    from tah import TaHConfig, TaHForCausalLM

The names below load on first use, so that light submodules (the graders and their sandbox, which
spawned grading processes import) do not pay for torch and transformers.
"""

from importlib import import_module
from typing import Any

_LAZY = {"TaHConfig": ".config", "LoraSettings": ".config", "DeciderSettings": ".config",
         "TaHForCausalLM": ".model", "TaHOutput": ".model"}
__all__ = list(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'tah' has no attribute {name!r}")
