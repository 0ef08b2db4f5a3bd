"""Predicted weak scaling of Latte training under DeepSpeed ZeRO-2 and ZeRO-3: a MODEL, not a measurement.

    python benchmarks/scaling_model.py [--model Latte-XL/2 --frames 16 --latent 32 --micro-batch 8
                                        --precision bf16 --grad-accum 1 --step-ms MS | --mfu 0.45
                                        --peak-tflops T --device-name H100 --gpus 8 16 32 64 128 256 512
                                        --gpus-per-node 8 --nvlink-gbps 360 --ib-gbits 400 --ib-efficiency 0.9
                                        --latency-us 8.4 --nvlink-hop-us 3.4 --ib-hop-us 14
                                        --z2-grad-allreduce --z3-reuse --json PATH]

Weak scaling: the micro batch per GPU is fixed, so the compute of one GPU per step (T) does not change with
the GPU count N; only the data-parallel collectives do. Nothing is run or timed: every number comes from the
formulas below, so the output is only as good as the bandwidth, latency and MFU it is given.

Symbols: P trainable parameters (counted from the flavor, built on the meta device), b bytes per element of
the communication dtype (= the precision: 2 for bf16/fp16, 4 for fp32; ``communication_data_type`` is null
in ds_configs), N GPUs, g GPUs per node, n = ceil(N / g) nodes, A micro-batches per step.

Bytes each GPU sends (and receives) per optimizer step, ring collectives ((N-1)/N of the message each):

    ZeRO-2:  A * (N-1)/N * P*b   reduce-scatter of gradients, every micro-batch (DeepSpeed's stage 2 hooks
                                 reduce each micro-batch, `partition_gradients` in stage_1_and_2.py; only
                                 stage 1 waits for the accumulation boundary)
           +     (N-1)/N * P*b   all-gather of the updated bf16 parameters at the end of step()
    ZeRO-3:  A * 3 * (N-1)/N * P*b   all-gather in forward, again in backward, reduce-scatter of gradients

so ZeRO-3 moves 1.5x the bytes of ZeRO-2 at A = 1. Two switches model what DeepSpeed 0.19 really does with
our ds_configs: ``--z2-grad-allreduce`` (its default ``use_multi_rank_bucket_allreduce: true``, not set in
zero2.json, all-reduces each gradient bucket, 2 * (N-1)/N * P*b, and keeps the owned slice) and
``--z3-reuse`` (``stage3_max_reuse_distance`` keeps a parameter gathered when it is used again within that
many elements; with parameters used in order, the part re-gathered in backward is max(0, 1 - R / (2P))).

Time of one collective of M bytes in k calls (alpha-beta model, NCCL ring, Simple protocol):

    t = k * alpha(N) + (N-1)/N * M / B(N)
    alpha(N) = base + (N - n) * hop_nvlink + (n - 1) * hop_ib   (NCCL's own ring latency model,
               src/graph/tuning.cc: nRanks-1 steps, nNodes-1 of them over the network; x2 hops for all-reduce)
    B(N) = B_nvlink                                   if N <= g (one node: every ring hop is NVLink)
         = min(B_nvlink, g * B_ib * efficiency)       otherwise

The multi-node B is a flat ring (what NCCL runs for reduce-scatter / all-gather) whose slowest hop is IB:
NCCL runs one ring per NIC, and each ring leaves a node through a different NIC, so every GPU's own NIC
carries only 1/g of that GPU's ring bytes and the node's g NICs together set the pace. Capping at B_nvlink
keeps a multi-node ring from being faster than the single-node one (rings also cross NVLink).

The counts k come from ds_configs: ZeRO-2 reduce-scatter ceil(P / reduce_bucket_size), all-gather
max(1, P // allgather_bucket_size) (DeepSpeed's all_gather_dp_groups shard count); ZeRO-3 all-gather
ceil(P / stage3_prefetch_bucket_size) per pass, reduce-scatter ceil(P / reduce_bucket_size).

Step time. Without overlap: A * T + all comm. With overlap (``overlap_comm: true``): forward is T/3 and
backward 2T/3 (backward = 2x forward FLOPs, no recomputation); a collective hides behind its window and what
does not fit, plus a stated non-overlappable part, adds:

    ZeRO-2: A * (T/3 + max(2T/3, RS - RS_last) + RS_last) + AG
            (RS_last: the last, partial gradient bucket, launched when backward ends; the all-gather runs
            inside optimizer.step() with no compute to hide behind)
    ZeRO-3: A * (max(T/3, AGf - AG_first) + AG_first + max(2T/3, AGb + RS - RS_last) + RS_last)
            (AG_first: the first prefetch bucket, needed before any forward compute)

Not modelled: NCCL kernels slowing compute (SM contention), stragglers, network congestion or
oversubscription, the optimizer's own time, the data loader, ZeRO-3's persistent small parameters (reported,
ignored) and frozen position tables (all-gathered in forward under ZeRO-3; < 0.1% of P for Latte-XL/2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

# latte (and so torch) is imported inside the functions that need it: the formulas below import nothing
# heavy, which keeps tests/test_scaling_model.py well under a second.

BYTES_PER_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16, the fallback when the peak table cannot be used


@dataclass(frozen=True)
class Network:
    """Per-GPU links of one cluster (GB/s, microseconds) and how many GPUs share a node."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 360.0  # effective ring bus bandwidth inside a node
    ib_gbits: float = 400.0  # line rate of the one NIC per GPU
    ib_efficiency: float = 0.9  # fraction of the line rate a long transfer gets
    latency_us: float = 8.4  # fixed cost of one collective call (NCCL ring/Simple base latency)
    nvlink_hop_us: float = 3.4  # per ring step inside a node
    ib_hop_us: float = 14.0  # per ring step across nodes

    def nodes(self, gpus: int) -> int:
        return math.ceil(gpus / self.gpus_per_node)

    def bus_gbps(self, gpus: int) -> float:
        """B(N): NVLink on one node, else the node's NICs together (one ring per NIC), capped at NVLink."""
        if gpus <= self.gpus_per_node:
            return self.nvlink_gbps
        ib_node = self.gpus_per_node * self.ib_gbits / 8 * self.ib_efficiency
        return min(self.nvlink_gbps, ib_node)

    def latency_s(self, gpus: int, hops_factor: int = 1) -> float:
        """alpha(N) of one ring call: N-1 dependent steps, n-1 of them over IB (x2 steps for all-reduce)."""
        n = self.nodes(gpus)
        hops = (gpus - n) * self.nvlink_hop_us + (n - 1) * self.ib_hop_us
        return (self.latency_us + hops_factor * hops) * 1e-6


