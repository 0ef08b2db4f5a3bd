"""Sequence parallelism (issue 19, the model part): Latte-S/2 split over 2 gloo ranks (frames in the spatial
blocks, token positions in the temporal blocks, one all-to-all each way around every temporal block) computes
what one rank computes: outputs, and parameter gradients summed over the group, within 1e-5 of the output's
(or gradient's) largest magnitude (+ 1e-7). The ranks' matmuls run on half-size batches, so their roundings
differ from one rank's by float32 reassociation only. LatteT2V too, its caption replicated in the group."""

from __future__ import annotations

import json

import pytest
import torch
from dist import run_ranks
from test_lora import _randomize

from latte.models import LATTE_MODELS

TOL = 1e-5
ABS = 1e-7  # a floor: an attention key bias's gradient is zero in exact arithmetic, ~1e-8 in float32
CASES = {  # name: (model kwargs, forward kwargs)
    "sdpa": ({"attention": "sdpa"}, {}),
    "math + mask + checkpointing": ({"attention": "math", "gradient_checkpointing": True}, {"mask": True}),
    "T2V, caption mask": ({"t2v": True, "attention": "sdpa"}, {"mask": True}),
    "joint: 4 frames + 2 images, mask": ({"attention": "sdpa"}, {"mask": True, "images": True}),
    "T2V joint: 4 frames + 2 captioned images, masks": (
        {"t2v": True, "attention": "sdpa"},
        {"mask": True, "images": True},
    ),
}


def _model(t2v: bool = False, **kwargs):
    torch.manual_seed(0)
    if t2v:  # a small LatteT2V (2 spatial-temporal pairs of width 64); the caption is replicated in the group
        from latte.models import LatteT2V

        model = LatteT2V(
            input_size=16,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            caption_channels=32,
            num_frames=4,
            **kwargs,
        )
    else:
        model = LATTE_MODELS["Latte-S/2"](input_size=16, num_frames=4, num_classes=10, **kwargs)
    return _randomize(model, 1, 0.02).train()  # adaLN-Zero's zero gates and output: make every path count


def _inputs(mask: bool = False, t2v: bool = False, images: bool = False) -> dict:
    g = torch.Generator().manual_seed(2)
    if t2v:
        kwargs = {
            "x": torch.randn(2, 4, 4, 16, 16, generator=g),  # (N, F, C, h, w)
            "t": torch.tensor([3, 700]),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),  # (N, L, D)
        }
        if mask:
            kwargs["encoder_attention_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
        if images:  # 2 images after the 4 frames, each with its own caption: states (N, 1+K, L, D)
            kwargs["x"] = torch.cat([kwargs["x"], torch.randn(2, 2, 4, 16, 16, generator=g)], dim=1)
            captions = torch.randn(2, 2, 5, 32, generator=g)  # (N, K, L, D)
            kwargs["encoder_hidden_states"] = torch.cat(
                [kwargs["encoder_hidden_states"][:, None], captions], 1
            )
            kwargs["use_image_num"] = 2
            if mask:  # the clip's mask, then the images': one short caption, one empty but its first token
                masks = torch.tensor([[[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]])
                kwargs["encoder_attention_mask"] = torch.cat(
                    [kwargs["encoder_attention_mask"][:, None], masks.bool()], 1
                )
        return kwargs
    kwargs = {
        "x": torch.randn(2, 4, 4, 16, 16, generator=g),  # (N, F, C, h, w): 4 frames of 8x8 = 64 tokens
        "t": torch.tensor([3, 700]),
        "y": torch.tensor([1, 7]),
        "force_drop_ids": torch.tensor([0, 1]),
    }
    if mask:
        kwargs["attention_mask"] = torch.tensor([[True, True, True, False], [True, True, True, True]])
    if images:  # video-image joint training: 2 images after the 4 frames, each with its label
        kwargs["x"] = torch.cat([kwargs["x"], torch.randn(2, 2, 4, 16, 16, generator=g)], dim=1)
        kwargs.update(
            use_image_num=2, y_image=torch.tensor([[2, 3], [4, 5]]), force_drop_image_ids=torch.tensor([1, 0])
        )
        if mask:
            kwargs["attention_mask"] = torch.cat(
                [kwargs["attention_mask"], torch.ones(2, 2, dtype=torch.bool)], 1
            )
    return kwargs


def _forward_backward(model, sequence=None, mask: bool = False, images: bool = False) -> dict:
    from latte.models import LatteT2V

    inputs = _inputs(mask, isinstance(model, LatteT2V), images)
    out = model(**inputs, sequence=sequence)  # (N, F, 2C, h, w)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()  # a loss every rank shares
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"out": out.detach(), "grads": grads}


def _on_rank(case: str) -> dict:
    import torch.distributed as dist

    from latte.parallel.sequence import sequence_groups

    dist.init_process_group("gloo")
    shard = sequence_groups(2)
    model_kwargs, forward_kwargs = CASES[case]
    result = _forward_backward(_model(**model_kwargs), shard, **forward_kwargs)
    dist.destroy_process_group()
    return result


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err, peak = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= TOL * peak + ABS, f"{what}: max |diff| {err:.3g} > {TOL} x {peak:.3g} + {ABS}"


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_compute_what_one_rank_computes(tmp_path, case):
    model_kwargs, forward_kwargs = CASES[case]
    want = _forward_backward(_model(**model_kwargs), **forward_kwargs)
    ranks = run_ranks(_on_rank, 2, (case,), tmp_path)
    for r in ranks:
        _close(r["out"], want["out"], f"rank output ({case})")
    assert ranks[0]["grads"].keys() == want["grads"].keys()
    for name, grad in want["grads"].items():
        _close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad, f"{name} gradient ({case})")
    some = next(iter(want["grads"]))
    assert not torch.equal(ranks[0]["grads"][some], want["grads"][some])  # each rank holds a part


