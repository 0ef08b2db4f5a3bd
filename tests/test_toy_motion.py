"""The demo's direction check (``data_pipeline.toy_motion``) on real clips: every clip of every class moves in
its class's direction, read back as the sharding job reads them, and a still square has no direction."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.toy_motion import (
    direction_accuracy,
    direction_class,
    motion_angle,
    read_frames,
    uint8_frames,
)
from data_pipeline.toy_videos import make_class_videos, make_video, synthetic_frames
from data_pipeline.video import ClipSpec, read_clips


@pytest.mark.parametrize("num_classes", [4, 8])
def test_real_class_clips_move_in_their_class_direction(tmp_path, num_classes):
    paths = make_class_videos(tmp_path, num_classes=num_classes, per_class=6 if num_classes == 4 else 2)
    spec = ClipSpec(num_frames=4, frame_interval=3, clips_per_video=4, image_size=64)  # the demo's windows
    videos, classes = [], []
    for path in paths:
        k = int(path.parent.name.removeprefix("class_"))
        for clip in read_clips(str(path), spec).pixels:  # (4, 3, 64, 64) each
            videos.append(uint8_frames(clip.numpy()))
            classes.append(k)
        videos.append(read_frames(path))  # and the whole 24-frame mp4
        classes.append(k)
    assert direction_accuracy(videos, classes, num_classes) == 1.0


def test_direction_is_the_angle_in_image_coordinates():
    for seed, angle in enumerate(np.linspace(0, 2 * np.pi, 13)[:-1]):  # y points down: pi/2 moves down
        measured, shift = motion_angle(synthetic_frames(16, (64, 64), seed=seed, angle=angle))
        assert abs((measured - angle + np.pi) % (2 * np.pi) - np.pi) < 0.1, (angle, measured)
        assert shift > 40  # across the frame: (64 - 16) px
    frames = synthetic_frames(10, (64, 64), seed=3, angle=np.pi / 2)
    assert direction_class(frames) == 1 and direction_class(frames[::-1].copy()) == 3


def test_still_or_empty_video_has_no_direction(tmp_path):
    still = read_frames(make_video(tmp_path / "still.mp4", frames=8, motion="static"))
    assert direction_class(still) is None
    assert direction_class(np.full((4, 64, 64, 3), 128, np.uint8)) is None  # nothing but background
    assert direction_accuracy([still, still], [0, 1]) == 0.0
    with pytest.raises(ValueError):
        direction_accuracy([still], [0, 1])
