"""Rendering jobs in worker processes, with a progress bar (the world's takes, the CLIP
corpus's takes)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

from input_pipeline.progress import bar as progress_bar

__all__ = ["map_in_processes"]

_Job = TypeVar("_Job")
_Result = TypeVar("_Result")


def map_in_processes(
    fn: Callable[[_Job], _Result],
    jobs: Sequence[_Job],
    *,
    workers: int | None,
    chunksize: int,
    desc: str,
    unit: str = "it",
    progress: bool = True,
) -> list[_Result]:
    """``[fn(job) for job in jobs]``, in order, computed by ``workers`` processes (default:
    up to 2; 1 or fewer: in this process).

    Workers are spawned, not forked: the caller may have imported JAX, whose threads fork
    would copy badly. So ``fn`` must be a module-level function, and a script calling this
    needs the usual ``if __name__ == "__main__":`` guard. On an error, queued jobs are dropped
    and running ones finish before it is raised, so that nothing still writes to files the
    caller then cleans up.
    """
    n = workers if workers is not None else min(2, os.cpu_count() or 1)
    bar = progress_bar(total=len(jobs), desc=desc, unit=unit, disable=not progress)
    results: list[_Result] = []
    try:
        if n <= 1:
            for job in jobs:
                results.append(fn(job))
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")
            pool = cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx)
            try:
                for result in pool.map(fn, jobs, chunksize=chunksize):
                    results.append(result)
                    bar.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return results
