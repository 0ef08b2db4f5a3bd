"""Sequence parallelism: activation memory per rank and all-to-all bytes per step, SP = 1 vs 2 (CPU, gloo).

    python benchmarks/sequence_parallel_memory.py [--model Latte-S/2 --latent 16 --frames 16 32 64 --batch 1]

For each clip length, one forward + backward of the model (fp32, ``sdpa``) on 1 rank and on 2 gloo
ranks at SP 2. Activation memory = the bytes autograd saves for backward during the forward (counted with
``torch.autograd.graph.saved_tensors_hooks``, each storage once, the weights' own storages left out): what a
rank holds between its forward and backward, independent of the allocator. All-to-all bytes = what this
rank sends through ``latte.parallel.sequence``'s all-to-alls in that forward + backward (counted at the
call), and the frame gather of the output. Ratios are SP 2 / SP 1 of the same clip length, in one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="Latte-S/2")
    p.add_argument("--latent", type=int, default=16, help="latent size (tokens per frame: (latent / 2)^2)")
    p.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--batch", type=int, default=1)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, frames: int, sp: int) -> dict[str, float]:
    """This rank's saved-activation bytes and all-to-all / gather bytes sent for one forward + backward."""
    import latte.parallel.sequence as sequence
    from latte.models import LATTE_MODELS

    shard = None
    if sp > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        shard = sequence.sequence_groups(sp)
    sent = {"all_to_all": 0, "gather": 0}
    plain = sequence._all_to_all

    def counted(x, group):
        sent["all_to_all"] += x.numel() * x.element_size() * (sp - 1) // sp  # the chunks to other ranks
        return plain(x, group)

    sequence._all_to_all = counted
    torch.manual_seed(0)
    model = LATTE_MODELS[args.model](
        input_size=args.latent, num_frames=max(args.frames), num_classes=101, attention="sdpa"
    )
    x = torch.randn(args.batch, frames, 4, args.latent, args.latent)  # (N, F, C, h, w)
    t, y = torch.randint(0, 1000, (args.batch,)), torch.randint(0, 101, (args.batch,))
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights (and their views) are not
    saved = [0]  # activations

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            saved[0] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, t, y=y, sequence=shard)  # (N, F, 8, h, w)
    if shard is not None:
        sent["gather"] = out.numel() * out.element_size() * (sp - 1) // sp  # this rank's frames to the others
    out.square().mean().backward()
    sequence._all_to_all = plain
    return {"saved": saved[0], **sent}


def _rank(args: argparse.Namespace) -> list[dict[str, float]]:
    return [measure(args, frames, 2) for frames in args.frames]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    from dist import run_ranks

    one = [measure(args, frames, 1) for frames in args.frames]
    with tempfile.TemporaryDirectory() as tmp:
        two = run_ranks(_rank, 2, (args,), Path(tmp))[0]  # rank 0's counts (the ranks hold equal shares)
    tokens = (args.latent // 2) ** 2
    print(
        f"{args.model}, batch {args.batch}, {tokens} tokens per frame (latent {args.latent}^2), fp32, one "
        f"forward + backward; activation = bytes saved for backward on the rank; 2 gloo ranks on CPU\n"
    )
    print(
        "| frames | activations SP 1 | activations / rank SP 2 | SP 2 / SP 1 | all-to-all sent / rank / step "
        "| output gather / rank |"
    )
    print("|---|---|---|---|---|---|")
    for frames, a, b in zip(args.frames, one, two, strict=True):
        mib = 2**20
        print(
            f"| {frames} | {a['saved'] / mib:.1f} MiB | {b['saved'] / mib:.1f} MiB | "
            f"{b['saved'] / a['saved']:.3f}x | {b['all_to_all'] / mib:.1f} MiB | "
            f"{b['gather'] / mib:.2f} MiB |"
        )


if __name__ == "__main__":
    main()