def test_frames_or_tokens_that_do_not_split_are_one_error():
    from latte.parallel.sequence import SequenceShard

    model = _model(attention="sdpa")
    inputs = _inputs()
    inputs["x"] = inputs["x"][:, :3]  # 3 frames over 2 ranks
    with pytest.raises(
        ValueError, match="^sequence parallelism over 2 ranks needs frames divisible by 2, got 3$"
    ):
        model(**inputs, sequence=SequenceShard(2, 0))
    inputs = _inputs(images=True)
    inputs.update(x=inputs["x"][:, :5], use_image_num=1, y_image=inputs["y_image"][:, :1])
    with pytest.raises(ValueError, match="needs images divisible by 2, got 1$"):
        model(**inputs, sequence=SequenceShard(2, 0))


@pytest.mark.slow
def test_training_with_sp2_follows_one_rank_and_resumes_with_sp1(tmp_path, monkeypatch):
    """The tiny Latte, micro-batch 8: 2 ranks at train.sequence_parallel 2 (one data-parallel group) train the
    same global batches as 1 rank; 20 steps end within fp32 rounding of the 1-rank run (module and EMA), and
    its step-10 checkpoint resumed on 1 rank without SP (a world-size change) ends there too."""
    import shutil

    import test_checkpoint as ckpt_tests
    from test_checkpoint import _finish, _one_process, _start

    from latte.checkpoint import tag_for

    monkeypatch.setattr(ckpt_tests, "STEPS", 20)
    monkeypatch.setattr(ckpt_tests, "EVERY", 10)
    common = ["train.micro_batch_size=8", "model.class_dropout_prob=0.1"]
    two = _finish(_start(tmp_path / "sp2", [*common, "train.sequence_parallel=2"]))
    assert "2 x cpu (sequence parallel 2 x data parallel 1)" in two and "x 1 groups" in two, two[-3000:]
    steps = ["train.max_steps=20", "train.ckpt_every=10", "train.log_every=10"]
    one = _one_process(tmp_path / "one", *common, *steps)
    assert one.returncode == 0, one.stderr[-3000:]
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "sp2" / "checkpoints" / tag_for(10), resumed_dir / tag_for(10))
    resumed = _one_process(tmp_path / "resumed", *common, *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 10 (saved by 2 ranks, resharded)" in resumed.stdout, resumed.stdout[-2000:]

    def weights(run: str) -> dict:
        step = tmp_path / run / "checkpoints" / tag_for(20)
        module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return {**module, **{f"ema.{k}": v for k, v in torch.load(step / "ema_consolidated.pt").items()}}

    want = weights("one")
    for run in ("sp2", "resumed"):
        got = weights(run)
        assert got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=f"{run} {key}")
    meta = json.loads((tmp_path / "sp2" / "checkpoints" / tag_for(20) / "meta.json").read_text())
    assert meta["samples_seen"] == 20 * 8 and meta["world_size"] == 2


@pytest.mark.slow
def test_sampling_with_sp2_gives_the_latents_of_one_rank(tmp_path):
    """``torchrun --nproc_per_node 2 -m latte.sample --sequence-parallel 2``: both ranks denoise every clip
    together (one group), including a 2-clip long video; the latents equal 1-rank sampling's (within 1e-5)."""

    import numpy as np
    from test_checkpoint import _one_process
    from test_t2v import _run as run_python

    from data_pipeline.toy_videos import make_tiny_vae
    from latte.rendezvous import free_port

    done = _one_process(
        tmp_path, "train.max_steps=3", "train.ckpt_every=3", "train.log_every=3", resume="none"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    vae = make_tiny_vae(tmp_path / "vae", downsample=8)
    common = ["--vae", str(vae), "--num-samples", "3", "--steps", "ddim3", "--cfg-scale", "3"]
    common += ["--total-frames", "6", "--overlap", "2", "--save-latents", "--no-progress"]
    ckpt = str(tmp_path / "checkpoints")
    one = run_python("-m", "latte.sample", ckpt, "--out", str(tmp_path / "one"), *common, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    sp = ["-m", "latte.sample", ckpt, "--out", str(tmp_path / "sp"), *common, "--sequence-parallel", "2"]
    two = run_python(*launch, *sp, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    for i in range(3):
        a, b = (np.load(tmp_path / d / f"sample_{i:04d}.npy") for d in ("one", "sp"))
        assert a.shape == (6, 4, 8, 8)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), i
    assert (tmp_path / "sp" / "grid.mp4").is_file()
