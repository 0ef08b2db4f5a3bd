"""Choices made for GPU runs, checked where a CPU can check them: which GPU a rank drives, the optimizer
flavour, per-sample draws, TF32/determinism switches (what only a GPU can show: benchmarks/gpu_check.py)."""

from __future__ import annotations

import os

import pytest
import torch

from latte.engine import configure_cuda_numerics, fused_adamw, offloads_optimizer
from latte.rendezvous import World, cuda_device_index, local_device, world_from_env
from latte.seeding import TrainingDraws, batch_indices, sample_seed


@pytest.mark.parametrize(
    "local_rank, visible, device",
    [(0, 8, 0), (3, 8, 3), (3, 1, 0), (7, 1, 0), (9, 8, 1), (5, 4, 1)],
    ids=["rank0", "all-visible", "one-per-task", "one-per-task-7", "wrap", "half"],
)
def test_a_rank_drives_local_rank_modulo_the_visible_gpus(local_rank, visible, device):
    """--gpus-per-task=1 (cgroups) shows each rank one device 0: set_device(local_rank) would fail."""
    assert cuda_device_index(local_rank, visible) == device


def test_no_visible_gpu_is_an_error():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda_device_index(0, 0)


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_launcher(monkeypatch):
    """No launcher's or SLURM's variables, and the environment restored afterwards (the rendezvous adds
    variables; set them with os.environ, not monkeypatch.setenv, whose undo would run after the restore)."""
    saved = dict(os.environ)
    for name in (*LAUNCHER_VARS, "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        os.environ.pop(name, None)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_the_world_comes_from_the_launcher_else_slurm_else_is_one_process(no_launcher):
    """Training and sampling read one layout (latte.rendezvous); its device: the rank's GPU, else the CPU."""
    cpu = torch.device("cpu")
    no_launcher.setattr(torch.cuda, "is_available", lambda: False)
    assert world_from_env() == World(0, 1, 0, cpu) and "RANK" not in os.environ  # sampling
    no_launcher.setattr(torch.cuda, "is_available", lambda: True)
    no_launcher.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU per task
    os.environ.update(SLURM_PROCID="5", SLURM_NTASKS="8", SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[03-05]")
    world = world_from_env()
    assert world == World(5, 8, 1, torch.device("cuda", 0)) and not world.is_main
    os.environ.update(RANK="2", WORLD_SIZE="4", LOCAL_RANK="2")  # torchrun's variables win over SLURM's
    assert world_from_env() == World(2, 4, 2, torch.device("cuda", 0)) == World(2, 4, 2, local_device(2))


def test_a_world_of_one_gets_the_variables_of_a_process_group(no_launcher):
    no_launcher.setattr(torch.cuda, "is_available", lambda: False)
    world = world_from_env(alone_env=True)  # what setup_distributed starts from
    assert world == World(0, 1, 0, torch.device("cpu")) and world.is_main
    assert [os.environ[k] for k in LAUNCHER_VARS[:4]] == ["0", "1", "0", "127.0.0.1"]
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536


def test_fused_adamw_only_where_the_master_weights_are_on_a_gpu():
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    plain = {"zero_optimization": {"stage": 2}}
    assert offloads_optimizer(offload) and not offloads_optimizer(plain)
    assert not offloads_optimizer({"zero_optimization": {"offload_optimizer": {"device": "none"}}})
    assert fused_adamw(torch.device("cuda", 0), plain)
    assert not fused_adamw(torch.device("cuda", 0), offload)
    assert not fused_adamw(torch.device("cpu"), plain)  # CPU runs keep their bitwise-tested numerics


def test_draws_depend_on_the_global_sample_index_only():
    draws = TrainingDraws(
        seed=3, num_timesteps=1000, shape=(2, 4, 8, 8), device=torch.device("cpu"), drop_prob=0.5
    )
    whole = draws(7, range(0, 8))  # one rank holding the whole global batch of 8
    for i in range(2):  # rank i of two ranks x 4, or micro-batch i of one rank x 4 x accumulation 2
        rows = slice(i * 4, i * 4 + 4)
        for indices in (batch_indices(0, i, 2, 4), batch_indices(i, 0, 1, 4)):
            part = draws(7, indices)
            assert torch.equal(part.t, whole.t[rows]) and torch.equal(part.noise, whole.noise[rows])
            assert torch.equal(part.drop, whole.drop[rows])
    again = draws(7, range(0, 8))
    assert torch.equal(again.noise, whole.noise) and torch.equal(again.drop, whole.drop)
    other_step = draws(8, range(0, 8))
    assert not torch.equal(other_step.noise, whole.noise)
    assert whole.t.shape == (8,) and whole.noise.shape == (8, 2, 4, 8, 8) and whole.drop.dtype == torch.int64


def test_label_dropout_differs_between_ranks():
    """Every rank used to draw the dropout from the same RNG state, dropping the same positions everywhere."""
    draws = TrainingDraws(0, 1000, (1,), torch.device("cpu"), drop_prob=0.5)
    per_rank = [draws(0, batch_indices(0, rank, 4, 16)).drop for rank in range(4)]
    assert len({tuple(d.tolist()) for d in per_rank}) == 4
    total = torch.cat([draws(s, range(256)).drop for s in range(4)]).float().mean().item()
    assert 0.45 < total < 0.55


def test_sample_seeds_do_not_collide():
    seeds = {sample_seed(0, step, index) for step in range(200) for index in range(200)}
    assert len(seeds) == 200 * 200
    assert all(0 <= s < 2**63 for s in seeds)
    assert batch_indices(1, 2, 4, 8) == range(48, 56)  # micro-batch 1 of rank 2 of 4, micro 8


def test_tf32_and_determinism_switches():
    before = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
    )
    try:
        configure_cuda_numerics(tf32=True, deterministic=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        configure_cuda_numerics(tf32=False, deterministic=True)
        assert not torch.backends.cuda.matmul.allow_tf32
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        import latte.models.attention as kernels

        assert kernels._deterministic[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.use_deterministic_algorithms(before[2])
        torch.backends.cudnn.deterministic = before[3]
        import latte.models.attention as kernels

        kernels.set_deterministic(False)
