"""The rank-aware parts of data-parallel training (issue 14): one worker process per device, started by
Accelerate's launcher (training/launch.py), each training on its own slice of every global batch.

Only the LoRA's gradients travel: after the accumulation loop each process packs the gradients of its
trainable parameters and its share of the loss into one buffer and all-reduces it (one collective per
optimizer step; no DDP wrapper of the frozen base). Each process's loss is its samples' weighted sum
divided by the global batch's sample count, and the buffers are summed, so the result is the mean over
the global batch however it was split: a process whose slice of a small last batch is empty joins with
zero gradients. A world of one process (`Distributed.single()`) runs no collective at all.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger("training")

# Per-process random state a checkpoint keeps for every rank: the CPU's (LoRA dropout), the accelerator's,
# and the VAE's sampling generator (latents encoded per step). The noise generator and the data position
# are the same on every rank and stay in the checkpoint's top level.
RANK_STATE_KEYS = ("torch_rng", "cuda_rng", "mps_rng")


def in_worker() -> bool:
    """Whether this process is a worker started by the launcher (torch elastic sets both)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


class PeerLost(RuntimeError):
    """A collective failed: another process of the run is gone. Not the run's cause of failure, so the
    process records no error of its own (training/launch.py reports the process that failed first)."""


@dataclass
class Distributed:
    rank: int = 0  # global rank; 0 is the main process, the only one writing the run's files
    world_size: int = 1
    local_rank: int = 0  # rank on this machine; local rank 0 builds the machine's caches
    accelerator: Any = field(default=None, repr=False)

    @classmethod
    def single(cls) -> Distributed:
        return cls()

    @classmethod
    def from_environment(cls, device_type: str) -> Distributed:
        """The process group of a launched worker (gloo on CPU, NCCL on CUDA), or a single process."""
        if not in_worker() or int(os.environ["WORLD_SIZE"]) == 1:
            return cls.single()
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device_type != "cuda")
        state = accelerator.state
        return cls(state.process_index, state.num_processes, state.local_process_index, accelerator)

    @property
    def multi(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device Accelerate gave this process (cuda:<local rank> or cpu); None for a single process."""
        if self.accelerator is None:
            return None
        device = self.accelerator.device
        return device if device.type == "cuda" else type(device)("cpu")  # Accelerate's "cpu:0" is the CPU

    def shard(self, count: int) -> tuple[int, int]:
        """This process's [start, end) of `count` samples: as even as possible, in rank order (a batch
        of B x world_size gives rank r the samples r*B to (r+1)*B - 1; a smaller one gives some ranks
        one sample fewer, or none)."""
        return self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size

    # --- collectives (none when single) ---------------------------------------------------------
    def sum_gradients(self, parameters: list[torch.Tensor], loss: torch.Tensor, stop: bool) -> tuple[float, bool]:
        """Sum every process's gradients of `parameters`, its loss share and its stop flag in one all-reduce
        (the only collective of a step); the gradients are replaced by the sums. The global loss, and whether
        any process asked to stop (the same answer on every process)."""
        import torch

        if not self.multi:
            return loss.item(), stop
        parts = [p.grad.reshape(-1) if p.grad is not None else torch.zeros_like(p).reshape(-1) for p in parameters]
        dtype = parts[0].dtype
        flag = torch.tensor([float(stop)], dtype=dtype, device=loss.device)
        buffer = torch.cat([*parts, loss.reshape(1).to(dtype), flag])
        self._all_reduce(buffer)
        offset = 0
        for parameter in parameters:
            size = parameter.numel()
            parameter.grad = buffer[offset : offset + size].view_as(parameter).clone()
            offset += size
        return buffer[offset].item(), buffer[offset + 1].item() > 0

    def sum_values(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes (e.g. a validation loss total and its item count)."""
        import torch

        if not self.multi:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self._all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request, a signal, auto_stop_on)."""
        return self.sum_values([float(flag)])[0] > 0 if self.multi else flag

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), by rank, on every process."""
        import torch.distributed as dist

        if not self.multi:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        with self._peers("gathering"):
            dist.all_gather_object(gathered, value)
        return gathered

    def broadcast(self, value: Any) -> Any:
        """The main process's `value` (picklable; ignored elsewhere), on every process: what only machine 0's
        run directory holds, such as the checkpoint a resume continues from."""
        import torch.distributed as dist

        if not self.multi:
            return value
        box = [value if self.is_main else None]
        with self._peers("receiving the main process's state"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every process (while the main one renders samples, saves, or a machine builds caches)."""
        if self.multi:
            with self._peers("waiting for the others"):
                self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Leave the process group together after a run that ended well (a process that exits while gloo's
        threads still run aborts)."""
        import torch.distributed as dist

        if self.multi and dist.is_initialized():
            self.barrier()
            with self._peers("leaving the process group"):
                dist.destroy_process_group()

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The body runs in this machine's first process, then in the others (which find its results)."""
        if not self.is_local_main:
            self.barrier()
        yield
        if self.is_local_main:
            self.barrier()

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        import torch.distributed as dist

        with self._peers("summing"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    @contextmanager
    def _peers(self, doing: str) -> Iterator[None]:
        """A collective's failure (gloo/NCCL raise RuntimeError or DistBackendError when a peer is gone) as
        PeerLost, so that this process is not blamed for it (launch.root_cause)."""
        import torch.distributed as dist

        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            raise PeerLost(f"process {self.rank} lost its peers while {doing}: {exc}") from exc

    # --- the run's processes --------------------------------------------------------------------
    def processes(self, device: torch.device) -> list[dict]:
        """Each process's rank, pid, host and device, for status.json (gathered once, at start)."""
        return self.gather({"rank": self.rank, "pid": os.getpid(), "host": socket.gethostname(), "device": str(device)})

    def record_failure(self, message: str) -> None:
        """Write this worker's error where torch elastic reads it (TORCHELASTIC_ERROR_FILE, in the format of
        its ErrorHandler), so the launcher reports it as this rank's failure."""
        path = os.environ.get("TORCHELASTIC_ERROR_FILE")
        if not self.multi or not path:
            return
        data = {"message": {"message": message, "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time()))}}}
        with open(path, "w", encoding="utf-8") as file:
            json.dump(data, file)

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self, state: dict) -> dict:
        """`state` plus every rank's own random state (gathered to all; the main process saves it)."""
        if not self.multi:
            return state
        mine = {key: state[key] for key in RANK_STATE_KEYS if key in state} | {"vae_rng": state["data"]["vae_rng"]}
        return {**state, "world_size": self.world_size, "ranks": self.gather(mine)}

    def own_state(self, state: dict) -> dict:
        """This rank's view of a checkpoint's state: its own random state when the checkpoint was written by
        the same number of processes (exact); otherwise the main process's, with a warning."""
        saved = state.get("world_size", 1)
        if saved == self.world_size:
            if not self.multi:
                return state
            mine = dict(state["ranks"][self.rank])
            data = {**state["data"], "vae_rng": mine.pop("vae_rng")}
            return {**state, **mine, "data": data}
        if self.is_main:
            log.warning(
                "the checkpoint was written by %d process(es), this run has %d: the LoRA, optimizer, schedule, "
                "noise and data position continue, but the batches of the current epoch are split anew (some "
                "images of it may be seen twice or not at all) and per-process random streams (LoRA dropout, "
                "VAE sampling without cached latents) restart from the main process's",
                saved,
                self.world_size,
            )
        return state
