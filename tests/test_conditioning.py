"""latte.conditioning: the one place that knows what the model is conditioned on (batch -> kwargs, the null
condition, request checks), and the training/sampling paths that go through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latte.conditioning import ClassLabels, RequestError, Unconditional, conditioning_of
from latte.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "configs/tiny.yaml"
CPU = torch.device("cpu")


def test_conditioning_of_follows_the_model_config():
    cfg = load_config(TINY)
    labels = conditioning_of(cfg.model)
    assert isinstance(labels, ClassLabels) and labels.num_classes == 4 and labels.dropout_prob == 0.1
    assert labels.batch_keys == ("y",)
    none = conditioning_of(load_config(TINY, ["model.num_classes=0"]).model)
    assert isinstance(none, Unconditional) and none.batch_keys == () and none.dropout_prob == 0.0


def test_class_labels_training_kwargs_and_dropout():
    labels = ClassLabels(4, 0.1)
    batch = {"latent": torch.zeros(3, 2, 4, 8, 8), "y": torch.tensor([0, 3, 1])}
    assert set(labels.training_kwargs(batch, CPU, None)) == {"y"}
    drop = torch.tensor([0, 1, 0])
    kwargs = labels.training_kwargs(batch, CPU, drop)
    assert torch.equal(kwargs["y"], batch["y"]) and kwargs["force_drop_ids"] is drop
    assert Unconditional().training_kwargs(batch, CPU, None) == {}


def test_sampling_request_cycles_classes_and_gives_the_null_row():
    cfg = load_config(TINY, ["sample.classes=[2,0]"])
    condition = conditioning_of(cfg.model).for_samples(cfg.sample, [0, 1, 2, 5], CPU)
    assert condition.kwargs["y"].tolist() == [2, 0, 2, 0]
    assert condition.null["y"].tolist() == [4, 4, 4, 4]  # the label table's "no class" row
    every = load_config(TINY)  # no classes given: 0, 1, 2, 3, 0, ...
    assert conditioning_of(every.model).for_samples(every.sample, [3, 4], CPU).kwargs["y"].tolist() == [3, 0]
    assert ClassLabels(4, 0.0).for_samples(cfg.sample, [0], CPU).null is None  # no dropout: no null row
    assert Unconditional().for_samples(cfg.sample, [0, 1], CPU).kwargs == {}
    assert conditioning_of(cfg.model).describe(cfg.sample, 1) == {"class": 0}
    assert Unconditional().describe(cfg.sample, 1) == {"class": None}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sample.classes=[4]"], "class 4 is out of range: the model has 4 classes, 0..3"),
        (
            ["model.num_classes=0", "sample.classes=[1]"],
            "sample.classes given, but the model is unconditional",
        ),
        (["model.num_classes=0", "sample.cfg_scale=4"], "sample.cfg_scale guides class-conditional models"),
        (["model.class_dropout_prob=0", "sample.cfg_scale=4"], "needs the 'no class' label"),
    ],
)
def test_requests_the_model_cannot_honour_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, overrides)


def test_the_request_check_is_the_conditionings_own():
    sample = load_config(TINY, ["sample.classes=[1]"]).sample
    ClassLabels(4, 0.1).check_request(sample)
    with pytest.raises(RequestError, match="out of range"):
        ClassLabels(1, 0.1).check_request(sample)
    with pytest.raises(RequestError, match="unconditional"):
        Unconditional().check_request(sample)


def test_guidance_without_a_null_condition_is_refused():
    from latte.sampling.generate import Denoiser

    model = torch.nn.Identity()
    with pytest.raises(ValueError, match="null condition"):
        Denoiser(model, ClassLabels(4, 0.0).labels(torch.tensor([1])), cfg_scale=3.0)
