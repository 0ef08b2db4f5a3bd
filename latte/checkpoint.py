"""Exactly resumable checkpoints: one manager, called by every rank, owns everything restartable.

Layout of ``ckpt_dir`` (``train.ckpt_dir``, default ``<results_dir>/checkpoints``)::

    step_00000040/
        mp_rank_00_model_states.pt      DeepSpeed: module, LR scheduler, step counters (every rank calls)
        *_optim_states.pt               DeepSpeed, per rank: optimizer shard, fp32 master weights, loss scaler
        rank_00000.pt ...               per rank: EMA shard, RNG states, data-stream state
        ema_consolidated.pt             rank 0: the full EMA in the model's key names
        meta.json                       rank 0: step, samples, world size, ZeRO, precision, config (+ hash)
        COMPLETE                        rank 0, after a barrier: every file's size (a manifest)
    latest                              the newest complete tag (temp file + os.replace)

A step directory counts only when ``COMPLETE`` exists and every file it lists has the listed size, so a
directory a kill interrupted is never resumed from. ``find()`` picks the checkpoint (rank 0 decides and
broadcasts, so every rank takes the same one and user errors are raised everywhere alike), ``load()``
restores it after the engine is built, ``save()`` writes one and prunes old ones.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from latte import lora
from latte.base_weights import base_identity
from latte.config import Config, ConfigError, flatten, resolve_saved
from latte.files import atomic_write
from latte.rendezvous import control_group
from latte.run_lock import LockError, RunLock

TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"
META = "meta.json"
EMA_FULL = "ema_consolidated.pt"
# Config keys that may change on resume without being listed: extending or re-pointing a run is normal.
ALWAYS_ALLOWED = (
    "train.max_steps",
    "train.log_every",
    "train.stop_check_every",
    "train.ckpt_every",
    "model.compile",  # how the same function is computed: speed (and rounding) only
    "train.tf32",
    "train.deterministic",
    "train.results_dir",
    "train.ckpt_dir",
    "train.keep_last",
    "train.keep_every",
    "train.resume",
    "train.resume_allow_changes",
    "train.sequence_parallel",  # a layout of the same training (as the world size is)
    "data.val_index",  # the validation loss only observes training
    "train.val_every",
    "train.val_clips",
    "train.val_buckets",
)
ALWAYS_ALLOWED_SECTIONS = ("sample.",)  # sampling settings never affect training


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message is one line naming the file or key."""


class SaveError(CheckpointError):
    """A checkpoint that could not be written (a full disk); raised on the rank that hit it, which says so."""


# ----------------------------------------------------------------------------------------------------------
# The directory: tags, validity, choice, pruning (plain file-system functions, no process group)
# ----------------------------------------------------------------------------------------------------------


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    match = TAG_RE.match(path.name)
    return int(match.group(1)) if match else None


def ckpt_dir_for(cfg: Config) -> Path:
    return Path(cfg.train.ckpt_dir or Path(cfg.train.results_dir) / "checkpoints")


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Every ``step_XXXXXXXX`` directory, newest first (complete or not)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def is_complete(step_dir: Path) -> bool:
    return (step_dir / MARKER).is_file()


