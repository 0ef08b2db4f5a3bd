"""The offline sharding job: videos -> VAE posterior latents -> WebDataset shards + index, local or S3.

    python -m data_pipeline.shard_latents --input SRC --output DST --vae VAE [options]

SRC: a directory of videos (mp4/avi/webm/mkv; class = sorted first-level folder, as UCF101 is laid out; no
folders = unconditional) or a ``.csv``/``.jsonl`` manifest of ``path[,label]``, local or ``s3://``
(``video.list_inputs``). DST: a local directory or ``s3://bucket/prefix``.

Each sample is one clip: ``__key__`` = ``{input:08d}_c{clip:02d}`` (+ ``_flip`` for the mirrored copy), where
``input`` is the video's position in the path-sorted input list; ``latent.npy`` and ``latent_std.npy``
(F, C, h, w) float16, the posterior mean and std times the VAE scaling factor; ``cls`` (labelled data
only); ``json`` (source, fps, frame indices, interval used, original size, flipped, ...).

Captions (``--text-encoder T5``): the manifest gives each video a caption, or one per clip window (formats in
``data_pipeline.video``); each sample then also holds ``caption.npy``, the encoder's hidden states of the
caption's real tokens, (L, D) float16 with L <= ``--max-caption-tokens`` (default 120, Latte-1's), and
``caption.txt``, its text. A longer caption is cut to that many tokens and counted (``captions_truncated``
in the summary line, per shard and in total in the index); a video without a caption is a failed input.
The index records the encoder, D, the length and the empty prompt's embedding (``null_caption.npy`` beside
it: the null condition of classifier-free guidance; ``data_pipeline.index.load_null_caption``). To caption
shards that already exist, without encoding video again: ``python -m data_pipeline.add_captions``.

Images (``--images``): SRC holds still images (png/jpg/jpeg/webp/bmp, class folders or a manifest, as for
videos; read with PIL); each gives one one-frame sample, latents (1, C, h, w), resized and centre-cropped as
video frames are (``--num-frames``, ``--frame-interval`` and ``--clips-per-video`` do not apply; ``--flip``
does). The result is the image dataset of video-image joint training (``data.image_index``).

Restarts. The inputs are shuffled with ``--seed`` (so a shard mixes classes; ``--sorted`` keeps path
order), dealt to tasks as ``order[task::num_tasks]`` and cut into chunks of ``videos_per_shard`` videos
(``--samples-per-shard`` over the samples one video gives). Chunk ``p`` of task ``t`` becomes shard
``{prefix}-{t:05d}-{p:06d}.tar``: which videos a shard holds is fixed by position alone, so a rerun needs no
decoding to know what is done. After every finished chunk the task rewrites its part
(``parts/task-XXXXX.json``); a rerun skips each chunk whose shard is listed there and exists with the
recorded size (or whose videos all failed) and redoes the rest, byte-identically on the same device and
dtype. ``DST/job.json`` records the job's settings; a rerun with other ones (inputs, task count, clip
settings, VAE) is refused rather than mixing two datasets. A task that ends and finds every task's part
complete writes ``index.json`` (so the one that finishes last does; two finishing together write the same
file); ``python -m data_pipeline.build_index DST`` merges by hand.

Exit codes: 0 done, also when some inputs failed (they are listed under ``failed``); 2 a mistake found
before any work, or a merged index without samples (every input failed: the index is written, listing the
failures, but a SLURM ``afterok`` training job must not start); 1 storage failed mid-job (rerun the task).
An array task whose own share all failed exits 0 unless it is the one that merges, so that the other
tasks and the index job still run.

Several GPUs on one node: ``--devices cuda:0,cuda:1`` runs one process per device (each a sub-task), or
start one process per GPU with ``--task-index``/``--num-tasks`` and ``--device``.

Test hook: ``LATTE_SHARD_KILL_AFTER_SAMPLES=N`` SIGKILLs the job once it has written N samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.build_index import JOB_NAME
from data_pipeline.index import (
    NULL_CAPTION_NAME,
    DatasetFacts,
    DatasetIndex,
    DatasetIndexError,
    ShardInfo,
    load_part,
    merge_parts,
    part_url,
    save_index,
    save_null_caption,
)
from data_pipeline.shard_writer import Caption, ShardFile, clip_samples, temp_path
from data_pipeline.text_encoder import DEFAULT_MAX_LENGTH, TextEncoder, TextEncoderError, load_text_encoder
from data_pipeline.vae import LatentEncoder, VaeError, load_vae
from data_pipeline.video import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    ClipSpec,
    InputError,
    VideoClips,
    VideoInput,
    clip_loader,
    list_inputs,
    window_slots,
)
from latte.errors import first_line

log = logging.getLogger("data_pipeline.shard_latents")
JOB_FORMAT = "latte-shard-job/1"
SHARD_BYTES = 1_000_000_000  # default shard size target
KILL_ENV = "LATTE_SHARD_KILL_AFTER_SAMPLES"
Done = dict[int, tuple[ShardInfo | None, list[dict[str, str]]]]  # chunk -> (shard or None, its failures)


class JobError(RuntimeError):
    """A problem found before any work: printed as one ``error:`` line, exit code 2."""


# ---------------------------------------------------------------------------------------------------------
# the plan: which videos go into which shard of which task, and which shards are done
# ---------------------------------------------------------------------------------------------------------


def task_chunks(order: list[VideoInput], task: int, num_tasks: int, per_shard: int) -> list[list[VideoInput]]:
    """The videos of each shard of ``task``: ``order[task::num_tasks]`` cut into chunks of ``per_shard``."""
    mine = order[task::num_tasks]
    return [mine[i : i + per_shard] for i in range(0, len(mine), per_shard)]


def finished_chunks(
    part: DatasetIndex | None, chunks: list[list[VideoInput]], names: list[str], output: str | None
) -> Done:
    """The chunks a previous run finished: listed in its part with their shard, or with all videos failed.

    With ``output``, a listed shard counts only if its object exists there with the recorded size.
    """
    if part is None:
        return {}
    shards = {s.url: s for s in part.shards}
    failures = {f["input"]: f for f in part.failed}
    done: Done = {}
    for c, (chunk, name) in enumerate(zip(chunks, names, strict=True)):
        failed = [failures[v.path] for v in chunk if v.path in failures]
        shard = shards.get(name)
        if shard is not None and (output is None or storage.size(storage.join(output, name)) == shard.bytes):
            done[c] = (shard, failed)
        elif shard is None and len(failed) == len(chunk):
            done[c] = (None, failed)
    return done


# ---------------------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Summary:
    videos_ok: int = 0
    videos_failed: int = 0
    clips: int = 0
    shards: int = 0
    shards_skipped: int = 0
    start: float = 0.0  # time.perf_counter() when encoding began
    seconds: float = 0.0  # set when the task ends
    merged: bool = False
    captioned: bool = False  # the job encodes captions
    captions_truncated: int = 0  # captions cut to the text encoder's length (in the shards written)

    @property
    def rate(self) -> float:
        """Clips per second so far (or over the whole task, once it has ended)."""
        elapsed = self.seconds or (time.perf_counter() - self.start)
        return self.clips / elapsed if elapsed > 0 else 0.0

    def line(self, task: int, num_tasks: int) -> str:
        rate = self.rate
        captions = f"; captions truncated {self.captions_truncated}" if self.captioned else ""
        return (
            f"shard_latents task {task}/{num_tasks}: videos ok {self.videos_ok}, failed "
            f"{self.videos_failed}; clips {self.clips}; shards written {self.shards}, skipped as done "
            f"{self.shards_skipped}{captions}; {rate:.2f} clips/s in {self.seconds:.1f} s"
        )


@dataclass
class Job:
    """Everything a task needs, validated by ``prepare``."""

    inputs: list[VideoInput]
    classes: list[str]
    output: str
    encoder: LatentEncoder
    spec: ClipSpec
    flip: bool
    task: int
    num_tasks: int
    videos_per_shard: int
    seed: int | None  # input shuffle seed; None keeps path order
    prefix: str
    vae_id: str
    workers: int = 4
    decode_threads: int = 1
    tmp_dir: str | None = None
    progress: bool = True
    text: TextEncoder | None = None  # encodes the manifest's captions; None = no captions

    @cached_property
    def facts(self) -> DatasetFacts:
        spec = self.spec
        text = self.text
        return DatasetFacts(
            vae=self.vae_id,
            scaling_factor=self.encoder.scaling_factor,
            latent_shape=self.encoder.latent_shape(spec.num_frames, spec.image_size),
            num_frames=spec.num_frames,
            frame_interval=spec.frame_interval,
            image_size=spec.image_size,
            classes=list(self.classes),
            text_encoder=text.name if text else "",
            caption_channels=text.width if text else 0,
            max_caption_tokens=text.max_length if text else 0,
            null_caption=NULL_CAPTION_NAME if text else "",
        )

    @cached_property
    def order(self) -> list[VideoInput]:
        order = list(self.inputs)
        if self.seed is not None:
            random.Random(self.seed).shuffle(order)
        return order

    @cached_property
    def positions(self) -> dict[str, int]:
        return {v.path: v.position for v in self.inputs}

    def chunks(self, task: int) -> tuple[list[list[VideoInput]], list[str]]:
        """The video chunks of ``task`` and their shard names."""
        chunks = task_chunks(self.order, task, self.num_tasks, self.videos_per_shard)
        return chunks, [f"{self.prefix}-{task:05d}-{c:06d}.tar" for c in range(len(chunks))]

    def settings(self) -> dict:
        """What makes two runs the same job (kept in DST/job.json; device, dtype, workers may change)."""
        rows = [(v.path, v.label, *([list(v.captions or ())] if self.text else [])) for v in self.inputs]
        listing = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
        return {
            "format": JOB_FORMAT,
            "inputs": len(self.inputs),
            "inputs_sha256": listing,
            "num_tasks": self.num_tasks,
            "videos_per_shard": self.videos_per_shard,
            "seed": self.seed,
            "prefix": self.prefix,
            "clips_per_video": self.spec.clips_per_video,
            "flip": self.flip,
            "facts": self.facts.to_json(),
        }

    def failures(self, done: Done) -> list[dict[str, str]]:
        """The failures of the finished chunks, in input order."""
        failures = [f for _, fs in done.values() for f in fs]
        return sorted(failures, key=lambda f: (self.positions.get(f["input"], -1), f["input"]))


def check_job_record(job: Job) -> None:
    """Refuse an output written by a different job; record this job's settings if none are there."""
    url, settings = storage.join(job.output, JOB_NAME), job.settings()
    if not storage.exists(url):
        storage.write_bytes(url, json.dumps(settings, indent=1, sort_keys=True).encode())
        return
    recorded = json.loads(storage.read_bytes(url))
    differ = sorted(k for k in set(settings) | set(recorded) if settings.get(k) != recorded.get(k))
    if differ:
        raise JobError(
            f"'{job.output}' holds a different job (differs in: {', '.join(differ)}); "
            "use a new output or remove the old one"
        )


