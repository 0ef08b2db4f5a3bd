"""Reading one webdataset tar shard sample by sample, with byte offsets, so a broken connection costs a
reopen at the sample it was on rather than the shard.

Samples are the webdataset way: consecutive members sharing a key (``webdataset.tariterators.base_plus_ext``:
``KEY.latent.npy`` -> key ``KEY``, suffix ``latent.npy``). Headers are parsed with ``tarfile.TarInfo.frombuf``
(ustar, pax and GNU long names); webdataset's own tar iterator hides member offsets, which the reopen needs.

Failures: transient storage errors (see ``s3_opener.is_transient``) reopen the shard at the current sample's
first header, after a backoff, up to ``retries`` times in a row; an archive that ends early or has a broken
header ends the shard (``ShardReader.problem`` says why; the caller turns the missing samples into holes).
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from data_pipeline.s3_opener import is_transient, open_shard
from latte.errors import first_line

logger = logging.getLogger("data_pipeline.loader")
BLOCK = 512
MAX_BACKOFF = 30.0  # seconds


class LoaderError(RuntimeError):
    """The loader cannot go on (a shard that vanished, storage down beyond the retries); one line."""


class DatasetUnreadableError(LoaderError):
    """The dataset itself is broken: every sample some worker reads is corrupt or cut off, though its shards
    can be opened. Unlike storage that is down (a plain ``LoaderError`` after the retries, worth a requeue),
    no retry or restart cures it; one line naming the dataset."""


class TarFormatError(ValueError):
    """The archive ends inside a member or has a malformed header."""


class TarCursor:
    """Walks a tar stream member by member, tracking the byte offset (``pos``) from the shard's start and
    counting the bytes it moves over in ``stats["bytes"]``."""

    def __init__(self, stream: BinaryIO, pos: int, stats: Counter) -> None:
        self.stream = stream
        self.pos = pos
        self.stats = stats
        self.seekable = stream.seekable()

    def _moved(self, count: int) -> None:
        self.pos += count
        self.stats["bytes"] += count

    def next(self) -> tuple[int, str, int] | None:
        """(offset of the member's first header, name, size) of the next regular file; None at the end."""
        start, name = self.pos, None
        while True:
            header = self.stream.read(BLOCK)
            if not header:
                return None  # the stream ends without end-of-archive blocks; the caller checks the count
            if len(header) < BLOCK:
                raise TarFormatError(f"the archive ends inside a header at byte {self.pos}")
            self._moved(BLOCK)
            if header.count(0) == BLOCK:
                return None  # end-of-archive block
            try:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise TarFormatError(f"bad tar header at byte {self.pos - BLOCK} ({exc})") from None
            if info.type == tarfile.XHDTYPE:  # pax extended header: may carry the next member's path
                name = _pax_path(self.read(info.size)) or name
            elif info.type == tarfile.GNUTYPE_LONGNAME:
                name = bytes(self.read(info.size)).rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif info.type in tarfile.REGULAR_TYPES:
                return start, name or info.name, info.size
            else:  # directories, links, global headers: not part of any sample
                self.skip(info.size)
                start, name = self.pos, None

    def read(self, size: int) -> bytearray:
        """A member's data (the cursor moves past its padding too)."""
        data = bytearray(size)
        view, got = memoryview(data), 0
        while got < size:
            n = self.stream.readinto(view[got:])
            if not n:
                raise TarFormatError(f"the archive ends inside a member at byte {self.pos + got}")
            got += n
        self._moved(size)
        self._advance(-size % BLOCK)
        return data

    def skip(self, size: int) -> None:
        """Move past a member's ``size`` data bytes and their padding without keeping them."""
        self._advance(size + -size % BLOCK)

    def _advance(self, count: int) -> None:
        if self.seekable:  # a local file: seek (a short file shows as the end of the archive next)
            self.stream.seek(count, 1)
        else:  # a network stream: read and drop
            left = count
            while left:
                chunk = self.stream.read(min(left, 1 << 20))
                if not chunk:
                    raise TarFormatError(f"the archive ends inside a member at byte {self.pos}")
                left -= len(chunk)
        self._moved(count)


def _pax_path(data: bytearray) -> str | None:
    """The ``path`` record of a pax extended header (records are "<len> <key>=<value>\\n")."""
    pos = 0
    while pos < len(data):
        try:
            space = data.index(b" ", pos)
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"malformed pax header record at {pos}") from None
        key, _, value = bytes(data[space + 1 : pos + length - 1]).partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += max(length, 1)
    return None


def split_name(name: str) -> tuple[str | None, str]:
    """Member name -> (sample key, lower-case suffix), the webdataset convention."""
    key, suffix = base_plus_ext(name)
    return key, (suffix or "").lower()


class ShardReader:
    """Samples of one shard in order, with reopen-and-continue on transient storage errors."""

    def __init__(
        self,
        url: str,
        stats: Counter,
        retries: int = 8,
        backoff: float = 0.5,
        suffixes: frozenset[str] | None = None,
    ) -> None:
        self.url = url
        self.suffixes = suffixes  # the members to read (None = all); the others are skipped
        self.stats = stats
        self.retries = retries
        self.backoff = backoff
        self.problem: str | None = None  # why the shard ended before the samples asked for

    def samples(self, wanted: Sequence[int]) -> Iterator[tuple[int, str, dict[str, bytearray]]]:
        """``(index, key, members)`` of the shard's samples 0..max(wanted) in order; members are read for
        wanted samples only (the others are skipped). Stops early where the archive ends or breaks."""
        last, want = wanted[-1], set(wanted)
        index, offset, failures = 0, 0, 0  # the sample being assembled and the offset of its first header
        while True:
            stream: BinaryIO | None = None
            try:
                stream = open_shard(self.url, offset)
                cursor = TarCursor(stream, offset, self.stats)
                key, members = None, {}
                while (member := cursor.next()) is not None:
                    start, name, size = member
                    sample_key, suffix = split_name(name)
                    if sample_key is None:
                        cursor.skip(size)
                        continue
                    if sample_key != key:
                        if key is not None:
                            yield index, key, members
                            index, offset, failures = index + 1, start, 0
                            if index > last:
                                return
                        key, members = sample_key, {}
                    if index in want and (self.suffixes is None or suffix in self.suffixes):
                        members[suffix] = cursor.read(size)
                    else:
                        cursor.skip(size)
                if key is not None:
                    yield index, key, members
                    index += 1
                if index <= last:
                    self.problem = f"the archive ends after {index} samples"
                return
            except TarFormatError as exc:
                self.problem = f"{exc}, in sample {index}"
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise LoaderError(f"cannot read shard '{self.url}': {_one_line(exc)}") from None
                failures += 1
                self.stats["retries"] += 1
                if failures > self.retries:
                    raise LoaderError(
                        f"shard '{self.url}' still fails after {self.retries} retries: {_one_line(exc)}"
                    ) from None
                delay = min(self.backoff * 2 ** (failures - 1), MAX_BACKOFF)
                logger.warning(
                    "shard '%s': %s; reopening at sample %d (byte %d) in %.1f s (retry %d/%d)",
                    *(self.url, _one_line(exc), index, offset, delay, failures, self.retries),
                )
                time.sleep(delay)
            finally:
                if stream is not None:
                    stream.close()


def _one_line(exc: BaseException) -> str:
    text = first_line(exc, limit=200, default="")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
