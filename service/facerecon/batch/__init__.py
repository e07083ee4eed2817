"""Batch reconstruction of a photo collection: ``facerecon batch INPUT... --out DIR``.

* :mod:`~facerecon.batch.inputs`: files, folders, globs, manifests and URIs -> photos with stable ids.
* :mod:`~facerecon.batch.worker`: one work unit (a photo, or the photos of one identity) -> face folders + rows;
  the same code runs in every engine.
* :mod:`~facerecon.batch.local`: ``--engine local``, a process pool with one Reconstructor per process.
* :mod:`~facerecon.batch.ray_engine`: ``--engine ray``, Ray Data ``map_batches`` on an actor pool, Parquet writer.
* :mod:`~facerecon.batch.table`: the results table's schema, the resume log (``parts/``), the final table.
* :mod:`~facerecon.batch.runner`: :func:`run_batch`, which ties them together.

Needs the ``batch`` extra (``pip install 'facerecon[batch]'``: pyarrow, and Ray Data for ``--engine ray``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchOptions", "BatchSummary", "run_batch"]


def __getattr__(name: str) -> Any:  # lazy: ``facerecon --help`` must not import torch, pyarrow or Ray
    if name in __all__:
        from facerecon.batch import runner

        return getattr(runner, name)
    raise AttributeError(name)
