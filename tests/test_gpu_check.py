"""benchmarks/gpu_check.py --smoke: the GPU check runs end to end here (tiny shapes, CPU), every part either
runs or says what it lacks, and it writes its Markdown and JSON. (On a GPU the same script measures.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_part_or_names_what_is_missing(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--smoke"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    parts = {p["title"]: p for p in json.loads((tmp_path / "gpu_check.json").read_text())}
    assert len(parts) == 9 and (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (smoke")
    for title, part in parts.items():
        assert part["status"] == "ok" or part["status"].startswith("skipped: "), (title, part["status"])
    cuda = any(row[0] == "device" and not row[1].startswith("cpu") for row in parts["environment"]["rows"])
    if not cuda:
        assert (
            parts["fp16 dynamic loss scaling: 12 steps vs 6 + resume + 6"]["status"]
            == "skipped: CUDA missing"
        )
    attention = parts["attention kernels vs fp32 math"]["rows"]
    sdpa = [row for row in attention if row[2] == "sdpa"]
    assert len(sdpa) == 6 and all(row[3] == "ok" and max(row[4:8]) < 1e-5 for row in sdpa)  # fp32 here
    steps = {
        (row[0], row[1]): row for row in parts["bare train step per attention backend (no DeepSpeed)"]["rows"]
    }
    assert steps[("auto", "compiled")][2] in ("sdpa", "flash", "flash3", "xformers")
    t2v = parts["bare train step of the text-to-video model (LatteT2V: cross-attention to masked captions)"]
    ran = {(row[0], row[1]): row[2] for row in t2v["rows"]}
    assert ran[("auto", "eager")] in ("sdpa", "flash", "flash3") and ran[("sdpa", "eager")] == "sdpa"
    cross = [row for row in attention if row[0].startswith("cross (120 caption keys)") and row[2] == "sdpa"]
    assert len(cross) == 2 and all(row[3] == "ok" for row in cross)
    deepspeed = parts["DeepSpeed, one rank: train.py's step"]
    assert [row[0] for row in deepspeed["rows"]] == ["ZeRO-2", "ZeRO-3"]
    (sample,) = parts["sampling"]["rows"]
    assert sample[1] is True
    lora = {row[0]: row for row in parts["LoRA vs full fine-tuning: train.py's ZeRO-2 step"]["rows"]}
    assert list(lora) == ["full", "LoRA r16"] and lora["LoRA r16"][1] < 0.5 * lora["full"][1]
    assert lora["LoRA r16"][2] < 0.5 * lora["full"][2]  # the optimizer holds the adapters' state alone
    sp = parts["sequence parallelism over 2 GPUs: forward + backward"]
    if torch.cuda.device_count() != 1:  # 2 CPU ranks here (or 2 GPUs): SP 2 computes SP 1's output
        assert [row[0][:4] for row in sp["rows"]] == ["SP 1", "SP 2"], sp
        assert sp["rows"][1][4] < (1e-5 if not cuda else 5e-2), sp["rows"]
