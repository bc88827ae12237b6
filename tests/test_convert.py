"""The authors' v1 checkpoints: converted exactly, loaded directly, and their pickles read safely.

The checkpoints here are written by the test in the authors' layout (thu-nics/TaH 1e07bc3
`TaHForCausalLM.save_pretrained`): the HF backbone files, `lora/` from peft's own save_pretrained with
their adapter_kwargs, `iter_decider.bin` = torch.save({"class", "state_dict", "init_args"}) under their
MLPIterDecider key names, `tah_config.json` with their keys and dtype encoding. Their decider's
forward is written out below on that state_dict, independently of tah/decider.py. TaH2 checkpoints:
tests/test_convert_tah2.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from tah import TaHForCausalLM
from tah.assets import shipped_tokenizer
from tah.convert import (
    UnsafeCheckpointError,
    UnsupportedCheckpointError,
    convert,
    decode_config,
    load_pickled_state,
    resolve_checkpoint,
)
from tah.testing import randomize_lora, tiny_qwen3

SEED, TOPK, WIDTH, BLOCKS, EXPANSION = 3, 16, 32, 3, 2
LAYERS = [0, 1, 3, 4]  # HF hidden_states indices of a 4-layer model: embeddings .. after the final norm
ADAPTER = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear", "bias": "none"}
REPO = Path(__file__).resolve().parents[1]


def their_decider_state(hidden: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """MLPIterDecider(topk, hidden_states_size=hidden, hidden_dims=[WIDTH]*BLOCKS, expansion_factor)'s
    state_dict: their key names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2, base: float = 0.0) -> torch.Tensor:
        return (base + scale * torch.randn(*shape, generator=g)).to(dtype)

    sd = {"threshold": torch.tensor(0.8, dtype=dtype),
          "logits_projection.weight": r(hidden, TOPK), "logits_projection.bias": r(hidden, scale=0.1),
          "combined_projection.weight": r(WIDTH, hidden * (len(LAYERS) + 1), scale=0.1),
          "combined_projection.bias": r(WIDTH, scale=0.1),
          "backbone.input_projection.weight": r(WIDTH, WIDTH), "backbone.input_projection.bias": r(WIDTH, scale=0.1)}
    for b in range(BLOCKS):
        p = f"backbone.blocks.{b}"
        sd |= {f"{p}.layer_norm.weight": r(WIDTH, scale=0.1, base=1.0), f"{p}.layer_norm.bias": r(WIDTH, scale=0.1),
               f"{p}.mlp.0.weight": r(WIDTH * EXPANSION, WIDTH), f"{p}.mlp.0.bias": r(WIDTH * EXPANSION, scale=0.1),
               f"{p}.mlp.3.weight": r(WIDTH, WIDTH * EXPANSION), f"{p}.mlp.3.bias": r(WIDTH, scale=0.1)}
    sd |= {"backbone.output_layer.0.weight": r(WIDTH, scale=0.1, base=1.0),
           "backbone.output_layer.0.bias": r(WIDTH, scale=0.1),
           "backbone.output_layer.1.weight": r(1, WIDTH), "backbone.output_layer.1.bias": r(1, scale=0.1)}
    return sd


def their_decider_forward(sd: dict[str, torch.Tensor], hidden_states: tuple[torch.Tensor, ...],
                          logits: torch.Tensor) -> torch.Tensor:
    """Their MLPIterDecider.forward in eval mode (normalize_input=false, equal widths): the chosen HF
    hidden states concatenated with Linear(top-k logits), Linear, Linear, pre-LayerNorm residual
    blocks (Linear, GELU, Linear), LayerNorm, Linear -> the continuation logit."""
    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    hidden = torch.cat([hidden_states[i] for i in LAYERS], dim=-1)
    top = torch.topk(logits, k=TOPK, dim=-1).values
    x = lin(torch.cat([hidden, lin(top, "logits_projection")], dim=-1), "combined_projection")
    x = lin(x, "backbone.input_projection")
    for b in range(BLOCKS):
        p = f"backbone.blocks.{b}"
        x = x + lin(F.gelu(lin(norm(x, f"{p}.layer_norm"), f"{p}.mlp.0")), f"{p}.mlp.3")
    return lin(norm(x, "backbone.output_layer.0"), "backbone.output_layer.1").squeeze(-1)


