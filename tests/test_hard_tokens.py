"""tah.eval.hard_tokens on hand-built label rows: counts per domain and per target-token kind."""

from __future__ import annotations

import pytest

from tah.eval.hard_tokens import hard_token_report, report_markdown, token_kind

VOCAB = {0: "<s>", 1: " The", 2: "re", 3: "7", 4: ".", 5: "\n", 6: " 12"}


def test_token_kinds():
    assert [token_kind(VOCAB[i]) for i in (1, 2, 3, 4, 5, 6)] == [
        "word_start", "word_piece", "digit", "punctuation", "whitespace", "digit"]
    assert token_kind("<s>", special=True) == "special"


def test_report_counts_by_hand():
    # Row a: tokens 0..5; assistant from position 1; labelled positions i with i, i+1 assistant: 1..4
    # (targets 2, 3, 4, 5 = word_piece, digit, punctuation, whitespace); hard at 2 and 3 (targets 3, 4).
    a = {"domain": "math", "input_ids": [0, 1, 2, 3, 4, 5], "assistant_mask": [0, 1, 1, 1, 1, 1],
         "ref_mismatch": [1, 0, 1, 1, 0, 0]}  # position 0 is not labelled: its flag is ignored
    # Row b: labelled positions 0..2 (targets 6, 3, 0); hard at 0 (target 6) and 2 (target 0, special).
    b = {"domain": "code", "input_ids": [1, 6, 3, 0], "assistant_mask": [1, 1, 1, 1], "ref_mismatch": [1, 0, 1, 0],
         "is_validation": True}
    rep = hard_token_report([a, b], VOCAB.__getitem__, special_ids={0})
    assert rep["domains"] == {"code": {"labelled": 3, "hard": 2, "hard_ratio": 2 / 3},
                              "math": {"labelled": 4, "hard": 2, "hard_ratio": 0.5}}
    k = rep["kinds"]
    assert (k["digit"]["labelled"], k["digit"]["hard"]) == (3, 2)  # targets 3 (a), 6 (b, hard), 3 (b)
    assert (k["punctuation"]["labelled"], k["punctuation"]["hard"]) == (1, 1)
    assert (k["special"]["labelled"], k["special"]["hard"]) == (1, 1)
    assert k["word_piece"]["hard"] == 0 and k["whitespace"]["hard"] == 0 and "word_start" not in k
    assert abs(sum(c["share_of_hard"] for c in k.values()) - 1) < 1e-12
    assert {t["token"] for t in rep["top_hard_targets"]} == {"7", ".", " 12", "<s>"}
    assert rep["validation"] == {"labelled": 3, "hard": 2, "reference_token_accuracy": pytest.approx(1 / 3)}
    assert "| math | 4 | 2 | 0.500 |" in report_markdown(rep)
