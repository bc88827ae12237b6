"""The README's production path, run as its CPU/tiny equivalent: a Ray head started with `ray start
--head` (the cluster), the Qwen3-1.7B recipe submitted to it with `ray job submit --working-dir . --
python jobs/experiment.py ...`, scaled down to the shipped base and task, with every artifact on S3 (a moto
server on 127.0.0.1); then `serve run serve.tah:app model=s3://...` and a REST call against it.

Marked `slow` (about 4 min on 2 CPUs, a quarter of the default suite): `make test-slow` runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tah.assets import shipped_base_model, shipped_task, shipped_tokenizer

from .helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this venv's python, ray and serve
# What the production recipe asks of a GPU cluster, brought down to 2 CPUs and a few steps.
TINY = [f"base_model={shipped_base_model()}", f"source={shipped_task()}", f"tokenizer={shipped_tokenizer()}",
        "label.samples_per_domain=12", "label.validation_fraction=0.25", "label.num_shards=2",
        "label.shards_per_wave=2", "label.num_actors=1", "label.use_gpu=false", "label.dtype=float32",
        "train.num_workers=2", "train.use_gpu=false", "train.bf16=false", "train.max_steps=2",
        "train.global_batch=4", "train.micro_batch=2", "train.eval_every=2", "train.checkpoint_every=2",
        "train.max_length=1024", "train.model.decider.layers=null", "train.model.decider.width=32",
        "train.model.decider.blocks=1", "train.model.lora.r=4", "train.model.lora.alpha=8",
        "eval.benchmarks=[tinytask]", "eval.limit=6", "eval.max_tokens=24", "eval.max_model_len=512",
        "eval.max_num_seqs=8", "eval.batch_size=6", "eval.num_actors=1", "eval.n_samples_per_benchmark={}"]


SWEEP_TINY = ["output=s3://prod/sweeps", "lora_ranks=[4]", "prune_layers=[-1]", "max_concurrent_trials=1",
              "train.base_model=s3://prod/sft/tiny", "train.labels=s3://prod/tah/tiny/labels",
              *(o for o in TINY if o.startswith("train.")),
              "eval.benchmarks=[tinytask]", "eval.limit=3", "eval.max_tokens=16", "eval.max_model_len=512",
              "eval.batch_size=3", "eval.max_num_seqs=8", "eval.n_samples=1"]


@contextlib.contextmanager
def ray_head(env: dict[str, str], tmp_path: Path):
    """`ray start --head` on 127.0.0.1 with 2 CPUs; yields the job API address. --block ties the
    head's processes to this one, so stopping it stops exactly this cluster (not `ray stop`, which
    would stop every Ray on the machine)."""
    dash = free_port()
    # Its own temp dir (short: Ray's unix sockets live there): the head writes its address file there,
    # and a later plain `ray.init()` (serve run below) must not find this stopped cluster's address.
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    log = tmp_path / "ray-head.log"
    with open(log, "w") as out:  # a file, not a pipe nobody reads while the jobs run
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}",
                                 f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                                 "--disable-usage-stats"],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the job API answers once the dashboard is up
            assert head.poll() is None, log.read_text()[-3000:]
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=5)
                break
            except urllib.error.HTTPError:  # it answers (401: token auth, which the CLI below passes)
                break
            except OSError:
                assert time.time() < deadline, "ray start --head: no job API within 120 s"
                time.sleep(1)
        yield address
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_recipe_to_s3_then_serve_from_s3(s3_server, tmp_path):
    from tah import TaHForCausalLM, storage

    storage.s3_client().create_bucket(Bucket="prod")
    storage.upload_dir(Path(shipped_base_model()), "s3://prod/sft/tiny")  # stands in for the SFT reference
    # The head's environment is what its job inherits: the S3 endpoint, and this venv's python first.
    env = {**os.environ, **s3_server, "TAH_CACHE": str(tmp_path / "cache"), "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Ray 2.60's token auth, made explicit: the head, the CLI and the job share one token (the CLI sends
    # none unless RAY_AUTH_MODE=token, while `ray start` turns auth on when ~/.ray/auth_token exists).
    cluster_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with ray_head(cluster_env, tmp_path) as address:
        cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
               "python", "jobs/experiment.py", "--config", "jobs/configs/qwen3-1.7b/tah.yaml",
               "output=s3://prod/tah/tiny", "reference_model=s3://prod/sft/tiny", *TINY]
        proc = subprocess.run(cmd, cwd=ROOT, env=cluster_env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        assert "succeeded" in proc.stdout  # ray job submit's own verdict
        # The README's sweep, submitted the same way: the Qwen3 recipe cut to one trial on the labels
        # and base above; Tune's experiment, the trial's Train checkpoints and the results all on S3.
        sweep = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
                 "python", "jobs/sweep.py", "--config", "jobs/configs/sweep/qwen3-1.7b.yaml", *SWEEP_TINY]
        proc = subprocess.run(sweep, cwd=ROOT, env=cluster_env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    res = json.loads(storage.read_bytes("s3://prod/sweeps/qwen3-1.7b-rank-layer/results.json"))
    assert [(r["trial"], r["status"]) for r in res["rows"]] == [("r4-prune-none-lr4e-05", "done")]
    assert res["best"] == "r4-prune-none-lr4e-05"
    assert storage.exists("s3://prod/sweeps/qwen3-1.7b-rank-layer/best.yaml")
    trial = "s3://prod/sweeps/qwen3-1.7b-rank-layer/trials/r4-prune-none-lr4e-05"
    assert TaHForCausalLM.from_pretrained(f"{trial}/stage2/model").config.max_depth == 2
    # Ray Train's own run directories (its checkpoints and state) live on S3 too.
    assert any("/r4-prune-none-lr4e-05-stage1/" in f for f in storage.list_files("s3://prod/sweeps"))

    files = storage.list_files("s3://prod/tah/tiny")
    names = {f[len("s3://prod/tah/tiny/"):] for f in files}
    assert "labels/manifest.json" in names and "results.md" in names and "eval/summary.json" in names
    assert not any(n.startswith(("train/standard", "sft-data")) for n in names)  # the reference was given
    ckpt = "s3://prod/tah/tiny/train/tah/stage2/model"
    # Published versioned: the files under .versions/<version>/, the pointer LATEST written last.
    assert storage.is_published(ckpt, "tah_config.json") and "train/tah/stage2/model/LATEST" in names
    assert f"{storage.resolve(ckpt)}/tah_config.json"[len("s3://prod/tah/tiny/"):] in names
    labels = json.loads(storage.read_bytes("s3://prod/tah/tiny/labels/manifest.json"))
    assert "s3://prod/sft/tiny" in json.dumps(labels)  # labelled with the given reference
    rows = json.loads(storage.read_bytes("s3://prod/tah/tiny/results.json"))["rows"]
    assert [r["method"] for r in rows] == ["tah"]
    model = TaHForCausalLM.from_pretrained(ckpt)
    assert model.num_layers == 3  # the recipe's TaH prunes one of the base's 4 layers

    # serve run serve.tah:app model=s3://...  (the README's command), then an OpenAI-style REST call.
    port = 8000  # `serve run` without a config file serves on Serve's default port
    serve = subprocess.Popen(["serve", "run", "serve.tah:app", f"model={ckpt}",
                              f"tokenizer={shipped_tokenizer()}", "max_model_len=512"],
                             cwd=ROOT, env=env,
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
