"""Evaluation: the validation loss while training, and FVD and FID of generated videos measured as the Latte
paper measured them (``python -m latte.evaluate``).

* ``validation_loss``: the training objective on fixed held-out clips at fixed timesteps (``train.py``);
* ``protocol``: what is measured and how (frames, strides, counts, detector), one frozen record per metric
  and dataset, written into every statistics file and result;
* ``frechet``: feature moments in float64 and the Fréchet distance between two of them;
* ``detectors``: the I3D / Inception TorchScript files a user gives, checked to be the kind expected;
* ``clips`` and ``frames``: which frames of a video are measured, and their crop + resize;
* ``video_sets``: the videos measured (a dataset's videos or frame folders; ``latte.sample`` outputs);
* ``features``: a rank's share of the videos through a detector, the shares combined on rank 0;
* ``stats``: the real videos' statistics, cached as ``.npz`` with their protocol.

The detectors are never downloaded: the user gives local files (see the README for where they come from).
"""

from __future__ import annotations


class EvaluationError(ValueError):
    """Input an evaluation cannot use (a detector of the wrong kind, a video too short for the protocol, a
    statistics file of another protocol): one line that names it."""
