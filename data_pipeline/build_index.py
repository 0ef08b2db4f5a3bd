"""Merge the per-task parts of a sharding job into ``DST/index.json``.

    python -m data_pipeline.build_index DST [--num-tasks N]

``--num-tasks`` defaults to the task count recorded in ``DST/job.json`` by the sharding job, so a task
that has not written its part yet is reported instead of silently left out. Prints one summary line;
any problem is one ``error:`` line on stderr and exit code 2, as is an index without samples (every input
failed: it is written, listing them, but a training job waiting on this one must not start).
"""

from __future__ import annotations

import argparse
import json
import sys

from data_pipeline import storage
from data_pipeline.index import DatasetIndexError, merge_parts
from latte.errors import first_line

JOB_NAME = "job.json"  # the sharding job's settings, written by data_pipeline.shard_latents


def recorded_num_tasks(output: str) -> int | None:
    """The task count ``DST/job.json`` records, or None if the output has no job record."""
    url = storage.join(output, JOB_NAME)
    if not storage.exists(url):
        return None
    try:
        return int(json.loads(storage.read_bytes(url))["num_tasks"])
    except (ValueError, KeyError, TypeError):
        raise DatasetIndexError(f"'{url}' is not a sharding job record") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.build_index", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("output", help="the sharding job's output: a directory or s3://bucket/prefix")
    parser.add_argument("--num-tasks", type=int, default=None, help="default: the count in DST/job.json")
    args = parser.parse_args(argv)
    try:
        num_tasks = args.num_tasks if args.num_tasks is not None else recorded_num_tasks(args.output)
        index = merge_parts(args.output, num_tasks)
    except (DatasetIndexError, storage.StorageError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 2
    gigabytes = sum(s.bytes for s in index.shards) / 1e9
    print(
        f"index: {storage.join(args.output, 'index.json')}: {index.num_samples} samples in "
        f"{len(index.shards)} shards ({gigabytes:.3f} GB), {len(index.failed)} failed inputs, "
        f"latent shape {index.facts.latent_shape}, scaling factor {index.facts.scaling_factor}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