def write_v1(path: Path, dtype: torch.dtype = torch.float32, threshold: float | None = 0.6,
             **kwargs_changes) -> dict[str, torch.Tensor]:
    """An authors' v1 checkpoint at `path`; returns the decider state_dict written."""
    hf = tiny_qwen3(seed=SEED, dtype=dtype)
    hf.save_pretrained(path)  # config.json, generation_config.json, model.safetensors (plain HF keys)
    peft_model = get_peft_model(hf, LoraConfig(**ADAPTER))  # their adapter_kwargs, no task_type
    randomize_lora(peft_model, scale=0.2, seed=1)
    peft_model.save_pretrained(path / "lora")
    sd = their_decider_state(hf.config.hidden_size, dtype)
    kwargs = {"topk": TOPK, "hidden_states_size": hf.config.hidden_size, "hidden_states_layer_nums": LAYERS,
              "hidden_dims": [WIDTH] * BLOCKS, "expansion_factor": EXPANSION, "dropout_rate": 0.1,
              "normalize_input": False, "threshold": threshold, "max_iter": 2, "dtype": torch.bfloat16}
    if threshold is None:
        del kwargs["threshold"]
    kwargs |= kwargs_changes
    torch.save({"class": "MLPIterDecider", "state_dict": sd, "init_args": kwargs}, path / "iter_decider.bin")
    encoded = {k: ({"__dtype__": True, "__str__": str(v)} if isinstance(v, torch.dtype) else v)
               for k, v in kwargs.items()}
    (path / "tah_config.json").write_text(json.dumps({
        "embedding_key": "model.embed_tokens", "max_iter": 2, "iter_decider": "MLPIterDecider",
        "iter_decider_kwargs": encoded, "eval_iter_decider": "iter_decider", "eval_iter_decider_kwargs": {},
        "input_updater_kwargs": {"topk": TOPK}, "adapter": "lora",
        "adapter_kwargs": {**ADAPTER, "base_grad": False, "adapter_grad": False},
        "train_loss": "IterDeciderLoss", "train_loss_kwargs": {"pos_weight": 5.4, "skip_last_iter": True, "max_iter": 2},
        "eval_loss": "NextTokenPredLoss", "eval_loss_kwargs": {}}, indent=2))
    return sd


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    root = tmp_path_factory.mktemp("v1")
    sd = write_v1(root / "src")
    for f in Path(shipped_tokenizer()).iterdir():  # their releases ship the tokenizer beside the model
        shutil.copy(f, root / "src" / f.name)
    convert(root / "src", root / "dst")
    return root / "src", root / "dst", sd


def _ids(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(5))


