"""Data-parallel training across processes, started by torchrun (one process per GPU, or CPU
processes).

    torchrun --standalone --nproc_per_node=4 train_wrn_ebm.py ...    # one node, 4 GPUs
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST \
        --master_port=29500 train_wrn_ebm.py ...    # two nodes (node_rank 1 on the other)


Each process (rank) keeps its own shard of the replay buffer (buffer_size / world_size images) and
runs its own SGLD chains on its own share of the data; gradients are averaged by
DistributedDataParallel. Rank 0 alone logs, plots and writes checkpoints; a checkpoint holds the
whole buffer, the shards in rank order.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from jem.errors import UserError


@dataclass(frozen=True)
class Topology:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init_from_torchrun(device_name):
    """The process's place in the run, from the variables torchrun sets (none: a single process).

    GPUs use nccl, one device per local rank; CPUs use gloo.
    """
    if "RANK" not in os.environ:
        return Topology()
    topology = Topology(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                        int(os.environ["LOCAL_RANK"]))
    use_cuda = torch.cuda.is_available() and (device_name or "cuda").startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(topology.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return topology


def device_for(topology, device):
    """Rank r of a GPU run uses cuda:local_rank; a CPU run shares the CPU."""
    if topology.distributed and device.type == "cuda":
        return torch.device("cuda", topology.local_rank)
    return device


def shard(full, topology):
    """This rank's contiguous share of a whole replay buffer (what `gather` put together)."""
    if len(full) % topology.world_size:
        raise UserError(f"a replay buffer of {len(full)} images cannot be split evenly over "
                        f"{topology.world_size} processes; choose a --buffer_size (or a process "
                        "count) that divides")
    size = len(full) // topology.world_size
    return full[topology.rank * size:(topology.rank + 1) * size]


def gather(images, topology):
    """Every rank's buffer shard, concatenated in rank order (all ranks must call this)."""
    if not topology.distributed:
        return images
    shards = [torch.empty_like(images) for _ in range(topology.world_size)]
    dist.all_gather(shards, images.contiguous())
    return torch.cat(shards)


def gather_objects(obj, topology):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. RNG states)."""
    if not topology.distributed:
        return [obj]
    objects = [None] * topology.world_size
    dist.all_gather_object(objects, obj)
    return objects


def broadcast(obj, topology):
    """Rank 0's picklable object (tensors included) on every rank (all ranks must call this)."""
    if not topology.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag_value, topology, device):
    """The largest value over ranks: one rank's divergence or stop request stops them all
    together."""
    if not topology.distributed:
        return flag_value
    value = torch.tensor(flag_value, dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def shutdown(topology):
    if topology.distributed:
        dist.destroy_process_group()
