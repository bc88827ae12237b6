"""The Ray Serve endpoint over real HTTP on 127.0.0.1, driven by the official `openai` client: the
API, malformed and hostile requests (each a 4xx in OpenAI's shape, none disturbing the streams that
run meanwhile), disconnects, live reconfiguration. The server wants an API key and caps the depth a
request may buy (min_request_threshold) and its body size.

    .venv/bin/python -m pytest -q tests/test_serve.py
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.assets import shipped_tokenizer
from tah.engine import Engine, EngineConfig, SamplingParams
from tah.testing import randomize_lora, tiny_qwen3
from tah.tokenizer import load_tokenizer

from .helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = shipped_tokenizer()
KEY = "test-key-0123456789"
MAX_BODY = 2**20
MIN_THRESHOLD = 0.3


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
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = ServeConfig(model=str(ckpt), engine=EngineConfig(max_num_seqs=4, max_model_len=4096), max_ongoing_requests=16,
                      max_queued_requests=32, api_key=KEY, min_request_threshold=MIN_THRESHOLD,
                      max_request_bytes=MAX_BODY)
    serve.run(deployment(cfg), name="tah", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "ckpt": str(ckpt), "cfg": cfg, "tok": tok}
    serve.shutdown()
    ray.shutdown()


def _client(server):
    from openai import OpenAI

    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


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
    # tokens per depth (M = 2): completion tokens by the depth that produced them, the prompt's likewise
    assert usage["depth_counts"] == [12 - usage["iterated_tokens"], usage["iterated_tokens"]]
    assert len(usage["prompt_depth_counts"]) == 2 and sum(usage["prompt_depth_counts"]) == len(ids)
    capped = client.completions.create(model="tah", prompt=prompt, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True, "max_depth": 1, "threshold": 0.3})
    assert capped.usage.model_dump()["depth_counts"] == [12, 0]
    assert capped.usage.model_dump()["prompt_depth_counts"] == [len(ids), 0]

    # Streaming gives the same text as the non-streamed call (greedy), ending with [DONE].
    chunks = list(client.completions.create(model="tah", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    # with logprobs, each chunk's text_offset counts the text streamed before it (as vLLM's does)
    chunks = list(client.completions.create(model="tah", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            logprobs=0, extra_body={"ignore_eos": True}))
    offsets = [c.choices[0].logprobs.text_offset[0] for c in chunks]
    assert offsets == [sum(len(c.choices[0].text) for c in chunks[:k]) for k in range(len(chunks))]
    assert offsets[-1] > 0

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
    assert stream[-1].usage.model_dump()["depth_counts"] == chat.usage.model_dump()["depth_counts"]
    assert sum(chat.usage.model_dump()["depth_counts"]) == chat.usage.completion_tokens


def test_greedy_tokens_equal_the_engine(server):
    """Token ids in (a list-of-ids prompt), the same ids out as the engine run locally."""
    client = _client(server)
    ids = [5, 17, 33, 60, 71]
    res = client.completions.create(model="tah", prompt=ids, max_tokens=10, temperature=0, logprobs=0)
    ref = _engine_reference(server, ids, 10)
    assert res.choices[0].text == server["tok"].decode(ref, skip_special_tokens=True)
    assert len(res.choices[0].logprobs.token_logprobs) == len(ref)


def _post_json(server, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server["url"] + path, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_echo_scoring_prompt_lists_and_tokenizer_endpoints(server):
    """What lm-eval's loglikelihood needs: echo + logprobs returns each prompt token's log-probability
    (the first null), equal to the engine's own scoring of the prompt; max_tokens 0 scores only; a list
    of prompts gives each its choices (index = prompt x n + sample), each equal to that prompt alone;
    /tokenize, /detokenize and /tokenizer_info as vLLM names them."""
    client = _client(server)
    tok = server["tok"]
    texts = ["Compute 12 + 30.", "The answer is 42"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    res = client.completions.create(model="tah", prompt=texts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in res.choices] == [0, 1] and [c.text for c in res.choices] == texts
    assert res.usage.completion_tokens == 0 and res.usage.prompt_tokens == sum(map(len, ids))
    model = TaHForCausalLM.from_pretrained(server["ckpt"])
    eng = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=4096), eos_token_ids=[tok.eos_token_id])
    for c, p in zip(res.choices, ids):
        ref = eng.generate([p], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0].prompt_logprobs
        lp = c.logprobs
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(p)
        assert lp.token_logprobs[1:] == pytest.approx([e[0] for e in ref[1:]], abs=1e-5)
        assert [len(t) for t in lp.top_logprobs[1:]] == [1] * (len(p) - 1)
    # n = 2: the prompt is scored once, and both its choices echo that scoring
    two = client.completions.create(model="tah", prompt=texts, max_tokens=0, echo=True, logprobs=1, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    for c, one in zip(two.choices, [res.choices[0], res.choices[0], res.choices[1], res.choices[1]]):
        assert c.text == one.text and c.logprobs.token_logprobs == one.logprobs.token_logprobs
    # echo with generation: prompt then completion, in text and in logprobs
    gen = client.completions.create(model="tah", prompt=ids[0], max_tokens=5, echo=True, logprobs=0, temperature=0,
                                    extra_body={"ignore_eos": True})
    alone = client.completions.create(model="tah", prompt=ids[0], max_tokens=5, logprobs=0, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert gen.choices[0].text == tok.decode(ids[0]) + alone.choices[0].text
    assert len(gen.choices[0].logprobs.token_logprobs) == len(ids[0]) + 5
    assert gen.choices[0].logprobs.token_logprobs[len(ids[0]):] == pytest.approx(
        alone.choices[0].logprobs.token_logprobs, abs=1e-6)
    # a batch of token-id prompts with n = 2 and a seed: each prompt's choices equal it sent alone
    kw = dict(model="tah", max_tokens=6, temperature=0.8, seed=3, n=2, extra_body={"ignore_eos": True})
    both = client.completions.create(prompt=ids, **kw)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    for j, p in enumerate(ids):
        one = client.completions.create(prompt=p, **kw)
        assert [c.text for c in both.choices[2 * j:2 * j + 2]] == [c.text for c in one.choices]
    # the tokenizer endpoints
    status, body = _post_json(server, "/tokenize", {"prompt": texts[0], "add_special_tokens": False})
    assert status == 200 and body["tokens"] == ids[0] and body["count"] == len(ids[0])
    status, body = _post_json(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    templ = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    assert status == 200 and body["tokens"] == list(templ["input_ids"] if hasattr(templ, "keys") else templ)
    assert _post_json(server, "/detokenize", {"tokens": ids[1]}) == (200, {"prompt": tok.decode(ids[1])})
    info = json.loads(urllib.request.urlopen(urllib.request.Request(
        server["url"] + "/tokenizer_info", headers={"authorization": f"Bearer {KEY}"}), timeout=10).read())
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template
    # refused: scoring without echo, echo with stream, a vocabulary-external id, both prompt and messages
    assert _post_json(server, "/v1/completions", {"model": "tah", "prompt": "x", "max_tokens": 0})[0] == 400
    assert _post_json(server, "/v1/completions", {"model": "tah", "prompt": "x", "echo": True, "stream": True})[0] == 400
    assert _post_json(server, "/detokenize", {"tokens": [10**9]})[0] == 400
    assert _post_json(server, "/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]})[0] == 400
    assert _post_json(server, "/v1/completions", {"model": "tah", "prompt": [[1, 2]] * 65})[0] == 400


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


def _post(server, path: str, body: bytes | str, content_type: str = "application/json",
          auth: str | None = f"Bearer {KEY}") -> tuple[int, dict]:
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    headers = {"content-type": content_type} | ({"authorization": auth} if auth else {})
    req = urllib.request.Request(server["url"] + path, data=data, headers=headers)
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
    '{"model": "tah", "prompt": []}', '{"model": "tah", "prompt": [[]]}', '{"model": "tah", "prompt": [1, "x"]}', '{"model": "tah", "prompt": ""}',
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
    '{"model": "tah", "prompt": "hi", "stop": [""]}', '{"model": "tah", "prompt": "hi", "echo": 1}', '{"model": "tah", "prompt": "hi", "max_tokens": 0}',
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
    conn.request("POST", "/v1/completions", body=body,
                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
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
                 "tah_prompt_tokens_total", "tah_generation_tokens_total", "tah_iterated_token_share",
                 'tah_generation_tokens_by_depth_total{depth="1"}', 'tah_prompt_tokens_by_depth_total{depth="1"}',
                 "tah_kv_cache_usage_perc", "tah_prefix_cache_queries", "tah_prefix_cache_hits", "tah_num_preemptions",
                 "tah_deep_reserve_share", 'tah_engine_tokens_by_depth{depth="1"}', 'tah_kv_cache_blocks{state="split"}',
                 'tah_kv_cache_deep_blocks{state="used"}', 'tah_kv_cache_deep_blocks{state="free"}'):
        assert name in text


def test_threshold_is_reconfigured_live(server):
    """user_config changes the decider threshold without a restart: 1.0 never iterates, 0.0 always does."""
    from dataclasses import replace

    from ray import serve

    from serve.tah import deployment

    client = _client(server)
    kw = dict(model="tah", prompt="Think about 5 * 9.", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    for thr, expect in ((1.0, 0), (0.0, 12)):
        cfg = replace(server["cfg"], engine=replace(server["cfg"].engine, threshold=thr))
        serve.run(deployment(cfg), name="tah", route_prefix="/")
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


def _body(**fields) -> str:
    return json.dumps({"model": "tah", "prompt": "hi", "max_tokens": 4, **fields})


def _chat(messages: list[dict], **fields) -> str:
    return json.dumps({"model": "tah", "messages": messages, "max_tokens": 4, **fields})


HI = [{"role": "user", "content": "hi"}]
C, CH = "/v1/completions", "/v1/chat/completions"
# (path, body, status, auth): each field's bound, bodies no parser should choke on, the size cap, keys.
HOSTILE = [
    (C, _body(top_k=2**64), 400, None), (C, _body(top_k=10**6), 400, None), (C, _body(seed=2**70), 400, None),
    (C, _body(seed=-(2**63) - 1), 400, None), (C, _body(stop_token_ids=[-1]), 400, None),
    (C, _body(stop_token_ids=[10**12]), 400, None), (C, _body(stop_token_ids=list(range(1000))), 400, None),
    (C, _body(stop=["x"] * 1000), 400, None), (C, _body(stop="x" * 10_000), 400, None),
    (C, _body(user="u" * 100_000), 400, None), (C, _body(model="m" * 10_000), 400, None),
    (C, _body(max_tokens=2**64), 400, None), (C, _body(logprobs=10**6), 400, None),
    (C, _body(threshold=MIN_THRESHOLD / 3), 400, None), (C, _body(threshold=0.0), 400, None),
    (C, _body(prompt="a" * 200_000), 400, None), (C, _body(prompt=[5] * 5000), 400, None),
    (CH, _chat([{"role": "user", "content": ""}] * 10_000), 400, None),
    (CH, _chat([{"role": "user", "content": "hi", "name": "n" * 10_000}]), 400, None),
    (CH, _chat(HI, threshold=0.01), 400, None), (C, _body(max_depth=3), 400, None),
    (C, _body(max_depth=0), 400, None), (CH, _chat(HI, max_depth=2**64), 400, None),
    (C, "[" * 100_000, 400, None), (C, "{" * 100_000, 400, None),
    (C, '{"model": "tah", "prompt": "hi", "x": ' + "[" * 50 + "]" * 50 + "}", 400, None),
    (C, '{"model": "tah", "prompt": "\\ud800"}', 400, None), (C, '{"model": "tah", "prompt": "a\\udfffb"}', 400, None),
    (CH, '{"model": "tah", "messages": [{"role": "user", "content": "\\udc00"}]}', 400, None),
    (C, b'{"model": "tah", "prompt": "\xed\xa0\x80"}', 400, None),  # a surrogate, UTF-8 encoded
    (C, b'{"model": "tah", "prompt": "\xc3\x28"}', 400, None),  # invalid UTF-8
    (C, '{"model": "tah", "prompt": "hi", "temperature": NaN}', 400, None),
    (C, '{"model": "tah", "prompt": "hi", "top_p": Infinity}', 400, None),
    (C, '{"model": "tah", "prompt": "hi", "seed": ' + "9" * 5000 + "}", 400, None),
    (C, "[1, 2]", 400, None), (C, '"just a string"', 400, None),
    (C, _body(prompt="a" * (MAX_BODY + 10)), 413, None),
    (C, _body(), 401, ""), (C, _body(), 401, "Bearer wrong-key"), (C, _body(), 401, f"Basic {KEY}"),
    (C, _body(), 401, f"Bearer {KEY}x"), (CH, _chat(HI), 401, ""),
]


def _send_hostile(server) -> None:
    for path, body, want, auth in HOSTILE:
        status, resp = _post(server, path, body, auth=f"Bearer {KEY}" if auth is None else auth)
        assert status == want, (path, str(body)[:100], status, resp)
        err = resp.get("error")
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and err["message"], resp
        assert len(json.dumps(resp)) < 2000  # nothing of the hostile input is echoed back at length


def test_hostile_requests_are_4xx_in_openai_shape(server):
    assert len(HOSTILE) >= 35
    _send_hostile(server)
    # The same cap without a Content-Length: counted while the chunked body streams in.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(server["url"].rsplit(":", 1)[1]), timeout=60)
    chunks = (b"x" * 65536 for _ in range(MAX_BODY // 65536 + 2))
    conn.request("POST", C, body=chunks, encode_chunked=True,
                 headers={"content-type": "application/json", "authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()
    # What is allowed next to those bounds is served.
    ok = _post(server, C, _body(threshold=MIN_THRESHOLD, top_k=len(server["tok"]), seed=2**63 - 1,
                                stop_token_ids=[3, 4], stop=["zz"] * 4))
    assert ok[0] == 200, ok


def test_keys_health_and_models(server):
    assert urllib.request.urlopen(server["url"] + "/health", timeout=10).status == 200  # no key needed
    assert urllib.request.urlopen(server["url"] + "/metrics", timeout=10).status == 200
    try:
        urllib.request.urlopen(server["url"] + "/v1/models", timeout=10)
        raise AssertionError("/v1/models answered without a key")
    except urllib.error.HTTPError as e:
        assert e.code == 401 and json.loads(e.read())["error"]["code"] == "invalid_api_key"
    req = urllib.request.Request(server["url"] + "/v1/models", headers={"authorization": f"Bearer {KEY}"})
    models = urllib.request.urlopen(req, timeout=10).read().decode()
    assert '"tah"' in models and server["ckpt"] not in models and "/" not in json.loads(models)["data"][0]["id"]
    assert "root" not in json.loads(models)["data"][0]


def test_hostile_requests_do_not_disturb_running_streams(server):
    """Greedy streams are started; for as long as they run, the hostile requests are sent over and over
    (another thread), plus a stream that a stop string ends early and one whose client goes away.
    The streams finish with exactly the text each gets alone, and the server serves on with no slot
    left taken."""
    import threading

    client = _client(server)
    prompts = ["Count: 1 2 3", "Compute (12 + 30) * 2.", "What is 7 * 6?"]
    kw = dict(model="tah", max_tokens=150, temperature=0, extra_body={"ignore_eos": True})

    def run(prompt: str, started: threading.Event | None = None) -> tuple[str, str]:
        text, reason = [], None
        for c in client.completions.create(prompt=prompt, stream=True, **kw):
            if started is not None:
                started.set()
            text.append(c.choices[0].text)
            reason = c.choices[0].finish_reason or reason
        return "".join(text), reason

    alone = [run(p) for p in prompts]
    assert all(r == "length" for _, r in alone)
    results: dict[int, tuple[str, str]] = {}
    started = [threading.Event() for _ in prompts]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(prompts[i], started[i])))
               for i in range(len(prompts))]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    passes, errors = [], []

    def hostile() -> None:
        try:
            while not passes or any(t.is_alive() for t in threads):
                _send_hostile(server)
                passes.append(any(t.is_alive() for t in threads))  # whether streams ran throughout
        except BaseException as e:  # noqa: BLE001 - reported by the test's thread below
            errors.append(e)

    attacker = threading.Thread(target=hostile)
    attacker.start()
    stop_at = alone[1][0][5:8]
    cut = client.completions.create(prompt=prompts[1], stop=[stop_at], **kw)
    assert cut.choices[0].text == alone[1][0][:alone[1][0].index(stop_at)] and cut.choices[0].finish_reason == "stop"
    with client.completions.create(prompt=prompts[0], stream=True, **kw) as dropped:
        next(iter(dropped))  # one chunk, then the client leaves
    for t in threads + [attacker]:
        t.join(120)
    assert not errors, errors[0]
    assert passes[0], "the streams ended before the first round of hostile requests did"
    assert [results[i] for i in range(len(prompts))] == alone
    assert run(prompts[2]) == alone[2]
    deadline = time.time() + 20
    while time.time() < deadline and _metric(server, "tah_num_requests_running") > 0:
        time.sleep(0.1)
    assert _metric(server, "tah_num_requests_running") == 0 and _metric(server, "tah_num_requests_waiting") == 0