def test_converted_decider_and_depth1_match_the_authors_forward(v1):
    _, dst, sd = v1
    files = {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()}
    assert {"model.safetensors", "lora/adapter_model.safetensors", "decider.safetensors", "tah_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert "tokenizer_config.json" in files
    cfg = json.loads((dst / "tah_config.json").read_text())
    assert cfg["max_depth"] == 2 and cfg["threshold"] == 0.6 and cfg["soft_input_topk"] == TOPK
    assert cfg["decider"] == {"layers": LAYERS, "width": WIDTH, "blocks": BLOCKS, "mlp_ratio": EXPANSION, "dropout": 0.1}
    assert cfg["lora"] == {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}

    model = TaHForCausalLM.from_pretrained(dst).eval()
    ids = _ids()
    hf = tiny_qwen3(seed=SEED)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        expect = their_decider_forward(sd, ref.hidden_states, ref.logits)
        out = model(ids, depths=torch.ones_like(ids))
    assert (out.decider_logits[..., 0] - expect).abs().max() <= 1e-5
    assert (out.logits - ref.logits).abs().max() <= 1e-5


def test_lora_weights_arrive_and_act_at_depth_2(v1):
    src, dst, _ = v1
    theirs, ours = load_file(src / "lora" / "adapter_model.safetensors"), load_file(dst / "lora" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in ours.items())
    model = TaHForCausalLM.from_pretrained(dst).eval()
    ids = _ids()
    depths = torch.ones_like(ids)
    depths[:, 4::3] = 2
    with torch.no_grad():
        d1 = model(ids, depths=torch.ones_like(ids)).logits
        d2 = model(ids, depths=depths).logits
    hard = depths == 2
    assert torch.equal(d1[~hard], d2[~hard])
    assert (d1[hard] - d2[hard]).abs().amax(-1).min() > 1e-3


def test_from_pretrained_loads_v1_directly_and_caches(v1, tmp_path, monkeypatch):
    src, dst, _ = v1
    monkeypatch.setenv("TAH_CACHE", str(tmp_path / "cache"))
    direct = TaHForCausalLM.from_pretrained(src).eval()
    converted = TaHForCausalLM.from_pretrained(dst).eval()
    assert direct.threshold == converted.threshold == 0.6
    ids = _ids(3, 14)
    with torch.no_grad():
        a, b = direct(ids), converted(ids)  # depths chosen by the decider
    assert torch.equal(a.depths, b.depths) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.decider_logits, b.decider_logits)
    cached = Path(resolve_checkpoint(src))
    assert cached.parent == tmp_path / "cache" / "converted" and len(list(cached.parent.iterdir())) == 1
    stamp = (cached / "tah_config.json").stat().st_mtime_ns
    assert Path(resolve_checkpoint(src)) == cached and (cached / "tah_config.json").stat().st_mtime_ns == stamp
    assert resolve_checkpoint(dst) == str(dst)  # this project's own checkpoints are read in place


def test_threshold_follows_their_loader_and_bf16_weights_are_kept(tmp_path):
    """No threshold in the config: their loader then keeps the state_dict's learnt threshold (bf16 0.8)."""
    sd = write_v1(tmp_path / "src", dtype=torch.bfloat16, threshold=None)
    convert(tmp_path / "src", tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "tah_config.json").read_text())["threshold"] == float(sd["threshold"])
    dec = load_file(tmp_path / "dst" / "decider.safetensors")
    assert dec["blocks.1.fc2.weight"].dtype == torch.bfloat16
    assert torch.equal(dec["blocks.1.fc2.weight"], sd["backbone.blocks.1.mlp.3.weight"])
    assert torch.equal(dec["logit_proj.bias"], sd["logits_projection.bias"])


