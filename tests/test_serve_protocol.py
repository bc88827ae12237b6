"""The endpoint's protocol and edge pieces without Ray: incremental detokenization (same text as one
decode, linear work), stop strings across pieces, API keys, the loopback setting.

    .venv/bin/python -m pytest -q tests/test_serve_protocol.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from serve.protocol import APIError, Detokenizer, StopMatcher
from serve.security import api_key_digest, check_api_key
from tah.assets import shipped_tokenizer
from tah.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = shipped_tokenizer()
TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 😀🎉 mixed ascii", "Ελληνικά και русский", "naïve café 12+30=42",
         "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√ ½", "a\u0301 combining", "tabs\tand\nnewlines"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TOKENIZER)


class CountingTokenizer:
    """Counts the tokens each decode call is given."""

    def __init__(self, tok) -> None:
        self.tok, self.lengths = tok, []

    def decode(self, ids, **kw):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, **kw)


def _stream(tok, ids: list[int]) -> str:
    d = Detokenizer(tok)
    return "".join(d.add(t, final=i == len(ids) - 1) for i, t in enumerate(ids))


def _random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Pieces of multi-byte text (characters split across byte tokens), random vocabulary ids
    (invalid UTF-8, special tokens) and runs of raw high bytes, mixed."""
    byte_ids = [i for i in range(len(tok)) if len(tok.convert_ids_to_tokens(i)) == 1]
    ids: list[int] = []
    while len(ids) < n:
        kind = rng.random()
        if kind < 0.5:
            text = rng.choice(TEXTS)
            a = rng.randrange(len(text))
            ids += tok(text[a:a + rng.randint(1, 12)], add_special_tokens=False)["input_ids"]
        elif kind < 0.8:
            ids += [rng.randrange(len(tok)) for _ in range(rng.randint(1, 5))]
        else:
            ids += [rng.choice(byte_ids) for _ in range(rng.randint(1, 25))]
    return ids[:n]


def test_incremental_detokenization_equals_one_decode(tok):
    rng = random.Random(0)
    for trial in range(400):
        ids = _random_ids(tok, rng, rng.randint(1, 80))
        assert _stream(tok, ids) == tok.decode(ids, skip_special_tokens=True), (trial, ids)
    for text in TEXTS:  # every character of these is split across byte tokens somewhere
        ids = tok(text * 3, add_special_tokens=False)["input_ids"]
        assert _stream(tok, ids) == text * 3


def test_streamed_text_never_shows_a_half_character(tok):
    """Before the final flush, no piece ends in U+FFFD where the whole text has none."""
    text = "".join(TEXTS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in ids]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == text


@pytest.mark.parametrize("kind", ["text", "invalid bytes"])
def test_incremental_detokenization_is_linear(tok, kind):
    """The tokens handed to decode grow linearly with the output (the old detokenizer re-decoded the
    whole prefix: n^2 / 2 tokens), also for a stream of bytes that never form a character."""
    per_token = []
    for n in (500, 2000):
        if kind == "text":
            ids = (tok("".join(TEXTS), add_special_tokens=False)["input_ids"] * n)[:n]
        else:
            lone = next(i for i in range(len(tok)) if tok.decode([i, i]) == "\ufffd\ufffd")
            ids = [lone] * n  # a byte that is no character on its own, n times
        counting = CountingTokenizer(tok)
        d = Detokenizer(counting)
        for i, t in enumerate(ids):
            d.add(t, final=i == n - 1)
        assert d.text == tok.decode(ids, skip_special_tokens=True)
        per_token.append(sum(counting.lengths) / n)
        assert max(counting.lengths) <= 2 * Detokenizer.MAX_HELD + 2
    assert per_token[1] <= per_token[0] * 1.1 + 1, per_token  # constant per token, not growing with n
    assert per_token[1] < (64 if kind == "text" else 200)


def _first_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference: feed one character at a time, stop at the first stop string completed."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(len(s) for s in done)], True
    return text, False


