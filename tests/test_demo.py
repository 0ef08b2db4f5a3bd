"""The demo's measured check (``scripts/demo.py``'s ``direction_check``) on videos whose motion is known: real
class clips written as ``latte.sample`` writes its samples, a reversed one and a still one. The full demo
runs in ``tests/test_train.py``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.toy_motion import read_frames, uint8_frames
from data_pipeline.toy_videos import make_class_videos
from data_pipeline.video import ClipSpec, read_clips
from latte.sampling.media import write_mp4

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo  # noqa: E402

LINE = (
    r"direction accuracy: ([0-9.]+) of (\d+) generated videos move in their class's direction "
    r"\(real clips: ([0-9.]+) of (\d+); chance 0.25\)"
)


def test_direction_check_counts_the_videos_that_move_their_class_way(tmp_path):
    videos = make_class_videos(tmp_path / "videos", num_classes=4, per_class=1)
    samples = tmp_path / "samples"
    samples.mkdir()
    rows = []
    for i, path in enumerate(videos):  # as latte.sample: sample_XXXX.mp4 + samples.json with each class
        clip = uint8_frames(read_clips(str(path), ClipSpec(**demo.CLIPS)).pixels[0].numpy())  # (4, 64, 64, 3)
        k = int(path.parent.name.removeprefix("class_"))
        write_mp4(samples / f"sample_{i:04d}.mp4", clip, fps=8)
        rows.append({"index": i, "class": k, "video": f"sample_{i:04d}.mp4"})
    write_mp4(samples / "sample_0004.mp4", clip[::-1].copy(), fps=8)  # class 3 (up) played backwards: down
    write_mp4(samples / "sample_0005.mp4", clip[:1].repeat(4, 0), fps=8)  # a still square: no direction
    rows += [
        {"index": 4, "class": 3, "video": "sample_0004.mp4"},
        {"index": 5, "class": 0, "video": "sample_0005.mp4"},
    ]
    (samples / "samples.json").write_text(json.dumps({"samples": rows}))

    line = demo.direction_check(videos, samples, tmp_path / "strip.png")
    found = re.search(LINE, line)
    assert found, line
    assert (float(found[1]), int(found[2])) == (round(4 / 6, 2), 6)
    assert (float(found[3]), int(found[4])) == (1.0, 16)  # 4 real videos x 4 training windows
    with Image.open(tmp_path / "strip.png") as strip:  # a row per class, its 4 frames, twice the size
        image = np.asarray(strip.convert("RGB")).astype(int)
    assert image.shape == (4 * 130 + 2, 4 * 130 + 2, 3)
    first = read_frames(samples / "sample_0000.mp4")[0]  # class 0's first frame, at the top left
    assert np.abs(image[2:130:2, 2:130:2] - first).mean() < 1
