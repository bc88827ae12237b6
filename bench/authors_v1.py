"""This project's TaH engine against the authors' own v1 `generate` (thu-nics/TaH), same weights, one run.

A benchmark, never part of CI. It
1. makes (once) a virtualenv `.venv-authors` with the authors' pins (transformers 4.52.4, peft 0.15.2;
   torch 2.13.0 CPU, see AUTHORS_PINS for why not their torch 2.6.0) and what their package imports;
2. builds this project's v1 TaH model (a random Qwen3 of bench/engine.py's shapes, a fresh LoRA with
   non-zero B), calibrates the decider's threshold so that ~`--share` of the generated tokens iterate,
   writes the model in the authors' v1 checkpoint layout (the inverse of tah/convert.py, for this bench
   only) and checks that tah/convert.py reads it back to the very same weights and settings;
3. loads that checkpoint with *their* `TaHForCausalLM.from_pretrained` in the other virtualenv (a driver
   script written to a temp file, imported from `--authors-repo`, talking JSON lines over a pipe) and
   runs their `TaHForCasualLM_generate` (greedy, static batches of B), interleaved round by round with
   this project's `Engine.generate` on the same batches (`--new-tokens` per row, EOS ignored). Every
   batch size runs the same `--prompts` prompts, B at a time, so each decodes the same tokens;
4. checks the greedy tokens, and the depth each token was read at, agree prompt for prompt, and prints
   a markdown table of tokens/s (median over rounds, with the range) and the ratio, by wall time and by
   process CPU time (each side runs `--threads` threads, 1 by default: on a shared machine the CPU-time
   ratio is the steadier one); it exits 1 if any token or depth differs (after printing everything).

    PYTHONPATH=. python bench/authors_v1.py --authors-repo /tmp/tah-authors     # small, batch 1 and 8, ~3 min
    PYTHONPATH=. python bench/authors_v1.py --authors-repo /tmp/tah-authors --size medium --batches 8 --new-tokens 64

Their repository is public (https://github.com/thu-nics/TaH); when the `--authors-repo` path is missing
it is cloned there with git, which needs network access. Nothing of theirs is copied into this
repository. The only change made to their code at run time is listed in the output (see DRIVER):
`torch.load` is forced to `weights_only=True`, so their decider loader cannot unpickle code. Their
generate runs on CPU as it is (no CUDA or flash-attn in its path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from engine import DIMS, calibrate, v1_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_URL = "https://github.com/thu-nics/TaH"
# Their pyproject pins torch==2.6.0, but PyPI's 2.6.0 Linux wheel is the CUDA build (GBs of NVIDIA
# libraries); 2.13.0 CPU is the build this machine installs, and it is the torch this project runs, so
# both sides use the same kernels and the comparison measures the code around them.
AUTHORS_PINS = ["torch==2.13.0", "transformers==4.52.4", "peft==0.15.2", "accelerate", "datasets", "numpy",
                "safetensors"]
# The shapes issue 16's "today" figures (1.25 / 1.13) were measured on, beside bench/engine.py's.
SIZES = {**DIMS,
         "issue16-a": dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32,
                           intermediate_size=768),
         "issue16-b": dict(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                           intermediate_size=1536)}

# ----------------------------------------------------------------------------- environment


def ensure_venv(venv: Path) -> Path:
    """The python of `venv`, created with AUTHORS_PINS if it is missing or holds other versions."""
    py = venv / "bin" / "python"
    want = {p.split("==")[0]: p.split("==")[1] for p in AUTHORS_PINS if "==" in p}
    probe = ("import json, importlib.metadata as m; "
             f"print(json.dumps({{k: m.version(k) for k in {sorted(want)!r}}}))")
    if py.exists():
        out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True)
        if out.returncode == 0 and {k: v.split("+")[0] for k, v in json.loads(out.stdout).items()} == want:
            return py
    print(f"# creating {venv} with {' '.join(AUTHORS_PINS)} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", *AUTHORS_PINS], capture_output=True, text=True)
    if pip.returncode != 0:
        raise SystemExit(f"error: pip could not install the authors' pins into {venv}:\n{pip.stderr[-3000:]}")
    return py


def ensure_authors_repo(path: Path) -> Path:
    """A checkout of thu-nics/TaH at `path` (their v1 package `tah/` at its top level), cloned if missing."""
    marker = path / "tah" / "model" / "tah_model.py"
    if marker.is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise SystemExit(f"error: {path} exists but is not a checkout of {AUTHORS_URL} (no {marker.relative_to(path)})")
    out = subprocess.run(["git", "clone", "--depth", "1", AUTHORS_URL, str(path)], capture_output=True, text=True)
    if out.returncode != 0 or not marker.is_file():
        raise SystemExit(f"error: could not clone {AUTHORS_URL} into {path} (offline?): {out.stderr.strip()[-500:]}\n"
                         f"Get a checkout some other way and pass it with --authors-repo PATH.")
    return path

# ----------------------------------------------------------------------------- the model, in both layouts


def build(size: str, seed: int = 0):
    """bench/engine.py's random TaH v1 model (its build(), for any SIZES shape): a random Qwen3, LoRA
    r=16 with random B, decider width 64 x 2 blocks, max depth 2."""
    from tah.testing import tiny_qwen3

    hf = tiny_qwen3(**SIZES[size], initializer_range=0.02)
    torch.manual_seed(seed)
    return v1_model(hf)


# Our IterationDecider's keys -> their MLPIterDecider's (tah/convert.py maps the other way).
_DECIDER_KEYS = [("logit_proj.", "logits_projection."), ("inp.", "combined_projection."),
                 ("mid.", "backbone.input_projection."), ("norm.", "backbone.output_layer.0."),
                 ("head.", "backbone.output_layer.1.")]
_BLOCK_KEYS = {"norm": "layer_norm", "fc1": "mlp.0", "fc2": "mlp.3"}


def _their_decider_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "blocks":  # blocks.N.{norm,fc1,fc2}.{weight,bias}
        return f"backbone.blocks.{parts[1]}.{_BLOCK_KEYS[parts[2]]}.{parts[3]}"
    for ours, theirs in _DECIDER_KEYS:
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(f"decider weight {key!r} has no counterpart in the authors' MLPIterDecider")


def _hf452_config(cfg) -> dict:
    """The backbone's config.json as transformers 4.52 reads it (5.x writes `rope_parameters`, which
    4.52 ignores, falling back to its default rope_theta)."""
    d = cfg.to_dict()
    rope = d.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise SystemExit(f"error: this bench writes plain RoPE only, the backbone has {rope}")
    d.update(rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)), rope_scaling=None,
             torch_dtype="float32", architectures=[type_name(cfg)], transformers_version="4.52.4")
    d.pop("dtype", None)
    return d


def type_name(cfg) -> str:
    if cfg.model_type != "qwen3":  # their v1 code and checkpoints are Qwen3
        raise SystemExit(f"error: this bench writes Qwen3 backbones, not {cfg.model_type}")
    return "Qwen3ForCausalLM"


def save_authors_v1(model, thr: float, dst: Path) -> None:
    """`model` in the authors' v1 layout (their save_pretrained at 1e07bc3): config.json,
    model.safetensors (plain HF keys), lora/ (adapter_config.json + adapter_model.safetensors),
    iter_decider.bin (torch.save of tensors and plain data: the file their loader reads) and
    tah_config.json with their keys and dtype encoding."""
    from peft import get_peft_model_state_dict

    from tah.model import backbone_state_dict

    c, bb = model.config, model.backbone
    if c.max_depth != 2 or c.decider_kind != "v1" or c.input_rule != "soft_topk" or c.combine != "logit_residual":
        raise SystemExit("error: the authors' v1 code runs max depth 2, soft top-k input, logit residual, v1 decider")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(_hf452_config(bb.config), indent=2))
    save_file({k: v.detach().contiguous() for k, v in backbone_state_dict(bb).items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    lora = c.lora
    adapter = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
               "target_modules": lora.target_modules, "bias": "none"}
    (dst / "lora").mkdir(exist_ok=True)
    (dst / "lora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True, **adapter}))
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model._peft).items()},
              dst / "lora" / "adapter_model.safetensors", metadata={"format": "pt"})
    d = c.decider
    kwargs = {"topk": c.soft_input_topk, "hidden_states_size": bb.config.hidden_size,
              "hidden_states_layer_nums": list(model.decider_layers), "hidden_dims": [d.width] * d.blocks,
              "expansion_factor": d.mlp_ratio, "dropout_rate": d.dropout, "normalize_input": False,
              "threshold": thr, "max_iter": 2, "dtype": torch.float32}
    if d.blocks < 1:
        raise SystemExit("error: their decider needs at least one block (hidden_dims non-empty)")
    state = {_their_decider_key(k): v.detach().clone() for k, v in model.decider.state_dict().items()}
    state["threshold"] = torch.tensor(thr, dtype=torch.float32)
    torch.save({"class": "MLPIterDecider", "state_dict": state, "init_args": kwargs}, dst / "iter_decider.bin")
    enc = {k: ({"__dtype__": True, "__str__": str(v)} if isinstance(v, torch.dtype) else v) for k, v in kwargs.items()}
    (dst / "tah_config.json").write_text(json.dumps({
        "embedding_key": "model.embed_tokens", "max_iter": 2, "iter_decider": "MLPIterDecider",
        "iter_decider_kwargs": enc, "eval_iter_decider": "iter_decider", "eval_iter_decider_kwargs": {},
        "input_updater_kwargs": {"topk": c.soft_input_topk}, "adapter": "lora",
        "adapter_kwargs": {**adapter, "base_grad": False, "adapter_grad": False},
        "train_loss": "IterDeciderLoss", "train_loss_kwargs": {"pos_weight": 5.0, "skip_last_iter": True, "max_iter": 2},
        "eval_loss": "NextTokenPredLoss", "eval_loss_kwargs": {}}, indent=2))


def check_roundtrip(model, src: Path) -> None:
    """tah/convert.py (theirs -> ours, written independently of save_authors_v1) must give back every
    weight bit for bit and the same settings; otherwise the two codes would not run the same model."""
    from tah import TaHForCausalLM
    from tah.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        convert(src, Path(tmp) / "ours")
        back = TaHForCausalLM.from_pretrained(Path(tmp) / "ours", dtype=torch.float32).eval()
    a, b = model.state_dict(), back.state_dict()
    bad = sorted(set(a) ^ set(b)) + [k for k in a.keys() & b.keys() if not torch.equal(a[k], b[k])]
    c, e = model.config, back.config
    same = (c.threshold, c.soft_input_topk, model.decider_layers, c.lora.r, c.lora.alpha) == \
        (e.threshold, e.soft_input_topk, back.decider_layers, e.lora.r, e.lora.alpha)
    if bad or not same:
        raise SystemExit(f"error: the authors' layout does not round-trip through tah/convert.py: weights {bad[:5]}, "
                         f"settings {'equal' if same else 'differ'}")

# ----------------------------------------------------------------------------- their side (other venv)


DRIVER = r'''
"""Runs the authors' v1 TaHForCasualLM_generate; JSON lines in (prompts, new_tokens), JSON lines out."""
import json, sys, time
repo, ckpt, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, repo)
import torch
torch.set_num_threads(threads)
patched = []
_load = torch.load
def _safe_load(*a, **k):  # their load_iter_decider passes weights_only=False: never unpickle code
    k["weights_only"] = True
    return _load(*a, **k)