@dataclass(frozen=True)
class Buckets:
    """Bucket sizes in elements (DeepSpeed counts numel, not bytes), read from ds_configs."""

    z2_reduce: int
    z2_allgather: int
    z3_reduce: int
    z3_prefetch: int
    z3_reuse_distance: int


@dataclass(frozen=True)
class Comm:
    """One kind of collective in a step: its whole message (bytes) split into ``calls`` ring calls.

    ``factor`` is 1 for reduce-scatter / all-gather and 2 for all-reduce (twice the bytes and the steps).
    """

    message_bytes: float
    calls: int
    factor: int = 1

    def bytes_per_gpu(self, gpus: int) -> float:
        return self.factor * (gpus - 1) / gpus * self.message_bytes

    def time_s(self, gpus: int, net: Network) -> float:
        if gpus <= 1 or self.calls == 0:
            return 0.0
        bandwidth = self.bytes_per_gpu(gpus) / (net.bus_gbps(gpus) * 1e9)
        return self.calls * net.latency_s(gpus, self.factor) + bandwidth


@dataclass(frozen=True)
class Workload:
    """What one GPU does per optimizer step: P parameters of b bytes, A micro-batches of T seconds each."""

    params: int
    bytes_per_element: int
    compute_s: float  # forward + backward of one micro-batch
    grad_accum: int = 1
    z2_grad_allreduce: bool = False
    z3_reuse: bool = False


