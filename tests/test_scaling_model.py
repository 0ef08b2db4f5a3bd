"""The analytic scaling model: hand-computed bytes and times, ZeRO-3 vs ZeRO-2 bytes, overlap, efficiency.

Pure arithmetic on made-up workloads (no torch, no model build), so the whole file runs in well under 2 s.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import scaling_model as sm

REPO = sm.REPO
GPU_COUNTS = [512, 8, 16, 32, 64, 128, 256]  # unsorted on purpose: predict sorts
BUCKETS = sm.Buckets(z2_reduce=200, z2_allgather=200, z3_reduce=50, z3_prefetch=50, z3_reuse_distance=1000)
NET = sm.Network()


def workload(compute_ms: float = 50.0, accum: int = 1, **flags: bool) -> sm.Workload:
    return sm.Workload(
        params=1_000, bytes_per_element=2, compute_s=compute_ms / 1e3, grad_accum=accum, **flags
    )


def test_bytes_per_step_match_a_hand_computed_case():
    """P = 1000 bf16 elements on 4 GPUs: each ring collective sends 3/4 x 2000 B = 1500 B per GPU."""
    z2 = sm.predict_row("zero2", 4, workload(), BUCKETS, NET)
    z3 = sm.predict_row("zero3", 4, workload(), BUCKETS, NET)
    assert z2.comm_bytes == pytest.approx(2 * 1500)  # reduce-scatter + all-gather
    assert z3.comm_bytes == pytest.approx(3 * 1500)  # gather (forward), gather (backward), reduce-scatter
    assert z2.collectives == 5 + 5  # ceil(1000 / 200) reduce-scatter calls, 1000 // 200 all-gather calls
    assert z3.collectives == 3 * 20  # 1000 / 50 calls for each of the three


def test_collective_time_is_latency_plus_bytes_over_bandwidth():
    """alpha-beta by hand: one node (NVLink hops only), then two nodes (one IB step, node NICs' bandwidth)."""
    net = sm.Network(nvlink_gbps=100.0, latency_us=10.0, nvlink_hop_us=1.0, ib_hop_us=20.0)
    comm = sm.Comm(message_bytes=8e9, calls=3)
    assert comm.time_s(4, net) == pytest.approx(3 * (10 + 3 * 1) * 1e-6 + 0.75 * 8e9 / 100e9)
    # 16 GPUs = 2 nodes: 14 NVLink steps + 1 IB step; 8 NICs x 50 GB/s x 0.9 = 360 GB/s > NVLink -> 100
    assert comm.time_s(16, net) == pytest.approx(3 * (10 + 14 * 1 + 1 * 20) * 1e-6 + 15 / 16 * 8e9 / 100e9)
    assert sm.Network(nvlink_gbps=450.0).bus_gbps(16) == pytest.approx(360.0)  # IB-bound across nodes
    assert comm.time_s(1, net) == 0.0


def test_zero3_moves_one_and_a_half_times_the_bytes_of_zero2():
    for n in GPU_COUNTS:
        z2 = sm.predict_row("zero2", n, workload(), BUCKETS, NET)
        z3 = sm.predict_row("zero3", n, workload(), BUCKETS, NET)
        assert z3.comm_bytes == pytest.approx(1.5 * z2.comm_bytes)


def test_switches_and_accumulation_change_the_bytes_as_documented():
    base = sm.predict_row("zero2", 8, workload(), BUCKETS, NET).comm_bytes  # 2 x 7/8 x 2000
    allreduce = sm.predict_row("zero2", 8, workload(z2_grad_allreduce=True), BUCKETS, NET).comm_bytes
    assert allreduce == pytest.approx(1.5 * base)  # gradients 2x, the all-gather unchanged
    accum = sm.predict_row("zero2", 8, workload(accum=4), BUCKETS, NET).comm_bytes
    assert accum == pytest.approx(base / 2 * (4 + 1))  # reduce every micro-batch, gather once per step
    # reuse distance 1000 of P = 1000: 1 - 1000 / 2000 = half of P gathered again in backward
    assert sm.z3_regather_fraction(workload(z3_reuse=True), BUCKETS) == pytest.approx(0.5)
    reuse = sm.predict_row("zero3", 8, workload(z3_reuse=True), BUCKETS, NET).comm_bytes
    assert reuse == pytest.approx(base / 2 * 2.5)


@pytest.mark.parametrize("stage", list(sm.STAGES))
@pytest.mark.parametrize("compute_ms", [0.01, 1.0, 50.0])
@pytest.mark.parametrize("accum", [1, 3])
def test_efficiency_and_overlap_bounds(stage, compute_ms, accum):
    """Efficiency is 1 at the smallest count and never above; overlap never makes a step slower."""
    for flags in ({}, {"z2_grad_allreduce": True, "z3_reuse": True}):
        rows = sm.predict(stage, GPU_COUNTS, workload(compute_ms, accum, **flags), BUCKETS, NET)
        assert [r.gpus for r in rows] == sorted(GPU_COUNTS)
        assert rows[0].efficiency == rows[0].efficiency_overlap == 1.0
        for r in rows:
            assert 0 < r.efficiency <= 1 and 0 < r.efficiency_overlap <= 1
            assert r.step_overlap_ms <= r.step_ms + 1e-12
            assert r.step_overlap_ms >= accum * compute_ms  # compute itself is never hidden


def test_buckets_come_from_the_repository_configs():
    """The counts use the JSON a user tunes (whatever it says today), and the remainder as the last bucket."""
    z2_path, z3_path = REPO / "ds_configs" / "zero2.json", REPO / "ds_configs" / "zero3.json"
    z2 = json.loads(z2_path.read_text())["zero_optimization"]
    z3 = json.loads(z3_path.read_text())["zero_optimization"]
    buckets = sm.load_buckets(z2_path, z3_path)
    assert (
        buckets.z2_reduce == z2["reduce_bucket_size"] and buckets.z2_allgather == z2["allgather_bucket_size"]
    )
    assert buckets.z3_reduce == z3["reduce_bucket_size"]
    assert buckets.z3_prefetch == z3["stage3_prefetch_bucket_size"]
    assert sm.last_bucket_elements(1000, 300) == 100 and sm.last_bucket_elements(900, 300) == 300
