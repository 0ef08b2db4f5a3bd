"""Opening shards as byte streams: ``s3://`` through boto3 streaming ``get_object`` (registered as
webdataset's ``s3`` gopen scheme, so ``webdataset.WebDataset("s3://...")`` works too), local files directly.

Both open at a byte offset, so a reader that lost its connection reopens where the sample it was on
starts (an S3 ranged GET) instead of reading the shard again. ``is_transient`` tells a failure worth a
retry (connection reset, timeout, 5xx, throttling, a server that is restarting) from one that is not (no
such object, access denied).
"""

from __future__ import annotations

import io
from typing import BinaryIO

import webdataset

from data_pipeline import storage

BUFFER = 1 << 20  # read-ahead of a shard stream: large reads keep the per-request overhead small


class _BodyRaw(io.RawIOBase):
    """A raw stream over a boto3 ``StreamingBody`` (anything with ``read(n)``), for ``io.BufferedReader``."""

    def __init__(self, body) -> None:
        super().__init__()
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = BUFFER, offset: int = 0, **_: object) -> BinaryIO:
    """webdataset gopen handler for ``s3://bucket/key``: a buffered reader from byte ``offset``.

    The boto3 client is the one of this process and thread (``storage.s3_client``; endpoint from
    ``AWS_ENDPOINT_URL``). Raises ``storage.StorageError`` (one line naming the url)."""
    if mode != "rb":
        raise ValueError(f"the s3 opener only reads (mode 'rb'), got mode {mode!r} for '{url}'")
    return io.BufferedReader(_BodyRaw(storage.open_read(url, offset)), max(bufsize, BUFFER))


def register() -> None:
    """Install the ``s3`` scheme in webdataset's dispatch table (idempotent; done on import)."""
    webdataset.gopen_schemes["s3"] = gopen_s3


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """A buffered stream over a shard from byte ``offset``: S3 through webdataset's gopen, local directly."""
    if storage.is_s3(url):
        return webdataset.gopen(url, "rb", BUFFER, offset=offset)
    stream = open(url, "rb", buffering=BUFFER)  # noqa: SIM115 - the caller owns and closes the stream
    stream.seek(offset)
    return stream


def is_transient(exc: BaseException) -> bool:
    """Whether reopening and retrying may cure ``exc`` (storage's classification for S3 failures)."""
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError

    if isinstance(exc, storage.StorageError):
        return exc.transient
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", "")) not in storage.PERMANENT_S3_CODES
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    return isinstance(exc, (BotoCoreError, HTTPError, OSError))


register()
