"""The GPU check: one command that proves (or measures) every CUDA path, in at most ~8 minutes on one GPU.

    python benchmarks/gpu_check.py --out DIR [--model Latte-XL/2 --batch 8 --frames 16 --latent 32
                                              --steps 8 --budget-s 450]
    python benchmarks/gpu_check.py --out DIR --smoke      # tiny shapes, any device: checks the script itself

Writes ``DIR/gpu_check.md`` (the tables, for benchmarks/README.md) and ``DIR/gpu_check.json``; prints the
Markdown. Each part that lacks something reports ``skipped: X missing`` (no CUDA, no deepspeed, no flash-attn
...) and the rest runs; a part that raises reports ``failed: <error>``; a part that would start past the
time budget reports ``skipped: time budget``. Parts:

1. environment: torch / CUDA / driver, the device and the peak FLOP/s MFU is computed against, which kernel
   packages import (and the import error of each that does not);
2. attention parity in bf16 of every kernel that runs here (FlashAttention-3, flash-attn 2, xformers, SDPA's
   flash / efficient / cuDNN kernels, SDPA's own choice) against fp32 math on Latte's spatial
   (B*F, T, H, D) and temporal (B*T, F, H, D) shapes: forward and the three input gradients, unmasked and
   with key padding (one sequence fully masked); forward+backward time per kernel;
3. the bare Latte train step (forward, backward, fused AdamW; no DeepSpeed) in bf16 per attention backend,
   eager, and compiled per block (``model.compile``) for ``auto``: ms, MFU, peak memory, CUDA kernels
   launched and host syncs per step (``torch.cuda.set_sync_debug_mode``);
4. DeepSpeed on one rank over NCCL, ZeRO-2 and ZeRO-3: train.py's step (per-sample draws, pinned
   non-blocking copies, engine backward/step, sharded EMA) vs the bare step; the EMA update's time;
5. fp16 with the dynamic loss scaler through ``train.train``: 12 steps straight vs 6 + resume + 6, with
   ``train.deterministic`` (losses and scaler state equal) and without (losses within a tolerance);
6. sampling: DDIM 10 steps with classifier-free guidance in bf16: finite outputs, ms per step;
7. (between 3 and 4) the bare step of the text-to-video model (``--t2v-model``, Latte-1's LatteT2V-XL/2) with
   captions padded to 120 tokens, per backend: its cross-attention runs the kernels part 2 checks on the
   (B*F, T, H, D) x (B*F, 120, H, D) shape with caption masks;
8. (after 4) LoRA vs full fine-tuning from the same base: train.py's ZeRO-2 step, trainable parameters,
   the optimizer's bytes on the rank, peak memory (``benchmarks/lora_vs_full.py`` is the CPU table's script);
9. with 2 or more GPUs, sequence parallelism: the model's forward + backward on one GPU vs split over two
   (``train.sequence_parallel 2``'s layout): ms, speed-up, peak memory per GPU, the output's error
   (``benchmarks/sequence_parallel_memory.py`` is the CPU table's script).

Never write a figure into a README that this script did not print on the machine named in its first table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import latte.models.attention as kernels  # noqa: E402
from latte import lora  # noqa: E402
from latte.builders import build_diffusion, build_model, compile_blocks  # noqa: E402
from latte.config import Config, caption_channels_of, load_config, resolved_arch  # noqa: E402
from latte.errors import first_line  # noqa: E402
from latte.metrics import flops_per_sample, peak_for_name, t2v_flops_per_sample  # noqa: E402
from latte.precision import call_in  # noqa: E402

CAPTION_TOKENS = 120  # Latte-1's T5 length
PACKAGES = ("torch", "deepspeed", "flash_attn", "flash_attn_interface", "xformers", "diffusers", "triton")


class Skip(Exception):
    """A part that cannot run here; the message says what is missing."""


@dataclass
class Part:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    status: str = "ok"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", f"status: {self.status} ({self.seconds:.0f} s)", ""]
        if self.rows:
            lines += ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
            lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in self.rows]
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc, 300, default='')}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="directory for gpu_check.md and gpu_check.json")
    p.add_argument("--model", default="Latte-XL/2")
    p.add_argument("--t2v-model", default="LatteT2V-XL/2", help="the text-to-video part's flavor (Latte-1's)")
    p.add_argument("--batch", type=int, default=8, help="micro-batch of the train steps")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32, help="latent size (256 px / 8)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per train-step row (after 2 warm-up)")
    p.add_argument("--budget-s", type=float, default=450.0, help="no part starts after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device: test the script")
    p.add_argument(
        "--parts",
        nargs="+",
        default=["env", "attention", "step", "t2v", "deepspeed", "lora", "fp16", "sample", "sp"],
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.frames, args.latent, args.steps = "Latte-T/2", 2, 4, 8, 2
        args.t2v_model = "LatteT2V-T/2"
    return args


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skip("CUDA missing")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms (CUDA-synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _config(args: argparse.Namespace, *overrides: str, model: str | None = None) -> Config:
    """The benchmark's config of ``model`` (default ``--model``; a text-to-video flavor takes no classes)."""
    name = model or args.model
    return load_config(
        None,
        [
            f"model.name={name}",
            f"model.num_classes={0 if name.startswith('LatteT2V') else 101}",
            "train.precision=bf16",
            f"data.num_frames={args.frames}",
            f"data.image_size={args.latent * 8}",
            f"train.micro_batch_size={args.batch}",
            "train.clip_start_step=0",
            *overrides,
        ],
    )


