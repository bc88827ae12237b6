"""TaHForCausalLM: Think-at-Hard over any HF decoder-only causal LM with the Llama/Qwen layout.

Depth 1 is the plain backbone. A token that runs depth d >= 2 takes as input the softmax of the top-k
of its cumulative logits weighting those rows of the input embedding matrix (replacing the token
embedding), keeps its position id, runs the backbone with the depth-LoRA switched on, and adds the
depth's logits to the ones before (residual on logits). Depth d runs only for the tokens that run it,
packed to the left of each row, attending under the duo-causal rule (tah/attention.py) to the
per-depth K/V (tah/cache.py). Only what differs from the HF model is written here: the backbone's
own modules (embedding, rotary, layers, norm, lm_head) run unchanged.

That is v1, the default `TaHConfig`. TaH2 (`TaHConfig.tah2(max_depth=M)`) is the same loop with other
choices: depth d + 1's input is `updater(token embedding, depth d's last hidden state)` (tah/updater.py),
no LoRA, the TaH2 decider after every depth < M, and the output a log-space mixture of each depth's own
probabilities with stop-probability (or even) weights instead of summed logits.

    python -m tah.demo            # builds a tiny model, mixed depths, generation
    from tah import TaHConfig, TaHForCausalLM
    model = TaHForCausalLM.from_backbone(hf_model, TaHConfig(max_depth=2))
    out = model(input_ids, attention_mask=mask, depths=oracle_depths, labels=input_ids)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import hf_adapter as hf
from . import storage
from .attention import ATTN_IMPLEMENTATION
from .cache import PackedKV, TaHCache
from .config import TaHConfig
from .convert import resolve_checkpoint
from .decider import IterationDecider, Tah2Decider, default_decider_layers, topk_logits
from .depths import (Layout, assemble_logits, deepest_logits_at, depthwise_loss, mixture_log_weights, mixture_logits,
                     mixture_nll, next_token_targets, segment_positions, wide)
from .updater import InputUpdater

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from peft import PeftModel

TAH_CONFIG_NAME = "tah_config.json"
DECIDER_NAME = "decider.safetensors"
UPDATER_NAME = "updater.safetensors"
LORA_DIR = "lora"
STAGES = ("all", "stage1", "stage2", "standard", "frozen")


@dataclass
class TaHOutput:
    """What a TaH forward returns (HF-style attribute access)."""

    logits: torch.Tensor | None
    """(B, T, V) final logits: with combine="logit_residual" (v1) the sum of the logits of every depth
    the token ran; with a mixture (TaH2) the mixture's log-probabilities in fp32. Zeros at padding;
    None if not asked for."""
    depths: torch.Tensor
    """(B, T) long: the depth each token ran (0 for padding)."""
    decider_logits: torch.Tensor | None = None
    """(B, T, max_depth - 1): decider logit after depth d at [..., d - 1], where depths >= d."""
    loss: torch.Tensor | None = None
    """Next-token cross-entropy of the final logits (of the mixture, for TaH2), averaged once over
    the target tokens."""
    depth_states: DepthStates | None = None
    """What each depth ran (forward(return_depth_states=True), cache-less only): TaH2 training's
    lookahead labels read it (tah/train/tah2.py)."""


@dataclass
class DepthStates:
    """Per depth d (list index d - 1) of one cache-less forward, in each depth's token order."""

    flat: list[torch.Tensor]
    """(N_d,) sorted flat indices into (B*T) of the tokens that ran depth d."""
    logits: list[torch.Tensor]
    """(N_d, V) their logits at depth d: the depth's own (mixture) or cumulative (v1); with grad."""
    last_hidden: list[torch.Tensor]
    """(N_d, H) their last hidden state after the final norm, for depths d < max_depth; with grad."""
    store: PackedKV
    """Every depth's K/V (with grad) and key positions/validity/segments."""
    position_ids: torch.Tensor
    """(B, T) the position ids the forward used."""


