"""Train Latte with DeepSpeed ZeRO-2/3.

    deepspeed --num_gpus N train.py --config configs/X.yaml [--set key=value ...]
    torchrun --nproc_per_node N train.py ...
    srun python train.py ...            (rank layout from SLURM's variables)
    python train.py ...                 (one process)

A thin entry point: parse and validate the config (before any process group exists), set up the ranks,
build model -> engine, loop, report. The loop holds no noise or loss math (``diffusion.training_losses``
does) and syncs with the host only every ``log_every`` steps.

Exit codes: 0 finished; 1 a rank failed (its traceback is printed); 2 a config or checkpoint mistake (one
``error:`` line); 3 stopped by SIGUSR1/SIGTERM at an agreed step after writing a checkpoint (SLURM's
warning before preemption or the time limit: requeue, and ``train.resume=auto`` continues the run).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from latte.checkpoint import SaveError
from latte.config import Config, ConfigError, add_set_argument, load_config
from latte.preemption import EXIT_PREEMPTED, StopFlag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/*.yaml); defaults when omitted")
    add_set_argument(parser, "train.lr=2e-4 model.attention=sdpa")
    parser.add_argument(
        "--resume",
        help="auto (newest complete checkpoint in train.ckpt_dir, else fresh; the default), none, or a "
        "step_XXXXXXXX / checkpoint directory (same as --set train.resume=...)",
    )
    # the deepspeed launcher passes --local_rank; the rank layout is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_run_dir(cfg: Config, previous: str | None = None) -> Path:
    """results_dir/NNN-<model>: a fresh directory per run, holding the resolved config and TensorBoard events.
    A resumed run continues in ``previous``, the directory its checkpoint was written from (one curve across
    restarts), when it still exists."""
    root = Path(cfg.train.results_dir)
    if previous and (root / previous).is_dir():
        cfg.save(root / previous / "config.yaml")
        return root / previous
    root.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "-", cfg.model.name).strip("-")
    index = len([p for p in root.iterdir() if p.is_dir() and re.match(r"\d{3}-", p.name)])  # not checkpoints/
    while True:
        run_dir = root / f"{index:03d}-{tag}"
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            index += 1
    cfg.save(run_dir / "config.yaml")
    return run_dir


class DivergedError(ConfigError):
    """The loss became NaN/inf: the run stops without a checkpoint (exit 2, not requeued)."""


def train(cfg: Config, world, stop: StopFlag | None = None) -> tuple[list[float], object, object]:
    """The training loop on this rank; returns the (all-reduced) mean loss of every logging interval, the
    DeepSpeed engine and the sharded EMA. With ``stop``, a stop signal ends the loop early at a step boundary
    agreed by all ranks, with a checkpoint (``stop.requested`` and ``stop.stopped_at`` tell the caller).
    The checkpoint directory is claimed (``latte.run_lock``) for the run's duration, whatever ends it."""
    from data_pipeline.sources import open_batches
    from latte.checkpoint import CheckpointManager
    from latte.parallel.sequence import data_place

    # first: a dataset that does not fit the config fails before any build
    try:  # sequence parallelism: each group of P ranks is one data-parallel rank (the same samples)
        place = data_place(world.rank, world.world_size, cfg.train.sequence_parallel)
    except ValueError as exc:
        raise ConfigError(f"train.sequence_parallel: {exc}") from None
    data = open_batches(cfg, place.rank, place.world_size, world.device.type)
    checkpoints = CheckpointManager(cfg, world)
    try:
        return _train(cfg, world, stop, data, checkpoints, place)
    finally:
        checkpoints.close()


