"""S3 stores: ``s3://bucket/prefix`` opened with settings from the standard AWS environment.

The data goes through ``pyarrow.fs.S3FileSystem``; boto3 is used once per store and process, to check that
the bucket can be used before any work starts, so that a wrong key, a missing bucket or a server that is
not running gives one message saying what to fix instead of a failure deep inside a task.

Settings, all from the environment of the process that opens the store (a Ray worker uses its own):
  ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``  an S3-compatible server, e.g. ``http://127.0.0.1:8333``
                                                   (its scheme is used; buckets are addressed path-style)
  ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (or anything else boto3 finds: ``AWS_PROFILE``, ...)
  ``AWS_REGION`` or ``AWS_DEFAULT_REGION``         default ``us-east-1``
Buckets are never created: a prefix needs no creating on S3, a bucket is an administrator's decision.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

import boto3
import botocore.exceptions
import pyarrow.fs as pafs
from botocore.config import Config

from .uri import StoreError

__all__ = ["S3Settings", "parse_s3_uri", "settings_from_env", "check_bucket", "s3_filesystem", "open_s3"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's rule for new bucket names
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # the service-specific one wins, as in boto3
_DEFAULT_REGION = "us-east-1"
# The bucket check must answer fast: a server that is down should not hold the user for a minute.
_CHECK_CONFIG = {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 2, "mode": "standard"}}


@dataclass(frozen=True)
class S3Settings:
    """Where S3 is and who we are, as found in this process's environment (never pickled, never printed)."""

    region: str
    endpoint: str | None  # "http://127.0.0.1:8333"; None means AWS itself
    endpoint_var: str  # the variable that set ``endpoint`` ("" when None), named in messages
    access_key: str
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    credentials_source: str = "env"  # boto3's name for where the key came from: env, shared-credentials-file...

    @property
    def where(self) -> str:
        """The server, as a message should name it."""
        if self.endpoint:
            return f"{self.endpoint} (from {self.endpoint_var})"
        return f"AWS S3 in region {self.region}"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix"); ``StoreError`` for anything malformed."""
    match = re.match(r"^s3://(.*)$", uri, flags=re.IGNORECASE)
    if match is None:
        raise StoreError(f"{uri!r} is not an s3:// URI")
    rest = match.group(1)
    if "?" in rest or "#" in rest:
        raise StoreError(f"store {uri!r}: options in the URI are not supported; the endpoint, region and "
                         f"credentials come from the AWS_* environment variables (e.g. AWS_ENDPOINT_URL)")
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        raise StoreError(f"store {uri!r}: {bucket!r} is not a valid bucket name (3-63 characters: lowercase "
                         f"letters, digits, '.' and '-'); the URI is s3://<bucket>/<prefix>")
    prefix = prefix.strip("/")
    segments = prefix.split("/") if prefix else []
    if any(segment in ("", ".", "..") for segment in segments):
        raise StoreError(f"store {uri!r}: the prefix {prefix!r} has an empty, '.' or '..' segment")
    return bucket, prefix


def settings_from_env(uri: str) -> S3Settings:
    """Read the endpoint, region and credentials for ``uri`` from this process's AWS environment."""
    endpoint_var = next((name for name in _ENDPOINT_VARS if os.environ.get(name, "").strip()), "")
    endpoint = os.environ[endpoint_var].strip().rstrip("/") if endpoint_var else None
    if endpoint is not None:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path or parsed.query:
            raise StoreError(f"{endpoint_var}={endpoint!r} is not an S3 endpoint URL: give the scheme, host and "
                             f"port only, e.g. http://127.0.0.1:8333")
    try:
        session = boto3.session.Session()
        credentials = session.get_credentials()
        region = (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or session.region_name
                  or _DEFAULT_REGION)
    except botocore.exceptions.BotoCoreError as exc:  # a profile that does not exist, half a key pair, ...
        raise StoreError(f"cannot read the AWS credentials for {uri}: {exc}") from None
    if credentials is None:
        raise StoreError(
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
            f"AWS_PROFILE) in the environment of every process that opens the store, Ray workers included"
        )
    frozen = credentials.get_frozen_credentials()
    return S3Settings(region=region, endpoint=endpoint, endpoint_var=endpoint_var, access_key=frozen.access_key,
                      secret_key=frozen.secret_key, session_token=frozen.token,
                      credentials_source=credentials.method or "unknown")