def soft_embedding(topk_values: torch.Tensor, topk_indices: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(N, k) top cumulative logits and their token ids -> (N, H) softmax-weighted embedding rows.

    embedding_bag avoids materialising the (N, k, H) gather; gradients reach both the logits and
    the embedding matrix (the authors use no stop-gradient either).
    """
    probs = torch.softmax(topk_values.float(), dim=-1).to(weight.dtype)
    return F.embedding_bag(topk_indices, weight, per_sample_weights=probs, mode="sum")


class TaHForCausalLM(nn.Module):
    """A looped HF causal LM that runs a second (or d-th) depth only for hard tokens."""

    def __init__(self, backbone: PreTrainedModel, config: TaHConfig, lora_path: str | Path | None = None) -> None:
        super().__init__()
        hf.check_decoder_layout(backbone)
        self.config = config
        hf.set_attn_implementation(backbone, ATTN_IMPLEMENTATION)
        num_layers = backbone.config.num_hidden_layers
        peft_model: PeftModel | None = None
        if config.max_depth >= 2 and config.depth_lora:
            if lora_path is not None:
                peft_model = hf.load_lora(backbone, lora_path)
            else:
                peft_model = hf.wrap_with_lora(backbone, config.lora)  # standard init: B = 0
        # Kept unregistered: the peft wrapper holds the same backbone, and registering it would put
        # every tensor twice into state_dict (and into DeepSpeed's view of the model).
        object.__setattr__(self, "_peft", peft_model)
        self.backbone = backbone
        # Flip the flag on a cached list: walking all modules per switch costs milliseconds per step.
        self._lora_layers = hf.lora_layers(backbone)
        self.decider_layers = list(config.decider.layers or default_decider_layers(num_layers))
        if any(not 0 <= i <= num_layers for i in self.decider_layers):
            raise ValueError(f"decider.layers {self.decider_layers} outside 0..{num_layers}")
        vocab = backbone.get_input_embeddings().weight.shape[0]
        self.topk = min(config.soft_input_topk, vocab)
        self.decider: IterationDecider | Tah2Decider | None = None
        self.updater: InputUpdater | None = None
        hidden = backbone.config.hidden_size
        w = backbone.get_input_embeddings().weight
        if config.max_depth >= 2 and config.decider_kind == "v1":
            self.decider = IterationDecider(hidden, len(self.decider_layers), self.topk,
                                            config.decider).to(device=w.device, dtype=w.dtype)
        elif config.max_depth >= 2:
            self.decider_layers = []  # the TaH2 decider reads the embedding and the last hidden state
            t2 = config.tah2_decider
            self.decider = Tah2Decider(hidden, t2.intermediate_size or hidden, t2.topk or hidden,
                                       t2.rms_norm_eps).to(device=w.device, dtype=w.dtype)
        if config.max_depth >= 2 and config.input_rule == "updater":
            self.updater = InputUpdater(hidden, config.updater.intermediate_size or hidden,
                                        config.updater.rms_norm_eps).to(device=w.device, dtype=w.dtype)
        self.threshold = config.threshold
        self.attention_paths: Counter = Counter()
        self.set_trainable("all")

    # ------------------------------------------------------------------ construction / switches
    @classmethod
    def from_backbone(cls, backbone: PreTrainedModel, config: TaHConfig | None = None) -> "TaHForCausalLM":
        """Wrap a loaded HF causal LM (it is modified in place: LoRA layers injected)."""
        return cls(backbone, config or TaHConfig())

    @property
    def num_layers(self) -> int:
        return self.backbone.config.num_hidden_layers

    def _set_lora(self, active: bool) -> None:
        hf.set_lora_enabled(self._lora_layers, active)

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component: backbone (incl. embeddings, lm_head), lora, decider."""
        out: dict[str, list[nn.Parameter]] = {"backbone": [], "lora": [], "decider": []}
        for name, p in self.backbone.named_parameters():
            out["lora" if hf.is_lora_param(name) else "backbone"].append(p)
        if self.decider is not None:
            out["decider"] = list(self.decider.parameters())
        if self.updater is not None:
            out["updater"] = list(self.updater.parameters())
        return out

    def set_trainable(self, stage: str) -> None:
        """Which parameters get gradients.

        all: everything; stage1: backbone + LoRA + updater (peft freezes the backbone by default --
        undone here), decider frozen; stage2: decider only; standard: backbone only; frozen: nothing.
        """
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        on = {"all": {"backbone", "lora", "decider", "updater"}, "stage1": {"backbone", "lora", "updater"},
              "stage2": {"decider"},
              "standard": {"backbone"}, "frozen": set()}[stage]
        for comp, params in self.components().items():
            for p in params:
                p.requires_grad_(comp in on)

    def parameter_report(self) -> dict[str, dict[str, int]]:
        """{component: {"total": n, "trainable": n}} for backbone, lora, decider and all."""
        rep = {c: {"total": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}
               for c, ps in self.components().items()}
        rep["all"] = {k: sum(r[k] for r in rep.values()) for k in ("total", "trainable")}
        return rep

    def new_cache(self, batch_size: int, capacity: int = 0, chunk: int = 128) -> TaHCache:
        """An empty per-depth KV cache sized for this model."""
        num_kv_heads, head_dim = hf.kv_shape(self.backbone.config)
        w = self.backbone.get_input_embeddings().weight
        return TaHCache(self.num_layers, self.config.max_depth, batch_size, num_kv_heads, head_dim,
                        dtype=w.dtype, device=w.device, chunk=chunk, capacity=capacity,
                        depth_attention=self.config.depth_attention)

    # ------------------------------------------------------------------ forward
    def _run_depth(self, depth: int, x: torch.Tensor, q_pos: torch.Tensor, layout: Layout,
                   store: PackedKV | TaHCache, keep: set[int],
                   q_segment: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """One pass of the backbone's layers for depth `depth`'s packed tokens. x (B_d, T_d, H)."""
        self._set_lora(depth >= 2)
        extra = {} if q_segment is None else {"q_segment": q_segment}
        view = store.begin_depth(depth, layout.rows, q_pos, layout.q_valid, self.config.attn_backend,
                                 self.attention_paths, single_step=layout.T == 1, **extra)
        return self._layers(x, q_pos, view, keep)

    def _layers(self, x: torch.Tensor, q_pos: torch.Tensor, view: Any,
                keep: set[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The backbone's layers and final norm over x (B, T, H) with a cache view; returns the
        normed output and the hidden states at the `keep` indices (0 = input, L = after the norm)."""
        parts = hf.decoder_parts(self.backbone)
        pe = hf.rotary_embeddings(parts.rotary, x, q_pos)  # (cos, sin), each (B, T, head_dim)
        saved: dict[int, torch.Tensor] = {0: x} if 0 in keep else {}
        h = x
        for i, layer in enumerate(parts.layers):
            h = hf.run_layer(layer, h, view.spec, q_pos, view, pe)
            if i + 1 in keep and i + 1 < self.num_layers:
                saved[i + 1] = h
        h = parts.norm(h)
        if self.num_layers in keep:
            saved[self.num_layers] = h
        return h, saved

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                depths: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values: TaHCache | None = None,
                threshold: float | torch.Tensor | None = None, return_decider_logits: bool = True,
                return_logits: bool = True, segment_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, return_depth_states: bool = False) -> TaHOutput:
        """Run every token to its depth: `depths` (B, T) forced (oracle), or chosen by the decider.

        input_ids (B, T); attention_mask (B, T) 1 = real token (left or right padding). Position ids
        default to HF generate's convention (count of real tokens before, continuing the cache).
        With `past_key_values` the tokens are appended to the cache (chunked prefill / decode); B must
        equal its active rows. threshold: a float, or (B,) one per row.
        return_logits=False (training with labels) skips assembling the (B, T, V) final logits: the
        loss is computed per depth on each token's deepest cumulative logits instead -- the same value,
        without two more (B*T, V) copies forward and backward. `.logits` is then None.
        logits_at (B,): return only each row's logits at that index, (B, V) (serving prefill: the
        last prompt token) instead of assembling (B, T, V).
        segment_ids (B, T): several samples packed in one row (ids constant within a sample): each
        sample gets its own positions from 0, attention and loss targets never cross samples.
        return_depth_states: also return `.depth_states` (what each depth ran; cache-less only).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        D = self.config.max_depth
        if depths is not None:
            if depths.shape != (B, T):
                raise ValueError(f"depths must have shape {(B, T)}, got {tuple(depths.shape)}")
            bad = valid & ((depths < 1) | (depths > D))
            if bool(bad.any()):
                raise ValueError(f"depths of real tokens must be in 1..{D}; got {depths[bad].unique().tolist()}")
        if past_key_values is not None and B != past_key_values.active:
            raise ValueError(f"batch of {B} rows but the cache's active rows are {past_key_values.active}")
        if return_depth_states and past_key_values is not None:
            raise ValueError("return_depth_states is for cache-less forwards (training)")
        if segment_ids is not None:
            if past_key_values is not None:
                raise NotImplementedError("segment_ids (packing) is for cache-less forwards (training, scoring)")
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids must have shape {(B, T)}, got {tuple(segment_ids.shape)}")
        if position_ids is None and segment_ids is not None:
            position_ids = segment_positions(segment_ids, valid)
        elif position_ids is None:
            base = past_key_values.seen_tokens[:, None] if past_key_values is not None else 0
            position_ids = (base + valid.long().cumsum(1) - 1).clamp_min(0)
        position_ids = position_ids.expand(B, T)
        thr = self.threshold if threshold is None else threshold
        if isinstance(thr, torch.Tensor):  # (B,) one threshold per row (serving: per request)
            thr = thr.to(device=dev, dtype=torch.float32).expand(B)
        store = past_key_values if past_key_values is not None else PackedKV(self.num_layers, B,
                                                                               self.config.depth_attention)
        cfg = self.config
        mix = cfg.combine != "logit_residual"  # TaH2: each depth keeps its own logits, mixed at the end
        tah2_dec = cfg.decider_kind == "tah2"
        need_decider = self.decider is not None and (depths is None or return_decider_logits
                                                     or cfg.combine == "stop_prob_mix")
        keep = set(self.decider_layers) if need_decider else set()
        need_embeds = self.updater is not None or (need_decider and tah2_dec)
        emb = self.backbone.get_input_embeddings()
        flat_ids, flat_pos = input_ids.reshape(-1), position_ids.reshape(-1)
        flat_seg = segment_ids.reshape(-1) if segment_ids is not None else None

        flat = valid.reshape(-1).nonzero().squeeze(1)  # tokens running depth 1
        # v1 with logits_at: the deepest depth's head runs on the returned tokens only (every other token's
        # logits there feed nothing); shallower depths need theirs for the decider's top-k.
        at_flat = torch.arange(B, device=dev) * T + logits_at if logits_at is not None else None  # (B,)
        want = at_flat if not mix and labels is None and not return_depth_states else None
        last_flat = None  # the flat indices of cum_lists[-1]'s rows when the last depth ran restricted
        layouts: list[Layout] = []
        cum_lists: list[torch.Tensor] = []  # per depth: (N_d, V) cumulative (v1) or own (mixture) logits
        dec_parts: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        conts: list[torch.Tensor] = []  # per depth: which of its tokens continue deeper
        topk_vals = topk_ids = prev_cum = None  # set at the end of depth d, read by depth d + 1
        embeds = last_hidden = None  # (N_d, H) in list order: token embeddings, depth d's final hidden
        hiddens: list[torch.Tensor] = []  # per depth < D: (N_d, H), kept for return_depth_states
        for d in range(1, D + 1):
            if flat.numel() == 0:
                break
            lay = Layout(flat, B, T)
            q_pos = lay.pack(flat_pos[flat])
            if d == 1:
                x = emb(lay.pack(flat_ids[flat]))  # (B_d, T_d, H)
                if need_embeds:
                    embeds = lay.unpack(x)
            elif self.updater is not None:
                x = lay.pack(self.updater(embeds, last_hidden))
            else:
                x = lay.pack(soft_embedding(topk_vals, topk_ids, emb.weight))
            q_seg = lay.pack(flat_seg[flat]) if flat_seg is not None else None
            h, saved = self._run_depth(d, x, q_pos, lay, store, keep, q_seg)
            if d == D and want is not None:  # the head only where a returned logit needs it (serving prefill)
                sel = torch.isin(lay.flat, want).nonzero().squeeze(1)  # (n,) of this depth's tokens
                logits = hf.decoder_parts(self.backbone).lm_head(lay.unpack(h)[sel])  # (n, V)
                layouts.append(lay)
                cum_lists.append(logits if d == 1 else prev_cum[sel] + logits)
                last_flat = lay.flat[sel]
                break
            logits = lay.unpack(hf.decoder_parts(self.backbone).lm_head(h))  # (N_d, V)
            cum = logits if d == 1 or mix else prev_cum + logits
            layouts.append(lay)
            cum_lists.append(cum)
            if d == D:
                break
            if return_depth_states:
                hiddens.append(lay.unpack(h))
            if need_embeds:
                last_hidden = lay.unpack(h)
            if need_decider and tah2_dec:
                dec = self.decider(embeds, last_hidden, logits)  # (N_d,)
                dec_parts.append((flat, d, dec))
            elif need_decider:
                top = topk_logits(cum, self.topk)  # sorted values, (N_d, k)
                dec = self.decider([lay.unpack(saved[i]) for i in self.decider_layers], top.values)  # (N_d,)
                dec_parts.append((flat, d, dec))
            if depths is not None:
                cont = depths.reshape(-1)[flat] > d
            else:
                cont = self.goes_deeper(dec, thr[flat // T] if isinstance(thr, torch.Tensor) else thr)
            # Continuing tokens keep their list order, so a boolean mask carries everything over.
            conts.append(cont)
            flat = flat[cont]
            if self.updater is not None:
                embeds, last_hidden = embeds[cont], last_hidden[cont]
                continue
            if need_embeds:
                embeds = embeds[cont]
            prev_cum = cum[cont]
            if need_decider and not tah2_dec:
                topk_vals, topk_ids = top.values[cont], top.indices[cont]
            else:  # top-k only where the next depth needs it (~15% of tokens), not over all (N, V)
                topk_vals, topk_ids = topk_logits(prev_cum, self.topk)

        run_depth = torch.zeros(B * T, dtype=torch.long, device=dev)
        for d, lay in enumerate(layouts, start=1):
            run_depth[lay.flat] = d
        log_w = mixture_log_weights(cfg.combine, layouts, conts, dec_parts, run_depth, emb.weight) if mix else None
        if mix and at_flat is not None:
            logits = mixture_logits(layouts, cum_lists, conts, log_w, B * T, emb.weight)[at_flat]
        elif mix:
            logits = mixture_logits(layouts, cum_lists, conts, log_w, B * T, emb.weight).view(B, T, -1) \
                if return_logits else None
        elif at_flat is not None:
            flats = [lay.flat for lay in layouts]
            if last_flat is not None:
                flats[-1] = last_flat
            logits = deepest_logits_at(flats, cum_lists, at_flat, B * T, emb.weight)
        else:
            logits = assemble_logits(layouts, cum_lists, B * T, emb.weight).view(B, T, -1) if return_logits else None
        decider_logits = None
        if need_decider and D > 1:
            dt = torch.float32 if not dec_parts else wide(dec_parts[0][2]).dtype
            decider_logits = torch.zeros(B * T, D - 1, dtype=dt, device=dev)
            for f, d, dec in dec_parts:
                decider_logits = decider_logits.index_put((f, torch.full_like(f, d - 1)), dec.to(dt))
            decider_logits = decider_logits.view(B, T, D - 1)
        loss = None
        if labels is not None:
            target = next_token_targets(labels, valid, segment_ids).reshape(-1)
            n = (target != -100).sum().clamp_min(1)
            if mix:
                loss = mixture_nll(layouts, cum_lists, conts, log_w, target) / n
            elif logits is not None:
                loss = F.cross_entropy(logits.reshape(B * T, -1).float(), target, ignore_index=-100, reduction="sum") / n
            else:
                loss = depthwise_loss(layouts, cum_lists, conts, target) / n
        self._set_lora(False)
        states = DepthStates([lay.flat for lay in layouts], cum_lists, hiddens, store, position_ids) \
            if return_depth_states else None
        return TaHOutput(logits=logits, depths=run_depth.view(B, T), decider_logits=decider_logits, loss=loss,
                         depth_states=states)

    @staticmethod
    def goes_deeper(decider_logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
        """THE rule for "does this token run the next depth" (v1 and TaH2 alike), used by the parallel
        forward and by the serving engine's runner: sigmoid(decider logit) > threshold, in fp32.
        decider_logits (N,); threshold a float or (N,) -> (N,) bool."""
        return torch.sigmoid(decider_logits.float()) > threshold

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, depth: torch.Tensor, cache: TaHCache,
                    soft_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
                    prev_cum: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """One pass of the layers with one token per active cache row, each row at its own depth.

        input_ids (B,) the token fed at depth 1 (ignored where depth > 1); depth (B,) 1..max_depth;
        for the rows with depth > 1 (in row order): soft_topk = (values, ids) (B_deep, k) of their
        cumulative logits so far and prev_cum (B_deep, V) those logits. Returns the rows' cumulative
        logits (B, V) and, if the model has a decider, the hidden states it reads ((B, H) each).

        This is how the serving engine decodes: a row whose token continues to depth 2 runs it in the
        next step's pass together with the other rows' depth-1 tokens, so a step costs one pass of
        the weights however the rows' depths mix (tests check it against `forward`).
        """
        if self.config.input_rule != "soft_topk" or self.config.combine != "logit_residual":
            raise NotImplementedError("decode_step serves the v1 configuration (soft_topk, logit_residual); "
                                      "decode TaH2 with decode_step_mix")
        n = input_ids.shape[0]
        if n != cache.active:
            raise ValueError(f"{n} rows but the cache's active rows are {cache.active}")
        emb = self.backbone.get_input_embeddings()
        deep = depth > 1
        di = deep.nonzero().squeeze(1)  # (B_deep,)
        x = emb(input_ids)  # (B, H)
        if di.numel():
            x = x.index_copy(0, di, soft_embedding(soft_topk[0], soft_topk[1], emb.weight))
        x = x[:, None]  # (B, 1, H)
        # A deeper row re-runs the position its depth-1 pass already took.
        q_pos = (cache.lengths[:n, 0] - deep.long())[:, None]  # (B, 1)
        # Split: the depth-1 rows read the depth-1 window only, the deeper rows also their deeper keys.
        view = cache.begin_mixed(depth, q_pos[:, 0], self.attention_paths, split_deep=True)
        keep = set(self.decider_layers) if self.decider is not None else set()
        with hf.lora_on_rows(self._lora_layers, di):  # the depth-LoRA on the deeper rows only
            h, saved = self._layers(x, q_pos, view, keep)
        cum = hf.decoder_parts(self.backbone).lm_head(h)[:, 0]  # (B, V)
        if di.numel():
            cum.index_add_(0, di, prev_cum.to(cum.dtype))  # (into the fresh lm_head output: no (B, V) copy)
        hidden = [saved[i][:, 0] for i in self.decider_layers] if self.decider is not None else None
        return cum, hidden

    @torch.no_grad()
    def decode_step_mix(self, input_ids: torch.Tensor, depth: torch.Tensor, cache: TaHCache,
                        last_hidden: torch.Tensor | None = None, decide: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """TaH2's decode pass (input_rule="updater", a mixture combine): one token per active cache row,
        each row at its own depth, one pass of the weights.

        input_ids (B,) each row's current token (a row that iterates feeds the same token again: its
        embedding e_t is the updater's and the decider's input at every depth); depth (B,) 1..max_depth;
        last_hidden (B_deep, H): for the rows with depth > 1 (row order), their token's last hidden state
        of the depth before. decide (N_dec,) sorted rows after whose depth the decider runs (the others
        stop at their cap or are forced). Returns this depth's own logits z_d (B, V), its last hidden
        state after the final norm (B, H), and the decider logits (N_dec,) (None without `decide`).
        The mixture over depths is the caller's (tah/mixture.py): it needs state kept across steps.
        """
        if self.config.input_rule != "updater" or self.config.combine == "logit_residual":
            raise NotImplementedError("decode_step_mix serves the TaH2 configuration (updater input, a mixture "
                                      "combine); decode v1 with decode_step")
        n = input_ids.shape[0]
        if n != cache.active:
            raise ValueError(f"{n} rows but the cache's active rows are {cache.active}")
        deep = depth > 1
        di = deep.nonzero().squeeze(1)  # (B_deep,)
        e = self.backbone.get_input_embeddings()(input_ids)  # (B, H)
        x = e if not di.numel() else e.index_copy(0, di, self.updater(e.index_select(0, di), last_hidden))
        # A deeper row re-runs the position its depth-1 pass already took.
        q_pos = (cache.lengths[:n, 0] - deep.long())[:, None]  # (B, 1)
        view = cache.begin_mixed(depth, q_pos[:, 0], self.attention_paths, split_deep=True)
        with hf.lora_on_rows(self._lora_layers, di):  # (TaH2 has no LoRA unless depth_lora is set)
            h, _ = self._layers(x[:, None], q_pos, view, set())
        h = h[:, 0]  # (B, H)
        z = hf.decoder_parts(self.backbone).lm_head(h)  # (B, V)
        dec = None
        if decide is not None and decide.numel():
            if decide.numel() == n:  # every row (sorted, unique): no gather of the (B, V) logits
                dec = self.decider(e, h, z)
            else:
                dec = self.decider(e.index_select(0, decide), h.index_select(0, decide), z.index_select(0, decide))
        return z, h, dec

    @contextlib.contextmanager
    def depth_capped(self, max_depth: int | None) -> Iterator[None]:
        """Within the block the model runs at most `max_depth` depths: it is then exactly the model
        whose config says max_depth, with these weights (the decider does not run at the cap; a
        mixture's weight there is R_d). The serving engine prefills a request that lowered its maximum
        depth this way. Not thread-safe: the block owns the model."""
        if max_depth is None or max_depth == self.config.max_depth:
            yield
            return
        if not 1 <= max_depth <= self.config.max_depth:
            raise ValueError(f"max_depth must be in 1..{self.config.max_depth}, got {max_depth}")
        full = self.config
        self.config = dataclasses.replace(full, max_depth=max_depth)
        try:
            yield
        finally:
            self.config = full

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Reference generation (exact, not fast): see tah.generate.generate for the arguments."""
        from .generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, save_directory: str | Path, tokenizer: Any = None) -> None:
        """Write an HF-loadable backbone, the peft adapter, the decider, the updater (TaH2) and
        tah_config.json atomically.

        The directory is written under a temporary name and renamed into place, so a crash never
        leaves a half-written checkpoint where a complete one is expected. An s3:// target is written
        locally first, then uploaded with tah_config.json last (a reader checks for it first).
        """
        if storage.is_s3(save_directory):
            with tempfile.TemporaryDirectory() as tmp:
                self.save_pretrained(Path(tmp) / "ckpt", tokenizer)
                storage.publish_dir(Path(tmp) / "ckpt", str(save_directory), last=TAH_CONFIG_NAME)
            return
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            cfg = self.backbone.config
            cfg.save_pretrained(tmp)
            gen = getattr(self.backbone, "generation_config", None)
            if gen is not None:
                gen.save_pretrained(tmp)
            save_file(backbone_state_dict(self.backbone), tmp / "model.safetensors", metadata={"format": "pt"})
            if self._peft is not None:
                hf.save_lora(self._peft, tmp / LORA_DIR)
            for module, name in ((self.decider, DECIDER_NAME), (self.updater, UPDATER_NAME)):
                if module is not None:
                    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
                              tmp / name, metadata={"format": "pt"})
            decider = self.config.decider
            if self.config.decider_kind == "v1":
                decider = dataclasses.replace(decider, layers=self.decider_layers)
            dataclasses.replace(self.config, decider=decider).save_json(tmp / TAH_CONFIG_NAME)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            storage.replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, **overrides: Any) -> "TaHForCausalLM":
        """Load a directory (or s3:// prefix) written by `save_pretrained`; overrides: TaHConfig
        fields, e.g. threshold=0.8."""
        # (an s3:// prefix is checked before anything is downloaded; its published version is read)
        if storage.is_s3(path) and not storage.is_published(str(path), TAH_CONFIG_NAME):
            raise FileNotFoundError(f"{path} is not a TaH checkpoint (no {TAH_CONFIG_NAME})")
        path = Path(storage.local_copy(str(path)))
        path = Path(resolve_checkpoint(path))  # the authors' v1 checkpoints: converted once, cached
        if (path / TAH_CONFIG_NAME).is_file():
            config = TaHConfig.load_json(path / TAH_CONFIG_NAME)
        elif (path / "config.json").is_file():
            # A plain HF causal LM (e.g. tah.real_model's directory) is the Standard model: depth 1
            # for every token, no decider. Said once, so nobody mistakes it for a TaH checkpoint.
            log.info("%s has no %s: loading it as a plain HF model at max_depth 1 (Standard)", path, TAH_CONFIG_NAME)
            config = TaHConfig(max_depth=1)
        else:
            raise FileNotFoundError(f"{path} is not a TaH checkpoint (no {TAH_CONFIG_NAME}) nor an HF model "
                                    f"(no config.json)")
        for k, v in overrides.items():
            if not hasattr(config, k):
                raise ValueError(f"unknown TaHConfig field {k!r}")
            setattr(config, k, v)
        config.__post_init__()
        backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        if device is not None:
            backbone = backbone.to(device)
        wants_lora = config.max_depth >= 2 and config.depth_lora
        lora = path / LORA_DIR if wants_lora and (path / LORA_DIR).is_dir() else None
        if wants_lora and lora is None:
            raise FileNotFoundError(f"{path}: max_depth={config.max_depth} but no {LORA_DIR}/ adapter saved")
        model = cls(backbone, config, lora_path=lora)
        for module, name in ((model.decider, DECIDER_NAME), (model.updater, UPDATER_NAME)):
            if module is not None:
                if not (path / name).is_file():
                    raise FileNotFoundError(f"{path}: no {name}")
                module.load_state_dict(load_file(path / name, device=str(next(module.parameters()).device)))
        return model


def backbone_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's weights under plain HF names: peft's LoRA tensors dropped, base_layer unwrapped."""
    return hf.base_state_dict(backbone)
