"""Forward+backward time of our Latte against the original Vchitect/Latte ``models/latte.py``, one run.

    python benchmarks/vs_original.py --original PATH/TO/Latte [--model Latte-S/2 --frames 16 --latent 32
        --batch 2 --num-classes 101 --attention math --ours-attention BACKEND --rounds 5 --warmup 2
        --threads N --device cpu|cuda --amp none|bf16|fp16 --profile]

``--original`` is a checkout of github.com/Vchitect/Latte (the directory holding ``models/latte.py``); that
file is loaded by path as the module ``original_latte``. It imports ``timm.models.vision_transformer``; when
timm cannot be imported (here it pulls in a torchvision that fails beside the CPU torch) a minimal shim of
timm's ``Mlp`` and ``PatchEmbed`` (same computation, same parameter names) is installed in its place.

What is measured: both models are built for the same config (fp32 weights; ``--amp`` runs both forwards
under ``torch.autocast``), ours is seeded and its zero-initialised adaLN/output layers get small random
weights (as ``attention_backends.py`` does), and the original loads ``ours.state_dict()`` with strict=True.
Both run in train() mode with label dropout off (``class_dropout_prob=0``: the original passes its
``self.training`` to the label embedder, so eval mode alone would not make the labels identical) on the same
inputs. One iteration = zero grads, forward, ``out.float().square().mean().backward()``. After ``--warmup``
untimed iterations per model the two are timed alternately, ours then original, for ``--rounds`` rounds
(``time.perf_counter``; ``torch.cuda.synchronize`` around each iteration on GPU). Reported: the median per
model, the ratio of the medians ours/original, the min/max of the per-round ratios, and how far apart the
outputs and the parameter gradients of the first iteration are (exactly 0 expected for math vs math),
and, per round, how many cores other processes kept busy (Linux: /proc/stat less this process): on a shared
machine a round with foreign load is flagged, as its timings are not comparable. On CPU the first few
iterations also pay extra page faults while glibc's malloc adapts its mmap threshold, hence ``--warmup 2``.
``--profile`` then runs one more iteration of each under ``torch.profiler`` and lists the self time per
aten op, ours against the original.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latte.models import BACKENDS, LATTE_ARCHS, Latte, resolve_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_backends import machine  # noqa: E402  (the same machine line in both benchmarks)

ORIGINAL_ATTENTION = ("math", "flash", "xformers")  # the original's attention_mode values
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The original's zoo: Latte-{S,B,L,XL}/{2,4,8} (not our tiny test flavor).
FLAVORS = sorted(name for name in LATTE_ARCHS if not name.startswith("Latte-T"))


# ----------------------------------------------------------------------------------------------------------
# Loading the original
# ----------------------------------------------------------------------------------------------------------


class _ShimMlp(nn.Module):
    """timm's ``Mlp`` for the arguments the original passes: fc1 -> act -> drop1 -> norm -> fc2 -> drop2."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _ShimPatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` (flatten=True, no norm): Conv2d ``proj`` -> flatten(2).transpose(1, 2)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[[int], nn.Module] | None = None,
        flatten: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, D, H/p, W/p)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)  # (B, T, D), a channel-first view as timm returns it
        return self.norm(x)


def _install_timm_shim() -> bool:
    """Make ``from timm.models.vision_transformer import Mlp, PatchEmbed`` work; True if the shim is used."""
    try:
        importlib.import_module("timm.models.vision_transformer")
        return False
    except Exception:  # ImportError, or timm's torchvision import failing with a RuntimeError
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]  # a half-imported timm
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    vit = types.ModuleType("timm.models.vision_transformer")
    vit.Mlp, vit.PatchEmbed = _ShimMlp, _ShimPatchEmbed
    timm.models, models.vision_transformer = models, vit
    timm.__path__, models.__path__ = [], []  # packages, so that submodule imports resolve
    sys.modules.update({"timm": timm, "timm.models": models, "timm.models.vision_transformer": vit})
    return True


