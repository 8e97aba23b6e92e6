"""preflight: one clear StoreAccessError line for each way an S3 location can be unusable."""

from __future__ import annotations

import json

import pytest

import mup.store as store
from mup.store._location import MULTIPART_CHUNKSIZE

pytestmark = pytest.mark.s3


def test_missing_bucket(s3_env, synth):
    assert store.preflight(f"s3://{synth.BUCKET}/x").kind == "s3"
    with pytest.raises(store.StoreAccessError, match="bucket 'no-such-bucket' does not exist") as e:
        store.preflight("s3://no-such-bucket/x")
    assert "\n" not in str(e.value)


def test_unreachable_endpoint(monkeypatch, moto_process, free_port):
    port = free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    for name in ("R2_ACCOUNT_ID", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(store.StoreAccessError, match=f"cannot reach S3 endpoint .*:{port}") as e:
        store.preflight("s3://bucket/x")
    assert "\n" not in str(e.value)


def test_missing_credentials(s3_env, monkeypatch, synth):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(store.StoreAccessError, match="no S3 credentials .* AWS_ACCESS_KEY_ID"):
        store.preflight(f"s3://{synth.BUCKET}/x")


def test_wrong_credentials(monkeypatch, moto_process):
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
