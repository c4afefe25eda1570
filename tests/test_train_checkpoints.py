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


def test_checkpoints_and_exported_weights_get_the_umask_mode_not_private(tmp_path, tokenizer):
    """mkstemp (the atomic checkpoint write) and safetensors create files 0600: a shared run directory's other
    readers could not load them."""
    import os

    from tests.conftest import tiny_config
    from vlm.checkpoint import save_model
    from vlm.model.vlm import VisionLanguageModel

    umask = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, tmp_path / "last.ckpt")
        out = save_model(VisionLanguageModel(tiny_config(), len(tokenizer)), tokenizer, tmp_path / "model")
    finally:
        os.umask(umask)
    for path in (tmp_path / "last.ckpt", out / "model.safetensors", out / "config.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_each_micro_batch_of_an_accumulated_step_draws_its_own_randomness():
    """StepSeed seeds from (seed, step, rank): the micro-batches of one optimizer step (one global_step) got the same
    dropout masks. Their place in the step tells them apart; a run without accumulation draws as before."""
    from vlm.train.checkpoints import StepSeed

    def draw(step: int, batch_idx: int, accumulate: int, rank: int = 0) -> torch.Tensor:
        trainer = type("T", (), {"global_step": step, "global_rank": rank, "accumulate_grad_batches": accumulate})
        StepSeed(7).on_train_batch_start(trainer, None, None, batch_idx)
        return torch.rand(4)

    assert not torch.equal(draw(3, 6, 2), draw(3, 7, 2))  # step 3's two micro-batches
    assert torch.equal(draw(3, 6, 2), draw(3, 6, 1)) and torch.equal(draw(3, 7, 1), draw(3, 6, 1))
    assert torch.equal(draw(3, 7, 2), draw(3, 9, 2)) and not torch.equal(draw(3, 6, 2), draw(4, 6, 2))
    assert not torch.equal(draw(3, 6, 1), draw(3, 6, 1, rank=1))


def test_resuming_a_checkpoint_without_a_vlm_model_is_one_line_error(tmp_path):
    from vlm.errors import VLMError
    from vlm.train.checkpoints import resume_model

    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, tmp_path / "other.ckpt")
    with pytest.raises(VLMError, match=r"other\.ckpt: cannot resume from this checkpoint: no vlm model config and "
                                       r"tokenizer in its hyper_parameters \(KeyError: 'model'\)$"):
        resume_model(tmp_path / "other.ckpt")
