"""Where a store lives: a local directory or an S3-compatible prefix (AWS, Cloudflare R2, moto).

A `Location` turns a user URL into tensorstore kvstore specs (for array I/O) and, for S3, a
boto3 client configured for R2's quirks. `preflight` checks access before any model loads.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
from pathlib import Path
from typing import Any

__all__ = [
    "Location",
    "StoreAccessError",
    "StoreError",
    "parse_location",
    "preflight",
]


class StoreError(Exception):
    """Base class for activation store errors."""


class StoreAccessError(StoreError):
    """The store location cannot be used: credentials, bucket or endpoint (one line)."""


# boto3 multipart settings. R2 rejects multipart uploads whose parts (except the last) differ in
# size; s3transfer cuts equal `multipart_chunksize` parts, so a fixed chunk size satisfies it.
MULTIPART_THRESHOLD = 64 << 20  # shards are usually below this: one PUT per shard object
MULTIPART_CHUNKSIZE = 16 << 20  # equal part size; 16 MiB keeps part count low and retries cheap
# tensorstore's per-request S3 retries where the caller retries (and reports) whole operations.
QUICK_S3_RETRIES = {"max_retries": 2, "initial_delay": "0.5s", "max_delay": "1s"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Location:
    """A resolved store URL.

    Attributes:
      url: the canonical URL (`s3://bucket/prefix` or an absolute local path).
      kind: "file" or "s3".
      path: local absolute path (kind "file"), else "".
      bucket, prefix: S3 bucket and key prefix without a trailing slash (kind "s3").
      endpoint: S3 endpoint URL, or None for AWS's default.
      region: S3 signing region ("auto" for R2).
      provider: "r2" or "aws" (which environment variables gave the credentials).
    """

    url: str
    kind: str
    path: str = ""
    bucket: str = ""
    prefix: str = ""
    endpoint: str | None = None
    region: str = "us-east-1"
    provider: str = "aws"

    def child(self, name: str) -> Location:
        """The location of `name` below this one (a store directory under an --out prefix)."""
        name = name.strip("/")
        if self.kind == "file":
            return dataclasses.replace(
                self, url=str(Path(self.path) / name), path=str(Path(self.path) / name)
            )
        prefix = posixpath.join(self.prefix, name) if self.prefix else name
        return dataclasses.replace(self, url=f"s3://{self.bucket}/{prefix}", prefix=prefix)

    def key(self, sub: str = "") -> str:
        """The S3 object key (or local path) of `sub` inside this location."""
        base = self.prefix if self.kind == "s3" else self.path
        return posixpath.join(base, sub) if base else sub

    def kvstore(self, sub: str = "", *, quick_retries: bool = False) -> dict[str, Any]:
        """A tensorstore kvstore spec rooted at `sub` (a directory, so the path ends in '/').

        quick_retries: S3 requests give up after `QUICK_S3_RETRIES` (about a second) instead of
        tensorstore's silent default (32 retries, ~15 minutes against a dead endpoint), for
        callers that retry whole operations themselves and report each retry (the writer).
        """
        if self.kind == "file":
            path = os.path.join(self.path, sub) if sub else self.path
            return {"driver": "file", "path": path.rstrip("/") + "/"}
        _export_r2_credentials(self)
        spec: dict[str, Any] = {
            "driver": "s3",
            "bucket": self.bucket,
            "path": self.key(sub).strip("/") + "/" if self.key(sub) else "",
            "aws_region": self.region,
            # Environment credentials only: tensorstore's default chain also probes ~/.aws and
            # instance metadata, which is slow and noisy on machines that have neither.
            "aws_credentials": {"type": "environment"},
        }
        if self.endpoint:
            spec["endpoint"] = self.endpoint
        if quick_retries:
            spec["context"] = {"s3_request_retries": QUICK_S3_RETRIES}
        return spec

    def boto3_client(self):
        """A boto3 S3 client with settings that R2 and moto accept."""
        import boto3
        from botocore.config import Config

        access, secret, token = _credentials(self)
        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            # botocore >= 1.36 adds CRC checksum headers to every PUT by default; R2 and older
            # S3-compatible servers reject some of them, so only send checksums when required.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path" if self.endpoint else "auto"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access,
            aws_secret_access_key=secret,
            aws_session_token=token,
            config=config,
        )

    def transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            use_threads=True,
        )


def _credentials(loc: Location) -> tuple[str | None, str | None, str | None]:
    env = os.environ
    if loc.provider == "r2":
        return env.get("R2_ACCESS_KEY_ID"), env.get("R2_SECRET_ACCESS_KEY"), None
    return (
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
    )


def _export_r2_credentials(loc: Location) -> None:
    # tensorstore's s3 driver takes no inline credentials (only environment/profile/imds), so
    # for R2 the R2_* keys are exported as the AWS_* variables of this process.
    if loc.provider == "r2":
        access, secret, _ = _credentials(loc)
        if access and secret:
            os.environ["AWS_ACCESS_KEY_ID"] = access
            os.environ["AWS_SECRET_ACCESS_KEY"] = secret
            os.environ.pop("AWS_SESSION_TOKEN", None)


def parse_location(url: str | os.PathLike) -> Location:
    """Resolve a local path or `s3://bucket/prefix` URL, reading S3 settings from the environment.

    S3 settings: Cloudflare R2 when R2_ACCOUNT_ID, R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY are
    all set (endpoint https://<account>.r2.cloudflarestorage.com, region "auto"); otherwise
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (if any) with AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN and AWS_REGION or AWS_DEFAULT_REGION.
    """
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"store url must be a non-empty path or s3:// URL, got {url!r}")
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url and not url.startswith("s3://"):
        raise ValueError(
            f"store url {url!r}: only local paths and s3://bucket/prefix are supported"
        )
    if not url.startswith("s3://"):
        path = str(Path(url).expanduser().resolve())
        return Location(url=path, kind="file", path=path)
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"store url {url!r} has no bucket: expected s3://bucket/prefix")
    prefix = prefix.strip("/")
    env = os.environ
    canonical = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if env.get("R2_ACCOUNT_ID") and env.get("R2_ACCESS_KEY_ID") and env.get("R2_SECRET_ACCESS_KEY"):
        endpoint = f"https://{env['R2_ACCOUNT_ID']}.r2.cloudflarestorage.com"
        return Location(
            url=canonical, kind="s3", bucket=bucket, prefix=prefix, endpoint=endpoint,
            region="auto", provider="r2",
        )  # fmt: skip
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    return Location(
        url=canonical, kind="s3", bucket=bucket, prefix=prefix, endpoint=endpoint, region=region
    )


def preflight(url: str | os.PathLike) -> Location:
    """Check that `url` is writable before any model is loaded; raise `StoreAccessError` if not.

    S3: credentials are present and accepted, the bucket exists and the endpoint answers (a
    HEAD bucket request), and they may write and delete under the prefix: one small object is
    written there and deleted again, so read-only credentials fail here, not after the model
    has loaded. Local: the nearest existing parent directory is writable.
    """
    loc = parse_location(url)
    if loc.kind == "file":
        parent = Path(loc.path)
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise StoreAccessError(
                f"cannot write store {loc.url}: {parent} is not a writable directory"
            )
        return loc
    import botocore.exceptions as bexc

    access, secret, _ = _credentials(loc)
    where = loc.endpoint or "AWS S3"
    if not access or not secret:
        names = (
            "R2_ACCESS_KEY_ID / R2_SECRET_ACCESS_KEY"
            if loc.provider == "r2"
            else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or R2_ACCOUNT_ID + R2_* for R2)"
        )
        raise StoreAccessError(f"no S3 credentials for {loc.url}: set {names}")
    client = loc.boto3_client()
    try:
        client.head_bucket(Bucket=loc.bucket)
    except (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError) as e:
        raise StoreAccessError(f"cannot reach S3 endpoint {where} for {loc.url}: {e}") from None
    except bexc.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            raise StoreAccessError(
                f"bucket {loc.bucket!r} does not exist at {where} (url {loc.url})"
            ) from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or (
            status in (401, 403)
        ):
            raise StoreAccessError(
                f"S3 credentials were rejected by {where} for bucket {loc.bucket!r} "
                f"({code or status}); check the access key and secret"
            ) from None
        raise StoreAccessError(f"S3 check of {loc.url} at {where} failed: {code} {e}") from None
    except bexc.BotoCoreError as e:
        raise StoreAccessError(f"S3 check of {loc.url} at {where} failed: {e}") from None
    import uuid

    probe = loc.key(f".mup-preflight-{uuid.uuid4().hex[:12]}")
    for action in ("write", "delete"):
        try:
            if action == "write":
                client.put_object(Bucket=loc.bucket, Key=probe, Body=b"mup preflight\n")
            else:
                client.delete_object(Bucket=loc.bucket, Key=probe)
        except bexc.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", "")) or str(
                e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            )
            left = f"; remove s3://{loc.bucket}/{probe} by hand" if action == "delete" else ""
            raise StoreAccessError(
                f"the S3 credentials may read bucket {loc.bucket!r} at {where} but not "
                f"{action} objects under {loc.url} ({code}); mup needs to write and delete "
                f"there{left}"
            ) from None
        except bexc.BotoCoreError as e:
            raise StoreAccessError(
                f"S3 check of {loc.url} at {where} failed ({action} a test object): {e}"
            ) from None
    return loc