@dataclass
class Row:
    """One GPU count of one stage; efficiencies are filled in against the smallest GPU count."""

    gpus: int
    nodes: int
    collectives: int
    comm_bytes: float
    comm_ms: float
    latency_ms: float
    bus_gbps: float
    step_ms: float
    step_overlap_ms: float
    efficiency: float = 1.0
    efficiency_overlap: float = 1.0


def last_bucket_elements(params: int, bucket: int) -> int:
    """Size of the last-filled bucket: the remainder after full buckets (a full one when P divides)."""
    return params - (math.ceil(params / bucket) - 1) * bucket


def bucketed(elements: float, bucket: int, bytes_per_element: int, factor: int = 1) -> Comm:
    """A collective over ``elements`` issued in ceil(elements / bucket) calls."""
    return Comm(elements * bytes_per_element, math.ceil(elements / bucket) if elements > 0 else 0, factor)


def zero2_comms(work: Workload, buckets: Buckets) -> dict[str, Comm]:
    """Per micro-batch gradient reduction (``rs``, its last bucket ``rs_last``) and the post-step ``ag``."""
    p, b = work.params, work.bytes_per_element
    factor = 2 if work.z2_grad_allreduce else 1
    return {
        "rs": bucketed(p, buckets.z2_reduce, b, factor),
        "rs_last": Comm(last_bucket_elements(p, buckets.z2_reduce) * b, 1, factor),
        "ag": Comm(p * b, max(1, p // buckets.z2_allgather)),
    }


def z3_regather_fraction(work: Workload, buckets: Buckets) -> float:
    """Part of P all-gathered again in backward: 1, or with --z3-reuse max(0, 1 - R / (2P)).

    A parameter at position x of the forward order is next used after ~2 (1 - x) P elements (the rest of
    forward, then backward down to it); DeepSpeed keeps it gathered when that is below R.
    """
    if not work.z3_reuse:
        return 1.0
    return max(0.0, 1.0 - buckets.z3_reuse_distance / (2 * work.params))


def zero3_comms(work: Workload, buckets: Buckets) -> dict[str, Comm]:
    """Per micro-batch: forward gather ``agf`` (first bucket ``ag_first``), backward ``agb``, ``rs``."""
    p, b = work.params, work.bytes_per_element
    return {
        "agf": bucketed(p, buckets.z3_prefetch, b),
        "ag_first": Comm(min(p, buckets.z3_prefetch) * b, 1),
        "agb": bucketed(p * z3_regather_fraction(work, buckets), buckets.z3_prefetch, b),
        "rs": bucketed(p, buckets.z3_reduce, b),
        "rs_last": Comm(last_bucket_elements(p, buckets.z3_reduce) * b, 1),
    }


def zero2_step_s(t: dict[str, float], work: Workload) -> tuple[float, float]:
    """(no overlap, overlap) seconds per step from the collectives' times ``t``."""
    c, a = work.compute_s, work.grad_accum
    serial = a * (c + t["rs"]) + t["ag"]
    overlap = a * (c / 3 + max(2 * c / 3, t["rs"] - t["rs_last"]) + t["rs_last"]) + t["ag"]
    return serial, overlap


def zero3_step_s(t: dict[str, float], work: Workload) -> tuple[float, float]:
    """(no overlap, overlap) seconds per step; ZeRO-3 has no post-step gather (next forward gathers)."""
    c, a = work.compute_s, work.grad_accum
    serial = a * (c + t["agf"] + t["agb"] + t["rs"])
    forward = max(c / 3, t["agf"] - t["ag_first"]) + t["ag_first"]
    backward = max(2 * c / 3, t["agb"] + t["rs"] - t["rs_last"]) + t["rs_last"]
    return serial, a * (forward + backward)


# stage -> (its collectives, its step time, the collectives issued once per step rather than per micro-batch)
STAGES = {"zero2": (zero2_comms, zero2_step_s, {"ag"}), "zero3": (zero3_comms, zero3_step_s, set())}


def predict_row(stage: str, gpus: int, work: Workload, buckets: Buckets, net: Network) -> Row:
    """One stage at one GPU count. Per-micro-batch collectives count A times, ZeRO-2's gather once."""
    comms_fn, step_fn, once = STAGES[stage]
    comms = comms_fn(work, buckets)
    times = {name: comm.time_s(gpus, net) for name, comm in comms.items()}
    # "_last" / "_first" are parts of another collective, named only for the overlap formula
    real = {name: comm for name, comm in comms.items() if not name.endswith(("_last", "_first"))}
    repeat = {name: 1 if name in once else work.grad_accum for name in real}
    comm_bytes = sum(repeat[k] * c.bytes_per_gpu(gpus) for k, c in real.items())
    comm_s = sum(repeat[k] * times[k] for k in real)
    latency_s = sum(repeat[k] * c.calls * net.latency_s(gpus, c.factor) for k, c in real.items() if gpus > 1)
    serial, overlap = step_fn(times, work)
    return Row(
        gpus=gpus,
        nodes=net.nodes(gpus),
        collectives=sum(repeat[k] * c.calls for k, c in real.items()),
        comm_bytes=comm_bytes,
        comm_ms=comm_s * 1e3,
        latency_ms=latency_s * 1e3,
        bus_gbps=net.bus_gbps(gpus),
        step_ms=serial * 1e3,
        step_overlap_ms=overlap * 1e3,
    )


def predict(stage: str, gpu_counts: list[int], work: Workload, buckets: Buckets, net: Network) -> list[Row]:
    """Rows by increasing GPU count; weak-scaling efficiency = step time at the smallest count / at N."""
    rows = [predict_row(stage, n, work, buckets, net) for n in sorted(set(gpu_counts))]
    for row in rows:
        row.efficiency = rows[0].step_ms / row.step_ms
        row.efficiency_overlap = rows[0].step_overlap_ms / row.step_overlap_ms
    return rows


# ---------------------------------------------------------------------------------------------------------
# Inputs: parameters from the flavor, compute time from FLOPs, buckets from ds_configs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    below_persistence: int  # trainable elements in tensors ZeRO-3 keeps whole (numel < threshold)


def count_params(model: str, frames: int, latent: int, num_classes: int, persistence: int) -> ParamCount:
    """Build the flavor on the meta device (no memory, no init cost) and count trainable parameters.

    Counting the built module rather than re-deriving a formula means a change to the model (a new
    embedder, a bias) changes the prediction too.
    """
    import torch

    from latte.models import LATTE_MODELS

    with torch.device("meta"):
        module = LATTE_MODELS[model](input_size=latent, num_frames=frames, num_classes=num_classes or None)
    params = [p for p in module.parameters() if p.requires_grad]
    small = sum(p.numel() for p in params if p.numel() < persistence)
    return ParamCount(sum(p.numel() for p in params), small)


def lookup_peak_tflops(device_name: str, precision: str) -> float | None:
    """The peak from ``latte.metrics.peak_for_name``; None if its signature or return type has changed."""
    try:
        from latte.metrics import peak_for_name

        peak = peak_for_name(device_name, precision)
    except (ImportError, TypeError):  # a changed signature falls back to --peak-tflops / the default
        return None
    return float(peak) / 1e12 if isinstance(peak, (int, float)) and peak > 0 else None


def compute_ms_from_flops(model: str, frames: int, latent: int, micro_batch: int, tflops: float) -> float:
    """T = training FLOPs per sample x micro batch / (peak x MFU), with tflops = peak x MFU in TFLOP/s."""
    from latte.metrics import flops_per_sample
    from latte.models import LATTE_ARCHS

    flops = flops_per_sample(LATTE_ARCHS[model], frames, latent).training * micro_batch
    return flops / (tflops * 1e12) * 1e3


def load_buckets(zero2: Path, zero3: Path) -> Buckets:
    """Bucket sizes from the JSON a user tunes, with DeepSpeed's defaults where a key is absent."""
    z2 = json.loads(zero2.read_text())["zero_optimization"]
    z3 = json.loads(zero3.read_text())["zero_optimization"]
    return Buckets(
        z2_reduce=int(z2.get("reduce_bucket_size", 5e8)),
        z2_allgather=int(z2.get("allgather_bucket_size", 5e8)),
        z3_reduce=int(z3.get("reduce_bucket_size", 5e8)),
        z3_prefetch=int(z3.get("stage3_prefetch_bucket_size", 5e7)),
        z3_reuse_distance=int(z3.get("stage3_max_reuse_distance", 1e9)),
    )


def persistence_threshold(zero3: Path) -> int:
    return int(
        json.loads(zero3.read_text())["zero_optimization"].get("stage3_param_persistence_threshold", 1e5)
    )


# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------

TITLES = {
    "zero2": "ZeRO-2 (reduce-scatter of gradients per micro-batch + all-gather of parameters after the step)",
    "zero3": "ZeRO-3 (all-gather in forward and in backward + reduce-scatter of gradients)",
}


def markdown_table(rows: list[Row]) -> str:
    head = (
        "| GPUs | nodes | collectives / step | comm GB / GPU / step | bus GB/s | comm ms (of which latency) "
        "| step ms, no overlap | step ms, overlap | efficiency, no overlap | efficiency, overlap |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r.gpus} | {r.nodes} | {r.collectives} | {r.comm_bytes / 1e9:.2f} | {r.bus_gbps:.0f} "
        f"| {r.comm_ms:.1f} ({r.latency_ms:.1f}) | {r.step_ms:.1f} | {r.step_overlap_ms:.1f} "
        f"| {r.efficiency:.3f} | {r.efficiency_overlap:.3f} |"
        for r in rows
    ]
    return "\n".join([head, *lines])


def assumptions(args: argparse.Namespace, counts: ParamCount, work: Workload, compute_src: str) -> list[str]:
    """Every input the numbers depend on, in the words the header prints."""
    net = network_from(args)
    ib_node = net.gpus_per_node * net.ib_gbits / 8 * net.ib_efficiency
    z2_grad = "all-reduce (2x bytes)" if work.z2_grad_allreduce else "reduce-scatter"
    z3_bwd = "reuse distance from zero3.json" if work.z3_reuse else "every parameter re-gathered"
    return [
        f"model {args.model}, {args.frames} frames, latent {args.latent}x{args.latent}, "
        f"{args.num_classes} classes: P = {counts.trainable:,} trainable parameters (meta-device build); "
        f"{counts.below_persistence / counts.trainable:.2%} of them in tensors below ZeRO-3's persistence "
        "threshold (ignored)",
        f"micro batch {args.micro_batch} per GPU, gradient accumulation {args.grad_accum}, "
        f"{args.precision}: {work.bytes_per_element} bytes per communicated element",
        f"compute per micro-batch T = {work.compute_s * 1e3:.1f} ms ({compute_src}); "
        "forward T/3, backward 2T/3",
        f"intra-node: {net.nvlink_gbps:g} GB/s effective NVLink ring bus bandwidth per GPU, "
        f"{net.gpus_per_node} GPUs per node",
        f"inter-node: one {net.ib_gbits:g} Gb/s NIC per GPU at {net.ib_efficiency:.0%} = "
        f"{ib_node:g} GB/s per node; flat NCCL ring, one ring per NIC, B = min(NVLink, node NICs)",
        f"latency per ring call: {net.latency_us:g} us + {net.nvlink_hop_us:g} us per NVLink step "
        f"+ {net.ib_hop_us:g} us per IB step (NCCL ring/Simple latency model)",
        f"ZeRO-2 gradients: {z2_grad}; ZeRO-3 backward: {z3_bwd}; overlap_comm on in the overlap columns",
    ]


def network_from(args: argparse.Namespace) -> Network:
    return Network(
        gpus_per_node=args.gpus_per_node,
        nvlink_gbps=args.nvlink_gbps,
        ib_gbits=args.ib_gbits,
        ib_efficiency=args.ib_efficiency,
        latency_us=args.latency_us,
        nvlink_hop_us=args.nvlink_hop_us,
        ib_hop_us=args.ib_hop_us,
    )


def compute_time(args: argparse.Namespace) -> tuple[float, str]:
    """(T in seconds, where it came from): --step-ms if given, else FLOPs / (peak x MFU)."""
    if args.step_ms is not None:
        return args.step_ms / 1e3, "given by --step-ms"
    peak, src = args.peak_tflops, "--peak-tflops"
    if peak is None:
        peak = lookup_peak_tflops(args.device_name, args.precision)
        src = f"latte.metrics.peak_for_name({args.device_name!r}, {args.precision!r})"
        if peak is None:
            peak, src = DEFAULT_PEAK_TFLOPS, "default (peak table unavailable)"
    ms = compute_ms_from_flops(args.model, args.frames, args.latent, args.micro_batch, peak * args.mfu)
    return (
        ms / 1e3,
        f"flops_per_sample x {args.micro_batch} / ({peak:g} TFLOP/s from {src} x MFU {args.mfu:g})",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from latte.models.flavors import LATTE_ARCHS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Latte-XL/2", choices=sorted(LATTE_ARCHS))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--latent", type=int, default=32, help="latent height = width (image size / 8)")
    p.add_argument("--num-classes", type=int, default=101, help="0 = unconditional (UCF-101 has 101)")
    p.add_argument("--micro-batch", type=int, default=8, help="clips per GPU per forward")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--precision", default="bf16", choices=sorted(BYTES_PER_ELEMENT))
    p.add_argument("--step-ms", type=float, help="compute of one micro-batch on one GPU (else from FLOPs)")
    p.add_argument("--mfu", type=float, default=0.45, help="assumed MFU when --step-ms is not given")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s (default: the table, else 989)")
    p.add_argument("--device-name", default="H100", help="key for latte.metrics.peak_for_name")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nvlink-gbps", type=float, default=360.0, help="effective NVLink ring bus GB/s per GPU")
    p.add_argument("--ib-gbits", type=float, default=400.0, help="inter-node Gb/s per GPU (one NIC each)")
    p.add_argument("--ib-efficiency", type=float, default=0.9, help="achieved fraction of the IB line rate")
    p.add_argument("--latency-us", type=float, default=8.4, help="fixed latency of one collective call")
    p.add_argument("--nvlink-hop-us", type=float, default=3.4, help="latency per intra-node ring step")
    p.add_argument("--ib-hop-us", type=float, default=14.0, help="latency per inter-node ring step")
    p.add_argument("--zero2-config", type=Path, default=REPO / "ds_configs" / "zero2.json")
    p.add_argument("--zero3-config", type=Path, default=REPO / "ds_configs" / "zero3.json")
    p.add_argument(
        "--z2-grad-allreduce",
        action="store_true",
        help="ZeRO-2 gradients all-reduced per bucket (DeepSpeed's use_multi_rank_bucket_allreduce default)",
    )
    p.add_argument(
        "--z3-reuse",
        action="store_true",
        help="ZeRO-3 keeps parameters reused within stage3_max_reuse_distance",
    )
    p.add_argument("--json", type=Path, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    counts = count_params(
        args.model, args.frames, args.latent, args.num_classes, persistence_threshold(args.zero3_config)
    )
    compute_s, compute_src = compute_time(args)
    work = Workload(
        counts.trainable,
        BYTES_PER_ELEMENT[args.precision],
        compute_s,
        args.grad_accum,
        args.z2_grad_allreduce,
        args.z3_reuse,
    )
    buckets, net = load_buckets(args.zero2_config, args.zero3_config), network_from(args)
    results = {stage: predict(stage, args.gpus, work, buckets, net) for stage in STAGES}
    notes = assumptions(args, counts, work, compute_src)
    print("**MODEL, not a measurement.** Assumptions:\n")
    print("\n".join(f"- {line}" for line in notes))
    for stage, rows in results.items():
        print(f"\n{TITLES[stage]}:\n")
        print(markdown_table(rows))
    if args.json:
        payload = {
            "note": "MODEL, not a measurement",
            "assumptions": notes,
            "inputs": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "params": counts.trainable,
            "compute_ms": compute_s * 1e3,
            "buckets": asdict(buckets),
            "network": asdict(net),
            **{stage: [asdict(r) for r in rows] for stage, rows in results.items()},
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
