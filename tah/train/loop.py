"""The per-worker training loop: DeepSpeed engine, accumulation, clipping, cosine schedule, validation.

Written for one worker of a data-parallel group (torch.distributed already initialised, gloo on
CPU or nccl on GPU); jobs/train.py runs it inside Ray Train and passes the Ray-specific pieces in as
`Hooks` (report metrics + a checkpoint directory, the checkpoint to resume from). Each worker gets a
fixed share of the samples from its runner, so a resumed run sees the same batches.

Stages: "standard" / "stage1" (LM loss at the given depths; backbone + LoRA train), "stage2"
(decider BCE on the frozen backbone, pos_weight counted from the data) and "joint" (TaH2: everything
trains on the mixture NLL + 0.05 x the cost-weighted BCE of the online lookahead labels, both divided by
the step's supervised-token count over all workers; tah/train/tah2.py).

    (run through jobs/train.py; tests/test_train_job.py runs it on 2 CPU workers)
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch

from ..config import check_choices
from ..model import TaHForCausalLM
from .batching import collate, sorted_windows
from .losses import Tah2Objective, decider_loss, pos_weight, stop_continue_counts

STATE_NAME = "trainer_state.json"
MODEL_DIR = "model"


@dataclass
class OptimConfig:
    """The optimizer, schedule, batching and DeepSpeed settings of a training stage (the loop's knobs)."""

    lr: float = 4e-5
    """Peak learning rate (AdamW, betas 0.9 / 0.999)."""
    stage2_lr: float = 3e-5
    """Learning rate of stage 2 (the decider alone)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at lr x min_lr_ratio."""
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    """AdamW weight decay, on every trainable parameter (the TaH2 authors exempt only nn.LayerNorm
    weights and biases, of which Qwen3 has none: its RMSNorm weights decay there too)."""
    max_grad_norm: float = 0.2
    epochs: float = 5.0
    stage2_epochs: float = 2.0
    max_steps: int | None = None
    """Stop each stage after this many optimizer steps (smoke runs)."""
    global_batch: int = 128
    """Sequences per optimizer step across all workers."""
    micro_batch: int = 4
    """Sequences per forward/backward per worker (gradient accumulation makes up the rest)."""
    max_length: int = 8192
    """Samples longer than this (tokens) are left out."""
    eval_every: int = 50
    """Optimizer steps between validation losses."""
    checkpoint_every: int = 50
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False
    """bf16 on GPU; CPU runs fp32."""
    tah2: Tah2Objective = field(default_factory=Tah2Objective)
    """The joint stage's loss and online labels (method tah2)."""

    def __post_init__(self) -> None:
        check_choices(self)
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError("optim.micro_batch and optim.global_batch must be >= 1")

    def grad_accum(self, world: int) -> int:
        """Micro-batches per optimizer step on each of `world` workers."""
        if self.global_batch % (self.micro_batch * world):
            raise ValueError(f"optim.global_batch {self.global_batch} must be a multiple of micro_batch x workers "
                             f"({self.micro_batch} x {world})")
        return self.global_batch // (self.micro_batch * world)


@dataclass
class Hooks:
    """What the loop needs from its runner."""

    report: Callable[[dict[str, float], str | None], None]
    """(metrics, directory holding this worker's checkpoint files or None); called by every worker."""
    resume_dir: str | None = None
    """A checkpoint directory from an earlier attempt of this stage, or None."""
    log_dir: str | None = None
    """Where rank 0 writes TensorBoard scalars (None: no TensorBoard)."""
    after_checkpoint: Callable[[int], None] | None = None
    """Called with the step number in every worker once that step's checkpoint is reported (tests
    crash a worker here, e.g. tah.testing.FailAfterStep, to check that a resumed run is exact)."""


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine down to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(cfg: OptimConfig, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum(world),
        "train_batch_size": cfg.micro_batch * cfg.grad_accum(world) * world,
        "gradient_clipping": cfg.max_grad_norm,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bool(cfg.bf16)},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no fused/CPU-Adam op to compile
        "steps_per_print": 10**9,
    }