def load_original(checkout: Path, name: str = "latte") -> tuple[types.ModuleType, bool]:
    """The original ``models/{name}.py`` (``latte_img``: the joint video-image model) as module
    ``original_{name}``, and whether the timm shim is in use."""
    path = checkout / "models" / f"{name}.py"
    if not path.is_file():
        raise SystemExit(
            f"--original {checkout}: no models/{name}.py there (expected a Vchitect/Latte checkout)"
        )
    if importlib.util.find_spec("einops") is None:
        raise SystemExit("the original models/latte.py needs einops: pip install einops")
    shim = _install_timm_shim()
    spec = importlib.util.spec_from_file_location(f"original_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"original_{name}"] = module
    spec.loader.exec_module(module)
    return module, shim


# ----------------------------------------------------------------------------------------------------------
# Models, inputs, one iteration
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--original", type=Path, required=True, help="checkout of github.com/Vchitect/Latte")
    p.add_argument("--model", default="Latte-S/2", choices=FLAVORS)
    p.add_argument("--frames", type=int, default=16, help="frames per clip (= num_frames of both models)")
    p.add_argument("--latent", type=int, default=32, help="latent height = width (image size / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=101, help="0 = unconditional (UCF-101 has 101)")
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--attention", default="math", choices=ORIGINAL_ATTENTION, help="the original's attention_mode"
    )
    p.add_argument(
        "--ours-attention", default=None, choices=BACKENDS, help="our backend (default: --attention)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, each one iteration of each model")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per model before the rounds")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--amp", default="none", choices=sorted(AMP), help="torch.autocast dtype for both")
    p.add_argument("--profile", action="store_true", help="then profile one iteration of each per aten op")
    p.add_argument("--profile-rows", type=int, default=30, help="ops listed by --profile")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_ours(args: argparse.Namespace) -> Latte:
    torch.manual_seed(args.seed)
    model = Latte(
        **dataclasses.asdict(LATTE_ARCHS[args.model]),
        input_size=args.latent,
        in_channels=4,
        num_frames=args.frames,
        class_dropout_prob=0.0,
        num_classes=args.num_classes,
        learn_sigma=args.learn_sigma,
        attention=args.ours_attention,
    )
    # adaLN-Zero makes a fresh model output zeros: give the zeroed layers small random weights so that the
    # output comparison means something. FLOPs are the same either way.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    return model


def build_original(module: types.ModuleType, args: argparse.Namespace, ours: Latte) -> nn.Module:
    arch = LATTE_ARCHS[args.model]
    model = module.Latte(
        input_size=args.latent,
        patch_size=arch.patch_size,
        in_channels=4,
        hidden_size=arch.hidden_size,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        num_frames=args.frames,
        class_dropout_prob=0.0,
        num_classes=args.num_classes,
        learn_sigma=args.learn_sigma,
        extras=2 if args.num_classes else 1,  # 2 = class-conditional, 1 = unconditional
        attention_mode=args.attention,
    )
    model.load_state_dict(ours.state_dict(), strict=True)
    return model


def make_inputs(args: argparse.Namespace, device: torch.device) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1)
    inputs = {
        "x": torch.randn(args.batch, args.frames, 4, args.latent, args.latent, generator=g),  # (N,F,C,H,W)
        "t": torch.randint(0, 1000, (args.batch,), generator=g),
    }
    if args.num_classes:
        inputs["y"] = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    return {k: v.to(device) for k, v in inputs.items()}


def step(model: nn.Module, inputs: dict[str, Tensor], amp: torch.dtype | None) -> Tensor:
    """One forward+backward; returns the detached output."""
    model.zero_grad(set_to_none=True)
    device_type = inputs["x"].device.type
    autocast = torch.autocast(device_type, amp) if amp is not None else contextlib.nullcontext()
    with autocast:
        out = model(inputs["x"], inputs["t"], inputs.get("y"))  # (N, F, C_out, H, W)
    out.float().square().mean().backward()
    return out.detach()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(model: nn.Module, inputs: dict[str, Tensor], amp: torch.dtype | None) -> tuple[Tensor, float]:
    device = inputs["x"].device
    sync(device)
    start = time.perf_counter()
    out = step(model, inputs, amp)
    sync(device)
    return out, (time.perf_counter() - start) * 1e3


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), Linux only; else None."""
    try:
        with open("/proc/stat") as f:
            ticks = [
                int(v) for v in f.readline().split()[1:9]
            ]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def foreign_load(before: tuple[float, float] | None, wall_s: float) -> float | None:
    """Cores kept busy by other processes (and the hypervisor's steal) since ``before``, on average."""
    after = cpu_seconds()
    if before is None or after is None or wall_s <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / wall_s


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}


