"""Pretrain the tiny Qwen3-architecture *base* model that the embedded default starts from.

    python jobs/pretrain.py                       # writes tah/assets/tiny-base (shipped; ~2 MB of safetensors)
    python jobs/pretrain.py steps=3000 hidden_size=192 output=runs/base-big

Plain next-token language modelling on the shipped task's training texts, without the chat template
(question, then the worked answer), so the base knows the domain's text but not the chat format:
Standard SFT then teaches the format and the task. One process, no Ray (seconds to minutes on CPU).
The exact command and config are recorded in `<output>/pretrain.json` beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.common import parse
from tah.assets import shipped_base_model, shipped_task, shipped_tokenizer


@dataclass
class PretrainConfig:
    source: str = field(default_factory=shipped_task)
    tokenizer: str = field(default_factory=shipped_tokenizer)
    output: str = field(default_factory=shipped_base_model)
    # 8 narrow layers (~0.9 M parameters with the embedding): deep enough that pruning one layer is an
    # eighth of the model, not a quarter, and that depth-bound tokens have layers to spend.
    hidden_size: int = 96
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 24
    intermediate_size: int = 256
    seq_len: int = 256
    batch: int = 16
    steps: int = 2400
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    threads: int = 2


def texts(source: str) -> list[str]:
    """Training texts: each sample's user message and assistant answer as plain text (no template)."""
    out = []
    for f in sorted(Path(source).glob("*/train-*.jsonl")):
        for line in f.read_text().splitlines():
            m = json.loads(line)["messages"]
            out.append(m[0]["content"] + "\n" + m[1]["content"])
    if not out:
        raise SystemExit(f"no */train-*.jsonl under {source}")
    return out


def data_sha256(source: str) -> str:
    """One digest over the training files read (sorted paths relative to `source`, then bytes), so the
    record says which data made the weights."""
    h = hashlib.sha256()
    for f in sorted(Path(source).glob("*/train-*.jsonl")):
        h.update(f.relative_to(source).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _shown(path: str) -> str:
    """A path as the record shows it: relative to the repository when inside it (the shipped assets),
    so the record does not carry one machine's directories."""
    root = Path(__file__).resolve().parents[1]
    p = Path(path).resolve()
    return p.relative_to(root).as_posix() if p.is_relative_to(root) else path


def run(cfg: PretrainConfig, argv: list[str]) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tah.tokenizer import load_tokenizer

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tok = load_tokenizer(cfg.tokenizer)
    docs = texts(cfg.source)
    random.Random(cfg.seed).shuffle(docs)
    stream: list[int] = []
    for d in docs:  # one token stream, documents separated by EOS, cut into seq_len windows
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // cfg.seq_len
    data = torch.tensor(stream[:n * cfg.seq_len]).view(n, cfg.seq_len)
    mcfg = Qwen3Config(vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=4096,
                       tie_word_embeddings=True, bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0, losses = time.time(), []
    for step in range(cfg.steps):
        batch = data[torch.randint(0, n, (cfg.batch,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            print(f"[pretrain] step {step + 1}/{cfg.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)  # safetensors
    tok.save_pretrained(out)
    from dataclasses import asdict

    shown = {**asdict(cfg), **{k: _shown(getattr(cfg, k)) for k in ("source", "tokenizer", "output")}}
    record = {"command": " ".join(["python jobs/pretrain.py", *argv]), "config": shown,
              "data_sha256": data_sha256(cfg.source),
              "parameters": sum(p.numel() for p in model.parameters()), "tokens_seen": cfg.steps * cfg.batch * cfg.seq_len,
              "final_loss": sum(losses[-50:]) / len(losses[-50:]), "seconds": round(time.time() - t0, 1),
              "torch": torch.__version__}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[pretrain] wrote {out} ({record['parameters']} parameters, final loss {record['final_loss']:.4f})")
    return record


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse(PretrainConfig, argv, __doc__.split("\n")[0])
    return run(cfg, argv)


if __name__ == "__main__":
    main()
