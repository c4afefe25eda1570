"""vlm/train/checkpoints.py: crash-safe checkpoint writes and the --resume checks (resuming itself:
tests/test_resume.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm.train.checkpoints import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_checkpoint_write_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def crash(obj, f):  # dies half way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resume_last_without_a_checkpoint_is_one_line_error(tmp_path, capsys):
    from vlm.cli import main

    code = main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(tmp_path), "--resume", "last"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip() == f"vlm train: error: --resume last: no checkpoint at {tmp_path / 'checkpoints' / 'last.ckpt'}"


@pytest.mark.parametrize("written_sharded", [True, False])
def test_resuming_across_fsdp_and_other_strategies_is_one_line_error(tmp_path, written_sharded):
    """FSDP keys the optimiser state its own way: resuming it under another strategy (or back) is refused."""
    from vlm.errors import VLMError
    from vlm.train.checkpoints import resume_path

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "sharded": written_sharded}, path)
    assert resume_path(str(path), tmp_path, sharded=written_sharded) == path
    with pytest.raises(VLMError, match=r"last\.ckpt: written under .*same kind of trainer.strategy"):
        resume_path(str(path), tmp_path, sharded=not written_sharded)
