"""Video-image joint training (issue 17, the data and training side): clip batches with K single-frame
images each from a second, resumable image stream (``data_pipeline.sources.JointSource``), the images'
label dropout per global sample, their FLOPs, the config checks, and a 2-rank ZeRO-2 run that resumes
bitwise with images on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from make_shards import make_dataset

from data_pipeline.sources import JointSource, image_seed, open_batches
from latte.config import ConfigError, load_config
from latte.metrics import flops_per_sample, t2v_flops_per_sample
from latte.models.flavors import LATTE_ARCHS, LATTE_T2V_ARCHS
from latte.seeding import TrainingDraws

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
TINY_T2V = REPO / "configs" / "tiny_t2v.yaml"
CLIP_COUNTS = [5, 7, 3, 8, 6, 9]  # 38 clips of (4, 4, 8, 8)
IMAGE_COUNTS = [9, 7, 11, 6, 8, 5]  # 46 images of (1, 4, 8, 8)
K, MICRO = 2, 2


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("joint")
    make_dataset(str(root / "clips"), CLIP_COUNTS)
    make_dataset(str(root / "images"), IMAGE_COUNTS, latent_shape=(1, 4, 8, 8), seed=1, prefix="img")
    return str(root / "clips" / "index.json"), str(root / "images" / "index.json")


def joint_sets(datasets) -> list[str]:
    """The overrides of joint training on ``datasets`` (clip index, image index) with K images per clip."""
    clips, images = datasets
    return [
        f"data.index={clips}",
        f"data.image_index={images}",
        f"data.use_image_num={K}",
        f"train.micro_batch_size={MICRO}",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
    ]


def joint_cfg(datasets, *extra: str, base: Path = TINY):
    return load_config(base, joint_sets(datasets) + list(extra))


def take(source, n: int) -> list[dict]:
    it = iter(source)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def test_batches_hold_the_clip_then_its_k_images(datasets):
    source = open_batches(joint_cfg(datasets), 0, 1, "cpu")
    assert isinstance(source, JointSource)
    assert source.batch_keys == ("latent", "y", "key", "y_image", "image_key")
    assert source.images.seed == image_seed(0) and source.images.layout.batch_size == MICRO * K
    (batch,) = take(source, 1)
    assert batch["latent"].shape == (MICRO, 4 + K, 4, 8, 8) and batch["y_image"].shape == (MICRO, K)
    # the images are the image stream's first batch, sample-major: sample i holds images i*K .. i*K+K-1
    alone = open_batches(joint_cfg(datasets), 0, 1, "cpu").images
    (images,) = take(alone, 1)
    assert torch.equal(batch["latent"][:, 4:], images["latent"].reshape(MICRO, K, 4, 8, 8))
    assert torch.equal(batch["y_image"], images["y"].reshape(MICRO, K))
    assert batch["image_key"] == [images["key"][:K], images["key"][K:]]
    # the clips are what the clip loader alone yields (K = 0)
    clips_only = open_batches(joint_cfg(datasets, "data.use_image_num=0", "data.image_index="), 0, 1, "cpu")
    (plain,) = take(clips_only, 1)
    assert torch.equal(batch["latent"][:, :4], plain["latent"]) and batch["key"] == plain["key"]


def test_state_resumes_exactly_mid_epoch_of_both_streams(datasets):
    cfg = joint_cfg(datasets)
    unbroken = take(open_batches(cfg, 0, 1, "cpu"), 30)  # clip epoch ~19 batches, image epoch ~11
    first = open_batches(cfg, 0, 1, "cpu")
    take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert set(state) == {"format", "use_image_num", "clips", "images"}
    resumed = open_batches(cfg, 0, 1, "cpu")
    resumed.load_state_dict(state)
    rest = take(resumed, 23)  # across the end of both epochs
    assert resumed.images.epoch >= 1 and resumed.clips.epoch >= 1
    for a, b in zip(unbroken[7:], rest, strict=True):
        assert torch.equal(a["latent"], b["latent"]) and torch.equal(a["y_image"], b["y_image"])
        assert a["key"] == b["key"] and a["image_key"] == b["image_key"]


def test_a_clip_only_state_loads_with_images_starting_afresh(datasets):
    clips_only = open_batches(joint_cfg(datasets, "data.use_image_num=0", "data.image_index="), 0, 1, "cpu")
    take(clips_only, 3)
    joint = open_batches(joint_cfg(datasets), 0, 1, "cpu")
    joint.load_state_dict(clips_only.state_dict())  # a checkpoint from before images were turned on
    (batch,) = take(joint, 1)
    (fourth,) = take(clips_only, 1)
    (first_images,) = take(open_batches(joint_cfg(datasets), 0, 1, "cpu").images, 1)
    assert batch["key"] == fourth["key"] and batch["image_key"][0] == first_images["key"][:K]


def test_one_to_two_ranks_keeps_each_image_once_per_image_epoch(datasets):
    """1 rank takes 4 batches of the image epoch, then 2 ranks resume from its state and finish the epoch:
    no image is drawn twice, and only the documented equalisation (at most one shard plus batch - 1
    samples per worker) is left out."""
    one = open_batches(joint_cfg(datasets), 0, 1, "cpu")
    seen = [k for b in take(one, 4) for keys in b["image_key"] for k in keys]
    state = json.loads(json.dumps(one.state_dict()))
    two = [open_batches(joint_cfg(datasets), r, 2, "cpu") for r in range(2)]
    for source in two:
        source.load_state_dict(state)
    remaining = len(two[0].images)  # the image batches each rank yields in the resumed part of the epoch
    assert remaining == len(two[1].images) > 0
    for source in two:
        seen += [k for b in take(source, remaining) for keys in b["image_key"] for k in keys]
        assert source.images.epoch == 0  # still the first image epoch, fully taken
        assert source.state_dict()["images"]["segments"][-1]["batches"] == remaining
    assert len(seen) == len(set(seen)), "an image was drawn twice in one image epoch"
    total = sum(IMAGE_COUNTS)
    assert total - len(seen) <= max(IMAGE_COUNTS) + 2 * (MICRO * K - 1)
    # and the next image epoch continues on both ranks, with new draws
    nxt = [k for s in two for b in take(s, 1) for keys in b["image_key"] for k in keys]
    assert two[0].images.epoch == 1 and len(nxt) == 2 * MICRO * K


def test_image_dataset_must_match_the_clips(tmp_path, datasets):
    clips, _ = datasets
    make_dataset(str(tmp_path / "frames"), [6, 6])  # (4, 4, 8, 8): clips, not images
    with pytest.raises(ConfigError, match=r"\(1, 4, 8, 8\)"):
        open_batches(joint_cfg((clips, str(tmp_path / "frames" / "index.json"))), 0, 1, "cpu")
    make_dataset(str(tmp_path / "three"), [6, 6], latent_shape=(1, 4, 8, 8), classes=3)
    with pytest.raises(ConfigError, match="3 classes"):
        open_batches(joint_cfg((clips, str(tmp_path / "three" / "index.json"))), 0, 1, "cpu")


def test_synthetic_clips_get_synthetic_images():
    cfg = load_config(TINY, [f"data.use_image_num={K}", "train.micro_batch_size=3"])
    source = open_batches(cfg, 0, 1, "cpu")
    a, b = take(source, 2)
    assert a["latent"].shape == (3, 4 + K, 4, 8, 8) and a["y_image"].shape == (3, K)
    state = source.state_dict()
    again = open_batches(cfg, 0, 1, "cpu")
    again.load_state_dict(state)
    (c,) = take(again, 1)
    (c_unbroken,) = take(source, 1)
    assert torch.equal(c["latent"], c_unbroken["latent"]) and torch.equal(c["y_image"], c_unbroken["y_image"])


@pytest.mark.parametrize(
    "sets, message",
    [
        (["data.use_image_num=-1"], "use_image_num must be >= 0"),
        (["data.image_index=/x/index.json"], "use_image_num is 0"),
        (["data.use_image_num=2", "data.index=/x/index.json"], "needs data.image_index"),
        (["data.use_image_num=2", "data.image_index=/x/index.json"], "data.index is empty"),
    ],
)
def test_config_checks(sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, sets)


# --------------------------------------------------------------------------------------------------------
# Text-to-video: images with their own captions
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("joint_t2v")
    make_dataset(str(root / "clips"), CLIP_COUNTS, caption_width=32, classes=0)
    make_dataset(
        str(root / "images"),
        IMAGE_COUNTS,
        latent_shape=(1, 4, 8, 8),
        seed=1,
        prefix="img",
        caption_width=32,
        classes=0,
    )
    return str(root / "clips" / "index.json"), str(root / "images" / "index.json")


def test_t2v_joint_forward_is_the_video_forward_and_the_image_forward():
    """LatteT2V with K images: the video frames' output is the video-only forward's (images never reach
    them), each image's is the text-to-image forward (spatial blocks only) of that image with its caption."""
    from latte.models.latte_t2v import LatteT2V

    torch.manual_seed(0)
    model = LatteT2V(
        input_size=8, hidden_size=64, num_layers=2, num_heads=4, caption_channels=16, num_frames=4
    )
    for p in model.parameters():  # the zero-initialised output layers would hide differences
        p.data.add_(0.02 * torch.randn_like(p))
    model.eval()
    n, f, k, length = 2, 4, 3, 5
    x = torch.randn(n, f + k, 4, 8, 8)
    t = torch.tensor([10, 700])
    states = torch.randn(n, 1 + k, length, 16)
    mask = torch.rand(n, 1 + k, length) < 0.7
    mask[..., 0] = True
    with torch.no_grad():
        joint = model(x, t, states, mask, use_image_num=k)  # (N, F+K, 8, 8, 8)
        video = model(x[:, :f], t, states[:, 0], mask[:, 0])
        images = model(
            x[:, f:].reshape(n * k, 1, 4, 8, 8),
            t.repeat_interleave(k),
            states[:, 1:].reshape(n * k, length, 16),
            mask[:, 1:].reshape(n * k, length),
            enable_temporal_attentions=False,
        )
    assert joint.shape == (n, f + k, 8, 8, 8)
    torch.testing.assert_close(joint[:, :f], video, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(joint[:, f:], images.reshape(n, k, 8, 8, 8), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1\\+K"):
        model(x, t, states[:, 0], mask[:, 0], use_image_num=k)


def test_t2v_batches_carry_each_images_caption_and_its_dropout(captioned):
    from latte.conditioning import conditioning_of

    cfg = joint_cfg(captioned, base=TINY_T2V)
    source = open_batches(cfg, 0, 1, "cpu")
    assert "image_encoder_hidden_states" in source.batch_keys and "y_image" not in source.batch_keys
    (batch,) = take(source, 1)
    length = source.clips.facts.max_caption_tokens
    assert batch["image_encoder_hidden_states"].shape == (MICRO, K, length, 32)
    assert batch["image_encoder_attention_mask"].shape == (MICRO, K, length)
    (images,) = take(open_batches(cfg, 0, 1, "cpu").images, 1)
    assert torch.equal(batch["image_encoder_hidden_states"][1, 0], images["encoder_hidden_states"][K])
    null = torch.from_numpy(source.null_caption())
    cond = conditioning_of(cfg.model, null)
    kwargs = cond.training_kwargs(batch, torch.device("cpu"), torch.tensor([0, 1]), torch.tensor([1, 0]))
    states, mask = kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]
    assert states.shape == (MICRO, 1 + K, length, 32) and mask.shape == (MICRO, 1 + K, length)
    assert torch.equal(states[0, 0], batch["encoder_hidden_states"][0].float())  # clip 0 kept
    assert torch.equal(states[1, 0, : len(null)], null.float()) and mask[1, 0].sum() == len(null)  # dropped
    assert all(torch.equal(states[0, 1 + j, : len(null)], null.float()) for j in range(K))  # images dropped
    assert torch.equal(states[1, 1:], batch["image_encoder_hidden_states"][1].float())  # images kept


def test_t2v_synthetic_clips_get_captioned_synthetic_images():
    cfg = load_config(TINY_T2V, [f"data.use_image_num={K}", "train.micro_batch_size=3"])
    (batch,) = take(open_batches(cfg, 0, 1, "cpu"), 1)
    assert batch["latent"].shape == (3, 4 + K, 4, 8, 8)
    assert batch["image_encoder_hidden_states"].shape[:2] == (3, K)


# --------------------------------------------------------------------------------------------------------
# Per-sample draws and FLOPs
# --------------------------------------------------------------------------------------------------------


def test_image_label_dropout_is_per_global_sample_and_layout_independent():
    shape = (4 + K, 4, 8, 8)
    draws = TrainingDraws(5, 1000, shape, torch.device("cpu"), 0.5, images=True)
    whole = draws(3, range(0, 64))
    assert whole.noise.shape == (64, *shape) and whole.image_drop.shape == (64,)
    assert 0 < int(whole.image_drop.sum()) < 64  # differs per sample
    assert not torch.equal(whole.image_drop, whole.drop)  # its own draw, not the clip's
    other_rank = TrainingDraws(5, 1000, shape, torch.device("cpu"), 0.5, images=True)
    halves = [other_rank(3, range(0, 32)), draws(3, range(32, 64))]  # each rank draws only its share
    assert torch.equal(torch.cat([h.image_drop for h in halves]), whole.image_drop)
    assert torch.equal(torch.cat([h.noise for h in halves]), whole.noise)
    assert not torch.equal(draws(4, range(0, 64)).image_drop, whole.image_drop)  # another step
    # without images nothing extra is drawn: the clip draws are what they were
    plain = TrainingDraws(5, 1000, shape, torch.device("cpu"), 0.5)(3, range(0, 64))
    assert plain.image_drop is None
    assert torch.equal(plain.t, whole.t) and torch.equal(plain.drop, whole.drop)


def test_flops_count_the_images_in_the_spatial_blocks_only():
    arch = LATTE_ARCHS["Latte-XL/2"]
    video, joint = flops_per_sample(arch, 16, 32), flops_per_sample(arch, 16, 32, images=8)
    assert flops_per_sample(arch, 16, 32, images=0) == video
    longer = flops_per_sample(arch, 24, 32)  # 8 more video frames: spatial and temporal blocks
    assert video.training < joint.training < longer.training
    assert joint.embed == video.embed
    t2v = LATTE_T2V_ARCHS["LatteT2V-XL/2"]
    plain, with_images = (
        t2v_flops_per_sample(t2v, 16, 32, 120),
        t2v_flops_per_sample(t2v, 16, 32, 120, images=8),
    )
    assert t2v_flops_per_sample(t2v, 16, 32, 120, images=0) == plain
    assert plain.training < with_images.training < t2v_flops_per_sample(t2v, 24, 32, 120).training


# --------------------------------------------------------------------------------------------------------
# End to end: 2 ranks, ZeRO-2, K = 2 images from an image dataset, stopped and resumed
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["class", "t2v"])
def test_two_rank_zero2_resume_with_images_is_bitwise(tmp_path, datasets, captioned, kind):
    """Class-conditional Latte (image labels) and LatteT2V (captioned images), each: 2 ranks, ZeRO-2,
    stopped at step 4 (inside the first image epoch) and resumed to 10 == 10 steps unbroken, bitwise."""
    from test_train_deepspeed import _run

    clips, images = datasets if kind == "class" else captioned
    model = (
        ["model.class_dropout_prob=0.3"]  # clip and image label dropout, per global sample
        if kind == "class"
        else ["model.name=LatteT2V-T/2", "model.num_classes=0", "model.caption_dropout_prob=0.3"]
    )
    common = model + joint_sets((clips, images)) + ["train.zero_stage=2", "train.ckpt_every=4"]
    unbroken = _run(tmp_path, "unbroken", 2, common + ["train.max_steps=10"])
    _run(tmp_path, "resumed", 2, common + ["train.max_steps=4"])  # image epoch: 46 // 8 = 5 steps
    resumed = _run(tmp_path, "resumed", 2, common + ["train.max_steps=10"])
    assert unbroken["steps"] == 10 and len(resumed["history"]) == 6
    assert resumed["history"] == unbroken["history"][4:]
    for name, w in unbroken["weights"].items():
        assert torch.equal(resumed["weights"][name], w), name