def _remove_stale_temps(job: Job) -> None:
    """Temporary shards a killed run of this task left behind (in a local output, or in the temp folder)."""
    example = temp_path(storage.join(job.output, f"{job.prefix}-{job.task:05d}-000000.tar"), job.tmp_dir)
    pattern = example.name.replace("-000000.tar", "-*.tar").rsplit(".tmp-", 1)[0] + ".tmp-*"
    for stale in example.parent.glob(pattern):
        stale.unlink(missing_ok=True)


def run_task(job: Job) -> Summary:
    """Encode and write every unfinished shard of ``job.task``; rewrite the part after each chunk."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    chunks, names = job.chunks(job.task)
    done = finished_chunks(load_part(job.output, job.task), chunks, names, job.output)
    summary = Summary(shards_skipped=sum(shard is not None for shard, _ in done.values()))
    summary.captioned = job.text is not None
    todo = [c for c in range(len(chunks)) if c not in done]
    total, skipped = sum(map(len, chunks)), sum(len(chunks[c]) for c in done)
    log.info(
        "task %d/%d: %d videos in %d shards, %d done before; %s %s",
        job.task,
        job.num_tasks,
        total,
        len(chunks),
        summary.shards_skipped,
        job.vae_id,
        job.encoder,
    )
    _remove_stale_temps(job)
    if job.text is not None and not storage.exists(storage.join(job.output, NULL_CAPTION_NAME)):
        (null,), _ = job.text.encode([""])  # (L0, D): the empty prompt, the null condition of guidance
        save_null_caption(job.output, null)
    if not chunks:  # more tasks than inputs: an empty part still tells the merge that this task is done
        save_index(DatasetIndex(job.facts), part_url(job.output, job.task))
    items = iter(clip_loader([v for c in todo for v in chunks[c]], job.spec, job.workers, job.decode_threads))
    summary.start = time.perf_counter()
    interval = 0.5 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not every video
    bar = tqdm(total=total, initial=skipped, unit="video", disable=not job.progress, mininterval=interval)
    with bar, logging_redirect_tqdm():
        for c in todo:
            done[c] = _write_chunk(job, len(chunks[c]), names[c], items, summary, bar)
            summary.shards += done[c][0] is not None
            shards = sorted((s for s, _ in done.values() if s is not None), key=lambda s: s.url)
            save_index(DatasetIndex(job.facts, shards, job.failures(done)), part_url(job.output, job.task))
    summary.seconds = time.perf_counter() - summary.start
    return summary


def _write_chunk(
    job: Job, videos: int, name: str, items: Iterator[dict], summary: Summary, bar
) -> tuple[ShardInfo | None, list[dict[str, str]]]:
    """Encode the next ``videos`` decoded videos into shard ``name`` and publish it (if any succeeded)."""
    shard, failures = None, []
    kill_after = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    for _ in range(videos):
        item = next(items)
        video, clips = item["input"], item["clips"]
        error = item["error"] if clips is None else None
        if error is None and job.text is not None:
            error = caption_problem(video, job.spec)
        if error is not None:
            failures.append({"input": video.path, "error": error})
            log.warning("failed: %s: %s", video.path, error)
            summary.videos_failed += 1
        else:
            captions = encode_captions(job.text, video, clips, job.spec) if job.text is not None else None
            mean, std = job.encoder.encode_clips(clips.pixels, job.flip)
            shard = shard or ShardFile(storage.join(job.output, name), job.tmp_dir)
            truncated = len({c.text for c in captions if c.truncated}) if captions else 0
            shard.captions_truncated += truncated
            summary.captions_truncated += truncated
            for sample in clip_samples(video, clips, mean, std, job.flip, captions):
                shard.write(sample)
                summary.clips += 1
                if kill_after is not None and summary.clips >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)  # the test hook: a real, unclean death
            summary.videos_ok += 1
        bar.update(1)
        bar.set_postfix(clips_s=f"{summary.rate:.1f}", failed=summary.videos_failed, refresh=False)
    return (shard.publish(job.task) if shard else None), failures


def caption_problem(video: VideoInput, spec: ClipSpec) -> str | None:
    """Why ``video`` cannot be captioned (one line for the index's ``failed``), or None."""
    if not video.captions:
        return "no caption in the manifest"
    if any(not c.strip() for c in video.captions):
        return "empty caption in the manifest"
    given, windows = len(video.captions), spec.clips_per_video
    if given not in (1, windows):
        return f"the manifest gives {given} captions; one, or one per clip window ({windows}), is needed"
    return None


def clip_captions(video: VideoInput, windows: int, total_frames: int, spec: ClipSpec) -> list[str]:
    """The caption of each of a video's ``windows`` clips: its one caption, or the one of the window slot
    each clip took (``video.window_slots``)."""
    assert video.captions
    if len(video.captions) == 1:
        return [video.captions[0]] * windows
    return [video.captions[k] for k in window_slots(total_frames, spec)]


def encode_captions(text: TextEncoder, video: VideoInput, clips: VideoClips, spec: ClipSpec) -> list[Caption]:
    """Each clip's caption, encoded: a video's distinct captions in one call, so they do not depend on what
    else the job does (and ``add_captions`` gets the same bytes)."""
    texts = clip_captions(video, len(clips.frame_indices), clips.total_frames, spec)
    distinct = list(dict.fromkeys(texts))
    embeds, _ = text.encode(distinct)
    cut = {t: n > text.max_length for t, n in zip(distinct, text.token_counts(distinct), strict=True)}
    by_text = {t: Caption(t, e, cut[t]) for t, e in zip(distinct, embeds, strict=True)}
    for caption in distinct:
        if cut[caption]:
            log.info("caption of %s cut to %d tokens: %.60s...", video.path, text.max_length, caption)
    return [by_text[t] for t in texts]


def incomplete_tasks(job: Job) -> list[int]:
    """Tasks whose part does not yet cover all their chunks (judged from the parts alone)."""
    missing = []
    for task in range(job.num_tasks):
        chunks, names = job.chunks(task)
        if len(finished_chunks(load_part(job.output, task), chunks, names, None)) < len(chunks):
            missing.append(task)
    return missing


def maybe_merge(job: Job) -> bool:
    """Write index.json if every task is complete; else say which are not and how to merge later."""
    missing = incomplete_tasks(job)
    if missing:
        hint = f"python -m data_pipeline.build_index {job.output}"
        log.info("tasks %s of %d are not finished; when they are, run: %s", missing[:10], job.num_tasks, hint)
        return False
    index = merge_parts(job.output, job.num_tasks)
    log.info(
        "index: %s (%d samples in %d shards, %d failed inputs)",
        storage.join(job.output, "index.json"),
        index.num_samples,
        len(index.shards),
        len(index.failed),
    )
    return True


# ---------------------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit code 2, like every other preflight error
        raise JobError(message)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m data_pipeline.shard_latents", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--input", required=True, help="video directory or .csv/.jsonl manifest (local or s3://)")
    add("--output", required=True, help="output directory or s3://bucket/prefix")
    add("--vae", required=True, help="AutoencoderKL: local directory or hub id")
    add("--vae-subfolder", default=None, help="subfolder of --vae (default: 'vae' in a local pipeline dir)")
    add("--scaling-factor", type=float, default=None, help="override the VAE config's scaling factor")
    add("--num-frames", type=int, default=16)
    add("--frame-interval", type=int, default=3)
    add("--clips-per-video", type=int, default=4, help="windows spread evenly over each video")
    add("--image-size", type=int, default=256)
    add(
        "--images",
        action="store_true",
        help="the inputs are still images (png/jpg/webp/bmp; class folders or a manifest): one-frame latents "
        "(1, C, h, w), the image dataset of video-image joint training (data.image_index)",
    )
    add("--flip", action="store_true", help="also store each clip mirrored horizontally")
    add("--samples-per-shard", type=int, default=None, help="default: ~1 GB; shards hold whole videos")
    add("--prefix", default="shard", help="shard file name prefix")
    add("--seed", type=int, default=0, help="input shuffle seed (which videos share a shard)")
    add("--sorted", action="store_true", help="keep path order instead of shuffling the inputs")
    add("--task-index", type=int, default=None, help="default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN")
    add("--num-tasks", type=int, default=None, help="default: $SLURM_ARRAY_TASK_COUNT, or 1")
    add("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    add("--devices", default="", help="comma-separated devices: one sub-process (sub-task) per device")
    add("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: fp32 CPU, bf16 GPU")
    add("--vae-batch", type=int, default=32, help="frames per VAE encode call")
    add(
        "--text-encoder",
        default=None,
        help="T5 encoder + tokenizer (local directory or hub id) for the manifest's captions (default: none)",
    )
    add(
        "--max-caption-tokens",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="longer captions are cut and counted",
    )
    add(
        "--text-dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="text encoder: auto fp32 CPU, bf16 GPU",
    )
    add("--text-batch", type=int, default=32, help="captions per text encoder call")
    workers = min(4, max(1, (os.cpu_count() or 2) - 1))
    add(
        "--workers",
        type=int,
        default=workers,
        help=f"DataLoader decode workers, 0: inline (default {workers})",
    )
    add("--decode-threads", type=int, default=1, help="ffmpeg threads per decode worker")
    add(
        "--tmp-dir",
        default=None,
        help="local folder for shards in progress when writing to S3 (default: "
        "the system's; created with its parents if missing; unused for a local output)",
    )
    add("--no-merge", action="store_true", help="do not write index.json, even when every task is done")
    add("--no-progress", action="store_true", help="no progress bar")
    return p


def task_from_env(args: argparse.Namespace) -> tuple[int, int]:
    """(task index, number of tasks): the options, else the SLURM array's (ids counted from its first)."""
    env = os.environ
    num = args.num_tasks if args.num_tasks is not None else int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    task = args.task_index
    if task is None:
        task = int(env.get("SLURM_ARRAY_TASK_ID", 0)) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    if num < 1 or not 0 <= task < num:
        raise JobError(f"task index {task} is not in 0..{num - 1} (num tasks {num})")
    return task, num


def _check_numbers(args: argparse.Namespace) -> None:
    at_least = {
        "num_frames": 1,
        "frame_interval": 1,
        "clips_per_video": 1,
        "image_size": 1,
        "vae_batch": 1,
        "decode_threads": 1,
        "samples_per_shard": 1,
        "workers": 0,
        "max_caption_tokens": 1,
        "text_batch": 1,
    }
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise JobError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if args.scaling_factor is not None and not args.scaling_factor > 0:
        raise JobError(f"--scaling-factor must be positive, got {args.scaling_factor}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.prefix):
        raise JobError(f"--prefix may hold letters, digits, '_' and '-' only, got {args.prefix!r}")
    if args.tmp_dir is not None and storage.is_s3(args.tmp_dir):
        raise JobError(f"--tmp-dir must be a local folder, got '{args.tmp_dir}'")


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise JobError(f"unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JobError(f"device '{name}' requested but CUDA is not available")
    return device


def _text_encoder(
    args: argparse.Namespace, inputs: list[VideoInput], device: torch.device
) -> TextEncoder | None:
    """The text encoder of ``--text-encoder``, once the inputs are known to have captions."""
    if args.text_encoder is None:
        if any(v.captions for v in inputs):
            log.info("the manifest's captions are not stored: no --text-encoder given")
        return None
    if not any(v.captions for v in inputs):
        raise JobError(
            f"--text-encoder given, but '{args.input}' gives no captions (a .csv manifest with a 'caption' "
            'column, or a .jsonl one with "caption"/"captions")'
        )
    return load_text_encoder(
        args.text_encoder, device, args.text_dtype, args.max_caption_tokens, args.text_batch
    )


def prepare(args: argparse.Namespace) -> Job:
    """Check everything before any work (``JobError``): arguments, inputs, output, VAE, an earlier run."""
    _check_numbers(args)
    if args.images:  # one frame per image: the clip options do not apply
        args.num_frames, args.frame_interval, args.clips_per_video = 1, 1, 1
    task, num_tasks = task_from_env(args)
    device = pick_device(args.device)
    try:
        inputs, classes = list_inputs(args.input, IMAGE_EXTENSIONS if args.images else VIDEO_EXTENSIONS)
        if storage.is_s3(args.output) and args.tmp_dir is not None:  # else shards are written beside DST
            storage.check_writable(args.tmp_dir, what="--tmp-dir")
        storage.check_writable(args.output)
        encoder = load_vae(
            args.vae, device, args.dtype, args.scaling_factor, args.vae_subfolder, args.vae_batch
        )
        shape = encoder.latent_shape(args.num_frames, args.image_size)
        text = _text_encoder(args, inputs, device)
    except (InputError, storage.StorageError, VaeError, TextEncoderError) as exc:
        raise JobError(str(exc)) from None
    per_video = args.clips_per_video * (2 if args.flip else 1)
    per_shard = args.samples_per_shard or max(1, SHARD_BYTES // (4 * int(np.prod(shape)) + 4096))
    spec = ClipSpec(args.num_frames, args.frame_interval, args.clips_per_video, args.image_size, args.images)
    job = Job(
        inputs,
        classes,
        args.output,
        encoder,
        spec,
        args.flip,
        task,
        num_tasks,
        videos_per_shard=max(1, per_shard // per_video),
        seed=None if args.sorted else args.seed,
        prefix=args.prefix,
        vae_id=args.vae,
        workers=args.workers,
        decode_threads=args.decode_threads,
        tmp_dir=args.tmp_dir,
        progress=not args.no_progress,
        text=text,
    )
    check_job_record(job)
    return job


def _sub_task_args(device: str, task: int, num_tasks: int) -> list[str]:
    """Options that make a run one sub-task on one device (later options win in argparse)."""
    return ["--devices", "", "--device", device, "--task-index", str(task), "--num-tasks", str(num_tasks)]


def fan_out(args: argparse.Namespace, argv: list[str], devices: list[str]) -> int:
    """One sub-process per device: device j of task i runs sub-task i * D + j of num_tasks * D. When all
    succeed, the index is merged here if every sub-task of the job is complete."""
    task, num_tasks = task_from_env(args)
    width = len(devices)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "data_pipeline.shard_latents",
                *argv,
                "--no-merge",
                *_sub_task_args(device, task * width + j, num_tasks * width),
            ]
        )
        for j, device in enumerate(devices)
    ]
    code = max(p.wait() for p in procs)
    if code == 0 and not args.no_merge:
        last = _sub_task_args("cpu", num_tasks * width - 1, num_tasks * width)
        maybe_merge(prepare(build_parser().parse_args([*argv, *last])))
    return code


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 done (even with failed inputs), 2 a preflight error or a merged index without samples (one
    line), 1 storage failed mid-job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("data_pipeline").setLevel(logging.INFO)  # ours at INFO; boto3 & co. stay quiet
    try:
        args = build_parser().parse_args(argv)
        devices = [d for d in args.devices.split(",") if d]
        if len(devices) > 1:
            return fan_out(args, argv, devices)
        args.device = devices[0] if devices else args.device
        job = prepare(args)
    except (JobError, DatasetIndexError) as exc:  # (the index: merged by fan_out after its sub-tasks)
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    summary, error, code = None, None, 0
    try:
        summary = run_task(job)
        if not args.no_merge:
            summary.merged = maybe_merge(job)
    except storage.StorageError as exc:  # e.g. S3 went away mid-job: finished shards stay recorded
        error, code = f"{first_line(exc)} (finished shards are kept; rerun the task to go on)", 1
    except DatasetIndexError as exc:  # an unreadable part, or the merged index has no samples
        error, code = first_line(exc), 2
    if summary is not None:  # what the task did, also when its merge failed
        print(summary.line(job.task, job.num_tasks))
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