# ----------------------------------------------------------------------------------------------------------
# 1. environment
# ----------------------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    names = {"flash_attn": "flash-attn", "flash_attn_interface": "flash-attn-3"}
    for name in (names.get(package, package), package):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(name)
    return "installed" if package == "flash_attn_interface" else "?"


def environment(args: argparse.Namespace, part: Part) -> None:
    kernels.load_kernels()
    dev = _device()
    rows = [
        ["python", platform.python_version()],
        ["torch", torch.__version__],
        ["CUDA (torch built with)", torch.version.cuda or "none"],
    ]
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        driver = "?"
        with contextlib.suppress(Exception):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
        cap = torch.cuda.get_device_capability(dev)
        memory = torch.cuda.get_device_properties(dev).total_memory / 2**30
        peaks = f"{peak_for_name(name, 'bf16')} / {peak_for_name(name, 'fp32')}"
        rows += [
            ["device", f"{name} (sm{cap[0]}{cap[1]}, {memory:.0f} GiB)"],
            ["driver", driver],
            ["peak FLOP/s used for MFU: bf16 / tf32", peaks],
        ]
    else:
        rows.append(["device", f"cpu ({os.cpu_count()} cores): CUDA missing"])
    for package in PACKAGES[1:]:
        backend = {"flash_attn": "flash", "flash_attn_interface": "flash3", "xformers": "xformers"}.get(
            package
        )
        if backend is not None:
            ok = kernels._modules.get(backend) is not None
            rows.append([package, _version(package) if ok else f"missing: {kernels._import_errors[backend]}"])
            continue
        try:
            __import__(package)
            rows.append([package, _version(package)])
        except Exception as exc:  # noqa: BLE001
            rows.append([package, f"missing: {_first_line(exc)}"])
    part.rows = rows


# ----------------------------------------------------------------------------------------------------------
# 2. attention parity and kernel time
# ----------------------------------------------------------------------------------------------------------

# (label, our backend, SDPA kernel to force or None)
KERNELS = [
    ("flash3", "flash3", None),
    ("flash", "flash", None),
    ("xformers", "xformers", None),
    ("sdpa:flash", "sdpa", "FLASH_ATTENTION"),
    ("sdpa:efficient", "sdpa", "EFFICIENT_ATTENTION"),
    ("sdpa:cudnn", "sdpa", "CUDNN_ATTENTION"),
    ("sdpa", "sdpa", None),
    ("math", "math", None),
]


def _kernel_context(sdpa_kernel: str | None):
    if sdpa_kernel is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend
    from torch.nn.attention import sdpa_kernel as force

    return force(getattr(SDPBackend, sdpa_kernel))


