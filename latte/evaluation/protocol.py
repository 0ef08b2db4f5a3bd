"""What FVD16 and FID measure, as the Latte paper measured them: a frozen ``Protocol`` per metric and dataset.

The Latte paper evaluates with its ``tools/eval_metrics.sh`` (``calc_metrics_for_dataset.py --metrics
fvd2048_16f --resolution 256``), StyleGAN-V's metric code with two changes of Latte's: real clips take every
3rd frame (``realdata_subsample_factor=3``, the training ``frame_interval``; 6 for Taichi-HD, as its
maintainers say in Vchitect/Latte#115) and the real videos are a random draw (``random.sample``) instead
of the first ones. Each field below says where its value comes from. A protocol is written into every
statistics file and result; a statistics file of another protocol is refused, naming the fields that differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from latte.evaluation import EvaluationError

METRICS = ("fvd", "fid")  # --metrics names: FVD16 (I3D, clips) and FID (Inception, frames)
FEATURE_DIMS = {"i3d": 400, "inception": 2048}  # Kinetics-400 logits; Inception pool3
DETECTOR_URLS = {  # where the standard TorchScript files come from (StyleGAN-V's metric code)
    "i3d": "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1",
    "inception": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
}
RESIZE = "center crop to the shorter side, then Lanczos (PIL) to resolution x resolution"
# FVD16 of Latte (no image-joint training) in the paper, for context in results; see the README for sources
PAPER_FVD16 = {"ffs": 34.00, "sky": 59.82, "ucf101": 477.97, "taichi": 159.60}


@dataclass(frozen=True)
class RealSet:
    """A dataset's real videos: which ones, and how far apart their clip frames are."""

    split: str
    frame_stride: int  # every k-th frame in a real clip (Latte's realdata_subsample_factor)
    num_videos: int = 0  # the videos the split has; 0 = not checked


DATASETS = {
    # The paper does not name a UCF101 split. Latte trains on every video of the 101 class folders (its
    # ucf101 dataset walks the whole folder), as DIGAN and StyleGAN-V did, and its maintainers compute the
    # real statistics from the training videos (Vchitect/Latte#141); so do we.
    "ucf101": RealSet("UCF-101: all 13,320 videos (official train + test lists, no split)", 3, 13320),
    "ffs": RealSet("FaceForensics: the training videos (Latte's preprocess_ffs/train)", 3),
    "sky": RealSet("SkyTimelapse: sky_train", 3),
    "taichi": RealSet("Taichi-HD: the training videos", 6),
    "custom": RealSet("the videos given with --reals", 3),
}


@dataclass(frozen=True)
class Protocol:
    """How one metric is measured on one dataset. FVD16 (``fvd2048_16f``): 16-frame clips through I3D; FID
    (``fid50k_full``): single frames through Inception."""

    metric: str  # "fvd16" | "fid"
    dataset: str  # a DATASETS key
    real_split: str  # which videos are the reals
    detector: str  # "i3d" | "inception": the TorchScript file's kind
    feature_dim: int  # the detector's feature width (I3D 400, Inception 2048)
    num_frames: int  # frames per clip: 16 (FVD16), 1 (FID: frames one by one)
    real_frame_stride: int  # FVD16: every 3rd frame (6 for Taichi-HD); FID: every frame
    real_clip_start: str  # FVD16: "random" (uniform, seeded; StyleGAN-V's random offset); FID: "every frame"
    num_reals: int  # FVD16: 2048 videos, one clip each (all when fewer); FID: 0 = every frame of every video
    fake_frame_stride: int = 1  # fakes: consecutive frames from the first (load_n_consecutive, no offset)
    num_fakes: int = 2048  # FVD16: 2048 videos; FID: 50,000 frames (all frames of 2048 16-frame videos)
    resolution: int = 256  # eval_metrics.sh --resolution 256; frames prepared center-crop-resize-256
    resize: str = RESIZE  # Latte's tools/convert_videos_to_frames.py (it then stores JPEGs; we do not)
    mirror: bool = False  # eval_metrics.sh passes --mirror 1, but fvd2048_16f / fid50k_full set xflip=False
    real_videos_expected: int = 0  # the split's size (UCF101: 13,320); 0 = not checked
    seed: int = 0  # which real videos and where their clips start (the reference's draws are unseeded)

    @property
    def real_frames_needed(self) -> int:
        """Shorter real videos are left out (``discard_short_videos``: at least num_frames x stride)."""
        return self.num_frames * self.real_frame_stride

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def differences(self, other: dict) -> list[str]:
        """``field: mine != theirs`` for each field where ``other`` (a recorded protocol) differs."""
        mine = self.to_dict()
        keys = sorted(set(mine) | set(other))
        return [
            f"{k} {other.get(k, '(missing)')!r} != {mine.get(k, '(missing)')!r}"
            for k in keys
            if mine.get(k) != other.get(k)
        ]


# what each metric measures; the dataset adds which reals and (FVD16) their frame stride
METRIC_FIELDS = {
    "fvd": dict(metric="fvd16", detector="i3d", num_frames=16, real_clip_start="random", num_reals=2048),
    "fid": dict(
        metric="fid",
        detector="inception",
        num_frames=1,
        real_frame_stride=1,
        real_clip_start="every frame",
        num_reals=0,
        num_fakes=50_000,
    ),
}


def protocol_for(metric: str, dataset: str) -> Protocol:
    """The protocol of ``metric`` ("fvd" | "fid") on ``dataset`` (a DATASETS key)."""
    if dataset not in DATASETS:
        raise EvaluationError(f"unknown dataset '{dataset}' (one of {', '.join(DATASETS)})")
    if metric not in METRIC_FIELDS:
        raise EvaluationError(f"unknown metric '{metric}' (one of {', '.join(METRICS)})")
    real, fields = DATASETS[dataset], dict(METRIC_FIELDS[metric])
    fields.setdefault("real_frame_stride", real.frame_stride)
    return Protocol(
        dataset=dataset,
        real_split=real.split,
        real_videos_expected=real.num_videos,
        feature_dim=FEATURE_DIMS[fields["detector"]],
        **fields,
    )
