"""Oracle labels on hand-built logits; the Mixture-of-Thoughts reader; chat masks; the shipped task."""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from tah.tokenizer import MalformedSample, tokenize_chat
from tah.data.openr1 import is_validation, iter_samples, normalize_row, select_balanced, source_files
from tah.oracle import continue_labels, labelled_positions, oracle_depths, token_stats
from tah.assets import shipped_task, shipped_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path(shipped_tokenizer())


# ------------------------------------------------------------------------------------------ oracle
def test_token_stats_by_hand():
    # 4 positions, vocab 3. Targets: position i predicts input_ids[i + 1].
    input_ids = torch.tensor([0, 1, 2, 2])
    logits = torch.tensor([[0.0, 5.0, 0.0],   # predicts 1, target 1 -> right
                           [3.0, 0.0, 1.0],   # predicts 0, target 2 -> wrong
                           [0.0, 0.0, 0.0],   # uniform, argmax 0, target 2 -> wrong
                           [9.0, 0.0, 0.0]])  # last: no target
    st = token_stats(logits, input_ids, chunk=2)
    assert st["mismatch"].tolist() == [False, True, True, False]
    lse1 = math.log(math.exp(3) + 1 + math.e)
    assert st["ce"][1].item() == pytest.approx(lse1 - 1.0, abs=1e-5)
    assert st["ce"][2].item() == pytest.approx(math.log(3), abs=1e-5)
    assert st["entropy"][2].item() == pytest.approx(math.log(3), abs=1e-5)
    assert st["ce"][3].item() == 0.0
    p = torch.softmax(logits[0], -1)
    assert st["entropy"][0].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)


def test_oracle_depths_prompt_and_metrics():
    #             prompt prompt  a     a     a     a     a     a
    am = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])
    mismatch = torch.tensor([1, 1, 1, 0, 1, 0, 0, 1], dtype=torch.bool)
    ce = torch.tensor([9.0, 9.0, 2.0, 0.1, 5.0, 7.0, 0.2, 8.0])
    ent = torch.tensor([9.0, 9.0, 0.1, 3.0, 0.2, 4.0, 0.3, 9.0])
    assert labelled_positions(am).tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    d = oracle_depths(mismatch, ce, ent, am, 2)
    # prompt positions never iterate; the last position has no assistant target
    assert d.tolist() == [1, 1, 2, 1, 2, 1, 1, 1]
    # same hard count (2) chosen by entropy / by CE among labelled positions
    assert oracle_depths(mismatch, ce, ent, am, 2, "entropy").tolist() == [1, 1, 1, 2, 1, 2, 1, 1]
    assert oracle_depths(mismatch, ce, ent, am, 2, "ce").tolist() == [1, 1, 1, 1, 2, 2, 1, 1]
    assert oracle_depths(mismatch, ce, ent, am, 1).tolist() == [1] * 8
    with pytest.raises(ValueError):
        oracle_depths(mismatch, ce, ent, am, 2, "vibes")


def test_quantile_binning_for_deeper_oracles():
    am = torch.ones(8, dtype=torch.long)
    mismatch = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    ce = torch.tensor([6.0, 1.0, 5.0, 2.0, 4.0, 3.0, 9.0, 9.0])
    # 6 hard tokens, max depth 3: the lower-CE half -> 2, the higher half -> 3
    assert oracle_depths(mismatch, ce, ce, am, 3).tolist() == [3, 2, 3, 2, 3, 2, 1, 1]
    # max depth 4: three bins of two
    assert oracle_depths(mismatch, ce, ce, am, 4).tolist() == [4, 2, 4, 2, 3, 3, 1, 1]
    assert continue_labels(torch.tensor([1, 2, 3, 0]), 3).tolist() == [[0, -1], [1, 0], [1, 1], [-1, -1]]


