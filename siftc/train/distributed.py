"""`--nproc N`: N processes on this machine, torch.distributed with the gloo backend (CPU), the model
wrapped in DistributedDataParallel.

Each process takes a 1/N slice of every global batch; DDP averages the gradients, so all ranks apply the
same update. Masks stay identical because the scheduler all-reduces RigL's dense gradients and
broadcasts every new mask from rank 0 (see siftc.sparse.schedulers); at the end the ranks check that
their weights and masks agree. Rank 0 alone logs, checkpoints and saves. Each process gets
cores / N intra-op threads, so N processes do not oversubscribe the machine.
"""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siftc.errors import SiftcError
from siftc.train.config import TrainConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: TrainConfig, run_id: str, progress=None):
    """Run `cfg` in cfg.nproc processes and wait for all of them. A SiftcError in a worker (a diverged
    loss, a full disk) is raised here as it was raised there, not as a worker's traceback."""
    port = free_port()
    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(cfg, run_id, progress, port, errors), nprocs=cfg.nproc, join=True)
    if not errors.empty():
        kind, message = errors.get()
        raise kind(message)


def _worker(rank: int, cfg: TrainConfig, run_id: str, progress, port: int, errors=None):
    from siftc.train.loop import run
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc))
    dist.init_process_group("gloo", rank=rank, world_size=cfg.nproc)
    try:
        run(cfg, run_id, progress, rank=rank, world=cfg.nproc)
        # Both ranks finished before either tears down its gloo connections: a rank whose peer has
        # already closed them can abort in gloo's own thread ("terminate called", seen once in CI).
        dist.barrier()
    except SiftcError as e:
        if errors is None:
            raise
        errors.put((type(e), str(e)))
    finally:
        dist.destroy_process_group()
