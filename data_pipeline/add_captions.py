"""Caption a dataset that is already sharded, without decoding or encoding any video again.

    python -m data_pipeline.add_captions --index SRC --manifest M --text-encoder T5 --output DST [options]

SRC: a dataset root or its index.json (local or ``s3://``), as ``data_pipeline.shard_latents`` wrote it. M:
a ``.csv``/``.jsonl`` manifest with captions (formats in ``data_pipeline.video``), whose paths, resolved as
the sharding job resolves them, are the videos' ``source`` in the samples' ``json``. Every shard of SRC is
rewritten into DST under its name with the members ``caption.npy``/``caption.txt`` added (and the caption's
token count in its ``json``), every other member as it was; DST gets an index with the caption facts and
``null_caption.npy``. The result is what ``shard_latents --text-encoder`` gives for the same videos,
captions and encoder (on the same device and dtype: byte for byte). Per-window captions need the clip
count of the job (``--clips-per-video``, default: SRC's ``job.json``).

The samples of a video without a caption (or with a wrong number of them) are left out and the video is
listed under ``failed`` with the reason, beside SRC's own failures. A rerun does the whole job again.
Exit codes: 0 done, 2 a mistake found before any work (one ``error:`` line) or no sample left, 1 storage
failed mid-job.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tarfile
from collections.abc import Iterator

import torch

from data_pipeline import storage
from data_pipeline.build_index import JOB_NAME
from data_pipeline.index import (
    NULL_CAPTION_NAME,
    DatasetIndex,
    DatasetIndexError,
    ShardInfo,
    index_url_for,
    load_index,
    save_index,
    save_null_caption,
)
from data_pipeline.latent_sample import CAPTION, CAPTION_TEXT
from data_pipeline.shard_latents import JobError, OneLineParser, caption_problem, encode_captions, pick_device
from data_pipeline.shard_reader import split_name
from data_pipeline.shard_writer import ShardFile, caption_members
from data_pipeline.text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, TextEncoderError, load_text_encoder
from data_pipeline.video import ClipSpec, InputError, VideoClips, VideoInput, list_inputs, window_slots
from latte.errors import first_line

log = logging.getLogger("data_pipeline.add_captions")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m data_pipeline.add_captions", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--index", required=True, help="the captionless dataset: its root or index.json (local or s3://)")
    add("--manifest", required=True, help=".csv/.jsonl manifest with the videos' captions")
    add("--text-encoder", required=True, help="T5 encoder + tokenizer: local directory or hub id")
    add("--output", required=True, help="the captioned dataset: a directory or s3://bucket/prefix")
    add(
        "--max-caption-tokens",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="longer captions are cut and counted",
    )
    add("--clips-per-video", type=int, default=None, help="default: the sharding job's (SRC/job.json)")
    add("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add("--text-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: fp32 CPU, bf16 GPU")
    add("--text-batch", type=int, default=32, help="captions per text encoder call")
    add("--tmp-dir", default=None, help="local folder for shards in progress when writing to S3")
    return p


def _clips_per_video(args: argparse.Namespace, index_url: str) -> int:
    if args.clips_per_video is not None:
        return args.clips_per_video
    url = storage.join(index_url.rsplit("/", 1)[0], JOB_NAME)
    try:
        return int(json.loads(storage.read_bytes(url))["clips_per_video"]) if storage.exists(url) else 1
    except (ValueError, KeyError, TypeError):
        raise JobError(f"'{url}' is not a sharding job record; give --clips-per-video") from None


def _samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) of a shard's samples, in order."""
    stream = storage.open_read(url)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            key, members = None, {}
            for member in tar:
                sample_key, suffix = split_name(member.name)
                if not member.isfile() or sample_key is None:
                    continue
                if sample_key != key and key is not None:
                    yield key, members
                    members = {}
                key = sample_key
                members[suffix] = tar.extractfile(member).read()
            if key is not None:
                yield key, members
    finally:
        stream.close()


def _video_of(meta: dict, by_path: dict[str, VideoInput]) -> VideoInput:
    """The manifest's entry of a sample's source video (one without captions if it is not listed)."""
    source = str(meta["source"])
    return by_path.get(source) or VideoInput(int(meta.get("input_index", -1)), source, None, None)