# ------------------------------------------------------------------------------------------ reader
def _mot_fixture(root: Path) -> None:
    """A small Mixture-of-Thoughts-shaped dataset as published (Parquet per domain) with bad rows."""
    good = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": f"<think>\n{a}\n</think>\n\n{a}"}]  # noqa: E731
    rows = {
        "math": [good(f"1+{i}?", str(1 + i)) for i in range(6)]
        + [[{"role": "user", "content": "no answer"}],                                   # no_assistant
           [{"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}],    # empty_assistant
           [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}],     # bad_role
           good("1+0?", "1")],                                                              # duplicate
        "code": [good(f"def f{i}", f"return {i}") for i in range(4)]
        + [[{"role": "assistant", "content": "only"}],                                     # no_user
           [{"role": "user", "content": "bad \ufffd text"}, {"role": "assistant", "content": "a"}]],  # undecodable
        "science": [good(f"Q{i}", "B") for i in range(3)],
    }
    for domain, msgs in rows.items():
        (root / domain).mkdir(parents=True)
        table = pa.table({"messages": msgs, "num_tokens": [1] * len(msgs), "source": [domain] * len(msgs)})
        half = len(msgs) // 2
        pq.write_table(table.slice(0, half), root / domain / "train-00000-of-00002.parquet")
        pq.write_table(table.slice(half), root / domain / "train-00001-of-00002.parquet")


def test_reader_counts_malformed_rows(tmp_path):
    _mot_fixture(tmp_path)
    counts: Counter = Counter()
    samples = list(iter_samples(str(tmp_path), ["math", "code", "science"], counts=counts))
    assert Counter(s.domain for s in samples) == {"math": 6, "code": 4, "science": 3}
    assert counts == {"no_assistant": 1, "empty_assistant": 1, "bad_role": 1, "duplicate": 1, "no_user": 1,
                      "undecodable": 1}
    assert len({s.id for s in samples}) == 13
    assert samples[0].extra["source"] == "math"
    assert [Path(f).name for f in source_files(str(tmp_path), "math")] == ["train-00000-of-00002.parquet",
                                                                            "train-00001-of-00002.parquet"]
    again = list(iter_samples(str(tmp_path), ["math", "code", "science"]))
    assert [s.id for s in again] == [s.id for s in samples]  # ids are stable


def test_normalize_rejects_bad_shapes():
    assert normalize_row({}, "math") == (None, "no_messages")
    assert normalize_row({"messages": "not json"}, "math") == (None, "no_messages")
    assert normalize_row({"messages": [{"role": "user"}]}, "math") == (None, "bad_message")
    s, r = normalize_row({"messages": json.dumps([{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}])}, "math")
    assert r is None and s.messages[1]["content"] == "a"


def test_hash_split_and_balanced_sampling_are_deterministic():
    ids = [hashlib.sha1(str(i).encode()).hexdigest()[:16] for i in range(20000)]
    val = [i for i in ids if is_validation(i, 0.01)]
    assert 150 <= len(val) <= 250  # ~1%
    assert val == [i for i in reversed(ids) if is_validation(i)][::-1]  # order-independent
    by = {"a": ids[:500], "b": ids[500:1000]}
    pick = select_balanced(by, 10, seed=3)
    assert len(pick) == 20 and pick == select_balanced({"b": by["b"][::-1], "a": by["a"]}, 10, seed=3)
    assert pick != select_balanced(by, 10, seed=4)
    assert select_balanced(by, None) == set(ids[:1000])


# ------------------------------------------------------------------------------------------ chat
def test_assistant_mask_covers_exactly_the_response():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 345?"},
            {"role": "assistant", "content": "<think>\n12 + 345 = 357\n</think>\n\n\\boxed{357}"}]
    ids, mask = tokenize_chat(tok, msgs)
    assert len(ids) == len(mask)
    resp = tok.decode([i for i, m in zip(ids, mask) if m])
    assert resp == msgs[2]["content"] + "<|im_end|>"
    first = mask.index(1)
    assert all(mask[first:-1]) and mask[-1] == 0  # one contiguous span; the template's final newline is prompt
    prompt = tok.decode(ids[:first])
    assert prompt.endswith("<|im_start|>assistant\n") and "12 + 345?" in prompt
    with pytest.raises(MalformedSample) as e:
        tokenize_chat(tok, msgs, max_response_tokens=5)
    assert e.value.reason == "too_long"


def test_multi_turn_marks_every_assistant_turn():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    ids, mask = tokenize_chat(tok, msgs)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "one<|im_end|>two<|im_end|>"


