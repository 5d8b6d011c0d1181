"""Checkpoints on S3 (``output.storage_path=s3://...``): train, export, resume, CLI export.

A real S3 API (moto's server, in this process, on a free loopback port) stands in for the
cloud. Ray Train's controller and workers reach it through the storage URI alone: pyarrow
reads the endpoint from its query and the (fake) keys from its user info, so nothing has to be
in the environment of the shared test Ray, which was started before this module ran.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from bloomray.cli import main as cli_main
from bloomray.config import load_config
from bloomray.export.run import run_training
from bloomray.train.resume import latest_checkpoint_meta
from bloomray.train.run import checkpoint_location, resume_config

pytestmark = pytest.mark.integration

BUCKET = "bloomray-test"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
S3_RUN = [
    "model.preset=tiny",
    "data.tokenizer.vocab_size=1024",
    "data.block_size=64",
    "train.max_steps=4",
    "train.log_every=2",
    "train.eval_every=4",
    "train.eval_max_batches=2",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=2",
    "output.tensorboard=false",
    "output.export=false",  # the first run's summary reads only bloomray.json from S3
]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """``host:port`` of a moto S3 server holding an empty :data:`BUCKET`.

    The driver's own S3 clients (boto3, pyarrow for the CLI export) get the fake keys from
    the environment; the instance-metadata lookup is off so nothing leaves the loopback.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {**KEYS, "AWS_EC2_METADATA_DISABLED": "true"}.items():
                mp.setenv(k, v)
            _s3(f"{host}:{port}").create_bucket(Bucket=BUCKET)
            yield f"{host}:{port}"
    finally:
        server.stop()


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1", **_boto_keys())


def _boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
    }


def _checkpoint_steps(endpoint: str, prefix: str) -> dict[str, int]:
    """{checkpoint dir name: step in its bloomray.json} of the objects under ``prefix`` in the bucket."""
    s3 = _s3(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    metas = [k for k in keys if k.endswith("/bloomray.json")]
    return {
        k.split("/")[-2]: json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())["step"]
        for k in metas
    }


def _download_dirs() -> set[str]:
    """Ray's temp dirs for checkpoint downloads (Checkpoint.as_directory of a remote one)."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("checkpoint_tmp_*")}


@pytest.fixture(scope="module")
def s3_run(s3_endpoint: str, tmp_path_factory, ray_local) -> dict[str, Any]:
    """A 4-step run whose checkpoints live in the bucket, then its resume to 6 steps and export."""
    query = f"endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    storage = f"s3://testing:testing@{BUCKET}/runs?{query}"
    out = (tmp_path_factory.mktemp("s3") / "run").resolve()
    cfg = load_config("tiny-cpu", [*S3_RUN, f"output.storage_path={storage}"])
    downloads_before = _download_dirs()
    first = run_training(cfg, out)
    name = checkpoint_location(cfg, out)[1]
    after_first = _checkpoint_steps(s3_endpoint, f"runs/{name}/")
    meta_before_resume = latest_checkpoint_meta(storage, name)
    exported_before_resume = (out / "model").exists()
    resumed = run_training(resume_config(out, ["train.max_steps=6", "output.export=true"]), out, resume=True)
    return {
        "out": out,
        "query": query,
        "name": name,
        "first": first,
        "resumed": resumed,
        "after_first": after_first,
        "after_resume": _checkpoint_steps(s3_endpoint, f"runs/{name}/"),
        "meta_before_resume": meta_before_resume,
        "exported_before_resume": exported_before_resume,
        "card": (out / "model" / "README.md").read_text(),
        "new_download_dirs": _download_dirs() - downloads_before,
    }


def test_checkpoints_are_in_the_bucket_not_on_local_disk(s3_run):
    assert sorted(s3_run["after_first"].values()) == [2, 4]  # keep_checkpoints=2
    assert sorted(s3_run["after_resume"].values()) == [4, 6]  # the oldest one deleted on S3 too
    assert not (s3_run["out"] / "checkpoints").exists()
    first, resumed = s3_run["first"], s3_run["resumed"]
    for summary, steps in ((first, s3_run["after_first"]), (resumed, s3_run["after_resume"])):
        name = next(k for k, v in steps.items() if v == summary["steps"])
        # The URI names bucket, key and endpoint (what `bloomray export` needs), never the keys.
        assert summary["checkpoint"] == f"s3://{BUCKET}/runs/{s3_run['name']}/{name}?{s3_run['query']}"
        assert "testing" not in json.dumps(summary)
    assert "testing" not in s3_run["card"]


def test_export_from_s3_reloads_and_matches_the_engine(s3_run):
    summary, out = s3_run["resumed"], s3_run["out"]
    assert "model_dir" not in s3_run["first"] and not s3_run["exported_before_resume"]
    # Without an export the summary comes from the final checkpoint's bloomray.json alone.
    first = s3_run["first"]
    assert first["eval_loss"] == s3_run["meta_before_resume"]["metrics"]["eval_loss"]
    assert first["eval_perplexity"] == pytest.approx(math.exp(first["eval_loss"]))  # step 4 was evaluated
    assert summary["export_max_abs_logit_diff"] <= 1e-2
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.bfloat16)
    assert model.config.vocab_size == summary["data"]["vocab_size"]
    assert f"`{summary['checkpoint']}`" in s3_run["card"]  # the card names the S3 source
    assert s3_run["new_download_dirs"] == set()  # each download was removed after export


def test_resume_reads_the_contract_from_s3_and_continues(s3_run):
    meta = s3_run["meta_before_resume"]
    assert meta["step"] == 4
    assert meta["resume_contract"]["total_steps"] == 4 and meta["lr_segments"] == [[0, 4]]
    resumed = s3_run["resumed"]
    assert resumed["steps"] == 6
    assert resumed["restarts"] == [4]


def test_cli_exports_a_checkpoint_uri(s3_run, tmp_path):
    target = tmp_path / "exported"
    uri = s3_run["resumed"]["checkpoint"]
    assert cli_main(["export", "--checkpoint", uri, "--output", str(target)]) == 0
    assert (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()
    assert f"`{uri}`" in (target / "README.md").read_text()