def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """The 1-D tensors of every worker, concatenated in rank order (sizes may differ, zero included):
    the sizes are gathered first, then the tensors padded to the largest. Identity on one worker."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.numel()], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    if max(sizes) == 0:  # every worker knows every size: all return here together
        return x.new_zeros(0)
    padded = x.new_zeros(max(sizes))
    padded[:x.numel()] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """x summed over every worker (a new tensor; identity on one worker)."""
    dist = torch.distributed
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    out = x.clone()
    dist.all_reduce(out)
    return out


def _micro_batches(rows: list[dict[str, Any]], micro: int, seed: int, epoch: int) -> list[list[int]]:
    """This epoch's micro-batches (indices into rows): shuffled by seed + epoch, similar lengths together."""
    order = list(range(len(rows)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    batches = []
    for chunk in sorted_windows(order, [len(r["input_ids"]) for r in rows], micro * 16):
        batches += [chunk[i:i + micro] for i in range(0, len(chunk) - micro + 1, micro)]
    random.Random(seed * 1000 + epoch + 1).shuffle(batches)
    return batches


def run_stage(model: TaHForCausalLM, stage: str, method: str, train_rows: list[dict[str, Any]],
              val_rows: list[dict[str, Any]], cfg: OptimConfig, hooks: Hooks, rank: int, world: int,
              device: torch.device, total_train_rows: int, metric: str = "mismatch", seed: int = 0
              ) -> dict[str, float]:
    """Train one stage on this worker's share of the rows (of `total_train_rows` over all workers;
    the caller assigns shares); returns the last metrics. `method` (standard | always_think | tah)
    sets the depths the rows run at; `metric` is the oracle's (see tah.oracle.row_depths). Stage
    "joint" (method tah2) routes by the decider and labels online: only the tokens and assistant masks
    of the rows are read."""
    import deepspeed

    from .tah2 import JointStep

    method = "tah" if stage == "stage2" else method
    max_depth = model.config.max_depth
    accum = cfg.grad_accum(world)
    if stage == "joint" and cfg.zero_stage == 3:
        # ZeRO-3 gathers each layer's weights inside its forward call; the routing and the side pass
        # call the backbone a different number of times on each rank, so the gathers would not match.
        raise ValueError("method tah2 trains with zero_stage 0-2 (ZeRO-3's per-call gathers need the same "
                         "backbone calls on every rank)")

    def to_device(idx: list[int], rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # tah2 needs no depths (the decider routes): any method's collate gives tokens and targets
        b = collate([rows[i] for i in idx], "standard" if stage == "joint" else method, max_depth, metric)
        return {k: v.to(device) for k, v in b.items()}

    model.set_trainable({"standard": "standard", "stage1": "stage1", "stage2": "stage2", "joint": "all"}[stage])
    model.to(device)
    mine = train_rows[: total_train_rows // world]  # equal counts on every worker: collectives need them
    val_mine = val_rows
    per_epoch = len(mine) // cfg.micro_batch // accum
    if per_epoch == 0:
        raise ValueError(f"{total_train_rows} samples are too few for global_batch={cfg.global_batch}")
    epochs = cfg.stage2_epochs if stage == "stage2" else cfg.epochs
    total = max(1, int(per_epoch * epochs))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    lr = cfg.stage2_lr if stage == "stage2" else cfg.lr
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                           config=deepspeed_config(cfg, world))
    weight = None
    if stage == "stage2":  # stop/continue counts summed over every worker's rows: one value everywhere
        b = collate(mine, "tah", max_depth, metric)
        counts = stop_continue_counts(b["depths"], b["positions"], max_depth)
        torch.distributed.all_reduce(counts)
        weight = pos_weight(counts)

    step = 0
    if hooks.resume_dir is not None:
        from safetensors.torch import load_file

        engine.load_checkpoint(hooks.resume_dir, tag="ds")
        step = json.loads(open(os.path.join(hooks.resume_dir, STATE_NAME)).read())["step"]
        # Dropout draws continue exactly where the interrupted run stopped (on a GPU they come from the
        # device's generator, saved beside the CPU's).
        rng = load_file(os.path.join(hooks.resume_dir, f"rng-rank{rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
    writer, jsonl = None, None
    if hooks.log_dir and rank == 0:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(os.path.join(hooks.log_dir, stage))
        jsonl = os.path.join(hooks.log_dir, stage, "metrics.jsonl")

    # A micro-batch without hard tokens skips depth 2, so the LoRA weights get no gradient on that
    # rank; ZeRO's bucketed all-reduce then differs in size between ranks and gloo aborts. A
    # zero-weighted touch keeps every skippable weight in the graph on every rank (the joint stage
    # does the same for the updater and decider: JointStep).
    skippable = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n] if stage == "stage1" else []
    # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages over the
    # workers: scale = accum x world gives the step's sums over every worker / N.
    joint = JointStep(model, cfg.tah2, gather=all_gather_varlen, reduce=all_reduce_sum,
                      scale=accum * world) if stage == "joint" else None

    def forward(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        # model.training, not engine.training: DeepSpeedEngine.eval() / .train() set only the wrapped
        # module's mode, so the engine's own flag stays True and validation would run the training step.
        if joint is not None and model.training:
            return joint.micro(engine, b), {}
        if joint is not None:  # validation: the mixture's NLL under the decider's routing
            out = engine(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         return_decider_logits=False, return_logits=False)
            return out.loss, {}
        if stage == "stage2":
            out = engine(b["input_ids"], attention_mask=b["attention_mask"], depths=b["depths"], return_logits=False)
            return decider_loss(out.decider_logits, b["depths"], b["positions"], weight)
        out = engine(b["input_ids"], attention_mask=b["attention_mask"], depths=b["depths"], labels=b["labels"],
                     return_decider_logits=False, return_logits=False)
        if skippable and not bool((b["depths"] > 1).any()):
            return out.loss + 0.0 * sum(p.reshape(-1)[0] for p in skippable), {}
        return out.loss, {}

    def validate() -> float:
        engine.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(val_mine), cfg.micro_batch):
                loss, _ = forward(to_device(list(range(i, min(i + cfg.micro_batch, len(val_mine)))), val_mine))
                tot += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        torch.distributed.all_reduce(tot)
        engine.train()
        return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")

    metrics: dict[str, float] = {}
    engine.train()
    t0, tokens, hard, seen = time.time(), 0, 0, 0
    while step < total:
        epoch, in_epoch = divmod(step, per_epoch)
        batches = _micro_batches(mine, cfg.micro_batch, seed, epoch)[in_epoch * accum:]
        todo = batches[: (per_epoch - in_epoch) * accum]
        for m, idx in enumerate(todo):
            if joint is not None and m % accum == 0:  # N of the step, over every worker (one all_reduce)
                group = [to_device(ix, mine) for ix in todo[m:m + accum]]
                joint.begin(group)
            b = group[m % accum] if joint is not None else to_device(idx, mine)
            loss, extra = forward(b)
            engine.backward(loss)
            engine.step()
            tokens += int(b["attention_mask"].sum())
            seen += int(b["positions"].sum())
            hard += int(((b["depths"] > 1) & b["positions"]).sum())
            if (m + 1) % accum:
                continue
            step += 1
            metrics = {"stage": {"standard": 0, "stage1": 1, "stage2": 2, "joint": 3}[stage], "step": step,
                       "loss": float(loss), "lr": sched.get_last_lr()[0],
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "tokens_per_s": tokens / max(time.time() - t0, 1e-9), "share_depth2": hard / max(seen, 1),
                       **{f"decider_{k}": v for k, v in extra.items()}}
            if joint is not None:  # the step's loss over every worker, shares, tau, pos_weight, BCE
                metrics.update(joint.metrics())
            last = step == total
            checkpoint = step % cfg.checkpoint_every == 0 or last
            if step % cfg.eval_every == 0 or checkpoint:  # every checkpoint carries its val loss
                metrics["val_loss"] = validate()
            if rank == 0 and "val_loss" in metrics:
                print(f"[{stage}] step {step}/{total} loss {metrics['loss']:.4f} val {metrics['val_loss']:.4f} "
                      f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s", flush=True)
            if writer is not None:
                for k, v in metrics.items():
                    writer.add_scalar(f"{stage}/{k}", v, step)
                with open(jsonl, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
            if checkpoint:
                from safetensors.torch import save_file

                with tempfile.TemporaryDirectory() as tmp:
                    engine.save_checkpoint(tmp, tag="ds")  # collective: every rank writes its shard
                    rng = {"cpu": torch.get_rng_state()}
                    if device.type == "cuda":
                        rng["cuda"] = torch.cuda.get_rng_state(device)
                    save_file(rng, os.path.join(tmp, f"rng-rank{rank}.safetensors"))
                    if rank == 0:
                        with open(os.path.join(tmp, STATE_NAME), "w") as f:
                            json.dump({"step": step, "stage": stage}, f)
                        model.save_pretrained(os.path.join(tmp, MODEL_DIR))
                    hooks.report(metrics, tmp)
                if hooks.after_checkpoint is not None:
                    hooks.after_checkpoint(step)
            elif "val_loss" in metrics:
                # Only with validation: a report is a barrier across workers (Ray Train v2), which
                # would cost more than a tiny model's step; every step still goes to TensorBoard.
                hooks.report(metrics, None)
            if last:
                break
    if writer is not None:
        writer.close()
    return metrics
