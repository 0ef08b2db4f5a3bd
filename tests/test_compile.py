"""``model.compile``: regional torch.compile of each block traces the attention dispatch without graph
breaks (``auto`` picks its kernel from dicts filled at construction) and computes what eager computes.

Inductor's C++ code generation takes minutes on this 2-core CPU, so the equality test compiles through
``aot_eager`` (dynamo's graph capture and AOTAutograd's forward/backward split, run eagerly); the CPU speed of
inductor-compiled blocks is measured by ``benchmarks/attention_backends.py --compile``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latte.builders import build_model, compile_blocks
from latte.config import load_config
from latte.models import LATTE_MODELS

REPO = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(0)
    model = LATTE_MODELS["Latte-T/2"](input_size=8, num_frames=4, num_classes=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05)  # adaLN-Zero would make every block the identity
    return model


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding"])
def test_auto_attention_traces_without_graph_breaks(masked):
    model = _model()
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 4, 16, 64, generator=g), torch.randn(2, 64, generator=g)  # (N, F, T, D), (N, D)
    mask = None
    if masked:
        mask = torch.ones(2, 4, 16, dtype=torch.bool)
        mask[0, -1] = False
    for block, h, m in ((model.blocks[0], x, mask), (model.blocks[1], x.transpose(1, 2), None)):
        torch._dynamo.reset()
        per_sequence = c.repeat_interleave(h.shape[1], dim=0)  # (N*S, D)
        explained = torch._dynamo.explain(block)(h, per_sequence, m)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_compiled_blocks_equal_eager_forward_and_backward():
    eager, compiled = _model(), _model()
    compile_blocks(compiled, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 4, 8, 8, generator=g)
    t, y = torch.tensor([3, 700]), torch.tensor([0, 3])
    outs = []
    for model in (eager, compiled):
        out = model(x, t, y)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_model_compile_keeps_the_checkpoint_keys():
    plain = build_model(load_config(REPO / "configs" / "tiny.yaml"))
    compiled = build_model(load_config(REPO / "configs" / "tiny.yaml", ["model.compile=true"]))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert all(getattr(b.forward, "_torchdynamo_orig_callable", None) is not None for b in compiled.blocks)


def test_compiled_t2v_blocks_equal_eager_forward_and_backward():
    cfg = load_config(REPO / "configs" / "tiny_t2v.yaml")
    torch.manual_seed(0)
    eager = build_model(cfg)
    with torch.no_grad():
        for p in eager.parameters():
            p.normal_(0.0, 0.05)  # zero-initialised layers would hide the blocks
    compiled = build_model(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled, backend="aot_eager")
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([3, 700])
    text, mask = torch.randn(2, 5, 32, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    outs = []
    for model in (eager, compiled):
        out = model(x, t, text, mask)
        out.square().mean().backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    blocks = [*compiled.transformer_blocks, *compiled.temporal_transformer_blocks]
    assert all(getattr(b.forward, "_torchdynamo_orig_callable", None) is not None for b in blocks)


@pytest.fixture()
def lora_base(tmp_path) -> Path:
    torch.save({"ema": _model().state_dict()}, tmp_path / "base.pt")
    return tmp_path / "base.pt"


def test_lora_blocks_compile_without_graph_breaks_and_equal_eager(lora_base):
    """``model.compile`` with ``model.lora``: peft's layers trace into one graph per block; with adapter
    dropout the seeded mask draws run eagerly between compiled regions, and forward and backward (the
    adapters' gradients) equal eager's."""
    from latte import lora

    def adapted(dropout: float, compiled: bool):
        overrides = [f"model.init_from={lora_base}", "model.lora.rank=4", f"model.lora.dropout={dropout}"]
        model = build_model(load_config(REPO / "configs" / "tiny.yaml", overrides)).train()
        with torch.no_grad():  # the adapters' B starts at zero: make their path count
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.05)
        if compiled:
            compile_blocks(model, backend="aot_eager")
        return model

    g = torch.Generator().manual_seed(1)
    h, c = torch.randn(2, 4, 16, 64, generator=g), torch.randn(8, 64, generator=g)  # (N, F, T, D), (N*F, D)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(adapted(0.0, False).blocks[0])(h, c, None)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    x, t, y = torch.randn(2, 4, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.tensor([0, 3])
    for dropout in (0.0, 0.2):
        outs = []
        for compiled in (False, True):
            torch.manual_seed(0)
            model = adapted(dropout, compiled)
            lora.set_dropout_seeds(model, (5, 6))
            out = model(x, t, y, force_drop_ids=torch.tensor([0, 1]))
            out.square().mean().backward()
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            outs.append((out.detach(), grads))
        (want, want_grads), (got, got_grads) = outs
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert got_grads.keys() == want_grads.keys() and all(".lora_" in n for n in got_grads)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
