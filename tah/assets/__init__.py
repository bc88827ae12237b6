"""The assets this package ships: the tiny task (its data and tokenizer) and the tiny base model.

They live inside the package (this folder), so an installed wheel finds them as the source tree
does; nothing computes a path from the source tree's depth. Config defaults point here.

    python -c "from tah.assets import shipped_task, shipped_tokenizer, shipped_base_model; \
               print(shipped_task(), shipped_tokenizer(), shipped_base_model(), sep='\n')"
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def _asset(*parts: str) -> str:
    path = Path(str(files(__name__).joinpath(*parts)))
    if not path.exists():
        raise FileNotFoundError(f"shipped asset {'/'.join(parts)} is missing from the installed package ({path})")
    return str(path)


def shipped_task() -> str:
    """The tiny task in the Mixture-of-Thoughts layout: <domain>/<split>-00000-of-00001.jsonl."""
    return _asset("tinytask")


def shipped_tokenizer() -> str:
    """The tiny task's byte-level BPE tokenizer with its Qwen3-style chat template."""
    return _asset("tinytask", "tokenizer")


def shipped_base_model() -> str:
    """The tiny pretrained base model (0.9 M parameters; how it was made: its pretrain.json)."""
    return _asset("tiny-base")
