"""EleutherAI's lm-evaluation-harness against the endpoint, as a user runs it (`local-completions`,
the server's own tokenizer through /tokenize): one generation task and one multiple-choice task from
local files, each sample's result equal to the one computed directly from the engine.

lm-eval lives in a virtualenv of its own (its pins are not the project's): `make test-lm-eval` builds
`.venv-lmeval` and runs this file; without it (LM_EVAL unset and no .venv-lmeval) the test skips.

    make test-lm-eval
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.assets import shipped_tokenizer
from tah.engine import Engine, EngineConfig, SamplingParams
from tah.testing import randomize_lora, tiny_qwen3
from tah.tokenizer import load_tokenizer

from .helpers import free_port

pytestmark = pytest.mark.lm_eval
ROOT = Path(__file__).resolve().parents[1]
KEY = "lm-eval-key-0123456789"
GEN_DOCS = [{"question": f"Question: what is {a} + {b}?\nAnswer:", "answer": str(a + b)}
            for a, b in [(2, 3), (7, 5), (12, 30), (9, 9), (40, 2), (1, 1)]]
MC_DOCS = [{"question": f"Question: which is {w}?\nAnswer:", "choices": ["red", "green", "blue"], "label": i % 3}
           for i, w in enumerate(["the sky", "grass", "a cherry", "the sea", "a leaf", "blood"])]
MAX_GEN = 12


def _lm_eval() -> str:
    exe = os.environ.get("LM_EVAL") or str(ROOT / ".venv-lmeval" / "bin" / "lm_eval")
    if not Path(exe).is_file():
        pytest.skip("lm-eval is not installed: run `make test-lm-eval` (it builds .venv-lmeval)")
    return exe


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from jobs.common import init_ray
    from serve.tah import ServeConfig, deployment

    tok = load_tokenizer(shipped_tokenizer())
    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=len(tok)), TaHConfig(max_depth=2, threshold=0.5))
    randomize_lora(model)
    ckpt = tmp_path_factory.mktemp("lmeval") / "model"
    model.save_pretrained(ckpt, tokenizer=tok)
    init_ray(num_cpus=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model=str(ckpt), engine=EngineConfig(max_num_seqs=4, max_model_len=1024), api_key=KEY)
    serve.run(deployment(cfg), name="tah", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "ckpt": str(ckpt), "tok": tok}
    serve.shutdown()
    ray.shutdown()


def _tasks(root: Path) -> Path:
    """The two task files (lm-eval's YAML task format) over local JSON-lines data."""
    root.mkdir(parents=True, exist_ok=True)
    for name, docs in (("gen", GEN_DOCS), ("mc", MC_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
    (root / "tah_gen.yaml").write_text(
        f"task: tah_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
        f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (root / "tah_mc.yaml").write_text(
        f"task: tah_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n")
    return root


def _samples(out: Path, task: str) -> list[dict]:
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert files, f"lm-eval wrote no samples for {task} under {out}"
    return sorted((json.loads(x) for x in files[-1].read_text().splitlines()), key=lambda s: s["doc_id"])


def test_lm_eval_generation_and_multiple_choice_equal_the_engine(server, tmp_path):
    exe = _lm_eval()
    tasks, out = _tasks(tmp_path / "tasks"), tmp_path / "out"
    base = f"{server['url']}/v1/completions"
    args = [exe, "--model", "local-completions", "--model_args",
            f"model=tah,base_url={base},tokenizer_backend=remote,tokenized_requests=True,num_concurrent=1,"
            f"max_retries=1,auth_token={KEY}",
            "--tasks", "tah_gen,tah_mc", "--include_path", str(tasks), "--output_path", str(out), "--log_samples",
            "--batch_size", "1"]
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]

    tok = server["tok"]
    model = TaHForCausalLM.from_pretrained(server["ckpt"])
    eng = Engine(model, EngineConfig(max_num_seqs=4, max_model_len=1024), eos_token_ids=[tok.eos_token_id])
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # what the server's /tokenize returns

    # generation: greedy from the engine, cut at the task's stop string (and the eos text lm-eval adds)
    for s, doc in zip(_samples(out, "tah_gen"), GEN_DOCS):
        ids = enc(doc["question"])
        ref = eng.generate([ids], SamplingParams(max_tokens=MAX_GEN, temperature=0))[0].token_ids
        text = tok.decode(ref, skip_special_tokens=True)
        for stop in ("\n", tok.eos_token):
            text = text.split(stop)[0]
        assert s["resps"][0][0] == text

    # multiple choice: each choice's log-likelihood = the engine's prompt logprobs of its tokens
    accs = []
    for s, doc in zip(_samples(out, "tah_mc"), MC_DOCS):
        ctx = enc(doc["question"])
        lls = []
        for choice in doc["choices"]:
            whole = enc(doc["question"] + " " + choice)  # lm-eval's target delimiter is " "
            plp = eng.generate([whole], SamplingParams(max_tokens=1, temperature=0,
                                                       prompt_logprobs=1))[0].prompt_logprobs
            lls.append(sum(e[0] for e in plp[len(ctx):]))
        got = [float(r[0][0]) for r in s["resps"]]  # (logged as text)
        assert got == pytest.approx(lls, abs=1e-4)
        accs.append(float(max(range(3), key=lambda i: lls[i]) == doc["label"]))
        assert s["acc"] == accs[-1]
    results = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())["results"]
    assert results["tah_mc"]["acc,none"] == pytest.approx(sum(accs) / len(accs))