# ------------------------------------------------------------------------------------------ shipped task
def test_shipped_task_regenerates_byte_identically(tmp_path):
    from tah.data.tinytask import build

    hashes = build(tmp_path / "tt")
    shipped = Path(shipped_task())
    for rel, digest in hashes.items():
        assert hashlib.sha256((shipped / rel).read_bytes()).hexdigest() == digest, rel
    assert len(hashes) == 15  # 4 domains x 3 splits + the tokenizer's 3 files


def test_shipped_task_is_checkable_and_disjoint():
    from tah.data.tinytask import DOMAINS

    root = Path(shipped_task())
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    assert len(tok) <= 4096 and tok.convert_tokens_to_ids("<think>") != tok.unk_token_id
    assert all(len(tok.tokenize(d)) == 1 for d in "0123456789")
    for domain in DOMAINS:
        splits = {s: [json.loads(l) for l in open(root / domain / f"{s}-00000-of-00001.jsonl")]
                  for s in ("train", "validation", "test")}
        qs = {s: {r["messages"][0]["content"] for r in rows} for s, rows in splits.items()}
        assert not (qs["train"] & qs["test"]) and not (qs["train"] & qs["validation"])
        for r in splits["test"][:50]:
            text = r["messages"][1]["content"]
            assert text.startswith("<think>\n") and "</think>" in text
            if domain == "code":  # the shipped solution passes the shipped tests
                scope: dict = {}
                exec(r["answer"], scope)  # noqa: S102 - our own generated code
                for t in r["tests"]:
                    exec(t, scope)  # noqa: S102
            else:
                assert f"\\boxed{{{r['answer']}}}" in text


def test_mental_answers_are_emitted_without_working():
    """The positive control is depth-bound by construction: the expression's value (computed here by
    Python's own parser) is the answer, and the response carries no digit but the answer's, so no
    written step can hold an intermediate value."""
    import ast
    import re

    rows = [json.loads(l) for l in open(Path(shipped_task()) / "mental" / "test-00000-of-00001.jsonl")]
    assert len(rows) == 200
    ops = set()
    for r in rows:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        expr = re.fullmatch(r"Compute (.+) in your head and give only the result\.", q).group(1)
        tree = ast.parse(expr, mode="eval")
        ops |= {type(n.op).__name__ for n in ast.walk(tree) if isinstance(n, ast.BinOp)}
        assert sum(isinstance(n, ast.BinOp) for n in ast.walk(tree)) == 2  # two chained operations
        assert all(0 <= n.value <= 9 for n in ast.walk(tree) if isinstance(n, ast.Constant))
        assert r["answer"] == str(eval(compile(tree, "<q>", "eval")))  # noqa: S307 - our own arithmetic
        assert re.findall(r"-?\d+", a) == [r["answer"]]
    assert ops == {"Add", "Sub", "Mult"}


def test_every_shipped_recipe_parses():
    from jobs.eval import EvalConfig
    from jobs.experiment import ExperimentConfig
    from jobs.label import LabelConfig
    from jobs.sweep import SweepConfig
    from jobs.train import TrainConfig
    from serve.tah import ServeConfig
    from tah.config import load_config

    # jobs/configs/<file>.yaml and jobs/configs/<model>/<file>.yaml are experiments (jobs/experiment.py)
    kinds = {"label": LabelConfig, "train": TrainConfig, "eval": EvalConfig, "sweep": SweepConfig}
    recipes = sorted((ROOT / "jobs/configs").rglob("*.yaml"))
    assert recipes
    for path in recipes:
        parts = path.relative_to(ROOT / "jobs/configs").parts
        cls = kinds.get(parts[0], ExperimentConfig)
        assert cls is not None, f"no config class for recipe {path}"
        # the real-model recipe takes the converted model's directory on its command line (make real-run)
        extra = ["base_model=/models/smollm2", "reference_model=/models/smollm2"] if parts[0] == "real" else []
        load_config(cls, path, extra)
    serve_recipes = sorted((ROOT / "serve/configs").glob("*.yaml"))
    assert serve_recipes
    for path in serve_recipes:
        load_config(ServeConfig, path)
