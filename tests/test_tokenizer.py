"""The tokenizer module: end tokens shared by serving and evaluation, chat prompts, shipped assets.

    .venv/bin/python -m pytest -q tests/test_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.assets import shipped_base_model, shipped_task, shipped_tokenizer
from tah.testing import tiny_qwen3
from tah.tokenizer import chat_prompt_ids, end_token_ids, load_tokenizer


def _checkpoint(tmp_path: Path) -> tuple[str, object]:
    tok = load_tokenizer(shipped_tokenizer())
    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=len(tok), seed=3), TaHConfig(max_depth=2))
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    return str(tmp_path / "ckpt"), tok


def test_end_tokens_include_the_generation_config(tmp_path):
    path, tok = _checkpoint(tmp_path)
    gen = Path(path, "generation_config.json")
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    gen.write_text(json.dumps({**cfg, "eos_token_id": [7, 11]}))
    assert end_token_ids(tok, path) == sorted({tok.eos_token_id, 7, 11})
    assert end_token_ids(tok) == [tok.eos_token_id]


def test_evaluation_stops_on_the_checkpoints_end_tokens(tmp_path):
    """The token the model emits first, declared an end token in generation_config.json only (not the
    tokenizer's eos): evaluation must stop there, as serving does (both use end_token_ids)."""
    from tah.engine import Engine, EngineConfig, SamplingParams
    from tah.eval.harness import EngineWorker

    path, tok = _checkpoint(tmp_path)
    prompt = "Compute 2 + 3."
    ids = chat_prompt_ids(tok, [{"role": "user", "content": prompt}])
    model = TaHForCausalLM.from_pretrained(path)
    first = Engine(model, EngineConfig(max_num_seqs=1)).generate(
        [ids], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))[0].token_ids[0]
    assert first != tok.eos_token_id
    gen = Path(path, "generation_config.json")
    cfg = json.loads(gen.read_text()) if gen.exists() else {}
    gen.write_text(json.dumps({**cfg, "eos_token_id": first}))
    worker = EngineWorker(path, engine={"max_model_len": 256}, sampling={"temperature": 0.0, "max_tokens": 16})
    out = worker({"id": np.array(["p"]), "benchmark": np.array(["tinytask"]), "prompt": np.array([prompt])})
    assert out["finish_reason"][0] == "stop" and out["tokens"][0] == 1


def test_shipped_assets_are_package_data():
    import tah.assets

    root = Path(tah.assets.__file__).parent
    for p in (shipped_task(), shipped_tokenizer(), shipped_base_model()):
        assert Path(p).is_dir() and Path(p).is_relative_to(root)
    assert (Path(shipped_base_model()) / "model.safetensors").is_file()
    assert (Path(shipped_task()) / "math" / "test-00000-of-00001.jsonl").is_file()


def test_an_installed_wheel_finds_its_assets(tmp_path):
    """The wheel carries the shipped task, tokenizer, base model and recipes, and an installed copy
    (not the source tree) finds them through tah.assets."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"tah/assets/tiny-base/model.safetensors", "tah/assets/tinytask/tokenizer/tokenizer.json",
            "tah/assets/tinytask/math/test-00000-of-00001.jsonl", "jobs/configs/tiny.yaml"} <= names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("import tah, tah.assets as a, json, pathlib; "
             "print(json.dumps([tah.__file__, a.shipped_task(), a.shipped_tokenizer(), a.shipped_base_model()]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")})
    paths = json.loads(out.stdout)
    assert all(p.startswith(str(tmp_path / "site")) for p in paths), paths
    assert all(Path(p).exists() for p in paths)
