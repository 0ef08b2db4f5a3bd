"""Where datasets live: a local directory or ``s3://bucket/prefix``, behind one small set of functions.

S3 goes through boto3; the endpoint comes from the environment (``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``) and so do credentials, which are never printed. One client per process and
thread: boto3 clients are not fork-safe, and DataLoader workers fork.

Writes are all-or-nothing: a local file is written under a temporary name and renamed; an S3 object is
uploaded whole (a multipart upload only becomes visible when completed), so no reader ever sees half an
object under its final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

from latte.errors import first_line
from latte.files import atomic_write

_local = threading.local()
_CLIENT_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_PROFILE",
)


class StorageError(RuntimeError):
    """A storage location that cannot be used; the message is one line naming it (never credentials).

    ``transient``: retrying may cure it (an unreachable, slow, throttling or failing server), as opposed to a
    missing object or bucket, denied access or a bad request."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# S3 error codes that no retry cures.
PERMANENT_S3_CODES = frozenset(
    {
        "404",
        "NoSuchKey",
        "NoSuchBucket",
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "Forbidden",
        "400",
        "InvalidRange",
        "416",
    }
)


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    rest = str(url)[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"malformed S3 url '{url}': expected s3://bucket/key")
    return bucket, key


def join(base: str, *names: str) -> str:
    """Join path parts onto a local path or an s3:// url."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(n.strip("/") for n in names)])
    return str(Path(base, *names))


def s3_client(max_attempts: int = 8):
    """The boto3 S3 client of this process and thread (created on first use, after any fork, and again
    when the endpoint or credentials in the environment change). Transient errors (connection resets, 5xx,
    throttling) are retried up to ``max_attempts`` times with adaptive backoff."""
    key = (os.getpid(), max_attempts, *(os.environ.get(name) for name in _CLIENT_ENV))
    clients = _local.__dict__.setdefault("clients", {})
    if key not in clients:
        import boto3
        from botocore.config import Config

        retries = {"max_attempts": max_attempts, "mode": "adaptive"}
        config = Config(retries=retries, connect_timeout=10, read_timeout=60)
        clients[key] = boto3.session.Session().client("s3", config=config)
    return clients[key]


def _s3_error(url: str, exc: Exception, is_object: bool = False) -> StorageError:
    """Turn a boto3/botocore failure into one line that names the location and the cause.

    ``is_object``: the request named an object (HEAD/GET), so a bare 404 means the object, not the bucket."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS default"
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"cannot reach the S3 endpoint {endpoint} for '{url}'", transient=True)
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"no S3 credentials for '{url}' (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        bucket = split_s3(url)[0]
        if code == "NoSuchKey" or (code == "404" and is_object):
            return StorageError(f"S3 object '{url}' does not exist")
        if code in ("404", "NoSuchBucket"):
            return StorageError(f"S3 bucket '{bucket}' does not exist (endpoint {endpoint}) for '{url}'")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"):
            return StorageError(f"S3 access to '{url}' denied ({code}): check the credentials")
        return StorageError(
            f"S3 error {code or type(exc).__name__} for '{url}'", code not in PERMANENT_S3_CODES
        )
    transient = isinstance(exc, (BotoCoreError, OSError))  # connection resets, timeouts, truncated bodies
    message = f"S3 failure for '{url}': {type(exc).__name__}: {first_line(exc, 200)}"
    return StorageError(message, transient)


def check_writable(url: str, what: str = "output") -> None:
    """Fail fast, before any work, if ``url`` (a directory or prefix) cannot be written; a missing local
    directory is created with its parents. ``what`` names it in the error (the option it came from)."""
    if is_s3(url):
        bucket, _ = split_s3(url)
        try:
            s3_client(max_attempts=2).head_bucket(Bucket=bucket)  # a preflight fails fast
        except Exception as exc:  # botocore raises several unrelated types
            raise _s3_error(url, exc) from None
        return
    path = Path(url)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise StorageError(f"{what} '{url}' is not writable: {exc.strerror or exc}") from None


def check_readable(url: str) -> None:
    """Fail fast if the object or file ``url`` cannot be read."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _s3_error(url, exc, is_object=True) from None
    elif not Path(url).is_file():
        raise StorageError(f"'{url}' does not exist or is not a file")


def size(url: str) -> int | None:
    """Bytes of a file or object, or None if it does not exist."""
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and str(exc.response["Error"].get("Code")) in (
                "404",
                "NoSuchKey",
            ):
                return None
            raise _s3_error(url, exc, is_object=True) from None
    path = Path(url)
    return path.stat().st_size if path.is_file() else None


def exists(url: str) -> bool:
    return size(url) is not None if is_s3(url) else Path(url).exists()


def list_files(url: str) -> list[str]:
    """Full urls/paths of the files directly or indirectly under a directory or prefix, sorted."""
    if is_s3(url):
        bucket, prefix = split_s3(url)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        out = []
        try:
            for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                out += [f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", [])]
        except Exception as exc:
            raise _s3_error(url, exc) from None
        return sorted(out)
    root = Path(url)
    return sorted(str(p) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def read_bytes(url: str) -> bytes:
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise _s3_error(url, exc, is_object=True) from None
    try:
        return Path(url).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read '{url}': {exc.strerror or exc}") from None


def open_read(url: str, offset: int = 0) -> BinaryIO:
    """A streaming binary reader from byte ``offset`` (S3: a ranged ``get_object``; local: open + seek)."""
    if is_s3(url):
        bucket, key = split_s3(url)
        kwargs = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            return s3_client().get_object(Bucket=bucket, Key=key, **kwargs)["Body"]
        except Exception as exc:
            raise _s3_error(url, exc, is_object=True) from None
    try:
        f = open(url, "rb")  # noqa: SIM115 - the caller owns and closes the stream
    except OSError as exc:
        raise StorageError(f"cannot read '{url}': {exc.strerror or exc}") from None
    f.seek(offset)
    return f


def _publish_local(url: str, fill) -> None:
    """Write a local file under a temporary name with ``fill(tmp_path)``, then rename it into place."""
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(url, fill)


def _s3_call(url: str, call) -> None:
    try:
        call(s3_client(), *split_s3(url))
    except Exception as exc:
        raise _s3_error(url, exc) from None


def _copy_unless_same(src: str | os.PathLike, dest: Path) -> None:
    if Path(src).resolve() != dest.resolve():  # the job may have written the shard at its temp name already
        shutil.copyfile(src, dest)


def put_file(local_path: str | os.PathLike, url: str) -> None:
    """Publish a finished local file at ``url`` all at once (S3: upload; local: temp name + rename)."""
    if is_s3(url):
        _s3_call(url, lambda client, bucket, key: client.upload_file(str(local_path), bucket, key))
    else:
        _publish_local(url, lambda tmp: _copy_unless_same(local_path, tmp))


def write_bytes(url: str, data: bytes) -> None:
    """Write a small object (an index) atomically."""
    if is_s3(url):
        _s3_call(url, lambda client, bucket, key: client.put_object(Bucket=bucket, Key=key, Body=data))
    else:
        _publish_local(url, lambda tmp: tmp.write_bytes(data))
