"""Shared fixtures: a tiny denoiser and config small enough for CPU tests that run in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raydiff.config import Config, load_config
from raydiff.model import Denoiser

# Ray hygiene for every test session (one Ray per session, no usage stats, no auth tokens)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller polls its workers every 2 s by default and a worker's report waits for
# the poll: the tests report every few steps of tiny models
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    """Every test that uses the session's Ray is in the slow tier (`-m ray`); tests that start
    processes or run long carry the mark themselves."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture
def smoke_cfg(tmp_path) -> Config:
    return load_config(ROOT / "configs" / "smoke.yaml", [f"train.output_dir={tmp_path / 'runs'}",
                                                          f"data.out_dir={tmp_path / 'data'}"])


def tiny_denoiser(vocab_size: int = 50, seq_len: int = 8, embed_dim: int = 8, **overrides):
    cfg = load_config(None, [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
        "model.intermediate_size=64", f"model.embed_dim={embed_dim}", "model.dropout=0.0",
        "model.time_embed_dim=16",
        *[f"model.{k}={v}" for k, v in overrides.items()],
    ])
    torch.manual_seed(0)
    return Denoiser(cfg.model, vocab_size, seq_len).eval()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (ray.init costs 6-20 s on 2 CPUs)."""
    import ray
    from ray.data import DataContext

    from raydiff.runtime import start_ray

    # the local Ray every command starts (raydiff.runtime), with a small object store
    start_ray("local", num_cpus=2, object_store_memory=300 * 1024**2)
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API as a real HTTP server on 127.0.0.1, with authentication enforced: one IAM
    user with full S3 access; any other key is refused, as real S3 would."""
    import json

    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"  # the 4 IAM calls below, then auth
    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 4
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
    iam.create_user(UserName="raydiff")
    policy = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    iam.attach_user_policy(UserName="raydiff", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="raydiff")["AccessKey"]
    yield {"endpoint": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    server.stop()