@pytest.mark.parametrize("change,match", [
    ({"normalize_input": True}, "normalize_input"),
    ({"hidden_dims": [WIDTH, 2 * WIDTH, WIDTH]}, "hidden_dims"),
    ({"topk": TOPK + 1}, "top-k"),
    ({"hidden_states_layer_nums": [0, 9]}, "outside"),
])
def test_unrepresentable_settings_are_refused(tmp_path, change, match):
    write_v1(tmp_path / "src", **change)
    with pytest.raises(UnsupportedCheckpointError, match=match):
        convert(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_step1_checkpoint_and_extra_weights_are_refused(v1, tmp_path):
    src, _, sd = v1
    step1 = tmp_path / "step1"
    shutil.copytree(src, step1)
    raw = json.loads((step1 / "tah_config.json").read_text())
    (step1 / "tah_config.json").write_text(json.dumps(raw | {"iter_decider": "IterLabelDecider"}))
    with pytest.raises(UnsupportedCheckpointError, match="step-1"):
        convert(step1, tmp_path / "out")
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    torch.save({"class": "MLPIterDecider", "state_dict": sd | {"backbone.blocks.0.dim_change.weight": torch.zeros(2)},
                "init_args": {}}, extra / "iter_decider.bin")
    with pytest.raises(UnsupportedCheckpointError, match="unequal width"):
        convert(extra, tmp_path / "out")


class _RunsShell:
    """Pickles as a call of os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Anything:
    def __init__(self) -> None:
        self.payload = "x"


def test_hostile_pickles_are_refused_and_nothing_runs(v1, tmp_path):
    src, _, sd = v1
    marker = tmp_path / "pwned"
    hostile = {
        "reduce": ({"class": "MLPIterDecider", "state_dict": {"w": _RunsShell(marker)}, "init_args": {}}, "posix.system"),
        "instance": ({"state_dict": {}, "init_args": {"x": _Anything()}}, "_Anything"),
        "not_a_dict": ([torch.zeros(2)], "expected a dict"),
        "not_a_tensor": ({"state_dict": {"w": 3}}, "not a tensor"),
        "extra_key": ({"state_dict": {}, "code": "print(1)"}, "expected keys"),
    }
    for name, (obj, match) in hostile.items():
        torch.save(obj, tmp_path / f"{name}.bin")
        with pytest.raises(UnsafeCheckpointError, match=match) as err:
            load_pickled_state(tmp_path / f"{name}.bin")
        assert str(tmp_path / f"{name}.bin") in str(err.value)
    assert not marker.exists()
    # The same file inside a checkpoint: refused by convert and by a direct load, still nothing run.
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shutil.copy(tmp_path / "reduce.bin", bad / "iter_decider.bin")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        convert(bad, tmp_path / "out")
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        TaHForCausalLM.from_pretrained(bad)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # Their real file shape (dtype among the init args) passes.
    got = load_pickled_state(src / "iter_decider.bin")
    assert got["class"] == "MLPIterDecider" and got["init_args"]["dtype"] is torch.bfloat16
    assert all(torch.equal(got["state_dict"][k], v) for k, v in sd.items())


def test_config_encodings_decode_without_imports():
    raw = {"a": {"__dtype__": True, "__str__": "torch.bfloat16"},
           "b": [{"__type__": True, "__module__": "no_such_module_xyz", "__name__": "Thing"}], "c": 1}
    assert decode_config(raw) == {"a": torch.bfloat16, "b": ["no_such_module_xyz.Thing"], "c": 1}
    assert "no_such_module_xyz" not in sys.modules


def test_cli_converts(v1, tmp_path):
    src, dst, _ = v1
    run = subprocess.run([sys.executable, "-m", "tah.convert", str(src), str(tmp_path / "cli")], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "converted authors' v1 checkpoint" in run.stdout and "threshold=0.6" in run.stdout
    assert load_file(tmp_path / "cli" / "decider.safetensors").keys() == load_file(dst / "decider.safetensors").keys()
    bad = subprocess.run([sys.executable, "-m", "tah.convert", str(tmp_path / "nothing"), str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0 and "not a checkpoint" in bad.stderr


def test_convert_from_and_to_s3(v1, s3_server, tmp_path, monkeypatch):
    from tah import storage

    src, dst, _ = v1
    monkeypatch.setenv("TAH_CACHE", str(tmp_path / "cache"))
    storage.s3_client().create_bucket(Bucket="rel")
    storage.upload_dir(src, "s3://rel/v1", last="tah_config.json")
    convert("s3://rel/v1", "s3://rel/ours")
    ids = _ids()
    with torch.no_grad():
        want = TaHForCausalLM.from_pretrained(dst).eval()(ids)
        for uri in ("s3://rel/ours", "s3://rel/v1"):  # converted, and the authors' one read directly
            got = TaHForCausalLM.from_pretrained(uri).eval()(ids)
            assert torch.equal(got.logits, want.logits) and torch.equal(got.decider_logits, want.decider_logits)
