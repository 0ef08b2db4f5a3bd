"""The video side of the sharding job on real encoded files: listing, windows, frames, resize, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_pipeline import video
from data_pipeline.toy_videos import make_corrupt_video, make_video, read_marker
from data_pipeline.video import (
    ClipDataset,
    ClipSpec,
    InputError,
    VideoError,
    decode_frames,
    list_inputs,
    plan_windows,
    read_clips,
    resize_center_crop,
)


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for ext in ("mp4", "avi", "webm", "mkv"):
        make_video(root / f"v.{ext}", frames=24, size=(90, 70), seed=1)
    make_video(root / "short.mp4", frames=6, size=(64, 48), seed=2)
    make_video(root / "three.mp4", frames=3, size=(64, 48), seed=3)
    make_corrupt_video(root / "corrupt.mp4")
    (root / "empty.mp4").write_bytes(b"")
    return root


def test_plan_windows_spread_short_and_too_short():
    interval, windows = plan_windows(24, ClipSpec(num_frames=4, frame_interval=3, clips_per_video=3))
    assert interval == 3
    assert windows == [[0, 3, 6, 9], [7, 10, 13, 16], [14, 17, 20, 23]]  # first frame to last, evenly
    # a window spans (F - 1) * I + 1 = 10 frames; 6 frames fit only I = 1; starts are distinct
    interval, windows = plan_windows(6, ClipSpec(num_frames=4, frame_interval=3, clips_per_video=5))
    assert interval == 1 and windows == [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5]]
    assert plan_windows(7, ClipSpec(num_frames=4, frame_interval=3, clips_per_video=1)) == (2, [[0, 2, 4, 6]])
    with pytest.raises(VideoError, match="3 frames, fewer than num_frames=4"):
        plan_windows(3, ClipSpec(num_frames=4))


@pytest.mark.parametrize("ext", ["mp4", "avi", "webm", "mkv"])
def test_decode_returns_exactly_the_wanted_frames(clips_dir, ext):
    frames, decoded, fps = decode_frames(str(clips_dir / f"v.{ext}"), {0, 5, 6, 17})
    assert sorted(frames) == [0, 5, 6, 17] and decoded == 18 and fps == 24.0  # stopped after the last one
    assert {i: read_marker(f) for i, f in frames.items()} == {0: 0, 5: 5, 6: 6, 17: 17}
    assert frames[0].shape == (70, 90, 3) and frames[0].dtype == np.uint8


def test_read_clips_shapes_range_and_metadata(clips_dir):
    spec = ClipSpec(num_frames=4, frame_interval=3, clips_per_video=2, image_size=32)
    clips = read_clips(str(clips_dir / "v.webm"), spec)  # webm: no frame count in the header
    assert clips.pixels.shape == (2, 4, 3, 32, 32) and clips.pixels.dtype == torch.float32
    assert -1.0 <= clips.pixels.min() and clips.pixels.max() <= 1.0
    assert clips.frame_indices == [[0, 3, 6, 9], [14, 17, 20, 23]] and clips.frame_interval == 3
    assert clips.total_frames == 24 and clips.original_size == (90, 70) and clips.fps == 24.0
    short = read_clips(str(clips_dir / "short.mp4"), spec)
    assert short.frame_interval == 1 and short.frame_indices == [[0, 1, 2, 3], [2, 3, 4, 5]]


def test_a_header_that_overstates_the_length_is_replanned(clips_dir, monkeypatch):
    monkeypatch.setattr(video, "_count_frames", lambda source: 40)  # the header claims 40 frames, 24 exist
    clips = read_clips(str(clips_dir / "v.mp4"), ClipSpec(num_frames=4, frame_interval=3, clips_per_video=2))
    assert clips.total_frames == 24 and clips.frame_indices == [[0, 3, 6, 9], [14, 17, 20, 23]]


def test_resize_shorter_side_then_center_crop():
    # a horizontal ramp 4 high, 8 wide: the short side is already 4, so the crop is exact (columns 2..5)
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).expand(4, 8)  # (H, W)
    frames = ramp[None, :, :, None].expand(2, 4, 8, 3).contiguous()  # (N, H, W, 3)
    out = resize_center_crop(frames, 4)
    assert out.shape == (2, 3, 4, 4)
    assert torch.allclose(out[0, 0, 0], torch.tensor([60.0, 90, 120, 150]) / 127.5 - 1)
    # 70 x 90 -> shorter side 32 (32 x 41), centre 32 x 32; a constant frame stays constant, 255 -> 1, 0 -> -1
    white = torch.full((1, 70, 90, 3), 255, dtype=torch.uint8)
    assert torch.allclose(resize_center_crop(white, 32), torch.ones(1, 3, 32, 32), atol=1e-5)
    assert torch.allclose(
        resize_center_crop(torch.zeros_like(white), 32), -torch.ones(1, 3, 32, 32), atol=1e-5
    )
    # a bright column at the centre of a wide frame stays at the centre of the crop
    wide = torch.zeros(1, 64, 128, 3, dtype=torch.uint8)
    wide[:, :, 63:65] = 255
    column = resize_center_crop(wide, 32)[0, 0].mean(0)  # (32,) mean over rows
    assert int(column.argmax()) in (15, 16)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("corrupt.mp4", "InvalidDataError"),
        ("empty.mp4", "empty file"),
        ("none.mp4", "no such file"),
        ("three.mp4", "fewer than num_frames"),
    ],
)
def test_bad_videos_give_one_line_reasons(clips_dir, name, reason):
    with pytest.raises(VideoError, match=reason) as info:
        read_clips(str(clips_dir / name), ClipSpec(num_frames=4, image_size=32))
    assert "\n" not in str(info.value)
    item = ClipDataset([video.VideoInput(0, str(clips_dir / name), None)], ClipSpec(num_frames=4))[0]
    assert item["clips"] is None and reason in item["error"]  # the dataset never raises


def test_list_inputs_folders_and_manifests(tmp_path):
    for rel in ("b/x.mp4", "a/y.MP4", "a/z.avi", "a/.hidden.mp4", "a/notes.txt", "c/deep/w.webm"):
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / rel).write_bytes(b"x")
    inputs, classes = list_inputs(str(tmp_path / "tree"))
    assert classes == ["a", "b", "c"]
    assert [(v.position, v.path.split("tree/")[1], v.label) for v in inputs] == [
        (0, "a/y.MP4", 0),
        (1, "a/z.avi", 0),
        (2, "b/x.mp4", 1),
        (3, "c/deep/w.webm", 2),
    ]
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "v.mkv").write_bytes(b"x")
    assert list_inputs(str(tmp_path / "flat"))[1] == []  # no folders: unconditional
    (tmp_path / "tree" / "loose.mp4").write_bytes(b"x")
    with pytest.raises(InputError, match="some videos have a label"):
        list_inputs(str(tmp_path / "tree"))

    (tmp_path / "m.csv").write_text("path,label\nsub/b.mp4,3\n/abs/a.mp4,0\n\n")
    inputs, classes = list_inputs(str(tmp_path / "m.csv"))
    assert classes == ["0", "1", "2", "3"]  # integer labels are kept as they are
    assert [(v.path, v.label) for v in inputs] == [("/abs/a.mp4", 0), (str(tmp_path / "sub/b.mp4"), 3)]
    rows = [{"path": "b.mp4", "label": "walk"}, {"path": "a.mp4", "label": "run"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    inputs, classes = list_inputs(str(tmp_path / "m.jsonl"))
    assert classes == ["run", "walk"] and [v.label for v in inputs] == [0, 1]

    (tmp_path / "bad.jsonl").write_text('{"label": 1}\n')
    (tmp_path / "twice.csv").write_text("a.mp4\nb.mp4\na.mp4\n")
    for src, message in [
        (tmp_path / "missing", "not a directory"),
        (tmp_path / "nope.csv", "cannot read"),
        (tmp_path / "bad.jsonl", "line 1"),
        (tmp_path / "flat" / "v.mkv", "not a directory"),
        (tmp_path / "twice.csv", "lists '.*a.mp4' more than once"),
    ]:
        with pytest.raises(InputError, match=message):
            list_inputs(str(src))
