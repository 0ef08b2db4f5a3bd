"""The real videos' statistics, computed once and cached in an ``.npz`` with the protocol they were made by.

One file holds one or more metrics: ``{metric}_mu`` (D,) and ``{metric}_sigma`` (D, D) float64,
``{metric}_count`` (features: videos for FVD16, frames for FID), ``protocols`` (JSON: metric -> the protocol's
fields) and ``info`` (JSON: metric -> where the reals came from, how many, which were left out). Loading
checks the recorded protocol against the run's: another protocol is refused with one line naming the fields
that differ, since statistics of other clips, strides or detectors give numbers that look like results.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from latte.errors import first_line
from latte.evaluation import EvaluationError
from latte.evaluation.protocol import Protocol
from latte.files import atomic_write


@dataclass(frozen=True)
class RealStats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    info: dict


def read_file(path: str | Path) -> tuple[dict[str, dict], dict[str, RealStats]]:
    """(recorded protocols, statistics) of every metric in the file at ``path``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        protocols = json.loads(str(arrays["protocols"]))
        info = json.loads(str(arrays["info"]))
        stats = {
            m: RealStats(arrays[f"{m}_mu"], arrays[f"{m}_sigma"], int(arrays[f"{m}_count"]), info.get(m, {}))
            for m in protocols
        }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise EvaluationError(
            f"{path} is not a statistics file of latte.evaluate ({first_line(exc, 120)})"
        ) from None
    return protocols, stats


def load_stats(path: str | Path, protocol: Protocol) -> RealStats | None:
    """The statistics of ``protocol.metric`` in ``path``; None when the file does not hold that metric.
    ``EvaluationError`` when it holds it for another protocol."""
    protocols, stats = read_file(path)
    recorded = protocols.get(protocol.metric)
    if recorded is None:
        return None
    differ = protocol.differences(recorded)
    if differ:
        raise EvaluationError(
            f"{path} holds {protocol.metric} statistics of another protocol (file != this run): "
            f"{'; '.join(differ)}; pass another --real-stats path (with --reals) to compute this protocol's"
        )
    return stats[protocol.metric]


def save_stats(path: str | Path, protocol: Protocol, stats: RealStats) -> None:
    """Write (or add) ``protocol.metric``'s statistics to ``path``, keeping the file's other metrics."""
    path = Path(path)
    protocols, kept = read_file(path) if path.is_file() else ({}, {})
    protocols[protocol.metric] = protocol.to_dict()
    kept[protocol.metric] = stats
    arrays: dict[str, np.ndarray] = {}
    for metric, s in kept.items():
        arrays[f"{metric}_mu"] = np.asarray(s.mu, np.float64)
        arrays[f"{metric}_sigma"] = np.asarray(s.sigma, np.float64)
        arrays[f"{metric}_count"] = np.asarray(s.count, np.int64)
    arrays["protocols"] = np.asarray(json.dumps(protocols, sort_keys=True))
    arrays["info"] = np.asarray(json.dumps({m: s.info for m, s in kept.items()}, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to the temporary name
            np.savez(f, **arrays)

    atomic_write(path, write)
