"""The processes of a run: rank, world size and device from torchrun's environment."""
import os

import torch
import torch.distributed as dist

from .errors import UsageError


def resolve_device(name: str) -> torch.device:
    """'auto' (a GPU if there is one), 'cpu' or 'cuda'; a :class:`UsageError` for 'cuda' without a GPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: expected a CUDA device, none is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Distributed:
    """Rank, world size and device, from torchrun's environment (a single process without it).

    Under torchrun the process group is nccl on GPUs and gloo on CPUs; rank 0 logs and saves.
    """

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over ranks of a float64 tensor on this process's device."""
        if self.enabled:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, obj) -> list:
        """`obj` of every rank, in rank order (picklable objects, e.g. RNG states)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