def max_diff(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------------------


def profile_ops(model: nn.Module, inputs: dict[str, Tensor], amp: torch.dtype | None) -> dict[str, float]:
    """Self time (ms) per op name over one forward+backward (device time on GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if inputs["x"].is_cuda:
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step(model, inputs, amp)
        sync(inputs["x"].device)
    attr = "self_device_time_total" if inputs["x"].is_cuda else "self_cpu_time_total"
    return {e.key: getattr(e, attr) / 1e3 for e in prof.key_averages() if getattr(e, attr) > 0}


def print_profile(ours: dict[str, float], original: dict[str, float], rows: int) -> None:
    names = sorted(ours.keys() | original.keys(), key=lambda k: -max(ours.get(k, 0.0), original.get(k, 0.0)))
    print("| op (self time) | ours ms | original ms | ours - original ms |")
    print("|---|---|---|---|")
    for name in names[:rows]:
        a, b = ours.get(name, 0.0), original.get(name, 0.0)
        print(f"| `{name}` | {a:.0f} | {b:.0f} | {a - b:+.0f} |")
    rest_a = sum(ours.get(k, 0.0) for k in names[rows:])
    rest_b = sum(original.get(k, 0.0) for k in names[rows:])
    print(f"| {len(names) - rows} other ops | {rest_a:.0f} | {rest_b:.0f} | {rest_a - rest_b:+.0f} |")
    total_a, total_b = sum(ours.values()), sum(original.values())
    print(f"| **total** | {total_a:.0f} | {total_b:.0f} | {total_a - total_b:+.0f} |")


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    ours_ms: list[float] = field(default_factory=list)
    original_ms: list[float] = field(default_factory=list)
    out_diff: float = 0.0
    out_equal: bool = False
    grad_diff: float = 0.0
    grads_equal: bool = False
    foreign: list[float] = field(default_factory=list)  # other processes' average cores, per round

    @property
    def ratios(self) -> list[float]:
        return [a / b for a, b in zip(self.ours_ms, self.original_ms, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ours_ms) / statistics.median(self.original_ms)


def compare(
    ours: nn.Module, original: nn.Module, inputs: dict[str, Tensor], args: argparse.Namespace
) -> Result:
    """Warm-up (the first iteration's outputs and grads are compared), then interleaved timed rounds."""
    amp = AMP[args.amp]
    res = Result()
    out_a, out_b = step(ours, inputs, amp), step(original, inputs, amp)
    res.out_diff, res.out_equal = max_diff(out_a, out_b), torch.equal(out_a, out_b)
    grads_a, grads_b = grads(ours), grads(original)
    if grads_a.keys() != grads_b.keys():
        raise RuntimeError(
            f"the models' trainable parameters differ: {sorted(grads_a.keys() ^ grads_b.keys())}"
        )
    res.grad_diff = max(max_diff(grads_a[k], grads_b[k]) for k in grads_a)
    res.grads_equal = all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    del grads_a, grads_b
    for _ in range(args.warmup - 1):
        step(ours, inputs, amp)
        step(original, inputs, amp)
    for r in range(args.rounds):
        before, start = cpu_seconds(), time.perf_counter()
        res.ours_ms.append(timed_step(ours, inputs, amp)[1])
        res.original_ms.append(timed_step(original, inputs, amp)[1])
        load = foreign_load(before, time.perf_counter() - start)
        res.foreign.append(load if load is not None else float("nan"))
        print(
            f"#   round {r + 1}: ours {res.ours_ms[-1]:.0f} ms, original {res.original_ms[-1]:.0f} ms, "
            f"ratio {res.ours_ms[-1] / res.original_ms[-1]:.3f}; other processes: "
            + ("?" if load is None else f"{load:.2f} cores"),
            flush=True,
        )
    return res


def main(argv: list[str] | None = None) -> Result:
    args = parse_args(argv)
    args.ours_attention = args.ours_attention or args.attention
    if args.warmup < 1 or args.rounds < 1:
        raise SystemExit(
            "--warmup and --rounds must be >= 1 (the first warm-up iteration is the output check)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    module, shim = load_original(args.original.resolve())
    ours = build_ours(args)
    original = build_original(module, args, ours)
    ours.to(device).train()
    original.to(device).train()
    inputs = make_inputs(args, device)
    amp = AMP[args.amp]
    probe = torch.empty(1, 1, ours.num_heads, 1, device=device, dtype=amp or torch.float32)
    ran = resolve_backend(args.ours_attention, probe)
    threads = torch.get_num_threads()
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"# {args.model} ({n_params / 1e6:.1f}M params), x {tuple(inputs['x'].shape)}, fp32 weights, "
        f"autocast {args.amp}, train mode, no label dropout; {machine(device)}"
    )
    print(f"# original: {args.original / 'models' / 'latte.py'}{' (timm shimmed)' if shim else ''}")
    print(f"# warm-up {args.warmup} per model, then {args.rounds} rounds of (ours, original)", flush=True)
    res = compare(ours, original, inputs, args)

    med_a, med_b = statistics.median(res.ours_ms), statistics.median(res.original_ms)
    ratios = res.ratios
    print()
    print(
        f"| model | attention | fwd+bwd ms, median of {args.rounds} ({threads} threads) | min ms | max ms |"
    )
    print("|---|---|---|---|---|")
    ours_attn = args.ours_attention if ran == args.ours_attention else f"{args.ours_attention} (ran {ran})"
    print(f"| ours | {ours_attn} | {med_a:.0f} | {min(res.ours_ms):.0f} | {max(res.ours_ms):.0f} |")
    print(
        f"| original | {args.attention} | {med_b:.0f} | {min(res.original_ms):.0f} | "
        f"{max(res.original_ms):.0f} |"
    )
    print(
        f"| **ours / original** | | **{res.ratio:.3f}** | per-round {min(ratios):.3f} | {max(ratios):.3f} |"
    )
    print()
    print(
        f"outputs: max |ours - original| = {res.out_diff:.3g} (torch.equal: {res.out_equal}); "
        f"parameter grads: max |diff| = {res.grad_diff:.3g} (all torch.equal: {res.grads_equal})"
    )
    busy = [i + 1 for i, load in enumerate(res.foreign) if load > 0.1]
    if busy:
        print(
            f"WARNING: other processes kept > 0.1 core busy during round(s) {busy}: "
            "those timings (and maybe the ratio) are disturbed; rerun on an idle machine"
        )
    if args.profile:
        print("\n# profile: one forward+backward each, self time per op (the profiler adds overhead)\n")
        print_profile(profile_ops(ours, inputs, amp), profile_ops(original, inputs, amp), args.profile_rows)
    return res


if __name__ == "__main__":
    main()
