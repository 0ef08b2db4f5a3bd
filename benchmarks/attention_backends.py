"""Forward+backward time of the whole Latte model under each attention backend.

    python benchmarks/attention_backends.py [--model Latte-S/2 --frames 16 --latent 32 --batch 2 --repeats 3
                                             --device cpu|cuda --dtype fp32|bf16|fp16 --compile]

One model, one set of weights and inputs; only the attention backend changes between rows. For each
requested backend the script asks ``resolve_backend`` what would actually run on this device and dtype: an
explicit backend that falls back ("flash" without flash-attn, anything GPU-only on CPU) is listed but not
timed, and a choice that resolves to a kernel already timed ("auto" -> "sdpa" on CPU) is not timed twice
unless ``--time-duplicates``. Timing: ``--warmup`` untimed iterations, then the median of ``--repeats``
(``time.perf_counter``, with ``torch.cuda.synchronize`` around each iteration on GPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latte.models import BACKENDS, LATTE_MODELS, Latte, resolve_backend  # noqa: E402
from latte.models.attention import Attention  # noqa: E402
from latte.precision import DTYPES  # noqa: E402


@dataclass
class Row:
    backend: str
    ran: str
    ms: float | None = None
    peak_mib: float | None = None
    max_diff: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Latte-S/2", choices=sorted(LATTE_MODELS))
    p.add_argument("--frames", type=int, default=16, help="frames per clip (= the model's num_frames)")
    p.add_argument("--latent", type=int, default=32, help="latent height = width (image size / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed iterations; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing each backend")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--num-classes", type=int, default=101, help="0 = unconditional (UCF-101 has 101)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument(
        "--time-duplicates", action="store_true", help="also time choices resolving to a timed kernel"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile", action="store_true", help="also time `auto` with every block compiled (model.compile)"
    )
    return p.parse_args(argv)


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Latte:
    torch.manual_seed(args.seed)
    model = LATTE_MODELS[args.model](
        input_size=args.latent, in_channels=4, num_frames=args.frames, num_classes=args.num_classes
    )
    # adaLN-Zero makes a fresh model output zeros: give the zeroed layers small random weights so that the
    # outputs (and the diffs between backends) mean something. FLOPs are the same either way.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0.0, 0.02)
    # eval(): no label dropout, so every backend sees the same labels; autograd is unaffected.
    return model.to(device=device, dtype=dtype).eval()


def set_backend(model: Latte, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model: Latte, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward+backward; returns the (detached) output."""
    model.zero_grad(set_to_none=True)
    out = model(inputs["x"], inputs["t"], inputs.get("y"))  # (N, F, C_out, H, W)
    out.float().square().mean().backward()
    return out.detach()


def measure(model: Latte, inputs: dict, args: argparse.Namespace, device: torch.device):
    """(output of the first iteration, median ms of the timed iterations, peak MiB or None)."""
    first = None
    for _ in range(max(args.warmup, 0)):
        out = step(model, inputs)
        first = out if first is None else first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        out = step(model, inputs)
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
        first = out if first is None else first
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return first, statistics.median(times), peak


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:  # Linux: the marketing name ("AMD EPYC ...") is more telling than "x86_64"
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU ({cpu}, {os.cpu_count()} cores, {threads} torch threads), torch {torch.__version__}"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    model = build(args, device, dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, args.frames, 4, args.latent, args.latent, generator=g)
    inputs = {"x": x.to(device, dtype), "t": torch.randint(0, 1000, (args.batch,), generator=g).to(device)}
    if args.num_classes:
        inputs["y"] = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    heads = model.num_heads
    head_dim = model.pos_embed.shape[-1] // heads
    probe = torch.empty(1, 1, heads, head_dim, device=device, dtype=dtype)  # what each block's q looks like
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# {args.model} ({n_params / 1e6:.1f}M params), x {tuple(x.shape)} {args.dtype}, {machine(device)}"
    )
    print(f"# warmup {args.warmup}, median of {args.repeats}", flush=True)

    # math first (the reference), then sdpa, so that "auto" is the row found to duplicate it on CPU.
    order = ["math"] + sorted((b for b in args.backends if b != "math"), key=lambda b: b != "sdpa")
    rows: list[Row] = []
    timed: dict[str, Row] = {}
    reference = None
    for name in order:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ran = resolve_backend(name, probe)
        if name not in ("auto", ran):
            rows.append(Row(name, ran, note=f"falls back to {ran} here: not timed"))
            continue
        if ran in timed and not args.time_duplicates:
            rows.append(Row(name, ran, note=f"same kernel as the {timed[ran].backend} row: not timed"))
            continue
        set_backend(model, name)
        start = time.perf_counter()
        out, ms, peak = measure(model, inputs, args, device)
        print(f"#   {name}: {time.perf_counter() - start:.1f} s in all", flush=True)
        if reference is None:
            reference = out.float()
        row = Row(name, ran, ms, peak, (out.float() - reference).abs().max().item())
        rows.append(row)
        timed.setdefault(ran, row)

    if args.compile:  # model.compile: each block through torch.compile (inductor), the backend `auto` picks
        from latte.builders import compile_blocks

        set_backend(model, "auto")
        compile_blocks(model)
        start = time.perf_counter()
        step(model, inputs)  # the first call compiles (both block kinds)
        compile_s = time.perf_counter() - start
        out, ms, peak = measure(model, inputs, args, device)
        ran = resolve_backend("auto", probe)
        rows.append(Row("auto + compile", ran, ms, peak, (out.float() - reference).abs().max().item()))
        print(f"#   auto + compile: compiling took {compile_s:.0f} s (not in the time)", flush=True)

    math_ms = timed["math"].ms
    print()
    print("| backend | actually ran | fwd+bwd ms | ratio vs math | peak memory MiB | max abs diff vs math |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = None if r.ms is None else r.ms / math_ms
        cells = [r.backend, r.ran, fmt(r.ms, ".0f"), fmt(ratio, ".2f"), fmt(r.peak_mib, ".0f")]
        cells.append(fmt(r.max_diff, ".2e") if r.ms is not None else r.note)
        print("| " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
