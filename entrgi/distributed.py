"""Multi-process generation under ``torchrun``: batches split across ranks, results
gathered on rank 0 in batch order. NCCL on GPUs, gloo on CPU; one process = world 1."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from entrgi.sampler import BatchedGeneration, PromptResult

BatchResults = tuple[int, list[PromptResult]]


@dataclass(frozen=True)
class World:
    """This process's place in the job (``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device: str) -> tuple[World, str]:
    """Join the ``torchrun`` job if there is one. Returns the world and this rank's
    device: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    # torch.distributed.nn.functional takes group.WORLD as default arguments when first
    # imported: imported once a group exists (transformers' model code imports it), it
    # keeps that group alive past destroy_process_group, and gloo's threads, still
    # running at exit, can abort the process. So it is imported before the group.
    importlib.import_module("torch.distributed.nn")
    if torch.device(device).type == "cuda":
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return world, device


def close_world(world: World, synchronize: bool = True) -> None:
    """Leave the job. ``synchronize`` first waits for every rank, so that no rank tears
    down its communication threads while another still talks to it (gloo can abort the
    process then); pass False after an error, when another rank may never arrive."""
    if world.size > 1:
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def broadcast(world: World, value):
    """``value`` from rank 0 on every rank (a picklable object)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_batches(
    job: BatchedGeneration,
    world: World,
    batches: Sequence[int],
    on_round: Callable[[list[BatchResults]], None] | None = None,
    progress: bool = False,
) -> list[BatchResults]:
    """Run ``batches`` in rounds of one batch per rank (round-robin); after each round
    rank 0 receives that round's results in batch order and passes them to
    ``on_round`` (e.g. to append them to a results file). Returns every batch's
    results on rank 0, nothing on the others."""
    collected: list[BatchResults] = []
    rounds = range(0, len(batches), world.size)
    if progress and world.is_main and len(rounds) > 1:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="batches", unit="round")
    for start in rounds:
        mine = start + world.rank
        local = (
            (batches[mine], job.run_batch(batches[mine], progress and world.size == 1)) if mine < len(batches) else None
        )
        gathered = [local] if world.size == 1 else _gather(world, local)
        if world.is_main:
            finished = sorted((item for item in gathered if item is not None), key=lambda item: item[0])
            collected += finished
            if on_round is not None:
                on_round(finished)
    return collected


def _gather(world: World, local: BatchResults | None) -> list[BatchResults | None]:
    received = [None] * world.size if world.is_main else None
    dist.gather_object(local, received, dst=0)
    return received or []
