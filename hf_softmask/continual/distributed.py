"""Which process this is, and collectives the runners need: one barrier, weights gathered for saving.

A run's processes are joined either by accelerate (``accelerate launch``: DDP, or FSDP2 through its plugin) or by
torch alone (``torch.distributed`` initialised by the caller, the model sharded with ``fully_shard`` by a model
hook). Both give the same rank and world size here; the second is ``torch_only``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = [
    "ProcessInfo",
    "describe_processes",
    "end_processes",
    "full_state_dict",
    "is_main_process",
    "is_sharded",
]


@dataclass
class ProcessInfo:
    rank: int
    world: int
    device: torch.device
    torch_only: bool  # processes joined by torch.distributed without accelerate knowing

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, cpu: bool) -> ProcessInfo:
        import torch.distributed as dist
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        if dist.is_available() and dist.is_initialized() and state.num_processes != dist.get_world_size():
            return cls(dist.get_rank(), dist.get_world_size(), state.device, True)
        return cls(state.process_index, state.num_processes, state.device, False)

    def describe(self, sharded: bool = False) -> str:
        """The runner's first console line: :func:`describe_processes` of this run."""
        return describe_processes(self.world, self.device, sharded, self.torch_only)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.barrier()


def is_main_process() -> bool:
    """Whether this is rank 0 of the run, however its processes were joined: torch's rank where a process group
    exists (accelerate's state alone calls every process of a torch-only group the main one), else accelerate's."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    from accelerate import PartialState

    return PartialState().is_main_process


def describe_processes(world: int, device, sharded: bool = False, torch_only: bool = False) -> str:
    """How a run trains, e.g. "trains with 2 processes (DDP, gloo process group) on cpu" or "1 process (no process
    group) on cpu": what the launcher really started, whatever its flags asked for."""
    import torch.distributed as dist

    where = getattr(device, "type", device)
    if world <= 1:
        return f"trains with 1 process (no process group) on {where}"
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "no"
    kind = "FSDP2" if sharded else "DDP"
    joined = "torch.distributed without accelerate" if torch_only else "accelerate"
    return f"trains with {world} processes ({kind}, {backend} process group, joined by {joined}) on {where}"


def is_sharded(model: torch.nn.Module) -> bool:
    """True when parameters are DTensors (FSDP2 ``fully_shard``)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The full (unsharded) state dict on the main process, gathered with every process taking part; None for a
    model that is not sharded (``save_pretrained`` reads it directly). Call it on every process."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


#: How long ``end_processes`` leaves the GIL to gloo's worker threads after the last barrier.
_GLOO_RELEASE_SECONDS = 0.2


def end_processes() -> None:
    """End a launched run: wait for every process, then destroy the process group (no-op in one process).

    Call it last in a script's ``main``. Without it the gloo/NCCL worker threads are torn down during interpreter
    finalization while still holding Python objects, which aborts a run that finished (SIGABRT, "terminate
    called without an active exception"), so the launcher reports a failure after all results were written.

    Under gloo, then, the GIL is left free for a moment: a gloo worker thread frees the barrier's work, and the
    work it waited for (e.g. FSDP2's last all-gather, holding Python tensors), just after the barrier returns, and
    needs the GIL for that. When it got the GIL only after the main thread had begun interpreter finalization, it
    was made to exit inside a C++ destructor: the same abort (core dumps, 2026-12-07: ``~AsyncBarrierWork`` ->
    ``~AsyncAllgatherCoalescedWork`` -> ``decref_pyobject`` -> ``PyThread_exit_thread``; 6 runs in 44 of an
    FSDP2 script). Nothing observable from Python says when the thread is done, hence a fixed pause.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        dist.destroy_process_group()
        if gloo:
            time.sleep(_GLOO_RELEASE_SECONDS)