torch.load = _safe_load
patched.append("torch.load forced to weights_only=True (their load_iter_decider asks for weights_only=False)")
import peft, transformers
from tah.model.tah_model import TaHForCausalLM
from tah.model.utils import TaHForCasualLM_generate
model = TaHForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32, attn_implementation="sdpa").eval()

class NoTokenizer:  # their generate reads eos_token_id (None: no stop, like ignore_eos) and decodes at the end
    eos_token_id = None
    def decode(self, ids):
        return ""

depths = []
def record(module, args, out):
    depths.append(out.iter_count)
hook = None
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                  "threshold": float(model.iter_decider.threshold), "patched": patched}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    ids = torch.tensor(cmd["prompts"], dtype=torch.long)
    depths.clear()
    if cmd.get("record_depths") and hook is None:
        hook = model.register_forward_hook(record)
    elif not cmd.get("record_depths") and hook is not None:
        hook.remove(); hook = None
    t0, c0 = time.perf_counter(), time.process_time()
    toks, _ = TaHForCasualLM_generate(model, NoTokenizer(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                      max_new_tokens=cmd["new_tokens"], do_sample=False, verbose=False)
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    # the depth of the position each new token was read from: the prompt's last, then each fed-back token
    d = [[int(x) for x in row] for row in torch.cat([depths[0][:, -1:]] + depths[1:], 1)[:, :cmd["new_tokens"]]] \
        if depths else None
    print(json.dumps({"tokens": toks, "seconds": sec, "cpu": cpu, "depths": d}), flush=True)
'''


class Authors:
    """Their model loaded once in the other venv; `generate` round-trips one JSON line."""

    def __init__(self, python: Path, repo: Path, ckpt: Path, threads: int, workdir: Path) -> None:
        driver = workdir / "authors_driver.py"
        driver.write_text(DRIVER)
        self.err = open(workdir / "authors_driver.stderr", "w+")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(repo), "TRANSFORMERS_OFFLINE": "1",
               "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([str(python), str(driver), str(repo), str(ckpt), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.err, text=True, env=env, cwd=workdir)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.err.seek(0)
            raise SystemExit(f"error: the authors' driver stopped:\n{self.err.read()[-4000:]}")
        return json.loads(line)

    def generate(self, prompts: list[list[int]], new_tokens: int, record_depths: bool = False) -> dict:
        self.proc.stdin.write(json.dumps({"prompts": prompts, "new_tokens": new_tokens,
                                          "record_depths": record_depths}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.err.close()

# ----------------------------------------------------------------------------- this project's side


def ours(model, thr: float, prompts: list[list[int]], new_tokens: int) -> dict:
    """A fresh engine (built inside the timing, as their generate builds its cache) on a static batch."""
    from tah.engine import Engine, EngineConfig, SamplingParams

    t0, c0 = time.perf_counter(), time.process_time()
    eng = Engine(model, EngineConfig(max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + new_tokens,
                                     depth_policy="decider", threshold=thr))
    outs = eng.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"tokens": [o.token_ids for o in outs], "seconds": sec, "cpu": cpu, "depths": [o.depths for o in outs]}


def compare(a: list[list[int]], b: list[list[int]]) -> tuple[int, int, list[int]]:
    """(elements differing, elements, per-row first differing index or -1)."""
    diff = sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) + sum(abs(len(ra) - len(rb)) for ra, rb in zip(a, b))
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), -1 if len(ra) == len(rb) else min(len(ra), len(rb)))
             for ra, rb in zip(a, b)]
    return diff, sum(max(len(ra), len(rb)) for ra, rb in zip(a, b)), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--authors-repo", type=Path, default=Path(tempfile.gettempdir()) / "tah-authors",
                    help=f"a checkout of {AUTHORS_URL} (cloned there with git if missing)")
    ap.add_argument("--venv", type=Path, default=ROOT / ".venv-authors")
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts", type=int, help="prompts run at each batch size (default: the largest batch)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (each runs both codes), median reported")
    ap.add_argument("--share", type=float, default=0.07, help="share of tokens the calibrated threshold sends deeper")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same on both sides")
    args = ap.parse_args()
    if args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1 or min(args.batches) < 1:
        raise SystemExit("error: --prompt-len, --new-tokens, --repeats and --batches must be >= 1")
    torch.set_num_threads(args.threads)
    python = ensure_venv(args.venv)
    repo = ensure_authors_repo(args.authors_repo.resolve())
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "(not a git checkout)"
    model, vocab = build(args.size), SIZES[args.size]["vocab_size"]
    # One prompt set for every batch size, run B prompts at a time (batch 1 runs each alone), so every
    # batch size decodes the same tokens and the threshold is calibrated once, on all of them.
    pool = torch.randint(3, vocab, (args.prompts or max(args.batches), args.prompt_len),
                         generator=torch.Generator().manual_seed(1000))
    if any(len(pool) % B for B in args.batches):
        raise SystemExit(f"error: every batch size must divide the number of prompts ({len(pool)})")
    thr, got = calibrate(model, pool.tolist(), args.new_tokens, args.share)  # (greedy; an fp32 value)
    model.threshold = model.config.threshold = thr
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "authors_v1"
        save_authors_v1(model, thr, ckpt)
        check_roundtrip(model, ckpt)
        theirs = Authors(python, repo, ckpt, args.threads, Path(tmp))
        try:
            info = theirs.info
            if info["threshold"] != thr:  # both fp32 values: any difference would change routing
                raise SystemExit(f"error: their decider threshold is {info['threshold']}, ours {thr}")
            print(f"# TaH engine vs the authors' v1 generate ({repo.name} @ {commit}; their venv: torch {info['torch']}, "
                  f"transformers {info['transformers']}, peft {info['peft']}), {args.size} random Qwen3 "
                  f"{SIZES[args.size]}, fp32 CPU, {args.threads} thread(s), greedy, prompt {args.prompt_len}, "
                  f"{args.new_tokens} new tokens, {len(pool)} prompts run B at a time, threshold {thr:.6g} "
                  f"(calibrated for {args.share:.0%} of generated tokens: {got:.1%}), tok/s median of {args.repeats} rounds")
            print("# patched in their code at run time: " + ("; ".join(info["patched"]) or "nothing"))
            print("| batch | TaH engine tok/s (range) | authors' generate tok/s (range) | engine ÷ authors | same, by CPU time | share depth 2 (engine / "
                  "authors) | tokens differing | depths differing |")
            print("|---|---|---|---|---|---|---|---|")
            failed = False
            for B in args.batches:
                chunks = [pool[i:i + B].tolist() for i in range(0, len(pool), B)]  # every prompt, B at a time

                def run(side, record: bool = False) -> dict:
                    res = [ours(model, thr, c, args.new_tokens) if side == "ours" else
                           theirs.generate(c, args.new_tokens, record) for c in chunks]
                    return {"tokens": [r for x in res for r in x["tokens"]], "seconds": sum(x["seconds"] for x in res),
                            "cpu": sum(x["cpu"] for x in res),
                            "depths": [r for x in res for r in x["depths"]] if res[0]["depths"] is not None else None}

                a, t = run("ours"), run("theirs", record=True)  # (also the warm-up)
                diff, n, first = compare(a["tokens"], t["tokens"])
                ddiff, _, _ = compare(a["depths"], t["depths"])
                share = [sum(d >= 2 for row in x["depths"] for d in row) / n for x in (a, t)]
                rates: dict[str, list[float]] = {"ours": [], "theirs": []}
                cpu: dict[str, list[float]] = {"ours": [], "theirs": []}  # CPU seconds: less hurt by other load
                for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
                    for side in rates:
                        r = run(side)
                        rates[side].append(len(pool) * args.new_tokens / r["seconds"])
                        cpu[side].append(r["cpu"])
                o, th = statistics.median(rates["ours"]), statistics.median(rates["theirs"])
                cpu_ratio = statistics.median(cpu["theirs"]) / statistics.median(cpu["ours"])
                span = {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in rates.items()}  # the spread shows the noise
                print(f"| {B} | {o:.0f} ({span['ours']}) | {th:.0f} ({span['theirs']}) | {o / th:.2f} | {cpu_ratio:.2f} | {share[0]:.3f} / {share[1]:.3f} | {diff} of {n} | "
                      f"{ddiff} of {n} |", flush=True)
                if diff or ddiff:
                    failed = True
                    print(f"#   batch {B}: first differing token per prompt: {first}", flush=True)
        finally:
            theirs.close()
    if failed:
        raise SystemExit("error: the greedy tokens (or depths) of the two codes differ (see above)")


if __name__ == "__main__":
    main()
