"""Crash-safe checkpoint files and resuming.

Lightning writes a checkpoint through a buffer but neither syncs it to disk nor renames it into place
atomically on every filesystem; a SIGKILL or power loss could leave a truncated ``last.ckpt``. Here a
checkpoint goes to a temporary file in the same folder, is fsynced, then ``os.replace``d over the target,
so the target is always either the old or the new complete checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlm.errors import VLMError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, fsyncs it and renames it over the target."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def resume_path(resume: str, out: str | os.PathLike, sharded: bool = False) -> Path:
    """The checkpoint to resume from: ``last`` means ``out/checkpoints/last.ckpt``.

    ``sharded``: this run uses ``strategy: fsdp``, whose checkpoints key the optimiser state differently, so a
    run resumes only from a checkpoint written under the same kind of strategy.
    """
    path = Path(out) / "checkpoints" / "last.ckpt" if resume == "last" else Path(resume)
    if not path.is_file():
        raise VLMError(f"--resume {resume}: no checkpoint at {path}")
    try:  # refuse a file that is not a plain checkpoint (or would run code) before any work, in one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise VLMError(f"{path}: cannot resume from this checkpoint ({e.__class__.__name__}: {reason[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise VLMError(f"{path}: not a vlm training checkpoint")
    if ckpt.get("sharded", False) != sharded:
        written = "fsdp" if ckpt.get("sharded", False) else "a strategy other than fsdp"
        raise VLMError(f"{path}: written under {written}; resume it with the same kind of trainer.strategy")
    return path
