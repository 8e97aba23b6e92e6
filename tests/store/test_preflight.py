"""preflight: one clear StoreAccessError line for each way an S3 location can be unusable; and
an endpoint that dies mid-run: the writer's retries are reported, then it fails in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _support import stores as synth
from _support.s3 import moto_process
from _support.servers import free_port

import mup.store as store
from mup.store._location import MULTIPART_CHUNKSIZE

pytestmark = pytest.mark.s3


def test_missing_bucket(s3_env):
    assert store.preflight(f"s3://{synth.BUCKET}/x").kind == "s3"
    with pytest.raises(store.StoreAccessError, match="bucket 'no-such-bucket' does not exist") as e:
        store.preflight("s3://no-such-bucket/x")
    assert "\n" not in str(e.value)


def test_unreachable_endpoint(monkeypatch):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    for name in ("R2_ACCOUNT_ID", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(store.StoreAccessError, match=f"cannot reach S3 endpoint .*:{port}") as e:
        store.preflight("s3://bucket/x")
    assert "\n" not in str(e.value)


def test_missing_credentials(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(store.StoreAccessError, match="no S3 credentials .* AWS_ACCESS_KEY_ID"):
        store.preflight(f"s3://{synth.BUCKET}/x")


def test_wrong_credentials(monkeypatch):
    """A second moto server with IAM authentication on: a real user passes, a wrong key fails."""
    import boto3

    # The first 4 requests run unauthenticated (to create the bucket, user, policy and key).
    with moto_process({"INITIAL_NO_AUTH_ACTION_COUNT": "4"}) as endpoint:
        kw = dict(endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="setup", aws_secret_access_key="setup")  # fmt: skip
        boto3.client("s3", **kw).create_bucket(Bucket="authed")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="writer")
        allow = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        policy = {"Version": "2012-10-17", "Statement": [allow]}
        iam.put_user_policy(UserName="writer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        for name in ("R2_ACCOUNT_ID", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        assert store.preflight("s3://authed/x").bucket == "authed"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        with pytest.raises(store.StoreAccessError, match="credentials were rejected") as e:
            store.preflight("s3://authed/x")
        assert "\n" not in str(e.value)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        with pytest.raises(store.StoreAccessError, match="credentials were rejected"):
            store.preflight("s3://authed/x")


def test_read_only_and_no_delete_credentials(monkeypatch):
    """moto with IAM on: credentials that may read but not write, or write but not delete, fail
    the preflight (which writes and deletes one object) in one line; full ones leave nothing."""
    import boto3

    users = {
        "full": ["s3:*"],
        "reader": ["s3:List*", "s3:Get*", "s3:HeadBucket"],
        "no-delete": ["s3:List*", "s3:Get*", "s3:HeadBucket", "s3:PutObject"],
    }
    # Unauthenticated setup requests: the bucket, then a user, policy and key per user.
    with moto_process({"INITIAL_NO_AUTH_ACTION_COUNT": str(1 + 3 * len(users))}) as endpoint:
        kw = dict(endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="setup", aws_secret_access_key="setup")  # fmt: skip
        boto3.client("s3", **kw).create_bucket(Bucket="authed")
        iam = boto3.client("iam", **kw)
        keys = {}
        for name, actions in users.items():
            iam.create_user(UserName=name)
            allow = {"Effect": "Allow", "Action": actions, "Resource": "*"}
            policy = {"Version": "2012-10-17", "Statement": [allow]}
            iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
            keys[name] = iam.create_access_key(UserName=name)["AccessKey"]
        for name in ("R2_ACCOUNT_ID", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)

        def as_user(name):
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", keys[name]["AccessKeyId"])
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", keys[name]["SecretAccessKey"])
            return store.parse_location("s3://authed/acts").boto3_client()

        client = as_user("full")
        assert store.preflight("s3://authed/acts").bucket == "authed"
        assert client.list_objects_v2(Bucket="authed").get("KeyCount", 0) == 0  # cleaned up
        as_user("reader")
        denied = r"may read bucket 'authed'.* but not write objects under s3://authed/acts "
        with pytest.raises(store.StoreAccessError, match=denied + r"\(AccessDenied\)") as e:
            store.preflight("s3://authed/acts")
        assert "\n" not in str(e.value)
        as_user("no-delete")
        no_delete = "not delete objects.*remove s3://authed/acts/.mup-preflight-"
        with pytest.raises(store.StoreAccessError, match=no_delete) as e:
            store.preflight("s3://authed/acts")
        assert "\n" not in str(e.value)


def test_r2_settings(monkeypatch):
    monkeypatch.setenv("R2_ACCOUNT_ID", "acct123")
    monkeypatch.setenv("R2_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("R2_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://elsewhere:9000")
    loc = store.parse_location("s3://bucket/a/b/")
    assert loc.endpoint == "https://acct123.r2.cloudflarestorage.com"
    assert loc.region == "auto" and loc.provider == "r2" and loc.prefix == "a/b"
    cfg = loc.boto3_client().meta.config
    assert cfg.request_checksum_calculation == "when_required"
    assert cfg.s3["addressing_style"] == "path"
    tc = loc.transfer_config()
    assert tc.multipart_chunksize == MULTIPART_CHUNKSIZE


def test_unreachable_endpoint_mid_run(monkeypatch):
    """The server goes away after some shards are durable: each retry of the next shard commit
    is reported (the extractor prints them above its progress bar), then a StoreError."""
    import boto3

    meta, acts = synth.make_job(seed=4)
    offsets = meta["offsets"]
    rows = np.arange(len(meta["ids"]))
    messages = []
    with moto_process() as endpoint:
        for name in ("R2_ACCOUNT_ID", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="dies"
        )
        writer = store.create("s3://dies/job", **meta, chunk_tokens=16, shard_tokens=64,
                              retries=2)  # fmt: skip
        writer.on_retry = messages.append
        writer.write(rows[:10], synth.batch_acts(acts, offsets, rows[:10]))
        writer.flush()
        assert writer.done_shards().any() and not messages
    # The server process is gone (killed on leaving the block): nothing listens any more.
    with pytest.raises(store.StoreError, match=r"writing a shard of s3://dies/job failed after "
                       r"2 retries: ABORTED.*(connect|Connect)") as e:  # fmt: skip
        writer.write(rows[10:], synth.batch_acts(acts, offsets, rows[10:]))
        writer.flush()
    assert "\n" not in str(e.value)
    # Two shard commits run at once: each reports both of its retries, in order.
    by_shard: dict[str, list[str]] = {}
    for m in messages:
        assert m.startswith("writing shard ") and "of s3://dies/job failed (ABORTED" in m, m
        by_shard.setdefault(m.split()[2], []).append(m.rsplit("; ", 1)[1])
    assert 1 <= len(by_shard) <= store.MAX_INFLIGHT_SHARDS
    for retries in by_shard.values():
        assert retries == ["retry 1 of 2 in 1 s", "retry 2 of 2 in 2 s"]
    writer.close()