def crc32_of(path: Path, chunk: int = 16 << 20) -> int:
    """CRC-32 of a file's bytes (zlib's: ~1 GB/s, enough to check a checkpoint once per save and resume)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def problem(step_dir: Path, verify: bool = False) -> str | None:
    """Why ``step_dir`` cannot be resumed from (one line naming the file), or None when it can. ``verify``:
    also compare every file's CRC-32 with the one recorded at save (manifests written before checksums
    existed are checked by size alone)."""
    marker = step_dir / MARKER
    if not marker.is_file():
        return f"{step_dir} is incomplete (no {MARKER} marker: its writing was interrupted)"
    try:
        record = json.loads(marker.read_text())
        manifest, checksums = record["files"], record.get("crc32", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{marker} is unreadable or malformed ({type(exc).__name__})"
    for name, size in manifest.items():
        path = step_dir / name
        if not path.is_file():
            return f"missing file {path}"
        if path.stat().st_size != size:
            return f"corrupt file {path}: {path.stat().st_size} bytes, {size} when written"
        if verify and name in checksums and crc32_of(path) != checksums[name]:
            return f"corrupt file {path}: its CRC-32 differs from the one recorded when it was written"
    try:
        meta = json.loads((step_dir / META).read_text())
        meta["step"], meta["config"], meta["world_size"]  # noqa: B018 (the fields load() needs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{step_dir / META} is unreadable or malformed ({type(exc).__name__})"
    return None


def choose(resume: str, ckpt_dir: Path, warn=print, verify: bool = False) -> Path | None:
    """The checkpoint ``resume`` names: "none" -> None; "auto" -> the newest valid complete one in
    ``ckpt_dir`` (an invalid one: ``warn`` and take the previous) or None; a step dir -> it, or an error
    naming the bad file; a checkpoint dir -> its newest complete one, or an error. ``verify``: check the
    files' checksums too (training does; sampling reads only the EMA file, which torch.load checks)."""
    if resume == "none":
        return None
    if resume == "auto":
        for step_dir in step_dirs(ckpt_dir):
            if not is_complete(step_dir):
                continue  # a half-written directory is never a candidate
            why = problem(step_dir, verify)
            if why is None:
                return step_dir
            warn(f"warning: skipping checkpoint {step_dir.name}: {why}")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {resume}")
    if step_of(path) is None and not (path / MARKER).exists():  # a checkpoint dir: its newest complete one
        complete = [p for p in step_dirs(path) if is_complete(p)]
        if not complete:
            raise CheckpointError(f"no complete checkpoint (step_XXXXXXXX/{MARKER}) in {resume}")
        path = complete[0]
    why = problem(path, verify)
    if why is not None:
        raise CheckpointError(f"cannot resume from {path}: {why}")
    return path