# --------------------------------------------------------------------------------------------------------
# The sharding job's image mode, on real PNG files
# --------------------------------------------------------------------------------------------------------


def test_shard_latents_image_mode_on_png_files(tmp_path):
    import numpy as np
    from PIL import Image
    from test_shard_latents import read_samples

    from data_pipeline.index import load_index
    from data_pipeline.loader import Expected, LatentLoader
    from data_pipeline.shard_latents import main as shard_latents
    from data_pipeline.toy_videos import make_tiny_vae
    from data_pipeline.video import resize_center_crop

    _write_images(tmp_path / "images")
    (tmp_path / "images" / "dog" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "images" / "dog" / "notes.txt").write_text("not an image: not listed")
    vae_dir = make_tiny_vae(tmp_path / "vae")
    out = tmp_path / "image-latents"
    args = ["--input", str(tmp_path / "images"), "--output", str(out), "--vae", str(vae_dir), "--images"]
    assert shard_latents([*args, "--image-size", "16", "--workers", "0", "--no-progress", "--flip"]) == 0
    index = load_index(str(out))
    facts = index.facts
    assert facts.latent_shape == [1, 4, 8, 8] and facts.num_frames == 1 and facts.classes == ["cat", "dog"]
    assert index.num_samples == 8  # 4 images and their mirrored copies
    assert [f["input"].rsplit("/", 1)[-1] for f in index.failed] == ["broken.png"]
    loader = LatentLoader(str(out), 8, expected=Expected((1, 4, 8, 8), facts.scaling_factor, 2))
    (batch,) = list(loader)
    assert batch["latent"].shape == (8, 1, 4, 8, 8)
    # the posterior mean of one image: its pixels resized and cropped as video frames are, through the VAE
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pixels = np.asarray(Image.open(tmp_path / "images" / "cat" / "a.png").convert("RGB"))
    x = resize_center_crop(torch.from_numpy(pixels.copy())[None], 16)  # (1, 3, 16, 16)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean * facts.scaling_factor  # (1, 4, 8, 8)
    labels = {key.rsplit("/", 1)[-1]: int(y) for key, y in zip(batch["key"], batch["y"], strict=True)}
    assert labels["00000000_c00"] == 0 and labels["00000003_c00_flip"] == 1  # cat/a.png, dog/c.png
    sample = read_samples(str(out))["00000000_c00"]
    assert json.loads(sample["json"])["source"].endswith("cat/a.png")
    np.testing.assert_allclose(sample["latent"].astype(np.float32), mean.numpy(), rtol=2e-3, atol=2e-4)