# (bucket, settings) pairs checked by this process: a Store is unpickled once per task argument, and one
# HEAD request per process and bucket is enough. Only successes are remembered.
_checked: set[tuple[str, S3Settings]] = set()


def check_bucket(bucket: str, settings: S3Settings, uri: str) -> None:
    """HEAD the bucket; ``StoreError`` with one message for each way it can fail. Creates nothing."""
    if (bucket, settings) in _checked:
        return
    client = boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint, region_name=settings.region,
        aws_access_key_id=settings.access_key, aws_secret_access_key=settings.secret_key,
        aws_session_token=settings.session_token,
        config=Config(**_CHECK_CONFIG, s3={"addressing_style": "path"} if settings.endpoint else None),
    )
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        raise StoreError(_refusal(exc, bucket, settings, uri)) from None
    except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError) as exc:
        if settings.endpoint:
            raise StoreError(
                f"cannot reach the S3 endpoint {settings.where} for {uri}: {exc}. Is the S3 server running "
                f"and listening there? Fix {settings.endpoint_var}, or unset it to use AWS S3"
            ) from None
        raise StoreError(f"cannot reach {settings.where} for {uri}: {exc}. Check the network and AWS_REGION, "
                         f"or set AWS_ENDPOINT_URL to use an S3-compatible server") from None
    finally:
        client.close()
    _checked.add((bucket, settings))


def _refusal(exc: botocore.exceptions.ClientError, bucket: str, settings: S3Settings, uri: str) -> str:
    """The message for a HEAD bucket answered with an error (a HEAD answer has a status but no body)."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    meta = exc.response.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    if status == 403 or code in ("403", "AccessDenied", "Forbidden", "InvalidAccessKeyId",
                                 "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
        return (f"access to bucket {bucket!r} at {settings.where} was refused (HTTP 403) for the access key "
                f"{settings.access_key!r} (found in: {settings.credentials_source}): the key or its secret is "
                f"wrong, or the key may not use this bucket. Check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
        endpoint = f" --endpoint-url {settings.endpoint}" if settings.endpoint else ""
        return (f"bucket {bucket!r} does not exist at {settings.where}. fragile never creates buckets: create "
                f"it once (e.g. `aws s3 mb s3://{bucket}{endpoint}`) or fix the bucket name in {uri}")
    if status == 301 or code in ("301", "PermanentRedirect"):
        actual = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region", "another region")
        return (f"bucket {bucket!r} is in {actual}, not in {settings.region}: set AWS_REGION={actual}")
    return f"cannot use bucket {bucket!r} at {settings.where} for {uri}: HTTP {status} {code}: {exc}"


def s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    """The ``pyarrow`` filesystem for ``settings``.

    ``allow_delayed_open``: an output stream sends nothing before its data is complete, and a buffer written
    in one call goes out as one PutObject (without it pyarrow starts a multipart upload at open, whatever the
    size). So ``write_atomic`` gets an object that appears whole or not at all. Path-style addressing is
    pyarrow's default once an endpoint is given.
    """
    scheme, host = "https", None
    if settings.endpoint:
        parsed = urlparse(settings.endpoint)
        scheme, host = parsed.scheme, parsed.netloc
    return pafs.S3FileSystem(
        access_key=settings.access_key, secret_key=settings.secret_key, session_token=settings.session_token,
        region=settings.region, scheme=scheme, endpoint_override=host, connect_timeout=5, request_timeout=60,
        allow_delayed_open=True, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )


def open_s3(uri: str, *, check: bool = True) -> tuple[str, pafs.S3FileSystem, str]:
    """Check (unless ``check`` is False) and open ``s3://bucket/prefix``: (normalised URI, filesystem, root
    path inside it). The credentials are always read: a worker without them gets the message at once."""
    bucket, prefix = parse_s3_uri(uri)
    settings = settings_from_env(uri)
    if check:
        check_bucket(bucket, settings, uri)
    root = f"{bucket}/{prefix}" if prefix else bucket
    return f"s3://{root}", s3_filesystem(settings), root
