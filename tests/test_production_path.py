"""The README's production path, run as its CPU/tiny equivalent: the Qwen3-1.7B recipe scaled down to the
shipped base and task, with every artifact on S3 (a moto server on 127.0.0.1), submitted as the same
command line; then `serve run serve.tah:app model=s3://...` and a REST call against it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the production recipe asks of a GPU cluster, brought down to 2 CPUs and a few steps.
TINY = ["base_model=models/tiny-base", "source=data/tinytask", "tokenizer=data/tinytask/tokenizer",
        "label.samples_per_domain=12", "label.validation_fraction=0.25", "label.num_shards=2",
        "label.shards_per_wave=2", "label.num_actors=1", "label.use_gpu=false", "label.dtype=float32",
        "train.num_workers=2", "train.use_gpu=false", "train.bf16=false", "train.max_steps=2",
        "train.global_batch=4", "train.micro_batch=2", "train.eval_every=2", "train.checkpoint_every=2",
        "train.max_length=1024", "train.model.decider.layers=null", "train.model.decider.width=32",
        "train.model.decider.blocks=1", "train.model.lora.r=4", "train.model.lora.alpha=8",
        "eval.benchmarks=[tinytask]", "eval.limit=6", "eval.max_tokens=24", "eval.max_model_len=512",
        "eval.max_num_seqs=8", "eval.batch_size=6", "eval.num_actors=1", "eval.n_samples_per_benchmark={}"]


def test_recipe_to_s3_then_serve_from_s3(s3_server, tmp_path):
    from tah import TaHForCausalLM, storage

    storage.s3_client().create_bucket(Bucket="prod")
    storage.upload_dir(ROOT / "models/tiny-base", "s3://prod/sft/tiny")  # stands in for the SFT reference
    env = {**os.environ, **s3_server, "TAH_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "jobs/train.py", "--config", "jobs/configs/qwen3-1.7b/tah.yaml",
           "output=s3://prod/tah/tiny", "reference_model=s3://prod/sft/tiny", *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    files = storage.list_files("s3://prod/tah/tiny")
    names = {f[len("s3://prod/tah/tiny/"):] for f in files}
    assert "labels/manifest.json" in names and "results.md" in names and "eval/summary.json" in names
    assert not any(n.startswith(("train/standard", "sft-data")) for n in names)  # the reference was given
    ckpt = "s3://prod/tah/tiny/train/tah/stage2/model"
    assert storage.exists(storage.join(ckpt, "tah_config.json"))
    labels = json.loads(storage.read_bytes("s3://prod/tah/tiny/labels/manifest.json"))
    assert "s3://prod/sft/tiny" in json.dumps(labels)  # labelled with the given reference
    rows = json.loads(storage.read_bytes("s3://prod/tah/tiny/results.json"))["rows"]
    assert [r["method"] for r in rows] == ["tah"]
    model = TaHForCausalLM.from_pretrained(ckpt)
    assert model.num_layers == 3  # the recipe's TaH prunes one of the base's 4 layers

    # serve run serve.tah:app model=s3://...  (the README's command), then an OpenAI-style REST call.
    port = 8000  # `serve run` without a config file serves on Serve's default port
    serve = subprocess.Popen(["serve", "run", "serve.tah:app", f"model={ckpt}",
                              "tokenizer=data/tinytask/tokenizer", "max_model_len=512"],
                             cwd=ROOT, env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        body = json.dumps({"model": "tah", "messages": [{"role": "user", "content": "What is 3 + 4?"}],
                           "max_tokens": 16}).encode()
        deadline, reply = time.time() + 240, None
        while time.time() < deadline and reply is None:
            assert serve.poll() is None, serve.stdout.read()[-3000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                             headers={"content-type": "application/json"})
                reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
            except OSError:
                time.sleep(2)
        assert reply is not None, "serve run did not answer within 240 s"
        assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] > 0
        assert isinstance(reply["choices"][0]["message"]["content"], str)
    finally:
        os.killpg(serve.pid, signal.SIGTERM)  # serve run ignores SIGINT when started in the background
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