def _train(
    cfg: Config, world, stop: StopFlag | None, data, checkpoints, place
) -> tuple[list[float], Any, Any]:
    from data_pipeline.synthetic import CAPTION_TOKENS
    from latte.builders import attention_line
    from latte.checkpoint import TrainState
    from latte.conditioning import conditioning_of, to_device
    from latte.engine import set_grad_clip
    from latte.lora import has_dropout, set_dropout_seeds
    from latte.metrics import MetricsLogger
    from latte.precision import DTYPES
    from latte.seeding import TrainingDraws, batch_indices
    from latte.training import build_training

    t_cfg = cfg.train
    null = data.null_caption()  # captioned data: the empty prompt's embedding, the null condition
    conditioning = conditioning_of(cfg.model, None if null is None else torch.from_numpy(null))
    missing = [key for key in conditioning.batch_keys if key not in data.batch_keys]
    if missing:
        raise ConfigError(f"the model is conditioned on {', '.join(missing)}, which the data does not carry")
    validator = None
    if cfg.data.val_index:  # read once, before any build (a bad validation set is a config error)
        from data_pipeline.sources import open_validation_set
        from latte.evaluation.validation_loss import Validator

        validator = Validator(cfg, world, conditioning, open_validation_set(cfg, data.facts), place)
    resume_from = checkpoints.find()  # refused (another config, dir in use, unwritable) before any build
    attention = attention_line(cfg, world.device, DTYPES[t_cfg.precision])  # can't run: an error
    training = build_training(
        cfg, world, load_universal=checkpoints.reshard, resuming=resume_from is not None
    )
    engine, ema, diffusion = training.engine, training.ema, training.diffusion
    run_dir = make_run_dir(cfg, checkpoints.resumed_run_dir) if world.is_main else None
    caption_tokens = data.facts.max_caption_tokens if data.facts is not None else CAPTION_TOKENS
    metrics = MetricsLogger(run_dir, world.is_main, cfg, world.world_size, world.device, caption_tokens)
    state = TrainState(engine, ema, data)
    if world.is_main:
        print(_run_line(cfg, run_dir, training, metrics), flush=True)
        print(attention, flush=True)
        if validator is not None:
            print(validator.describe(), flush=True)

    start_step = checkpoints.load(resume_from, state) if resume_from is not None else 0
    if resume_from is None and world.is_main:
        where = f"no complete checkpoint in {checkpoints.dir}"
        why = "train.resume=none" if t_cfg.resume == "none" else where
        print(f"starting at step 0 ({why})", flush=True)
    if start_step >= t_cfg.max_steps:
        if world.is_main:
            print(
                f"nothing to train: the run is already at step {start_step}, train.max_steps is "
                f"{t_cfg.max_steps} (raise train.max_steps to continue it)",
                flush=True,
            )
        metrics.close()
        return [], engine, ema
    batches = iter(data)  # after load: the stream continues where the checkpoint's left off
    micro, accum, ws = t_cfg.micro_batch_size, t_cfg.gradient_accumulation_steps, world.world_size
    sp = t_cfg.sequence_parallel
    images = cfg.data.use_image_num  # K single-frame images after each clip's F frames (joint training)
    frames = cfg.data.num_frames + images
    latent_shape = (frames, cfg.model.in_channels, cfg.data.latent_size, cfg.data.latent_size)
    # (t, noise, condition dropout) of each sample from (seed, step, its index in the global batch)
    draws = TrainingDraws(
        t_cfg.seed, diffusion.num_timesteps, latent_shape, world.device, conditioning.dropout_prob, images > 0
    )
    adapter_dropout = has_dropout(engine.module)
    interval_loss = torch.zeros((), device=world.device)  # the sum of this rank's losses since the last log
    history: list[float] = []

    def mean_loss_since(first: int, done: int) -> float:
        """The all-reduced mean loss of steps ``first+1 .. done``: one collective and host sync. NaN/inf
        stops the run without a checkpoint and without a further step."""
        total = interval_loss.detach().clone()
        torch.distributed.all_reduce(total)
        mean = total.item() / ((done - first) * ws)
        if not math.isfinite(mean):
            latest = checkpoints.dir / "latest"
            good = latest.read_text().strip() if latest.is_file() else "none"
            raise DivergedError(
                f"the loss is {mean} in steps {first + 1}-{done}: stopped without writing a checkpoint "
                f"(latest stays {good}); lower train.lr or clip earlier (train.clip_start_step), then resume"
            )
        return mean

    def save(done: int) -> None:  # non-finite weights are never saved: the loss since the last log first
        if metrics.interval_start < done:
            mean_loss_since(metrics.interval_start, done)
        checkpoints.save(done, state, run_dir)

    if stop is not None:
        stop.arm()
    metrics.start(start_step)
    for step in range(start_step, t_cfg.max_steps):
        set_grad_clip(engine, t_cfg.clip_max_norm if step >= t_cfg.clip_start_step else 0.0)
        for a in range(accum):  # engine.step() steps the optimizer exactly at every accum-th micro-batch
            with metrics.waiting_for_data():
                batch = next(batches)
            drawn = draws(step, batch_indices(a, place.rank, place.world_size, micro))  # the group's samples
            if adapter_dropout:  # LoRA dropout masks from the samples' seeds (forward and recomputation)
                set_dropout_seeds(engine.module, drawn.seeds)
            x = to_device(batch["latent"], world.device, torch.float32)  # (B, F+K, C, h, w)
            kwargs = conditioning.training_kwargs(batch, world.device, drawn.drop, drawn.image_drop)
            if images:
                kwargs["use_image_num"] = images
            if place.sequence is not None:
                kwargs["sequence"] = place.sequence
            loss = diffusion.training_losses(training.model_fn, x, drawn.t, kwargs, noise=drawn.noise)["loss"]
            loss = loss.mean()
            # each rank of a group holds its part of the sample's gradient and DeepSpeed averages over all
            # P x DP ranks: x P makes it the mean over the DP groups of the whole gradients
            engine.backward(loss * sp if sp > 1 else loss)
            engine.step()
            if engine.was_step_applied():  # an optimizer step happened (not a micro-batch, not an fp16 skip)
                ema.update()
            interval_loss += loss.detach() / accum
        done = step + 1
        if metrics.should_log(done):
            history.append(mean_loss_since(metrics.interval_start, done))
            grad_norm = engine.get_global_grad_norm()
            lr = engine.get_lr()[0]
            grad_norm = float(grad_norm) if grad_norm is not None else None
            metrics.log_step(done, {"train/loss": history[-1], "train/grad_norm": grad_norm, "train/lr": lr})
            interval_loss.zero_()
        if validator is not None and validator.due(done):
            began = time.perf_counter()
            results = validator.run(training)
            metrics.log_validation(done, results, time.perf_counter() - began)
        saved = checkpoints.due(done)
        if saved:
            save(done)
        check = done % t_cfg.stop_check_every == 0  # the same steps on every rank, across restarts
        if stop is not None and check and done < t_cfg.max_steps and stop.agreed():  # one CPU all-reduce
            if not saved:
                save(done)
            stop.stopped_at = done
            break
    metrics.close()
    return history, engine, ema


