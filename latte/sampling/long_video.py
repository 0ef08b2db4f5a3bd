"""Training-free long videos: clips of the model's trained length, each conditioned on the previous one.

Method. A model trained on F-frame clips is never run on more than F frames. The first clip is sampled as
usual. Every next clip shares its first k latent frames (``overlap``) with the last k of the previous clip:
those frames are *known*, and the sampling loop conditions on them by replacement (Ho et al. 2022, "Video
Diffusion Models", sec. 3.1): before each denoising step at t, the known frames of x_t are overwritten by a
fresh draw of q(x_t | x_0) of their values, so the model sees them at the noise level it was trained for and
denoises the F - k new frames to agree with them; after the last step the known frames are set to the
previous clip's exactly (``latte.diffusion.KnownFrames``, a hook in the one shared sampling loop). The clips
are stitched: all of the first, then the F - k new frames of each next one, cut to exactly T frames, which
takes 1 + ceil((T - F) / (F - k)) clips. Each clip costs a full sampling run; T frames cost about
(T - k) / (F - k) times one clip.

Limits.

* Drift: the only memory is the k shared frames. Colours, identity and layout wander a little with every
  clip and errors compound, so a long video can end far from where it began; anything that left the frame
  more than k frames ago is forgotten (objects may come back changed). More overlap gives more context and
  smoother joins but fewer new frames per clip (more clips for the same T).
* Replacement is an approximation: the new frames are denoised beside a noisy copy of the known ones, not
  sampled from the true conditional. Joins can show a small jump in motion (the direction of motion is only
  as well pinned down as k frames allow), and with few sampling steps the join is rougher.
* Why not sample all T frames at once: a model trained on 16 frames has temporal position embeddings and
  attention statistics for 16 frames only (``Latte`` refuses F > num_frames). Stretching it to more frames
  at once gives the familiar failures: checkerboard/grid patterns, flicker and frozen or repeated motion.
  This method never exceeds the trained length, so each clip stays in distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latte.diffusion import KnownFrames

#: run_clip(known) -> one clip's latents (N, F, C, H, W); known is None for the first clip.
ClipSampler = Callable[[KnownFrames | None], torch.Tensor]


def default_overlap(num_frames: int) -> int:
    """Latent frames shared by consecutive clips when the config does not say: a quarter of a clip (>= 1)."""
    return max(1, num_frames // 4)


def num_clips(total_frames: int, num_frames: int, overlap: int) -> int:
    """Clips needed for ``total_frames``: the first gives F frames, every next one F - overlap more."""
    if total_frames <= num_frames:
        return 1
    return 1 + math.ceil((total_frames - num_frames) / (num_frames - overlap))


def sample_clips(
    run_clip: ClipSampler, total_frames: int, num_frames: int, overlap: int
) -> list[torch.Tensor]:
    """The clips of a ``total_frames`` video; clip c+1's first ``overlap`` frames equal clip c's last ones."""
    clips = [run_clip(None)]
    mask = torch.arange(num_frames) < overlap  # (F,): the first ``overlap`` frames are known
    for _ in range(num_clips(total_frames, num_frames, overlap) - 1):
        prev = clips[-1]
        x0 = torch.zeros_like(prev)  # (N, F, C, H, W); only the known frames are read
        x0[:, :overlap] = prev[:, -overlap:]
        clips.append(run_clip(KnownFrames(x0, mask)))
    return clips


def stitch(clips: list[torch.Tensor], overlap: int, total_frames: int) -> torch.Tensor:
    """One video of exactly ``total_frames`` frames: the first clip, then each next clip's new frames."""
    parts = [clips[0]] + [clip[:, overlap:] for clip in clips[1:]]
    return torch.cat(parts, dim=1)[:, :total_frames]  # (N, T, C, H, W)
