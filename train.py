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
import random
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from latte.builders import build_diffusion, build_model
from latte.checkpoint import SaveError
from latte.config import Config, ConfigError, load_config, resolved_arch
from latte.preemption import EXIT_PREEMPTED, StopFlag


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML preset (configs/*.yaml); defaults when omitted")
    parser.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set train.lr=2e-4 model.attention=sdpa",
    )
    parser.add_argument(
        "--resume",
        help="auto (newest complete checkpoint in train.ckpt_dir, else fresh; the default), none, or a "
        "step_XXXXXXXX / checkpoint directory (same as --set train.resume=...)",
    )
    # the deepspeed launcher passes --local_rank; the rank layout is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_run_dir(cfg: Config, resumed_meta: dict | None = None) -> Path:
    """results_dir/NNN-<model>: a fresh directory per run, holding the resolved config and TensorBoard events.
    A resumed run continues in the directory its checkpoint was written from (one curve across restarts)."""
    root = Path(cfg.train.results_dir)
    previous = (resumed_meta or {}).get("run_dir")
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


def batches_for(cfg: Config, world):
    """This rank's resumable stream of micro-batches ``{"latent": (B, F, C, h, w), "y": (B,)}``: an iterable
    with ``state_dict()`` / ``load_state_dict()`` (the dataset's ``LatentLoader`` or the synthetic stream)."""
    if cfg.data.index:  # stream the dataset's shards; the index must fit the model this config builds
        from data_pipeline.loader import Expected, LatentLoader, LoaderError

        size = cfg.data.latent_size
        expected = Expected((cfg.data.num_frames, cfg.model.in_channels, size, size), cfg.data.scaling_factor,
                            cfg.model.num_classes)  # fmt: skip
        try:
            loader = LatentLoader(cfg.data.index, cfg.train.micro_batch_size, rank=world.rank,
                                  world_size=world.world_size, seed=cfg.train.seed,
                                  num_workers=cfg.data.num_workers, shuffle_buffer=cfg.data.shuffle_buffer,
                                  infinite=True, expected=expected,
                                  pin_memory=world.device.type == "cuda")  # fmt: skip
        except (ValueError, LoaderError) as exc:  # unreadable index, missing shard, index vs config
            raise ConfigError(str(exc)) from None
        return loader
    from data_pipeline.synthetic import SyntheticStream

    return SyntheticStream(
        cfg.train.seed,
        cfg.train.micro_batch_size,
        cfg.model.num_classes,
        cfg.data.num_frames,
        cfg.model.in_channels,
        cfg.data.latent_size,
        rank=world.rank,
        world_size=world.world_size,
        accumulation=cfg.train.gradient_accumulation_steps,
    )


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host batch tensor -> ``device`` without a blocking copy: pinned (the loader's workers pin already on
    CUDA) and ``non_blocking``. The caching host allocator keeps the pinned buffer until the copy is done."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)


class DivergedError(ConfigError):
    """The loss became NaN/inf: the run stops without a checkpoint (exit 2, not requeued)."""


def dataset_record(cfg: Config, data) -> dict | None:
    """What the latents were made with, recorded in every checkpoint (sampling divides by this factor)."""
    facts = getattr(data, "facts", None)  # the dataset index's facts; None for synthetic data
    if facts is None:
        return None
    return {"index": cfg.data.index, "vae": facts.vae, "scaling_factor": facts.scaling_factor}


def train(cfg: Config, world, stop: StopFlag | None = None) -> tuple[list[float], object, object]:
    """The training loop on this rank; returns the (all-reduced) mean loss of every logging interval, the
    DeepSpeed engine and the sharded EMA. With ``stop``, a stop signal ends the loop early at a step boundary
    agreed by all ranks, with a checkpoint (``stop.requested`` and ``stop.stopped_at`` tell the caller).
    The checkpoint directory is claimed (``latte.run_lock``) for the run's duration, whatever ends it."""
    from latte.checkpoint import CheckpointManager

    data = batches_for(cfg, world)  # first: a dataset that does not fit the config fails before any build
    checkpoints = CheckpointManager(cfg, world)
    try:
        return _train(cfg, world, stop, data, checkpoints)
    finally:
        checkpoints.close()


def _train(
    cfg: Config, world, stop: StopFlag | None, data, checkpoints
) -> tuple[list[float], object, object]:
    from latte.builders import attention_line
    from latte.ema import ShardedEMA
    from latte.engine import build_engine, set_grad_clip
    from latte.metrics import MetricsLogger, flops_per_sample, peak_flops
    from latte.seeding import TrainingDraws, batch_indices

    resume_from = checkpoints.find()  # refused (another config, dir in use, unwritable) before any build
    checkpoints.dataset = dataset_record(cfg, data)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    random.seed(cfg.train.seed)  # python's and numpy's RNGs too: checkpoints save all three, so resumes are
    np.random.seed(cfg.train.seed)  # exact whatever library draws from them
    model = build_model(cfg)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)
    attention = attention_line(cfg, world.device, compute_dtype)  # an explicit kernel that cannot run: error
    diffusion = build_diffusion(cfg)
    # fp32 sin-cos tables for the EMA, and the parameter count: before ZeRO-3 partitions (and bf16 casts) them
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = build_engine(cfg, model, world, load_universal=checkpoints.reshard)
    ema = ShardedEMA(engine, cfg.train.ema_decay, frozen)  # starts as a copy of the synced initial weights

    def model_fn(x_t, t, **kwargs):  # diffusion math in fp32, the network in the engine's precision
        return engine(x_t.to(compute_dtype), t, **kwargs).float()

    run_dir = make_run_dir(cfg, checkpoints.saved_meta) if world.is_main else None
    checkpoints.run_dir = run_dir
    logger = MetricsLogger(run_dir, world.is_main)
    t_cfg, d_cfg = cfg.train, cfg.data
    micro, accum, ws = t_cfg.micro_batch_size, t_cfg.gradient_accumulation_steps, world.world_size
    global_batch = micro * accum * ws
    latent_shape = (d_cfg.num_frames, cfg.model.in_channels, d_cfg.latent_size, d_cfg.latent_size)
    arch = resolved_arch(cfg)
    flops = flops_per_sample(arch, d_cfg.num_frames, d_cfg.latent_size, cfg.model.in_channels,
                             cfg.model.learn_sigma)  # fmt: skip
    peak, device_name = peak_flops(world.device, t_cfg.precision, tf32=t_cfg.tf32)
    tokens_per_sample = d_cfg.num_frames * (d_cfg.latent_size // arch.patch_size) ** 2
    if world.is_main:
        peak_text = f"{peak:.3g} FLOP/s" if peak else "n/a"
        print(
            f"run dir {run_dir} | {cfg.model.name} {n_params / 1e6:.2f}M params | {ws} x {device_name} | "
            f"{t_cfg.precision} | ZeRO {t_cfg.zero_stage} | global batch {global_batch} = {micro} micro x "
            f"{accum} accumulation x {ws} ranks | peak {peak_text}",
            flush=True,
        )
        print(attention, flush=True)

    start_step = checkpoints.load(resume_from, engine, ema, data) if resume_from is not None else 0
    if resume_from is None and world.is_main:
        why = (
            "train.resume=none" if t_cfg.resume == "none" else f"no complete checkpoint in {checkpoints.dir}"
        )
        print(f"starting at step 0 ({why})", flush=True)
    if start_step >= t_cfg.max_steps:
        if world.is_main:
            print(f"nothing to train: the run is already at step {start_step}, train.max_steps is "
                  f"{t_cfg.max_steps} (raise train.max_steps to continue it)", flush=True)  # fmt: skip
        logger.close()
        return [], engine, ema
    batches = iter(data)  # after load: the stream continues where the checkpoint's left off
    # (t, noise, label dropout) of each sample from (seed, step, its index in the global batch)
    drop_prob = cfg.model.class_dropout_prob if cfg.model.num_classes else 0.0
    draws = TrainingDraws(t_cfg.seed, diffusion.num_timesteps, latent_shape, world.device, drop_prob)
    interval_loss = torch.zeros((), device=world.device)
    history: list[float] = []
    data_wait, t0, interval_start = 0.0, time.perf_counter(), start_step

    def check_finite(loss_sum: float, first: int, last: int) -> None:
        """No checkpoint, and no further step, after a NaN/inf loss (checked where the loss is reduced)."""
        if not math.isfinite(loss_sum):
            latest = checkpoints.dir / "latest"
            good = latest.read_text().strip() if latest.is_file() else "none"
            raise DivergedError(
                f"the loss is {loss_sum} in steps {first}-{last}: stopped without writing a checkpoint "
                f"(latest stays {good}); lower train.lr or clip earlier (train.clip_start_step), then resume"
            )

    def save(done: int, since: int) -> None:
        """Checkpoint after step ``done``, unless a loss since the last log (step ``since``) is not finite:
        non-finite weights are never saved (one all-reduce and host sync, at checkpoints only)."""
        if since < done:
            pending = interval_loss.detach().clone()
            torch.distributed.all_reduce(pending)
            check_finite(pending.item(), since + 1, done)
        checkpoints.save(done, engine, ema, data)

    if stop is not None:
        stop.arm()
    for step in range(start_step, t_cfg.max_steps):
        set_grad_clip(engine, t_cfg.clip_max_norm if step >= t_cfg.clip_start_step else 0.0)
        for a in range(accum):  # engine.step() steps the optimizer exactly at every accum-th micro-batch
            wait = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - wait
            drawn = draws(step, batch_indices(a, world.rank, ws, micro))
            x = to_device(batch["latent"], world.device, torch.float32)  # (B, F, C, h, w)
            kwargs = {"y": to_device(batch["y"], world.device)} if "y" in batch else {}
            if drawn.drop is not None:
                kwargs["force_drop_ids"] = drawn.drop
            losses = diffusion.training_losses(model_fn, x, drawn.t, kwargs, noise=drawn.noise)
            loss = losses["loss"].mean()
            engine.backward(loss)
            engine.step()
            if engine.was_step_applied():  # an optimizer step happened (not a micro-batch, not an fp16 skip)
                ema.update()
            interval_loss += loss.detach() / accum
        if (step + 1) % t_cfg.log_every == 0 or step + 1 == t_cfg.max_steps:
            steps = step + 1 - interval_start
            torch.distributed.all_reduce(interval_loss)  # the one collective + host sync per interval
            mean_loss = interval_loss.item() / (steps * ws)
            check_finite(mean_loss, interval_start + 1, step + 1)
            history.append(mean_loss)
            elapsed = time.perf_counter() - t0
            samples_per_s = steps * global_batch / elapsed
            tflops = flops.training * samples_per_s / ws  # per device
            grad_norm = engine.get_global_grad_norm()
            logger.log(step + 1, {
                "train/loss": mean_loss,
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train/lr": engine.get_lr()[0],
                "perf/samples_per_s": samples_per_s,
                "perf/tokens_per_s": samples_per_s * tokens_per_sample,
                "perf/tflops_per_device": tflops / 1e12,
                "perf/mfu": tflops / peak if peak else None,
                "perf/data_wait": data_wait / elapsed,
                "perf/peak_mem_gb": _peak_memory_gb(world.device),
            })  # fmt: skip
            interval_loss.zero_()
            data_wait, t0, interval_start = 0.0, time.perf_counter(), step + 1

        saved = (step + 1) % t_cfg.ckpt_every == 0 or step + 1 == t_cfg.max_steps
        if saved:
            save(step + 1, interval_start)
        check = (step + 1) % t_cfg.stop_check_every == 0  # the same steps on every rank, across restarts
        if stop is not None and check and step + 1 < t_cfg.max_steps and stop.agreed():  # one CPU all-reduce
            if not saved:
                save(step + 1, interval_start)
            stop.stopped_at = step + 1
            break
    logger.close()
    return history, engine, ema


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (host RSS)


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
        print(f"stopped on request ({why}; exit {EXIT_PREEMPTED}: requeue, the next run resumes with "
              f"train.resume=auto); checkpoint written at step {at}", flush=True)  # fmt: skip
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
