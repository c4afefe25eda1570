"""`trainer.strategy: fsdp`: the model sharded with FSDP2 (``fully_shard``) over every process.

Lightning's own ``fsdp`` (FSDP1) needs an accelerator: torch's ``FullyShardedDataParallel`` refuses a
CPU-only process ("FSDP needs a non-CPU accelerator device", torch/distributed/fsdp/_init_utils.py).
FSDP2 runs on GPUs (NCCL) and on CPUs (gloo) alike, so one code path is trained and tested here.

Sharding units: the encoder, each decoder block and its cross-attention, and the whole model for what is
left (embeddings, final norm). FSDP2 gathers a unit's parameters around its ``forward``; the model's
other entry points that training uses (``encode``, ``encode_features``, ``decode``, the cross-attention's
``keys_values``, the encoder's ``project``) are registered as forward methods so they gather too.
Generation calls decoder parts step by step, a different number of steps on each process, so it runs
inside ``full_parameters``: every unit gathered once, no collective inside the loop. FSDP leaves buffers
unsynchronised, so validation first takes rank 0's BatchNorm statistics everywhere (as DDP does).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from vlm.model.vlm import VisionLanguageModel


class FSDPStrategy(ModelParallelStrategy):
    """Data parallelism over all processes of all nodes with the model sharded (FSDP2), on any accelerator.

    Checkpoints hold the full (gathered) weights and optimiser state in one file, written by rank 0 through
    the trainer's checkpoint IO (atomically), so ``vlm.load`` and ``--resume`` read them. Their optimiser
    state is keyed by parameter order, not by optimiser group as DDP's: resume with the same strategy.
    """

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=False)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # all processes shard one model
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: VisionLanguageModel, mesh: DeviceMesh) -> None:
    """Shard the model in place over ``mesh`` (a no-op when it already is)."""
    if is_sharded(model):
        return
    for p in model.parameters():  # FSDP2 shards contiguous parameters only (not channels-last conv weights)
        p.data = p.data.contiguous()
    fully_shard(model.encoder, mesh=mesh)
    for method in ("project", "feature_map", "patch_features", "contextualise"):  # the last three: context blocks
        register_fsdp_forward_method(model.encoder, method)
    for block in model.decoder.blocks:
        fully_shard(block.cross_attn, mesh=mesh)
        register_fsdp_forward_method(block.cross_attn, "keys_values")
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ("encode", "encode_features", "decode"):
        register_fsdp_forward_method(model, method)


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Every sharded unit of ``model`` gathered for the duration (like FSDP1's ``summon_full_params``).

    Inside, forwards neither gather nor free parameters, so code may call any part of the model any number
    of times without collectives. Every process must enter together. A no-op for an unsharded model.
    """
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # the root keeps its weights gathered


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process, as DDP makes them before each forward.

    FSDP shards parameters but leaves buffers alone, so each process's statistics follow its own batches.
    """
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


def unsharded(model: VisionLanguageModel) -> VisionLanguageModel | None:
    """The model itself, or under FSDP a plain copy with the gathered weights on rank 0 (None elsewhere).

    Every process must call it: gathering is a collective.
    """
    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # not rank 0
        return None
    copy = VisionLanguageModel(model.cfg, model.vocab_size, pretrained=False)
    copy.load_state_dict(state)
    return copy.eval()
