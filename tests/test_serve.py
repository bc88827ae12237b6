"""The Ray Serve endpoint over real HTTP on 127.0.0.1, driven by the official `openai` client."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.data.labeling import load_tokenizer
from tah.engine import Engine, EngineConfig, SamplingParams
from tah.testing import randomize_lora, tiny_qwen3

from .conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data/tinytask/tokenizer")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray
    from ray import serve

    from jobs.common import init_ray
    from serve.tah import ServeConfig, deployment

    tok = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=len(tok)), TaHConfig(max_depth=2, threshold=0.5))
    randomize_lora(model)
    ckpt = tmp_path_factory.mktemp("serve") / "model"
    model.save_pretrained(ckpt, tokenizer=tok)
    init_ray(num_cpus=2)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model=str(ckpt), max_num_seqs=4, max_model_len=4096, max_ongoing_requests=16,
                      max_queued_requests=32)
    serve.run(deployment(cfg), name="tah", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "ckpt": str(ckpt), "cfg": cfg, "tok": tok}
    serve.shutdown()
    ray.shutdown()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _engine_reference(server, prompt_ids: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    model = TaHForCausalLM.from_pretrained(server["ckpt"])
    tok = server["tok"]
    eng = Engine(model, EngineConfig(max_num_seqs=1, max_model_len=4096), eos_token_ids=[tok.eos_token_id])
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)
    return eng.generate([prompt_ids], sp)[0].token_ids


def _metric(server, name: str, default: float | None = None) -> float:
    text = urllib.request.urlopen(server["url"] + "/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is not None:
        return default
    raise AssertionError(f"{name} not in /metrics")


def test_completions_chat_stream_models(server):
    client = _client(server)
    tok = server["tok"]
    assert [m.id for m in client.models.list().data] == ["tah"]
    prompt = "Compute 12 + 30."
    res = client.completions.create(model="tah", prompt=prompt, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ref = _engine_reference(server, ids, 12, ignore_eos=True)
    assert res.choices[0].text == tok.decode(ref, skip_special_tokens=True)
    assert res.usage.completion_tokens == 12 and res.usage.prompt_tokens == len(ids)
    usage = res.usage.model_dump()
    assert "iterated_tokens" in usage and 0 <= usage["iterated_tokens"] <= 12

    # Streaming gives the same text as the non-streamed call (greedy), ending with [DONE].
    chunks = list(client.completions.create(model="tah", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    # Chat: the template is applied; streamed == not streamed; usage in the last chunk when asked.
    msgs = [{"role": "user", "content": "What is 7 * 6?"}]
    chat = client.chat.completions.create(model="tah", messages=msgs, max_tokens=10, temperature=0, seed=1)
    templ = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    templ = list(templ["input_ids"] if hasattr(templ, "keys") else templ)
    assert chat.usage.prompt_tokens == len(templ)
    assert chat.choices[0].message.role == "assistant"
    stream = list(client.chat.completions.create(model="tah", messages=msgs, max_tokens=10, temperature=0, seed=1,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_greedy_tokens_equal_the_engine(server):
    """Token ids in (a list-of-ids prompt), the same ids out as the engine run locally."""
    client = _client(server)
    ids = [5, 17, 33, 60, 71]
    res = client.completions.create(model="tah", prompt=ids, max_tokens=10, temperature=0, logprobs=0)
    ref = _engine_reference(server, ids, 10)
    assert res.choices[0].text == server["tok"].decode(ref, skip_special_tokens=True)
    assert len(res.choices[0].logprobs.token_logprobs) == len(ref)


def test_sampling_knobs_seed_and_stop(server):
    client = _client(server)
    kw = dict(model="tah", prompt="Solve: 3 + 4 =", max_tokens=16, temperature=0.9, seed=7,
              extra_body={"top_k": 50, "min_p": 0.05, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text  # seeded: reproducible
    text = a.choices[0].text
    if len(text) > 3:
        stop = text[2:4]
        c = client.completions.create(**kw, stop=[stop])
        assert c.choices[0].text == text[:text.index(stop)] and c.choices[0].finish_reason == "stop"
    n3 = client.completions.create(**{**kw, "n": 3})
    assert [ch.index for ch in n3.choices] == [0, 1, 2]


def _post(server, path: str, body: bytes | str, content_type: str = "application/json") -> tuple[int, dict]:
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(server["url"] + path, data=data, headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, {"raw": raw.decode(errors="replace")}


MALFORMED = [
    "", "{", "not json", "[]", "null", "42", '"prompt"', "{'model': 'tah'}", '{"model": "tah"',
    '{"prompt": "hi"}', '{"model": "tah"}', '{"model": "nope", "prompt": "hi"}', '{"model": 1, "prompt": "hi"}',
    '{"model": "tah", "prompt": 5}', '{"model": "tah", "prompt": null}', '{"model": "tah", "prompt": {"a": 1}}',
    '{"model": "tah", "prompt": ["a", "b"]}', '{"model": "tah", "prompt": [1, "x"]}', '{"model": "tah", "prompt": ""}',
    '{"model": "tah", "prompt": [-1, 3]}', '{"model": "tah", "prompt": [999999]}', '{"model": "tah", "prompt": []}',
    '{"model": "tah", "prompt": "hi", "max_tokens": -1}', '{"model": "tah", "prompt": "hi", "max_tokens": 0}',
    '{"model": "tah", "prompt": "hi", "max_tokens": 100000000}', '{"model": "tah", "prompt": "hi", "max_tokens": "10"}',
    '{"model": "tah", "prompt": "hi", "max_tokens": 1.5}', '{"model": "tah", "prompt": "hi", "temperature": -1}',
    '{"model": "tah", "prompt": "hi", "temperature": "hot"}', '{"model": "tah", "prompt": "hi", "temperature": 9}',
    '{"model": "tah", "prompt": "hi", "top_p": 0}', '{"model": "tah", "prompt": "hi", "top_p": 1.5}',
    '{"model": "tah", "prompt": "hi", "top_k": -3}', '{"model": "tah", "prompt": "hi", "min_p": 2}',
    '{"model": "tah", "prompt": "hi", "threshold": 1.5}', '{"model": "tah", "prompt": "hi", "n": 0}',
    '{"model": "tah", "prompt": "hi", "n": 100}', '{"model": "tah", "prompt": "hi", "stream": "yes"}',
    '{"model": "tah", "prompt": "hi", "stream": true, "n": 2}', '{"model": "tah", "prompt": "hi", "logprobs": 50}',
    '{"model": "tah", "prompt": "hi", "stop": 5}', '{"model": "tah", "prompt": "hi", "stop": ["a","b","c","d","e"]}',
    '{"model": "tah", "prompt": "hi", "stop": [""]}', '{"model": "tah", "prompt": "hi", "echo": true}',
    '{"model": "tah", "prompt": "hi", "frequency_penalty": 1.0}', '{"model": "tah", "prompt": "hi", "bogus": 1}',
    '{"model": "tah", "prompt": "hi", "seed": "x"}', '{"model": "tah", "prompt": "' + "word " * 5000 + '"}',
    '{"model": "tah", "prompt": "hi", "stop_token_ids": "x"}',
]
MALFORMED_CHAT = [
    '{"model": "tah"}', '{"model": "tah", "messages": []}', '{"model": "tah", "messages": "hi"}',
    '{"model": "tah", "messages": [{"role": "wizard", "content": "hi"}]}', '{"model": "tah", "messages": [{"content": "hi"}]}',
    '{"model": "tah", "messages": [{"role": "user"}]}', '{"model": "tah", "messages": [{"role": "user", "content": 3}]}',
    '{"model": "tah", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99}',
    '{"model": "tah", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}',
    '{"model": "x", "messages": [{"role": "user", "content": "hi"}]}',
]


def test_malformed_requests_are_4xx_and_the_server_survives(server):
    bad = [("/v1/completions", b) for b in MALFORMED] + [("/v1/chat/completions", b) for b in MALFORMED_CHAT]
    bad += [("/v1/nothing", "{}"), ("/v1/completions", b"\xff\xfe")]
    assert len(bad) >= 50
    for path, body in bad:
        status, resp = _post(server, path, body)
        assert 400 <= status < 500, (path, body[:80], status, resp)
        assert "error" in resp and resp["error"]["message"], (path, body[:80], resp)
    status, resp = _post(server, "/v1/completions", '{"model": "tah", "prompt": "' + "word " * 5000 + '"}')
    assert "maximum context length is 4096 tokens" in resp["error"]["message"]
    assert _post(server, "/v1/completions", '{"model": "nope", "prompt": "hi"}')[0] == 404
    client = _client(server)
    ok = client.completions.create(model="tah", prompt="still alive?", max_tokens=4)
    assert ok.usage.completion_tokens >= 1
    assert urllib.request.urlopen(server["url"] + "/health", timeout=10).status == 200


def test_client_disconnect_frees_the_slot(server):
    """A stream asked for 4000 tokens (many seconds here) is dropped after a few chunks: the engine
    stops it at once and the slot is free again."""
    import http.client

    aborted = _metric(server, 'tah_requests_total{finish_reason="abort"}', default=0.0)
    generated = _metric(server, "tah_generation_tokens_total")
    conn = http.client.HTTPConnection("127.0.0.1", int(server["url"].rsplit(":", 1)[1]), timeout=30)
    body = json.dumps({"model": "tah", "prompt": "Tell me everything.", "max_tokens": 4000, "stream": True,
                       "ignore_eos": True})
    conn.request("POST", "/v1/completions", body=body, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read(200)  # a few chunks arrived: the generation is running
    assert _metric(server, "tah_num_requests_running") == 1
    conn.sock.close()
    conn.close()
    deadline = time.time() + 20
    while time.time() < deadline and _metric(server, "tah_num_requests_running") > 0:
        time.sleep(0.1)
    assert _metric(server, "tah_num_requests_running") == 0
    assert _metric(server, "tah_num_requests_waiting") == 0
    assert _metric(server, 'tah_requests_total{finish_reason="abort"}') == aborted + 1
    assert _metric(server, "tah_generation_tokens_total") - generated < 4000
    text = urllib.request.urlopen(server["url"] + "/metrics", timeout=10).read().decode()
    for name in ("tah_time_to_first_token_seconds", "tah_inter_token_latency_seconds", "tah_e2e_request_latency_seconds",
                 "tah_prompt_tokens_total", "tah_generation_tokens_total", "tah_iterated_token_share"):
        assert name in text


def test_threshold_is_reconfigured_live(server):
    """user_config changes the decider threshold without a restart: 1.0 never iterates, 0.0 always does."""
    from dataclasses import replace

    from ray import serve

    from serve.tah import deployment

    client = _client(server)
    kw = dict(model="tah", prompt="Think about 5 * 9.", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    for thr, expect in ((1.0, 0), (0.0, 12)):
        serve.run(deployment(replace(server["cfg"], threshold=thr)), name="tah", route_prefix="/")
        assert client.completions.create(**kw).usage.model_dump()["iterated_tokens"] == expect
    serve.run(deployment(server["cfg"]), name="tah", route_prefix="/")


def test_app_builder_parses_arguments(server, tmp_path):
    from serve.tah import app

    built = app({"model": server["ckpt"], "max_replicas": "3", "threshold": "0.8"})
    assert built is not None
    with pytest.raises(SystemExit, match="no TaH checkpoint"):
        app({"model": str(tmp_path / "missing")})
    with pytest.raises(Exception, match="max_num_seqs"):
        app({"model": server["ckpt"], "max_num_seqs": "many"})