def _attention_case(
    shape: tuple[int, int, int, int], dev: torch.device, masked: bool, seed: int, keys: int | None = None
):
    """q and the output gradient (B, N, H, D), k and v (B, keys, H, D) (``keys`` None: N), and with
    ``masked`` a (B, keys) key padding mask."""
    b, n, h, d = shape
    m = keys or n
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(b, n if i in (0, 3) else m, h, d, generator=g) for i in range(4))
    mask = None
    if masked:
        mask = torch.rand(b, m, generator=g) > 0.3  # (B, M) key padding, True = real
        mask[:, 0] = True
        mask[0] = False  # one sequence with every key masked: zeros, never NaN
    return [u.to(dev) for u in (q, k, v, grad)], None if mask is None else mask.to(dev)


def _fwd_bwd(backend: str, sdpa_kernel: str | None, tensors, mask, dtype):
    q, k, v, grad = (u.to(dtype).detach().requires_grad_(i < 3) for i, u in enumerate(tensors))
    with _kernel_context(sdpa_kernel):
        out = kernels.attention(q, k, v, mask, backend)
        out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def attention_parity(args: argparse.Namespace, part: Part) -> None:
    dev = _device()
    arch = resolved_arch(_config(args))
    heads, head_dim = arch.num_heads, arch.hidden_size // arch.num_heads
    tokens = (args.latent // arch.patch_size) ** 2
    shapes = {  # (shape of q, key length): the class-conditional blocks, and LatteT2V's caption attention
        "spatial": ((args.batch * args.frames, tokens, heads, head_dim), None),
        "temporal": ((args.batch * tokens, args.frames, heads, head_dim), None),
        f"cross ({CAPTION_TOKENS} caption keys)": (
            (args.batch * args.frames, tokens, heads, head_dim),
            CAPTION_TOKENS,
        ),
    }
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    kernels.probe(dev, dtype, head_dim, heads)
    part.notes.append(
        f"inputs {str(dtype).replace('torch.', '')} vs fp32 math; errors are max |kernel - "
        f"math| / max |math| over the output and dq, dk, dv; masked: random key padding with "
        f"one fully masked sequence (its output must be 0 and finite)"
    )
    for where, (shape, keys) in shapes.items():
        for masked in (False, True):
            tensors, mask = _attention_case(shape, dev, masked, seed=len(where), keys=keys)
            ref = _fwd_bwd("math", None, tensors, mask, torch.float32)
            for label, backend, sdpa_kernel in KERNELS:
                row = [f"{where} {tuple(shape)}", "yes" if masked else "no", label]
                probe_q = tensors[0][:1, :1].to(dtype)
                reason = kernels.why_not(backend, probe_q) if backend not in ("sdpa", "math") else None
                if reason is None and sdpa_kernel is not None and dev.type != "cuda":
                    reason = "CUDA missing"
                if reason is not None:
                    part.rows.append(row + [f"skipped: {reason}"] + [None] * 5)
                    continue
                try:
                    got = _fwd_bwd(backend, sdpa_kernel, tensors, mask, dtype)
                    errs = [_rel(a, r) for a, r in zip(got, ref, strict=True)]
                    zero_row = None if mask is None else bool((got[0][0] == 0).all())
                    ms = _time_ms(
                        functools.partial(_fwd_bwd, backend, sdpa_kernel, tensors, mask, dtype),
                        reps=5 if args.smoke else 20,
                    )
                    part.rows.append(
                        row + ["ok" if zero_row in (None, True) else "masked row not 0", *errs, ms]
                    )
                except Exception as exc:  # noqa: BLE001 (a kernel refusing an input is a result)
                    part.rows.append(row + [f"refused: {_first_line(exc)}"] + [None] * 5)


# ----------------------------------------------------------------------------------------------------------
# 3. the bare train step per backend, eager and compiled
# ----------------------------------------------------------------------------------------------------------


@dataclass
class StepInputs:
    x: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    noise: torch.Tensor


def _inputs(cfg: Config, dev: torch.device) -> StepInputs:
    g = torch.Generator().manual_seed(0)
    n, f, size = cfg.train.micro_batch_size, cfg.data.num_frames, cfg.data.latent_size
    x = torch.randn(n, f, cfg.model.in_channels, size, size, generator=g)
    return StepInputs(
        x.to(dev),
        torch.randint(0, 1000, (n,), generator=g).to(dev),
        torch.randint(0, max(cfg.model.num_classes, 1), (n,), generator=g).to(dev),  # (unused by T2V)
        torch.randn(x.shape, generator=g).to(dev),
    )


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """adaLN-Zero makes a fresh model's blocks the identity: give every zeroed weight small values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return model


def _count_syncs(fn: Callable[[], Any]) -> int:
    """Host syncs ``fn()`` makes, as torch's sync debug mode reports them (one warning each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _count_kernels(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        _sync()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _condition(cfg: Config, inp: StepInputs, dev: torch.device) -> dict[str, torch.Tensor]:
    """The model's conditioning kwargs: class labels, or (text-to-video) padded caption states + mask."""
    channels = caption_channels_of(cfg.model)
    if not channels:
        return {"y": inp.y}
    g = torch.Generator().manual_seed(1)
    n = inp.x.shape[0]
    states = torch.randn(n, CAPTION_TOKENS, channels, generator=g)  # (N, L, D)
    lengths = torch.randint(8, CAPTION_TOKENS + 1, (n,), generator=g)  # real tokens per caption
    mask = torch.arange(CAPTION_TOKENS)[None] < lengths[:, None]  # (N, L)
    return {"encoder_hidden_states": states.to(dev), "encoder_attention_mask": mask.to(dev)}


def bare_step_fn(cfg: Config, dev: torch.device, compile_backend: str | None):
    """(step function, model) of a bare bf16 train step: forward + loss, backward, fused AdamW."""
    torch.manual_seed(0)
    model = _randomised(build_model(cfg))
    if compile_backend is not None:
        compile_blocks(model, compile_backend)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    model = model.to(device=dev, dtype=dtype).train()
    diffusion = build_diffusion(cfg)
    inp = _inputs(cfg, dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")

    condition = _condition(cfg, inp, dev)

    def model_fn(x_t, ts, **kw):
        return call_in(model, dtype, x_t, ts, **kw)

    def step() -> None:
        loss = diffusion.training_losses(model_fn, inp.x, inp.t, condition, noise=inp.noise)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def _mfu(cfg: Config, ms: float, dev: torch.device) -> float | None:
    if dev.type != "cuda":
        return None
    peak = peak_for_name(torch.cuda.get_device_name(dev), cfg.train.precision)
    arch, d, m = resolved_arch(cfg), cfg.data, cfg.model
    if caption_channels_of(m):
        out = m.in_channels * (2 if m.learn_sigma else 1)
        flops = t2v_flops_per_sample(arch, d.num_frames, d.latent_size, CAPTION_TOKENS, m.in_channels, out)
    else:
        flops = flops_per_sample(arch, d.num_frames, d.latent_size)
    flops = dataclasses.replace(flops, frozen=lora.enabled(m.lora)).training  # LoRA: no weight gradients
    return None if not peak else flops * cfg.train.micro_batch_size / (ms / 1e3) / peak


_BARE_MS: dict[str, float] = {}  # "backend/mode" -> bare step ms, for the DeepSpeed ratios


def train_steps(args: argparse.Namespace, part: Part, t2v: bool = False) -> None:
    """The bare step of ``--model`` (``t2v``: of ``--t2v-model``, with padded captions) per backend."""
    model = args.t2v_model if t2v else args.model
    dev = _device()
    fp32 = ["train.precision=fp32"] if dev.type != "cuda" else []  # no bf16 speed to measure on a CPU
    arch = resolved_arch(_config(args, model=model))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    probe_q = torch.empty(1, 1, arch.num_heads, arch.hidden_size // arch.num_heads, device=dev, dtype=dtype)
    # inductor on a CPU takes minutes to generate C++: the smoke run compiles through aot_eager instead
    compile_backend = "inductor" if dev.type == "cuda" else "aot_eager"
    captions = f", captions of {CAPTION_TOKENS} tokens (8..{CAPTION_TOKENS} real)" if t2v else ""
    part.notes.append(
        f"{model}{captions}, micro-batch {args.batch}, {args.frames}x{args.latent}² latents, "
        f"{str(dtype).replace('torch.', '')}, median of {args.steps} steps after 2 warm-up; "
        f"compiled = model.compile ({compile_backend}), compile time not counted"
    )
    rows = [("auto", False), ("auto", True)] + [(b, False) for b in ("flash3", "flash", "xformers", "sdpa")]
    if t2v:
        rows = [("auto", False), ("auto", True), ("flash", False), ("sdpa", False)]
    for backend, compiled in rows:
        mode = "compiled" if compiled else "eager"
        reason = kernels.why_not(backend, probe_q) if backend not in ("auto", "sdpa") else None
        if reason is not None:
            part.rows.append([backend, mode, f"skipped: {reason}"] + [None] * 5)
            continue
        try:
            cfg = _config(args, *fp32, f"model.attention={backend}", model=model)
            step, net = bare_step_fn(cfg, dev, compile_backend if compiled else None)
            ran = kernels.resolve_backend(backend, probe_q)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            ms = _time_ms(step, args.steps)
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            launched = _count_kernels(step) if dev.type == "cuda" else None
            syncs = _count_syncs(step) if dev.type == "cuda" else None
            if not t2v:
                _BARE_MS[f"{backend}/{mode}"] = ms
            part.rows.append([backend, mode, ran, ms, _mfu(cfg, ms, dev), peak, launched, syncs])
            del step, net
        except Exception as exc:  # noqa: BLE001
            part.rows.append([backend, mode, f"failed: {_first_line(exc)}"] + [None] * 5)
        finally:
            torch._dynamo.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# 4. DeepSpeed on one rank
# ----------------------------------------------------------------------------------------------------------


_WORLD = None


def _world():
    """A world of one (NCCL on CUDA), made once."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        from latte.rendezvous import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    from latte.engine import setup_distributed

    global _WORLD
    if _WORLD is None:
        _WORLD = setup_distributed()
    return _WORLD


def _need_deepspeed() -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"deepspeed missing ({_first_line(exc)})") from None


def _engine_step_fn(cfg: Config, world):
    """(step, engine, EMA) for train.py's micro-step on ``cfg``: per-sample draws, pinned non-blocking host
    batch copies, the engine's forward/backward/step, the sharded EMA update."""
    from latte.conditioning import to_device
    from latte.ema import ShardedEMA
    from latte.engine import build_engine, set_grad_clip
    from latte.seeding import TrainingDraws

    dev = world.device
    torch.manual_seed(0)
    engine = build_engine(cfg, _randomised(build_model(cfg)), world)
    set_grad_clip(engine, cfg.train.clip_max_norm)
    ema = ShardedEMA(engine, 0.9999)
    diffusion = build_diffusion(cfg)
    size, micro = cfg.data.latent_size, cfg.train.micro_batch_size
    shape = (cfg.data.num_frames, cfg.model.in_channels, size, size)
    draws = TrainingDraws(0, diffusion.num_timesteps, shape, dev, cfg.model.class_dropout_prob)
    g = torch.Generator().manual_seed(0)
    host_x, host_y = torch.randn(micro, *shape, generator=g), torch.randint(0, 101, (micro,), generator=g)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    steps = iter(range(10**9))

    def model_fn(x_t, t, **kwargs):
        return engine(x_t.to(dtype), t, **kwargs).float()

    def step() -> None:
        drawn = draws(next(steps), range(micro))
        x, y = to_device(host_x, dev, torch.float32), to_device(host_y, dev)
        kwargs = {"y": y, "force_drop_ids": drawn.drop}
        losses = diffusion.training_losses(model_fn, x, drawn.t, kwargs, noise=drawn.noise)
        engine.backward(losses["loss"].mean())
        engine.step()
        ema.update()

    return step, engine, ema


def deepspeed_steps(args: argparse.Namespace, part: Part) -> None:
    _need_deepspeed()
    world = _world()
    dev = world.device
    precision = "bf16" if dev.type == "cuda" else "fp32"
    base = _BARE_MS.get("auto/eager")
    backend = "NCCL" if dev.type == "cuda" else "gloo"
    part.notes.append(
        f"train.py's step on one rank ({backend}), {precision}; ratio = ZeRO step ms / the bare eager auto "
        f"step of part 3 ({_cell(base)} ms)"
    )
    for stage in ("2", "3"):
        cfg = _config(args, f"train.zero_stage={stage}", f"train.precision={precision}")
        step, engine, ema = _engine_step_fn(cfg, world)
        ms = _time_ms(step, args.steps)
        ema_ms = _time_ms(ema.update, 5 if args.smoke else 20)
        syncs = _count_syncs(step) if dev.type == "cuda" else None
        ratio = None if not base else ms / base
        gib = ema.local_bytes() / 2**30
        part.rows.append([f"ZeRO-{stage}", ms, ratio, _mfu(cfg, ms, dev), ema_ms, gib, syncs])
        del step, engine, ema
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def lora_steps(args: argparse.Namespace, part: Part) -> None:
    """train.py's ZeRO-2 step, full fine-tuning vs LoRA (rank 16 on the default targets) from one base."""
    from benchmarks.lora_vs_full import optimizer_bytes

    _need_deepspeed()
    world = _world()
    dev = world.device
    precision = "bf16" if dev.type == "cuda" else "fp32"
    part.notes.append(f"ZeRO-2, one rank, {precision}; optimizer = fp32 masters + Adam moments on the rank")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.pt"
        full_cfg = _config(args, f"train.precision={precision}")
        torch.save({"ema": _randomised(build_model(full_cfg)).state_dict()}, base)
        full_ms = None
        for name, extra in (("full", []), ("LoRA r16", ["model.lora.rank=16"])):
            cfg = _config(args, f"train.precision={precision}", f"model.init_from={base}", *extra)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            step, engine, ema = _engine_step_fn(cfg, world)
            ms = _time_ms(step, args.steps)
            full_ms = full_ms or ms
            trainable = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
            peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
            part.rows.append([name, trainable / 1e6, optimizer_bytes(engine) / 2**30, ms, ms / full_ms, peak])
            del step, engine, ema
            if dev.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# 9. sequence parallelism over two GPUs
# ----------------------------------------------------------------------------------------------------------


def _sp_rank(args: argparse.Namespace) -> list[list[Any]]:
    """On each of 2 ranks (GPU r over NCCL; with ``--smoke`` and no CUDA, gloo CPU ranks): the model's
    forward + backward on the whole batch alone (SP 1), then split over the pair (SP 2): ms, peak GiB on
    this GPU, the output's max error relative to SP 1's."""
    import torch.distributed as dist

    from latte.parallel.sequence import sequence_groups

    cuda = torch.cuda.is_available()
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    shard = sequence_groups(2)
    cfg = _config(args)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = _randomised(build_model(cfg)).to(device=dev, dtype=dtype).train()
    inp = _inputs(cfg, dev)
    weight = torch.linspace(-1, 1, inp.x.numel() * 2, device=dev).view(*inp.x.shape[:2], -1)

    def fwd_bwd(sequence) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = call_in(model, dtype, inp.x, inp.t, y=inp.y, sequence=sequence)  # (N, F, 2C, h, w)
        (out.flatten(2) * weight).sum().backward()  # a loss both ranks share
        return out.detach()

    rows, reference = [], None
    for name, sequence in (("SP 1 (one GPU, whole clip)", None), ("SP 2 (frames / tokens split)", shard)):
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        ms = _time_ms(lambda sequence=sequence: fwd_bwd(sequence), args.steps)
        out = fwd_bwd(sequence)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None
        reference = out if reference is None else reference
        rows.append([name, ms, rows[0][1] / ms if rows else 1.0, peak, _rel(out, reference)])
    dist.destroy_process_group()
    return rows


def sequence_parallel(args: argparse.Namespace, part: Part) -> None:
    """Part 9: ``_sp_rank`` on 2 spawned ranks (2 GPUs, or 2 CPU ranks with ``--smoke``); rank 0's rows."""
    gpus = torch.cuda.device_count()
    if gpus == 1:
        raise Skip("a second GPU missing (1 here)")
    if not gpus and not args.smoke:
        raise Skip("CUDA missing")
    sys.path.insert(0, str(REPO / "tests"))
    from dist import run_ranks

    precision = "bf16" if gpus else "fp32 (CPU, smoke)"
    part.notes.append(
        f"the bare forward + backward of {args.model}, batch {args.batch}, {args.frames} frames, latent "
        f"{args.latent}, {precision}, on 2 ranks: each rank alone (SP 1), then the pair at SP 2; speed-up = "
        "SP 1 ms / SP 2 ms; error = SP 2's output vs SP 1's, max relative"
    )
    with tempfile.TemporaryDirectory() as tmp:
        part.rows = run_ranks(_sp_rank, 2, (args,), Path(tmp))[0]


# ----------------------------------------------------------------------------------------------------------
# 5. fp16: dynamic loss scaling across a resume
# ----------------------------------------------------------------------------------------------------------


def _scaler_state(engine) -> dict[str, float]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return {}
    return {
        k: float(getattr(scaler, k))
        for k in ("cur_scale", "cur_iter", "last_overflow_iter")
        if hasattr(scaler, k)
    }


def fp16_resume(args: argparse.Namespace, part: Part) -> None:
    _need_cuda()
    _need_deepspeed()
    import train as train_script
    from latte.engine import configure_cuda_numerics

    world = _world()
    model = "Latte-T/2" if args.smoke else "Latte-S/2"
    for deterministic in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            common = [
                f"model.name={model}",
                "model.num_classes=4",
                "data.num_frames=8",
                "data.image_size=128",
                "train.micro_batch_size=4",
                "train.precision=fp16",
                "train.log_every=1",
                f"train.deterministic={str(deterministic).lower()}",
                "train.stop_check_every=1",
            ]
            straight = load_config(
                None, [*common, "train.max_steps=12", "train.ckpt_every=100", f"train.results_dir={tmp}/a"]
            )
            configure_cuda_numerics(True, deterministic)
            losses_a, engine_a, _ = train_script.train(straight, world)
            scaler_a = _scaler_state(engine_a)
            del engine_a
            first = load_config(
                None, [*common, "train.max_steps=6", "train.ckpt_every=6", f"train.results_dir={tmp}/b"]
            )
            losses_b1, engine_b, _ = train_script.train(first, world)
            del engine_b
            second = load_config(
                None, [*common, "train.max_steps=12", "train.ckpt_every=6", f"train.results_dir={tmp}/b"]
            )
            losses_b2, engine_b, _ = train_script.train(second, world)
            scaler_b = _scaler_state(engine_b)
            del engine_b
        losses_b = losses_b1 + losses_b2
        diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(losses_a, losses_b, strict=True))
        part.rows.append(
            [
                str(deterministic).lower(),
                len(losses_a),
                diff,
                scaler_a == scaler_b,
                json.dumps(scaler_a),
                json.dumps(scaler_b),
            ]
        )
        torch.use_deterministic_algorithms(False)
        kernels.set_deterministic(False)


# ----------------------------------------------------------------------------------------------------------
# 6. sampling
# ----------------------------------------------------------------------------------------------------------


def sampling(args: argparse.Namespace, part: Part) -> None:
    from latte.sampling.generate import sample_batch

    dev = _device()
    precision = "bf16" if dev.type == "cuda" else "fp32"
    cfg = _config(
        args,
        "diffusion.sampling_steps=ddim10",
        "sample.cfg_scale=4",
        f"sample.precision={precision}",
        f"sample.num_samples={min(args.batch, 4)}",
        f"sample.batch_size={min(args.batch, 4)}",
    )
    torch.manual_seed(0)
    model = _randomised(build_model(cfg)).to(dev).eval().requires_grad_(False)
    diffusion = build_diffusion(cfg, sampling=True)
    indices = list(range(cfg.sample.num_samples))
    sample_batch(model, diffusion, cfg, indices[:1], dev)  # warm-up
    _sync()
    start = time.perf_counter()
    (clip,) = sample_batch(model, diffusion, cfg, indices, dev)
    _sync()
    ms = (time.perf_counter() - start) * 1e3 / diffusion.num_timesteps
    part.rows.append(
        [
            f"{args.model}, {len(indices)} videos, {args.frames} frames, DDIM 10, cfg 4, {precision}",
            bool(torch.isfinite(clip).all()),
            tuple(clip.shape),
            ms,
        ]
    )


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------

PARTS = {
    "env": ("environment", ["item", "value"], environment, 5),
    "attention": (
        "attention kernels vs fp32 math",
        [
            "shape (B, N, H, D)",
            "masked",
            "kernel",
            "status",
            "out err",
            "dq err",
            "dk err",
            "dv err",
            "fwd+bwd ms",
        ],
        attention_parity,
        30,
    ),
    "step": (
        "bare train step per attention backend (no DeepSpeed)",
        ["backend", "mode", "ran", "ms", "MFU", "peak GiB", "CUDA kernels", "host syncs"],
        train_steps,
        120,
    ),
    "t2v": (
        "bare train step of the text-to-video model (LatteT2V: cross-attention to masked captions)",
        ["backend", "mode", "ran", "ms", "MFU", "peak GiB", "CUDA kernels", "host syncs"],
        functools.partial(train_steps, t2v=True),
        90,
    ),
    "deepspeed": (
        "DeepSpeed, one rank: train.py's step",
        ["engine", "ms", "ratio vs bare", "MFU", "EMA update ms", "EMA GiB", "host syncs"],
        deepspeed_steps,
        60,
    ),
    "lora": (
        "LoRA vs full fine-tuning: train.py's ZeRO-2 step",
        ["variant", "trainable M", "optimizer GiB", "ms", "vs full", "peak GiB"],
        lora_steps,
        60,
    ),
    "fp16": (
        "fp16 dynamic loss scaling: 12 steps vs 6 + resume + 6",
        ["deterministic", "steps", "max rel loss diff", "scaler state equal", "straight", "resumed"],
        fp16_resume,
        60,
    ),
    "sample": ("sampling", ["case", "finite", "shape", "ms per step"], sampling, 15),
    "sp": (
        "sequence parallelism over 2 GPUs: forward + backward",
        ["layout", "ms", "speed-up", "peak GiB per GPU", "output error vs SP 1"],
        sequence_parallel,
        60,
    ),
}


def main(argv: list[str] | None = None) -> list[Part]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if torch.cuda.is_available():  # train.py's defaults (train.tf32); the fixed cuBLAS workspace that
        os.environ.setdefault(
            "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
        )  # part 5's determinism needs, from the start
        from latte.engine import configure_cuda_numerics

        configure_cuda_numerics(tf32=True, deterministic=False)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    start = time.perf_counter()
    parts: list[Part] = []
    for key in args.parts:
        title, columns, fn, estimate = PARTS[key]
        part = Part(title, columns)
        began = time.perf_counter()
        if began - start + estimate > args.budget_s:
            part.status = "skipped: time budget"
        else:
            try:
                fn(args, part)
            except Skip as exc:
                part.status = f"skipped: {exc}"
            except Exception as exc:  # noqa: BLE001 (one broken part must not hide the others)
                part.status = f"failed: {_first_line(exc)}"
                part.notes.append(
                    "traceback tail: " + " | ".join(traceback.format_exc().strip().splitlines()[-3:])
                )
        part.seconds = time.perf_counter() - began
        parts.append(part)
        print(part.markdown(), flush=True)
    header = f"# GPU check ({'smoke, ' if args.smoke else ''}{time.perf_counter() - start:.0f} s in all)\n\n"
    text = header + "\n".join(p.markdown() for p in parts)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps([p.__dict__ for p in parts], indent=1, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return parts


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (a destroyed process group's thread can abort it)
