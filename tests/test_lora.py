"""LoRA fine-tuning (issue 18): peft adapters on a frozen base, trained under ZeRO-2/3 on 2 CPU ranks.

Model level: only the adapters train, the adapted model starts equal to its base, merged weights compute
base + adapter, per-sample seeded adapter dropout. Run level: kill -9 and resume give the bits of an unbroken
run (adapters, their optimizer state and EMA), the checkpoint holds no base, a changed base is refused on
resume in one line; export (merged, peft adapter, diffusers for T2V) and ``latte.sample --lora``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import test_checkpoint as ckpt_tests
import torch
from test_checkpoint import _finish, _kill_9, _one_process, _start, assert_same_bits, assert_same_checkpoint
from test_sample import latents_in, sample_cli
from test_t2v import _run as run_python

from latte import lora
from latte.builders import build_model
from latte.checkpoint import EMA_FULL, META, tag_for
from latte.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
T2V = REPO / "configs" / "tiny_t2v.yaml"
STEPS, EVERY = 20, 5
X = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, F, C, h, w)
T = torch.tensor([10, 600])


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every weight but the fixed tables: a freshly initialised Latte is adaLN-Zero (zero gates and
    final layer), through which no adapter would get a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in model.FIXED_TABLES:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _adapted(base_file: Path, *overrides: str, config: Path = TINY):
    return build_model(load_config(config, [f"model.init_from={base_file}", "model.lora.rank=4", *overrides]))


@pytest.fixture(scope="module")
def base_pt(tmp_path_factory) -> Path:
    """A "released" class-conditional checkpoint: {"ema": state dict} of a tiny Latte with random weights."""
    path = tmp_path_factory.mktemp("base") / "base.pt"
    torch.save({"ema": _randomize(build_model(load_config(TINY)), 1).state_dict()}, path)
    return path


def _base_model(base_pt: Path):
    model = build_model(load_config(TINY))
    model.load_state_dict(torch.load(base_pt, weights_only=True)["ema"])
    return model.eval()


def test_only_the_adapters_train_and_the_adapted_model_starts_as_its_base(base_pt):
    model = _adapted(base_pt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targets = {n.rsplit(".lora_", 1)[0] for n in trainable}
    assert targets == {
        f"blocks.{i}.{m}" for i in range(4) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    y = torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.equal(model.eval()(X, T, y=y), _base_model(base_pt)(X, T, y=y))  # lora_B starts at 0
    model.train()
    model(X, T, y=y).square().mean().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable  # the base gets none
    nonzero = {n for n in trainable if model.get_parameter(n).grad.any()}
    assert nonzero == {n for n in trainable if ".lora_B." in n}  # (lora_A's gradient waits for a nonzero B)
    # 4 blocks x rank 4 x (in + out) per adapted linear (hidden 64; qkv out 3x, mlp 4x)
    assert sum(model.get_parameter(n).numel() for n in trainable) == 4 * 4 * (
        (64 + 192) + 128 + 2 * (64 + 256)
    )


def test_targets_defaults_adaln_and_mistakes(base_pt, tmp_path):
    from latte.models import to_diffusers

    t2v_base = tmp_path / "transformer"
    to_diffusers(_randomize(build_model(load_config(T2V)), 2), t2v_base)
    t2v = _adapted(t2v_base, "model.lora.adaln=true", config=T2V)
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in t2v.named_parameters() if p.requires_grad}
    assert (
        "transformer_blocks.0.attn2.to_k" in adapted and "temporal_transformer_blocks.1.ff.net.2" in adapted
    )
    assert "transformer_blocks.0.attn1.to_out.0" in adapted and "adaln_single.linear" in adapted
    assert not any("caption_projection" in n or n == "proj_out" for n in adapted)
    only_qkv = _adapted(base_pt, "model.lora.target_modules=[attn.qkv]", "model.lora.adaln=true")
    names = {n.rsplit(".lora_", 1)[0] for n, p in only_qkv.named_parameters() if p.requires_grad}
    assert names == {f"blocks.{i}.{m}" for i in range(4) for m in ("attn.qkv", "adaLN_modulation.1")} | {
        "final_layer.adaLN_modulation.1"
    }

    with pytest.raises(ConfigError, match="^model.lora.target_modules: 'to_q' names no linear layer"):
        _adapted(base_pt, "model.lora.target_modules=[to_q]")
    with pytest.raises(ConfigError, match="^model.lora.rank > 0 needs model.init_from"):
        load_config(TINY, ["model.lora.rank=4"])
    with pytest.raises(ConfigError, match="^model.lora.dropout must be in"):
        load_config(TINY, [f"model.init_from={base_pt}", "model.lora.rank=4", "model.lora.dropout=1"])
    with pytest.raises(ConfigError, match="^model.init_from: the weights of .* do not match Latte: missing"):
        build_model(load_config(TINY, [f"model.init_from={t2v_base}"]))
    with pytest.raises(ConfigError, match="^model.init_from: no such file or directory"):
        build_model(load_config(TINY, [f"model.init_from={tmp_path / 'nowhere.pt'}"]))


def test_dropout_masks_follow_each_sample_not_the_batch():
    drop = lora.SampleSeededDropout(0.5, stream=7).train()
    ones = torch.ones(2 * 3, 5, 8)  # (B * k, L, D): 2 samples of 3 rows each
    drop.seeds = (11, 22)
    both = drop(ones)
    drop.seeds = (22,)
    alone = drop(ones[:3])
    assert torch.equal(both[3:], alone)  # sample 22's mask whatever shares its batch
    assert not torch.equal(both[:3], both[3:]) and set(both.unique().tolist()) == {0.0, 2.0}
    drop.seeds = (11, 22)
    assert torch.equal(drop(ones), both)  # a recomputation (activation checkpointing) draws the same
    other = lora.SampleSeededDropout(0.5, stream=8).train()  # another layer: other masks
    other.seeds = (11, 22)
    assert not torch.equal(other(ones), both)
    assert torch.equal(drop.eval()(ones), ones)


def test_merged_weights_compute_base_plus_adapter(base_pt, tmp_path):
    from latte.models import to_diffusers

    t2v_base = tmp_path / "transformer"
    to_diffusers(_randomize(build_model(load_config(T2V)), 2), t2v_base)
    cases = [
        (TINY, base_pt, {"y": torch.tensor([1, 3])}),
        (T2V, t2v_base, {"encoder_hidden_states": torch.randn(2, 5, 32), "encoder_attention_mask": None}),
    ]
    for config, base, kwargs in cases:
        adapted = _adapted(base, "model.lora.alpha=8", config=config)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in adapted.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        adapted.eval()
        for scale in (1.0, 0.5):
            lora.set_scale(adapted, scale)
            plain = build_model(load_config(config))
            plain.load_state_dict(lora.merged_state_dict(adapted), strict=True)
            with torch.no_grad():
                want, got = adapted(X, T, **kwargs), plain.eval()(X, T, **kwargs)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err <= 1e-5, (config.name, scale, err)
            assert not torch.allclose(
                want, build_model(load_config(config, [f"model.init_from={base}"]))(X, T, **kwargs)
            )


# ----------------------------------------------------------------------------------------------------------
# Runs: 2 CPU ranks, synthetic clips, the tiny Latte adapted from base.pt
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_runs(monkeypatch):
    monkeypatch.setattr(ckpt_tests, "STEPS", STEPS)
    monkeypatch.setattr(ckpt_tests, "EVERY", EVERY)


def _lora_overrides(base: Path, zero: str) -> list[str]:
    return [
        f"model.init_from={base}",
        "model.lora.rank=4",
        "model.lora.dropout=0.1",
        f"train.zero_stage={zero}",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("zero, kill_during_save", [("2", False), ("3", True)])
def test_lora_kill_9_and_resume_gives_the_bits_of_an_unbroken_run(
    tmp_path, base_pt, lora_runs, zero, kill_during_save
):
    overrides = _lora_overrides(base_pt, zero)
    unbroken = _start(tmp_path / "unbroken", overrides)
    broken = tmp_path / "broken"
    ck = broken / "checkpoints"
    newest, _ = _kill_9(_start(broken, overrides), ck, 2 * EVERY, kill_during_save)
    out = _finish(_start(broken, overrides, "--resume", "auto"))
    assert f"resumed from {ck / tag_for(newest)} at step {newest}" in out, out[-3000:]
    assert "Latte-T/2 LoRA rank 4: 0.016M trainable params of 0.35M" in out, out[-3000:]
    _finish(unbroken)
    final = ck / tag_for(STEPS)
    assert_same_checkpoint(tmp_path / "unbroken" / "checkpoints" / tag_for(STEPS), final)

    # the checkpoint holds the adapters alone; the base is named by path + hash
    ema = torch.load(final / EMA_FULL, weights_only=True)
    assert ema and all(lora.is_adapter_key(k) for k in ema)
    for states in final.glob("*model_states.pt"):
        module = torch.load(states, weights_only=False)["module"]
        assert all(lora.is_adapter_key(k) for k in module), sorted(module)[:3]
    meta = json.loads((final / META).read_text())
    from latte.base_weights import base_identity

    assert meta["base"] == base_identity(base_pt) and len(meta["base"]["sha256"]) == 64


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_pt) -> dict[str, Path]:
    """A LoRA run (ZeRO-2, 2 ranks, 10 steps) on a private copy of base.pt, and a tiny VAE."""
    from data_pipeline.toy_videos import make_tiny_vae

    root = tmp_path_factory.mktemp("lora-run")
    base = root / "base.pt"
    base.write_bytes(base_pt.read_bytes())
    _finish(_start(root, [*_lora_overrides(base, "2"), "train.max_steps=10", "train.ckpt_every=10"]))
    return {
        "ckpt": root / "checkpoints",
        "base": base,
        "root": root,
        "vae": make_tiny_vae(root / "vae", downsample=8),
    }


def _sample(source, out: Path, vae: Path, *extra: str) -> None:
    """test_sample's sampling CLI call (2 samples, ddim3, guidance 2, latents saved), classes 1 and 2."""
    assert sample_cli(source, out, "--classes", "1,2", *extra, vae=vae) == 0


