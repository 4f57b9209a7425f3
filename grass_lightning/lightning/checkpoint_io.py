"""Checkpoints written beside their target, flushed to disk, then renamed over it.

Lightning's `TorchCheckpointIO` serialises a checkpoint into memory and commits it through an
fsspec transaction whose local temporary file lives in the system temp directory and is then
moved: atomic only when that directory is on the output's filesystem; otherwise a kill during the
move leaves a truncated file under the real name. Writing to ``<name>.partial`` in the same
folder and ``os.replace`` is atomic on any local filesystem, so a killed run always leaves the
previous complete checkpoint in place, and the checkpoint streams to disk without a second copy
in memory. Remote paths (``s3://``...) keep Lightning's way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves never leave a half-written checkpoint.

    Example::

        Trainer(plugins=[AtomicCheckpointIO()])
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # the rename itself reaches the disk
        finally:
            os.close(folder)