def _run_line(cfg: Config, run_dir: Path | None, training, metrics) -> str:
    t, ws = cfg.train, metrics.world_size
    peak = f"{metrics.peak:.3g} FLOP/s" if metrics.peak else "n/a"
    p, dp = t.sequence_parallel, t.data_parallel_size(ws)
    sp = f" (sequence parallel {p} x data parallel {dp})" if p > 1 else ""
    params = f"{training.n_params / 1e6:.2f}M params"
    lora = cfg.model.lora
    if lora.rank:
        params = (
            f"LoRA rank {lora.rank}: {training.n_params / 1e6:.3f}M trainable params of "
            f"{training.n_total / 1e6:.2f}M (base {cfg.model.init_from})"
        )
    return (
        f"run dir {run_dir} | {cfg.model.name} {params} | {ws} x {metrics.device_name}{sp} | "
        f"{t.precision} | ZeRO {t.zero_stage} | global batch {metrics.global_batch} = {t.micro_batch_size} "
        f"micro x {t.gradient_accumulation_steps} accumulation x {dp} {'groups' if p > 1 else 'ranks'}"
        f" | peak {peak}"
    )


def _config_error(error: ConfigError, rank: int) -> int:
    """One ``error:`` line per job, from rank 0. The other ranks (which found the same mistake) wait a moment
    before exiting, so the launcher does not stop rank 0 for their exit before it has printed."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(3.0)
    return 2


def main(argv: list[str] | None = None) -> int:
    stop = StopFlag()  # first: SIGUSR1's default action would kill the process
    args = parse_args(argv)
    try:
        overrides = args.set + ([f"train.resume={args.resume}"] if args.resume else [])
        cfg = load_config(args.config, overrides)  # every config mistake surfaces here, before any rendezvous
    except ConfigError as e:
        return _config_error(e, int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))))
    from latte.engine import setup_distributed

    world = setup_distributed(cfg)
    from data_pipeline.loader import DatasetUnreadableError

    try:
        history, _, _ = train(cfg, world, stop)
    except (SaveError, DatasetUnreadableError) as e:  # found by the rank that hit it: it says so itself
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(2)
    except ConfigError as e:  # found while building (e.g. the DeepSpeed JSON): the same on every rank
        torch.distributed.destroy_process_group()
        return _config_error(e, world.rank)
    except BaseException:
        # One failing rank must end the job, not leave the others waiting in a collective: print this rank's
        # traceback and exit at once; the launcher (deepspeed, torchrun, srun) then stops the other ranks.
        print(f"[rank {world.rank}] training failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        os._exit(1)
    if world.is_main and len(history) >= 2:
        print(f"loss {history[0]:.4f} (first interval) -> {history[-1]:.4f} (last interval)", flush=True)
    if world.is_main and stop.stopped_at is not None:  # the last line, whatever the launcher's exit code
        why, at = stop.received, stop.stopped_at
        print(
            f"stopped on request ({why}; exit {EXIT_PREEMPTED}: requeue, the next run resumes with "
            f"train.resume=auto); checkpoint written at step {at}",
            flush=True,
        )
    torch.distributed.destroy_process_group()
    return EXIT_PREEMPTED if stop.stopped_at is not None else 0


if __name__ == "__main__":
    code = main()
    # The job's work is done and saved: skip interpreter teardown, where a C++ thread of the destroyed process
    # group occasionally aborts ("terminate called without an active exception") and would turn a finished
    # run into a failed one for the launcher / SLURM.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