IMAGES = {"cat/a.png": (40, 30), "cat/b.jpg": (32, 32), "dog/c.png": (24, 36), "dog/d.png": (50, 20)}


def _write_images(root: Path) -> None:
    """Real image files (random pixels) of the sizes in ``IMAGES``, written with PIL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for rel, (w, h) in IMAGES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / rel)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> str:
    from text_encoder_fixture import tiny_t5_dir

    return tiny_t5_dir(tmp_path_factory)


def test_shard_latents_image_mode_with_captions(tmp_path, tiny_t5):
    """Captioned images (a CSV manifest path,caption) for joint text-to-video training: each one-frame
    sample carries its own caption embedding, as captioned clips do."""
    from test_shard_latents import read_samples

    from data_pipeline.index import load_index
    from data_pipeline.shard_latents import main as shard_latents
    from data_pipeline.toy_videos import make_tiny_vae

    _write_images(tmp_path / "images")
    rows = ["path,caption"] + [f"images/{rel},a photo of a {rel.split('/')[0]}" for rel in sorted(IMAGES)]
    (tmp_path / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "captioned"
    args = ["--input", str(tmp_path / "captions.csv"), "--output", str(out), "--images"]
    args += ["--vae", str(make_tiny_vae(tmp_path / "vae")), "--text-encoder", tiny_t5]
    assert shard_latents([*args, "--image-size", "16", "--workers", "0", "--no-progress"]) == 0
    facts = load_index(str(out)).facts
    assert facts.latent_shape == [1, 4, 8, 8] and facts.has_captions and facts.caption_channels == 32
    samples = read_samples(str(out))
    assert len(samples) == 4
    dog = samples["00000002_c00"]  # dog/c.png
    assert dog["caption.txt"] == "a photo of a dog"
    assert dog["caption"].ndim == 2 and dog["caption"].shape[1] == 32


@pytest.mark.parametrize("preset", ["ucf101", "ffs", "sky", "taichi"])
def test_img_presets_mirror_the_reference(preset):
    video = load_config(REPO / "configs" / f"{preset}.yaml")
    joint = load_config(REPO / "configs" / f"{preset}_img.yaml")
    assert joint.data.use_image_num == 8 and joint.data.image_index.endswith("index.json")
    assert joint.train.micro_batch_size == 4  # the reference's local_batch_size with images
    assert joint.train.precision == video.train.precision == "bf16"
    assert (joint.model.name, joint.model.num_classes) == (video.model.name, video.model.num_classes)
    assert (joint.data.num_frames, joint.data.image_size, joint.data.frame_interval) == (16, 256, 3)