def prune(ckpt_dir: Path, keep_last: int, keep_every: int | None) -> list[Path]:
    """Remove complete checkpoints beyond the ``keep_last`` newest (keeping multiples of ``keep_every`` and
    the one ``latest`` names) and incomplete ones older than the newest complete one. Returns the removed."""
    dirs = step_dirs(ckpt_dir)
    complete = [p for p in dirs if is_complete(p)]
    if not complete:
        return []
    pointer = ckpt_dir / "latest"
    latest = pointer.read_text().strip() if pointer.is_file() else None
    keep = {p.name for p in complete[:keep_last]} | ({latest} if latest else set())
    if keep_every:
        keep |= {p.name for p in complete if step_of(p) % keep_every == 0}
    newest = step_of(complete[0])
    doomed = [p for p in dirs if p.name not in keep and (is_complete(p) or step_of(p) < newest)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(universal_dir(path), ignore_errors=True)
    return doomed


def universal_dir(step_dir: Path) -> Path:
    """Where the world-size-free (DeepSpeed "universal") copy of ``step_dir`` goes, made on first need."""
    return step_dir.with_name(f"{step_dir.name}_universal")


def make_universal(step_dir: Path) -> Path:
    """Convert ``step_dir``'s DeepSpeed state to a universal checkpoint (once; temp name + rename)."""
    out = universal_dir(step_dir)
    if out.is_dir():
        return out
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(step_dir),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CheckpointError(f"converting {step_dir} for another world size failed: {tail}")
    os.replace(tmp, out)
    (step_dir.parent / "latest_universal").unlink(
        missing_ok=True
    )  # the converter's pointer; ours is `latest`
    return out


def consolidated_model(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint in the model's key names (assembled from the ZeRO shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def config_changes(saved: dict[str, Any], current: Config) -> list[str]:
    """``key 'saved' != 'now'`` for every config value that differs and is not allowed to. ``saved`` may come
    from an older version: keys it lacks count at their defaults, retired keys as their successors."""
    allowed = set(ALWAYS_ALLOWED) | set(current.train.resume_allow_changes)
    old, new = flatten(resolve_saved(saved).to_dict()), flatten(current.to_dict())
    return [
        f"{key} {old.get(key)!r} != {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if key not in allowed and not key.startswith(ALWAYS_ALLOWED_SECTIONS) and old.get(key) != new.get(key)
    ]


def base_changed(saved: dict[str, str] | None, current: Config) -> str | None:
    """Why a LoRA checkpoint whose ``meta.json`` recorded the base ``saved`` (``{"path", "sha256"}``) cannot
    run on ``current``'s base weights (their bytes differ), or None."""
    if not lora.enabled(current.model.lora) or not saved:
        return None
    now = base_identity(current.model.init_from)
    if now["sha256"] == saved["sha256"]:
        return None
    return (
        f"adapts the base weights {saved['path']} (sha256 {saved['sha256'][:12]}), but model.init_from "
        f"{now['path']} now holds other weights (sha256 {now['sha256'][:12]}): resume with the base it was "
        "trained on"
    )


def check_writable(path: Path, key: str) -> None:
    """Fail before anything is built, not at the first save hours later, if ``path`` cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"{key} {path} is not writable: {exc.strerror or exc}") from None


def disk_full_error(exc: BaseException, where: Path) -> bool:
    """Whether ``exc`` (an OSError, or torch.save's "basic_ios::clear: iostream error" / "PytorchStreamWriter
    failed writing" RuntimeError, which carry no errno) is a full disk or quota at ``where``."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)):
        return False
    try:
        return shutil.disk_usage(where).free < 64 << 20  # a write failed and under 64 MiB are left
    except OSError:
        return False


def shape_mismatch(saved: Config, current: Config) -> str | None:
    """The first parameter whose presence or shape differs between the models the two configs build (on the
    meta device: no memory, no compute), or None. Catches an allowed change (``resume_allow_changes``) that
    cannot load, e.g. model.name to another size, before DeepSpeed asserts on it."""
    from latte.builders import build_model

    with torch.device("meta"):
        old, new = (build_model(c, base_weights=False).state_dict() for c in (saved, current))
    for key in sorted(old.keys() | new.keys()):
        a, b = (tuple(sd[key].shape) if key in sd else None for sd in (old, new))
        if a != b:
            return f"'{key}' is {a or 'absent'} in the checkpoint, {b or 'absent'} in this config's model"
    return None


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


# ----------------------------------------------------------------------------------------------------------
# RNG states (label dropout draws from the global torch RNG; noise and timesteps need none)
# ----------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The RNG states a resume restores. CUDA: only this rank's own device (``torch.cuda.current_device()``),
    so a resume that sees another number of GPUs per process (e.g. one per task under cgroups) still loads."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):  # written before issue 12: one state per visible GPU
        index = torch.cuda.current_device()
        if index >= len(cuda):
            print(
                f"warning: the checkpoint holds CUDA RNG states of {len(cuda)} GPUs, none for this rank's "
                f"device {index}; its CUDA RNG is not restored",
                file=sys.stderr,
                flush=True,
            )
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


# ----------------------------------------------------------------------------------------------------------
# The manager
# ----------------------------------------------------------------------------------------------------------


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """Everything a checkpoint restores, as one value passed to ``save``/``load``.

    ``engine``: DeepSpeed (module, optimizer + fp32 masters, LR schedule, loss scale; its own files);
    ``ema``: the sharded EMA; ``data``: the batch stream (its position). A new per-rank state goes into
    ``extra`` under a name: it is saved in every rank's file and restored when a checkpoint has it (one
    written before it existed leaves it as built). The RNG states are always saved."""

    engine: Any
    ema: Any
    data: Any
    extra: dict[str, Stateful] = field(default_factory=dict)


def dataset_record(cfg: Config, data) -> dict[str, Any] | None:
    """What the latents were made with, recorded in every checkpoint (sampling divides by this factor)."""
    facts = getattr(data, "facts", None)  # the dataset index's facts; None for synthetic data
    if facts is None:
        return None
    record = {"index": cfg.data.index, "vae": facts.vae, "scaling_factor": facts.scaling_factor}
    if getattr(facts, "text_encoder", ""):  # captioned data: the T5 that sampling encodes prompts with
        record["text_encoder"] = facts.text_encoder
    return record


class CheckpointManager:
    """Save / find / load / prune for one rank; every rank makes the same calls (they are collectives)."""

    def __init__(self, cfg: Config, world) -> None:
        self.cfg, self.world = cfg, world
        self.dir = ckpt_dir_for(cfg)
        self.saved_meta: dict[str, Any] | None = None  # meta.json of the checkpoint find() chose
        self.lock = RunLock(self.dir) if world.is_main else None  # one run per checkpoint directory

    @property
    def resumed_run_dir(self) -> str | None:
        """The run directory (a name under results_dir) the checkpoint to resume from was written from."""
        return (self.saved_meta or {}).get("run_dir")

    def due(self, done: int) -> bool:
        """Whether to save after ``done`` steps: every ``train.ckpt_every``, and the last step."""
        t = self.cfg.train
        return done % t.ckpt_every == 0 or done == t.max_steps

    @property
    def saved_world_size(self) -> int | None:
        return None if self.saved_meta is None else int(self.saved_meta["world_size"])

    @property
    def reshard(self) -> bool:
        """The chosen checkpoint was saved by another number of ranks: the engine must be built to load a
        universal checkpoint (``build_engine(..., load_universal=True)``)."""
        return self.saved_world_size not in (None, self.world.world_size)

    def _say(self, text: str) -> None:
        if self.world.is_main:
            print(text, file=sys.stderr if text.startswith("warning") else sys.stdout, flush=True)

    def _decide(self, fn) -> Any:
        """``fn()`` on rank 0, its result (or its CheckpointError) on every rank."""
        result: list[Any] = [None]
        if self.world.is_main:
            try:
                result[0] = ("ok", fn())
            except CheckpointError as exc:
                result[0] = ("error", str(exc))
        group = control_group()  # gloo, long timeout: rank 0 may convert a checkpoint for a long time
        if group is not None:
            torch.distributed.broadcast_object_list(result, src=0, group=group)
        status, value = result[0]
        if status == "error":
            raise CheckpointError(value)
        return value

    def find(self) -> Path | None:
        """The checkpoint to resume from (``train.resume``), checked against this run's config; None = start
        fresh. A collective; call it before building the engine (refusals are fast, ``reshard`` is known)."""
        path = self._decide(self._find)
        self.saved_meta = None if path is None else json.loads((path / META).read_text())
        return path

    def _find(self) -> Path | None:
        check_writable(self.dir, "train.ckpt_dir")
        check_writable(Path(self.cfg.train.results_dir), "train.results_dir")
        try:
            self.lock.acquire()
        except LockError as exc:
            raise CheckpointError(str(exc)) from None
        if self.lock.took_over:
            self._say(f"checkpoint directory {self.dir}: {self.lock.took_over}")
        path = choose(self.cfg.train.resume, self.dir, warn=self._say, verify=True)
        if path is None:
            return None
        meta = json.loads((path / META).read_text())
        changes = config_changes(meta["config"], self.cfg)
        if changes:
            raise CheckpointError(
                f"checkpoint {path.name} was made with a different config: {'; '.join(changes)} "
                f"(allow with --set train.resume_allow_changes=[key,...])"
            )
        mismatch = shape_mismatch(resolve_saved(meta["config"]), self.cfg)
        if mismatch:
            raise CheckpointError(
                f"checkpoint {path.name} holds another architecture ({mismatch}): it cannot resume this "
                f"config; start fresh (train.resume=none, or another train.ckpt_dir)"
            )
        base_change = base_changed(meta.get("base"), self.cfg)
        if base_change:
            raise CheckpointError(f"checkpoint {path.name} {base_change}")
        if meta["world_size"] != self.world.world_size:
            make_universal(path)  # rank 0 converts once; the others wait in the broadcast
        return path

    def load(self, path: Path, state: TrainState) -> int:
        """Restore engine (module, optimizer, LR scheduler, loss scaler), EMA, RNG, data position and the
        extra states from ``path``; returns the step to continue from."""
        engine, ema, data = state.engine, state.ema, state.data
        ds_tag = universal_dir(path).name if self.reshard else path.name
        # LoRA: the module state holds the adapters; the frozen base is init_from's, as built
        adapters = {"load_module_strict": False} if lora.enabled(self.cfg.model.lora) else {}
        load_path, _ = engine.load_checkpoint(
            str(path.parent),
            tag=ds_tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            **adapters,
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the engine state in {path.parent / ds_tag}")
        ema.refresh_masters()  # the EMA reads the master weights through views: look them up again
        # another world size: RNG of rank r % saved ranks; the data state is the same in every rank's file
        source = self.world.rank % self.saved_world_size
        own = torch.load(path / f"rank_{source:05d}.pt", map_location="cpu", weights_only=False)
        if self.reshard:
            ema.load_consolidated(torch.load(path / EMA_FULL, map_location="cpu", weights_only=True))
        else:
            ema.load_state_dict(own["ema"])
        try:
            data.load_state_dict(own["data"])
        except (ValueError, RuntimeError) as exc:  # e.g. another dataset (the loader's one-line errors)
            raise CheckpointError(f"checkpoint {path.name}: {exc}") from None
        for name, obj in state.extra.items():
            if name in own:  # a checkpoint written before this state existed: it stays as built
                obj.load_state_dict(own[name])
        set_rng_state(own["rng"])
        step = int(self.saved_meta["step"])
        from latte.engine import apply_optimizer_config

        apply_optimizer_config(engine, self.cfg, step)  # this config's lr, betas, decay (allowed changes)
        how = f" (saved by {self.saved_world_size} ranks, resharded)" if self.reshard else ""
        self._say(f"resumed from {path} at step {step}{how}")
        return step

    def save(self, step: int, state: TrainState, run_dir: Path | None = None) -> Path:
        """Write checkpoint ``step`` (every rank its part), mark it complete, point ``latest`` at it and
        prune; ``run_dir`` (rank 0's run directory) is recorded, so a resumed run continues in it.
        RNG-neutral: the global RNG states are as before the call, saved or not. A full disk is a
        ``SaveError`` naming the directory, what is left, and what to do; nothing earlier is touched."""
        rng = rng_state()
        step_dir = self.dir / tag_for(step)
        try:
            self._write(step, step_dir, state, run_dir, rng)
        except (OSError, RuntimeError) as exc:
            if not disk_full_error(exc, self.dir):
                raise
            shutil.rmtree(step_dir, ignore_errors=True)  # never complete: free its space for the next try
            raise SaveError(self._no_space(step_dir)) from None
        finally:
            set_rng_state(rng)
        return step_dir

    def _write(self, step: int, step_dir: Path, state: TrainState, run_dir: Path | None, rng: dict) -> None:
        engine, ema, data = state.engine, state.ema, state.data
        if self.world.is_main:  # a leftover of an interrupted run (or of a run started with resume none)
            if step_dir.exists():
                (step_dir / MARKER).unlink(missing_ok=True)
                shutil.rmtree(step_dir)
            step_dir.mkdir(parents=True)
        self._barrier()
        frozen_out = {"exclude_frozen_parameters": True} if lora.enabled(self.cfg.model.lora) else {}
        engine.save_checkpoint(
            str(self.dir), tag=step_dir.name, client_state={"step": step}, save_latest=False, **frozen_out
        )
        own = {"ema": ema.state_dict(), "rng": rng, "data": data.state_dict(), "step": step}
        own.update({name: obj.state_dict() for name, obj in state.extra.items()})
        atomic_write(step_dir / f"rank_{self.world.rank:05d}.pt", lambda tmp: torch.save(own, tmp))
        full_ema = ema.consolidate()  # a collective: the copy export and world-size changes read
        if self.world.is_main:
            atomic_write(step_dir / EMA_FULL, lambda tmp: torch.save(full_ema, tmp))
            t = self.cfg.train
            meta = {
                "step": step,
                "samples_seen": step
                * t.micro_batch_size
                * t.gradient_accumulation_steps
                * t.data_parallel_size(self.world.world_size),
                "world_size": self.world.world_size,
                "zero_stage": t.zero_stage,
                "precision": t.precision,
                "config_hash": self.cfg.hash(),
                "run_dir": run_dir.name if run_dir else None,
                "dataset": dataset_record(self.cfg, data),  # the VAE and scaling factor of the latents
                "config": self.cfg.to_dict(),
            }
            if lora.enabled(self.cfg.model.lora):  # the frozen base the adapters belong to: path + sha256
                meta["base"] = base_identity(self.cfg.model.init_from)
            _write_text(step_dir / META, json.dumps(meta, indent=1))
        self._barrier()  # every rank's files are written
        checksums = self._checksums(step_dir)  # each rank reads its share back (from the page cache)
        if self.world.is_main:
            files = {
                str(p.relative_to(step_dir)): p.stat().st_size
                for p in sorted(step_dir.rglob("*"))
                if p.is_file() and p.name != MARKER
            }
            _write_text(step_dir / MARKER, json.dumps({"files": files, "crc32": checksums}, indent=1))
            _write_text(self.dir / "latest", step_dir.name)
            prune(self.dir, self.cfg.train.keep_last, self.cfg.train.keep_every)

    def _checksums(self, step_dir: Path) -> dict[str, int]:
        """CRC-32 of every file of ``step_dir``, computed by the ranks in turns, gathered (a collective)."""
        files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MARKER)
        ranks, rank = self.world.world_size, self.world.rank
        mine = {str(p.relative_to(step_dir)): crc32_of(p) for i, p in enumerate(files) if i % ranks == rank}
        group = control_group()
        if group is None:
            return mine
        parts: list[dict[str, int] | None] = [None] * ranks
        torch.distributed.all_gather_object(parts, mine, group=group)
        return {name: crc for part in parts for name, crc in part.items()}

    def _no_space(self, step_dir: Path) -> str:
        free = shutil.disk_usage(self.dir).free / 2**20 if self.dir.exists() else 0.0
        pointer = self.dir / "latest"
        latest = pointer.read_text().strip() if pointer.is_file() else "none yet"
        keep = self.cfg.train.keep_last
        return (
            f"no space left on {self.dir} while writing checkpoint {step_dir.name} ({free:.0f} MiB "
            f"free): nothing was lost (latest is still {latest}); free space there, lower "
            f"train.keep_last ({keep}: old checkpoints are pruned only after a save succeeds), or point "
            f"train.ckpt_dir at a larger file system, then resume"
        )

    def close(self) -> None:
        """The run is over (finished, stopped or failed): let the next run claim the directory."""
        if self.lock is not None:
            self.lock.release()

    def _barrier(self) -> None:
        """Wait for every rank's files: over the gloo control group, so that a slow file system (one rank
        writing for minutes) cannot hit NCCL's collective timeout, and no GPU is synced."""
        group = control_group()
        if group is not None:
            torch.distributed.barrier(group=group)
