"""`serve run serve.tah:app` started as a user starts it (no RAY_ADDRESS, no loopback setting in the
environment): every socket of the Ray it starts listens on 127.0.0.1 only, the API key from
$TAH_API_KEY is required and appears in no output or Ray log.

    .venv/bin/python -m pytest -q tests/test_serve_local.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tah import TaHConfig, TaHForCausalLM
from tah.assets import shipped_tokenizer
from tah.testing import tiny_qwen3
from tah.tokenizer import load_tokenizer

from .helpers import VENV_BIN, port_free

ROOT = Path(__file__).resolve().parents[1]
PORT = 8000  # `serve run` with an import path serves on Serve's default port
KEY = "local-test-key-5f1c"


def _call(path: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of `pid` and its descendants."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    out = set()
    for p in procs:
        try:
            out |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def test_serve_run_stays_on_loopback_and_wants_the_key(tmp_path):
    if not port_free(PORT):
        pytest.skip(f"port {PORT} is taken (another `serve run`?)")
    tok = load_tokenizer(shipped_tokenizer())
    torch.manual_seed(0)
    ckpt = tmp_path / "model"
    TaHForCausalLM.from_backbone(tiny_qwen3(vocab_size=len(tok)), TaHConfig(max_depth=2)).save_pretrained(
        ckpt, tokenizer=tok)
    # Its own Ray directory: a cluster another process started with `ray start` is not joined, and
    # the logs searched below are this Ray's only. (Short: Ray's socket paths have a length limit.)
    ray_tmp = tempfile.mkdtemp(prefix="tahray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=ray_tmp, TAH_API_KEY=KEY, PATH=f"{VENV_BIN}:{env['PATH']}")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(["serve", "run", "serve.tah:app", f"model={ckpt}", "max_model_len=256"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, status = time.time() + 240, None
        while time.time() < deadline and status is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                status = _call("/health")[0]
            except OSError:
                time.sleep(1)
            except ValueError:
                # The proxy is up before the app's route: Ray answers 404 with a plain-text body.
                time.sleep(1)
        assert status == 200, log.read_text()[-3000:]

        listening = _listening(proc.pid)
        assert (("127.0.0.1", PORT)) in listening
        assert listening and all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for ip, _ in listening), listening

        body = {"model": "tah", "prompt": "1+1=", "max_tokens": 3}
        status, resp = _call("/v1/completions", body)
        assert status == 401 and resp["error"]["code"] == "invalid_api_key"
        assert _call("/v1/completions", body, key="wrong")[0] == 401
        status, resp = _call("/v1/completions", body, key=KEY)
        assert status == 200 and resp["usage"]["completion_tokens"] >= 1
        status, resp = _call("/v1/models", key=KEY)
        assert status == 200 and str(ckpt) not in json.dumps(resp)
    finally:
        import psutil

        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGTERM)  # serve run ignores SIGINT when started in the background
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in psutil.wait_procs(tree, timeout=30)[1]:  # Ray's processes, still writing their logs
            p.kill()
    try:
        assert KEY not in log.read_text()
        for path in Path(ray_tmp).rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50 * 2**20:
                assert KEY.encode() not in path.read_bytes(), path
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