def test_stop_strings_across_pieces():
    rng = random.Random(1)
    for _ in range(500):
        text = "".join(rng.choice("abcé😀 ") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abcé😀 ") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
        m, out, hit, i = StopMatcher(stops), [], False, 0
        while i < len(text) and not hit:
            j = min(len(text), i + rng.randint(0, 6))
            piece, hit = m.feed(text[i:j], final=j == len(text))
            out.append(piece)
            i = j
        if not hit:
            out.append(m.feed("", final=True)[0])
        assert ("".join(out), hit) == _first_stop(text, stops), (text, stops)


def test_api_key_check():
    digest = api_key_digest("s3cret-key")
    check_api_key("Bearer s3cret-key", digest)
    check_api_key("bearer   s3cret-key ", digest)
    check_api_key(None, None)  # no key set: open
    for header in (None, "", "Bearer", "Bearer ", "Basic s3cret-key", "Bearer s3cret-kez", "Bearer s3cret-key2",
                   "s3cret-key", "Bearer \udcff"):
        with pytest.raises(APIError) as e:
            check_api_key(header, digest)
        assert e.value.status == 401 and e.value.body()["error"]["code"] == "invalid_api_key"
        assert "s3cret" not in e.value.message


def test_api_key_from_env_and_never_in_the_deployment(monkeypatch, tmp_path):
    from ray import cloudpickle

    from serve.tah import ServeConfig, deployment

    monkeypatch.delenv("TAH_API_KEY", raising=False)
    assert api_key_digest(None) is None
    monkeypatch.setenv("TAH_API_KEY", "from-env-key")
    assert api_key_digest(None) == api_key_digest("from-env-key") != api_key_digest("other")
    assert api_key_digest("config-key") == api_key_digest("config-key") != api_key_digest(None)

    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "tah_config.json").write_text("{}")
    cfg = ServeConfig(model=str(ckpt), api_key="config-key-123")
    assert "config-key-123" not in repr(cfg)
    app = deployment(cfg)
    blob = cloudpickle.dumps(app)  # what Serve ships to the controller and the replicas
    assert b"config-key-123" not in blob and b"from-env-key" not in blob
    assert api_key_digest("config-key-123").encode() in blob  # the replicas get the digest


def test_serve_module_keeps_a_local_ray_on_loopback():
    """`serve run` imports Ray before the app: importing serve.tah then still makes the Ray it starts
    take 127.0.0.1 as its node address (Ray's default here: the external interface)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    code = ("import ray\nfrom ray._private import services\nbefore = services.get_node_ip_address()\n"
            "import serve.tah\nprint(before, services.get_node_ip_address())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.split()[-2:]
    assert after == "127.0.0.1", out.stdout
    env["RAY_ADDRESS"] = "127.0.0.1:1"  # joining a cluster: left alone
    code = code.replace("import serve.tah", "from serve.security import keep_local_ray_on_loopback as k; k()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == out.stdout.split()[-2]


def test_max_depth_is_validated_and_passed_to_the_engine():
    """max_depth: an integer in 1..the served model's M, else a 400 naming the field; it reaches the
    request's SamplingParams."""
    import json

    from serve.protocol import ChatRequest, CompletionRequest, Limits, parse

    limits = Limits(vocab_size=512, max_model_len=64, max_depth=4)

    def body(**kw) -> bytes:
        return json.dumps({"model": "tah", "prompt": "hi", **kw}).encode()

    req = parse(CompletionRequest, body(max_depth=2), limits)
    assert req.sampling(None, 0).max_depth == 2
    assert parse(CompletionRequest, body(), limits).sampling(None, 0).max_depth is None
    assert parse(CompletionRequest, body(max_depth=4), limits).max_depth == 4
    for bad, says in ((5, "maximum depth 4"), (0, "greater than or equal to 1"), (1.5, "integer"),
                      ("2", "integer"), (True, "integer")):
        with pytest.raises(APIError) as e:
            parse(CompletionRequest, body(max_depth=bad), limits)
        assert e.value.status == 400 and e.value.param == "max_depth" and says in e.value.message
    chat = json.dumps({"model": "tah", "messages": [{"role": "user", "content": "x"}], "max_depth": 9}).encode()
    with pytest.raises(APIError, match="maximum depth 4"):
        parse(ChatRequest, chat, limits)


def test_usage_depth_counts():
    from serve.protocol import depth_list, usage

    u = usage(5, 7, 3, depth_list({1: 4, 2: 2, 4: 1}, 4), depth_list({1: 5}, 4))
    assert u == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12, "iterated_tokens": 3,
                 "depth_counts": [4, 2, 0, 1], "prompt_depth_counts": [5, 0, 0, 0]}
    assert "depth_counts" not in usage(1, 1, 0)
    with pytest.raises(ValueError, match="outside 1..2"):
        depth_list({3: 1}, 2)
