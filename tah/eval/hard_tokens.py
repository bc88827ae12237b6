"""What kind of tokens are hard: the oracle labels of a label run, read back and sorted by token kind.

A position is hard when the reference model's top-1 prediction of the next token is wrong (tah.oracle).
This reads the label shards (local or s3://) and reports, per domain, the hard ratio, and per kind of
*target* token (the one the reference failed to predict) how often it is hard and what share of all hard
tokens it makes: digits, word starts, word pieces, punctuation/symbols, whitespace/newlines, special
(template) tokens; plus the most frequent hard targets. jobs/experiment.py writes it beside the results.

    python -m tah.eval.hard_tokens runs/tiny/labels [TOKENIZER]   # prints the Markdown table
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections import Counter
from typing import Any, Callable

KINDS = ("digit", "word_start", "word_piece", "punctuation", "whitespace", "special")


def token_kind(text: str, special: bool = False) -> str:
    """The kind of a token from its decoded text (a leading space marks the start of a word)."""
    if special:
        return "special"
    if text.strip() == "":
        return "whitespace"
    core = text.strip()
    if any(ch.isdigit() for ch in core):
        return "digit"
    if all(unicodedata.category(ch)[0] in "PS" for ch in core):
        return "punctuation"
    return "word_start" if text[:1].isspace() else "word_piece"


def hard_token_report(rows: list[dict[str, Any]], decode: Callable[[int], str], special_ids: set[int],
                      top: int = 15) -> dict[str, Any]:
    """rows: label rows (input_ids, assistant_mask, ref_mismatch, domain). Counts over labelled
    positions i (tokens i and i + 1 both assistant tokens), keyed by the kind of target token i + 1."""
    from ..oracle import labelled_positions

    import torch

    per_dom: dict[str, Counter] = {}
    kinds: dict[str, Counter] = {k: Counter() for k in KINDS}
    hard_targets: Counter = Counter()
    val: Counter = Counter()  # the validation rows alone: 1 - their hard ratio is the reference's token accuracy there
    cache: dict[int, str] = {}
    for r in rows:
        ids = [int(x) for x in r["input_ids"]]
        lab = labelled_positions(torch.as_tensor(list(r["assistant_mask"]))).tolist()
        mism = [bool(x) for x in r["ref_mismatch"]]
        dom = per_dom.setdefault(str(r["domain"]), Counter())
        for i, on in enumerate(lab):
            if not on:
                continue
            t = ids[i + 1]
            if t not in cache:
                cache[t] = token_kind(decode(t), t in special_ids)
            kind = cache[t]
            kinds[kind]["labelled"] += 1
            dom["labelled"] += 1
            val["labelled"] += bool(r.get("is_validation"))
            if mism[i]:
                kinds[kind]["hard"] += 1
                dom["hard"] += 1
                val["hard"] += bool(r.get("is_validation"))
                hard_targets[t] += 1
    total_hard = sum(c["hard"] for c in per_dom.values())
    return {
        "domains": {d: {"labelled": c["labelled"], "hard": c["hard"], "hard_ratio": c["hard"] / max(c["labelled"], 1)}
                    for d, c in sorted(per_dom.items())},
        "kinds": {k: {"labelled": c["labelled"], "hard": c["hard"], "hard_ratio": c["hard"] / max(c["labelled"], 1),
                      "share_of_hard": c["hard"] / max(total_hard, 1)} for k, c in kinds.items() if c["labelled"]},
        "top_hard_targets": [{"token": decode(t), "kind": cache[t], "count": n} for t, n in hard_targets.most_common(top)],
        "samples": len(rows),
        "validation": {"labelled": val["labelled"], "hard": val["hard"],
                       "reference_token_accuracy": 1 - val["hard"] / val["labelled"] if val["labelled"] else None},
    }


def report_markdown(rep: dict[str, Any], title: str = "Hard tokens") -> str:
    lines = [f"# {title}", "", f"{rep['samples']} labelled samples; a position is hard when the reference's "
             "top-1 next-token prediction is wrong.", "", "| domain | labelled | hard | hard ratio |", "|---|---|---|---|"]
    lines += [f"| {d} | {c['labelled']} | {c['hard']} | {c['hard_ratio']:.3f} |" for d, c in rep["domains"].items()]
    lines += ["", "| target token kind | labelled | hard | hard ratio | share of hard |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {c['labelled']} | {c['hard']} | {c['hard_ratio']:.3f} | {c['share_of_hard']:.3f} |"
              for k, c in rep["kinds"].items()]
    v = rep.get("validation") or {}
    if v.get("reference_token_accuracy") is not None:
        lines += ["", f"On the validation split ({v['labelled']} positions) the reference's teacher-forced next-token "
                  f"accuracy is {v['reference_token_accuracy']:.4f} (= 1 - its hard ratio)."]
    lines += ["", "Most frequent hard targets: " + ", ".join(f"`{json.dumps(t['token'])[1:-1]}` ({t['kind']}, {t['count']})"
                                                             for t in rep["top_hard_targets"])]
    return "\n".join(lines) + "\n"


def read_label_rows(labels: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The label shards' rows (the columns the report needs), read with pyarrow (local or s3://)."""
    import pyarrow.parquet as pq

    from .. import storage
    from ..data.labeling import label_files

    files = label_files(labels)
    if not files:
        raise FileNotFoundError(f"no label shards under {labels}")
    rows: list[dict[str, Any]] = []
    for f in files:
        fs, path = storage.pyarrow_fs(f)
        table = pq.read_table(path, filesystem=fs, columns=["domain", "is_validation", "input_ids", "assistant_mask", "ref_mismatch"])
        rows += table.to_pylist()
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows


def report_for(labels: str, tokenizer_path: str, limit: int | None = None) -> dict[str, Any]:
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    return hard_token_report(read_label_rows(labels, limit), lambda t: tok.decode([t]), set(tok.all_special_ids))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit(__doc__)
    from ..assets import shipped_tokenizer

    rep = report_for(argv[0], argv[1] if len(argv) > 1 else shipped_tokenizer())
    print(report_markdown(rep, f"Hard tokens of {argv[0]}"))


if __name__ == "__main__":
    main()