def _clips_view(meta: dict, spec: ClipSpec) -> VideoClips:
    """What ``encode_captions`` reads of a video's clips (how many, of how many frames), from the metadata
    of one of its samples."""
    total = int(meta["num_video_frames"])
    windows: list[list[int]] = [[] for _ in window_slots(total, spec)]
    return VideoClips(torch.empty(0), windows, int(meta["frame_interval"]), 0.0, (0, 0), total)


def caption_shard(
    text: TextEncoder,
    spec: ClipSpec,
    url: str,
    out_url: str,
    task: int,
    by_path: dict[str, VideoInput],
    failed: dict[str, str],
    tmp_dir: str | None = None,
) -> ShardInfo | None:
    """Rewrite shard ``url`` into ``out_url`` with captions (None: no sample left); the videos that cannot
    be captioned go into ``failed``."""
    shard, current, captions = None, None, None
    for key, members in _samples(url):
        meta = json.loads(members["json"])
        video = _video_of(meta, by_path)
        if video.path != current:  # a shard holds whole videos, one after the other
            current, captions = video.path, None
            problem = caption_problem(video, spec)
            if problem is not None:
                failed.setdefault(video.path, problem)
                log.warning("failed: %s: %s", video.path, problem)
            else:
                captions = encode_captions(text, video, _clips_view(meta, spec), spec)
                shard = shard or ShardFile(out_url, tmp_dir)
                shard.captions_truncated += len({c.text for c in captions if c.truncated})
        if captions is None or shard is None:
            continue
        caption = captions[int(meta["clip"])]  # window j of the video (its mirrored copy has the same)
        meta["caption_tokens"] = int(caption.embedding.shape[0])
        meta["caption_truncated"] = caption.truncated
        sample = {k: v for k, v in members.items() if k not in (CAPTION, CAPTION_TEXT, "json")}
        sample.update(caption_members(caption))
        sample["json"] = json.dumps(meta, sort_keys=True).encode()
        shard.write({"__key__": key, **sample})
    return shard.publish(task) if shard else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("data_pipeline").setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
        index_url = index_url_for(args.index)
        source = load_index(index_url)
        out_index = index_url_for(args.output)
        if out_index.rsplit("/", 1)[0] == index_url.rsplit("/", 1)[0]:
            raise JobError("--output must differ from the dataset of --index (its shards are rewritten)")
        facts = source.facts
        spec = ClipSpec(
            facts.num_frames, facts.frame_interval, _clips_per_video(args, index_url), facts.image_size
        )
        inputs, _ = list_inputs(args.manifest)
        if not any(v.captions for v in inputs):
            raise JobError(f"manifest '{args.manifest}' gives no captions")
        storage.check_writable(args.output)
        text = load_text_encoder(
            args.text_encoder,
            pick_device(args.device),
            args.text_dtype,
            args.max_caption_tokens,
            args.text_batch,
        )
    except (JobError, DatasetIndexError, InputError, storage.StorageError, TextEncoderError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    by_path = {v.path: v for v in inputs}
    failed: dict[str, str] = {}
    captioned = dataclasses.replace(
        facts,
        text_encoder=text.name,
        caption_channels=text.width,
        max_caption_tokens=text.max_length,
        null_caption=NULL_CAPTION_NAME,
    )
    try:
        shards = []
        for info, url in zip(source.shards, source.shard_urls(index_url), strict=True):
            name = info.url.rsplit("/", 1)[-1]
            out_url = storage.join(args.output, name)
            done = caption_shard(text, spec, url, out_url, info.task, by_path, failed, args.tmp_dir)
            if done is not None:
                shards.append(done)
        (null,), _ = text.encode([""])
        save_null_caption(args.output, null)
        new_failed = [{"input": path, "error": error} for path, error in failed.items()]
        index = DatasetIndex(captioned, shards, [*source.failed, *new_failed])
        save_index(index, args.output)
    except storage.StorageError as exc:
        print(f"error: {first_line(exc)} (rerun to go on)", file=sys.stderr)
        return 1
    print(
        f"add_captions: {index.num_samples} samples in {len(shards)} shards captioned, videos failed "
        f"{len(new_failed)}, captions truncated {index.captions_truncated}; index {out_index}"
    )
    if index.num_samples == 0:
        print(f"error: dataset '{args.output}' has no samples left: no video has a caption", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