@pytest.mark.slow
def test_exports_and_sampling_with_an_adapter(lora_run, tmp_path):
    from peft import PeftModel

    from latte.export import main as export_main

    ck, base, vae = lora_run["ckpt"], lora_run["base"], lora_run["vae"]
    assert export_main([str(ck), str(tmp_path / "merged.pt")]) == 0
    assert export_main([str(ck), str(tmp_path / "adapter"), "--adapter"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    # the merged export loads strictly in a plain Latte and computes base + adapter (the EMA's)
    merged = build_model(load_config(TINY))
    merged.load_state_dict(torch.load(tmp_path / "merged.pt", weights_only=True)["ema"], strict=True)
    adapted = _adapted(base)
    lora.load_adapter_state(adapted, torch.load(ck / tag_for(10) / EMA_FULL, weights_only=True), "ema")
    y = torch.tensor([0, 2])
    with torch.no_grad():
        want = adapted.eval()(X, T, y=y)
        assert ((merged.eval()(X, T, y=y) - want).abs().max() / want.abs().max()).item() <= 1e-5
        assert not torch.allclose(want, _base_model(base)(X, T, y=y))  # the adapters learned something
        # peft's own loader applies the exported adapter to the base model
        peft_model = PeftModel.from_pretrained(_base_model(base), str(tmp_path / "adapter")).eval()
        assert torch.equal(peft_model(X, T, y=y), want)

    # sampling: the LoRA checkpoint == its base + --lora (checkpoint dir or exported adapter) == merged
    _sample(ck, tmp_path / "ckpt", vae)
    _sample(base, tmp_path / "dir", vae, "--config", str(TINY), "--lora", str(ck))
    _sample(base, tmp_path / "peft", vae, "--config", str(TINY), "--lora", str(tmp_path / "adapter"))
    reference = latents_in(tmp_path / "ckpt")
    for name in ("dir", "peft"):
        assert all(
            np.array_equal(a, b) for a, b in zip(latents_in(tmp_path / name), reference, strict=True)
        ), name
    _sample(tmp_path / "merged.pt", tmp_path / "merged", vae, "--config", str(TINY))
    assert all(
        np.allclose(a, b, atol=1e-4) for a, b in zip(latents_in(tmp_path / "merged"), reference, strict=True)
    )
    manifest = json.loads((tmp_path / "peft" / "samples.json").read_text())
    assert f"LoRA adapter {tmp_path / 'adapter'} (rank 4, trained on {base})" in manifest["weights"]
    # --lora-scale 0 samples the base
    _sample(ck, tmp_path / "zero", vae, "--lora-scale", "0")
    _sample(base, tmp_path / "base", vae, "--config", str(TINY))
    assert all(
        np.array_equal(a, b)
        for a, b in zip(latents_in(tmp_path / "zero"), latents_in(tmp_path / "base"), strict=True)
    )


@pytest.mark.slow
def test_a_changed_base_is_refused_on_resume_sampling_and_export(lora_run, tmp_path, capsys):
    from latte.export import main as export_main
    from latte.sample import main as sample_main

    root, base = lora_run["root"], lora_run["base"]
    original = base.read_bytes()
    try:
        torch.save({"ema": _randomize(build_model(load_config(TINY)), 9).state_dict()}, base)
        refused = _one_process(
            root, *_lora_overrides(base, "2"), "train.max_steps=20", "train.ckpt_every=10", resume="auto"
        )
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        line = refused.stderr.strip()
        assert "\n" not in line and line.startswith(
            f"error: checkpoint {tag_for(10)} adapts the base weights {base}"
        ), line
        assert "now holds other weights" in line and "resume with the base it was trained on" in line
        capsys.readouterr()
        assert export_main([str(lora_run["ckpt"]), str(tmp_path / "m.pt")]) == 2
        assert (
            sample_main([str(lora_run["ckpt"]), "--out", str(tmp_path / "s"), "--vae", str(lora_run["vae"])])
            == 2
        )
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 2 and all("now holds other weights" in e for e in errors), errors
        assert not (tmp_path / "m.pt").exists() and not (tmp_path / "s").exists()
    finally:
        base.write_bytes(original)


@pytest.mark.slow
def test_t2v_lora_merged_export_loads_in_diffusers(tmp_path):
    from diffusers import LatteTransformer3DModel

    from latte.export import main as export_main
    from latte.models import to_diffusers

    base = tmp_path / "transformer"
    to_diffusers(_randomize(build_model(load_config(T2V)), 2), base)
    overrides = [
        f"model.init_from={base}",
        "model.lora.rank=4",
        "train.max_steps=6",
        "train.ckpt_every=6",
        "train.log_every=3",
        f"train.results_dir={tmp_path / 'run'}",
    ]
    done = run_python("train.py", "--config", str(T2V), "--set", *overrides, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ck = tmp_path / "run" / "checkpoints"
    assert export_main([str(ck), str(tmp_path / "merged"), "--diffusers"]) == 0
    theirs, info = LatteTransformer3DModel.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert all(not v for v in info.values()), info

    cfg = load_config(T2V, overrides)
    adapted = build_model(cfg)
    lora.load_adapter_state(adapted, torch.load(ck / tag_for(6) / EMA_FULL, weights_only=True), "ema")
    states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = adapted.eval()(X, T, encoder_hidden_states=states)
        got = theirs.eval()(X.permute(0, 2, 1, 3, 4), T, states).sample.permute(0, 2, 1, 3, 4)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@pytest.mark.slow
def test_layouts_of_one_global_batch_train_the_same_adapters_with_dropout(tmp_path):
    """2 ranks x b == 1 rank x 2b == 1 rank x b x accumulation 2 with recomputed blocks: the adapter dropout
    masks are drawn per global sample, and recomputation draws them again the same."""
    from test_train_deepspeed import _run

    base_pt = tmp_path / "base.pt"  # _run turns label dropout off: no null-class row in the table
    plain = _randomize(build_model(load_config(TINY, ["model.class_dropout_prob=0"])), 1)
    torch.save({"ema": plain.state_dict()}, base_pt)
    common = [f"model.init_from={base_pt}", "model.lora.rank=4", "model.lora.dropout=0.3"]
    two_ranks = _run(tmp_path, "2xb", 2, [*common, "train.micro_batch_size=4"])
    one_rank = _run(tmp_path, "1x2b", 1, [*common, "train.micro_batch_size=8"])
    accumulated = _run(
        tmp_path,
        "1xbx2",
        1,
        [
            *common,
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=2",
            "model.gradient_checkpointing=true",
        ],
    )
    without = _run(tmp_path, "nodrop", 1, [*common[:2], "train.micro_batch_size=8"])
    adapters = {n: w for n, w in two_ranks["weights"].items() if lora.is_adapter_key(n)}
    assert len(adapters) == 32
    for other in (one_rank, accumulated):
        torch.testing.assert_close(
            torch.tensor(other["history"]), torch.tensor(two_ranks["history"]), rtol=1e-5, atol=1e-6
        )
        for name, w in adapters.items():
            torch.testing.assert_close(other["weights"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(
        without["weights"]["blocks.0.attn.qkv.lora_B.default.weight"],
        adapters["blocks.0.attn.qkv.lora_B.default.weight"],
    )
    base = torch.load(base_pt, weights_only=True)["ema"]
    assert torch.equal(
        two_ranks["weights"]["blocks.0.attn.qkv.base_layer.weight"], base["blocks.0.attn.qkv.weight"]
    )


@pytest.mark.slow
def test_full_fine_tuning_resumes_without_its_init_from_file(tmp_path, base_pt):
    """Full fine-tuning from ``model.init_from``: a resume takes every weight from the checkpoint, so it
    does not read the base (moved away here) and ends with the bits of a run that never stopped; LoRA,
    whose checkpoint holds the adapters alone, still needs its base (the tests above)."""
    import shutil

    base = tmp_path / "base.pt"
    shutil.copy(base_pt, base)
    steps = ["train.max_steps=4", "train.ckpt_every=2", "train.log_every=2", f"model.init_from={base}"]
    whole = _one_process(tmp_path / "whole", *steps, resume="none")
    assert whole.returncode == 0, whole.stderr[-3000:]
    half = _one_process(tmp_path / "half", *steps[1:], "train.max_steps=2", resume="none")
    assert half.returncode == 0, half.stderr[-3000:]
    base.rename(tmp_path / "moved.pt")
    resumed = _one_process(tmp_path / "half", *steps)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout, resumed.stdout[-2000:]
    a, b = (tmp_path / run / "checkpoints" / tag_for(4) for run in ("whole", "half"))
    files = sorted(p.name for p in a.glob("*.pt"))
    assert files == sorted(p.name for p in b.glob("*.pt")) and "ema_consolidated.pt" in files
    for name in files:  # one rank's optimizer shard, module and rank state, and the EMA: the same bits
        assert_same_bits(
            torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), name
        )
