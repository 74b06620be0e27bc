"""Training in several processes, torch.distributed with the gloo backend (CPU), the model wrapped in
DistributedDataParallel. Two ways in:

    siftc train ... --nproc 2                                  # this machine: siftc spawns 2 processes
    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29400 -m siftc train ...      # a launcher's group (one line per node)

A launcher (torchrun, or any that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT) starts the
processes and siftc joins its group (init from the environment). Rank 0 alone reads and writes RUN/: it
checks and locks it, loads the checkpoint, and sends the settings and the checkpoint to the other ranks,
which load the artifact and the data themselves (the same files at the same paths on every node, checked
by digest) and never touch RUN/, so RUN/ needs no shared file system. A rank that cannot start says why
and every rank stops before RUN/ is written.

Each process takes a 1/N slice of every global batch; DDP averages the gradients, so all ranks apply the
same update. Masks stay identical because the scheduler all-reduces RigL's dense gradients and
broadcasts every new mask from rank 0 (see siftc.sparse.schedulers); at the end the ranks check that
their weights and masks agree. Rank 0 alone logs, checkpoints and saves. With --nproc each process gets
cores / N intra-op threads, so N processes do not oversubscribe the machine; under a launcher, --threads
or the launcher's OMP_NUM_THREADS (torchrun: 1 with several processes a node).
"""
import contextlib
import dataclasses
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siftc.errors import SiftcError, UsageError
from siftc.train.config import TrainConfig

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what init from env:// reads


class LeadStopped(SiftcError):
    """Rank 0 (or another rank) could not start the run and says why; this rank ends without a word of
    its own (exit code 2), so the reason is printed once."""


@dataclasses.dataclass(frozen=True)
class Group:
    """The process group a launcher described in the environment."""
    rank: int
    world: int

    def config(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with nproc = the launcher's world size; a different --nproc is refused."""
        if cfg.nproc not in (1, self.world):
            raise nproc_with_launcher(self.world)
        return dataclasses.replace(cfg, nproc=self.world)


def nproc_with_launcher(world: int) -> UsageError:
    return UsageError(f"--nproc with a launcher: the launcher (torchrun) already started this process as "
                      f"one of WORLD_SIZE={world}; drop --nproc (it is the single-machine shortcut)")


def launched() -> Group | None:
    """The launcher's group when RANK or WORLD_SIZE is set; None when no launcher started this process."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    missing = [v for v in LAUNCHER_ENV if not os.environ.get(v)]
    if missing:
        raise UsageError(f"the environment sets {', '.join(v for v in LAUNCHER_ENV if v not in missing)} but "
                         f"not {', '.join(missing)}: a launcher (torchrun) sets all of {', '.join(LAUNCHER_ENV)}; "
                         f"set them all, or unset RANK and WORLD_SIZE to train without a launcher")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise UsageError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                         f"integers (a launcher sets them)") from None
    if not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in [0, WORLD_SIZE={world}); check the launcher's settings")
    return Group(rank, world)


def run_launched(group: Group, claim, progress, given: TrainConfig | None = None) -> dict | None:
    """This process's rank of a launched run. `claim` (rank 0 only) is the context that checks, locks and
    loads RUN/ (siftc.train.loop); `given`, the settings this rank was started with, if any (a new run:
    every rank must be given the same). Returns the summary on rank 0, None on the others."""
    dist.init_process_group("gloo")  # init_method env://, from the launcher's variables
    try:
        summary = _lead(group, claim, progress) if group.rank == 0 else _follow(group, given)
        dist.barrier()  # as in _worker: nobody tears down gloo while a peer still uses it
        return summary
    finally:
        dist.destroy_process_group()


def _lead(group: Group, claim, progress) -> dict:
    from siftc.train.loop import run
    with contextlib.ExitStack() as held:
        with _telling_the_others():
            c = held.enter_context(claim())
            if c.cfg.nproc != group.world:  # a resumed run: its checkpoint holds one RNG state a rank
                raise UsageError(f"{c.cfg.out} trained on {c.cfg.nproc} process(es), this launcher starts "
                                 f"{group.world}; resume it with WORLD_SIZE={c.cfg.nproc}, or without a "
                                 f"launcher: siftc train --resume {c.cfg.out}")
        _broadcast(("go", c.cfg.to_json(), c.digests, c.state))
        _all_ready(group, None)
        with _telling_the_others():
            run_id = c.begin()["run_id"]
        _broadcast(("go", run_id))
        run(c.cfg, run_id, progress, rank=0, world=group.world, prepared=c.prepared, state=c.state)
    return json.loads((Path(c.cfg.out) / "summary.json").read_text())


def _follow(group: Group, given: TrainConfig | None) -> None:
    from siftc.train.loop import input_digests, prepare, run
    _, settings, digests, state = _received()
    cfg, prepared, error = TrainConfig.from_json(settings), None, None
    try:
        if given is not None:
            _same_settings(group, given, cfg)
        prepared = prepare(cfg, lead=False)
        if input_digests(cfg) != tuple(digests):
            raise UsageError(f"rank {group.rank}'s artifact {cfg.artifact} or data {cfg.data} differs from rank "
                             f"0's (by digest); every node must see the same files at the same paths")
    except SiftcError as e:
        error = e
    _all_ready(group, error)
    _, run_id = _received()
    run(cfg, run_id, None, rank=group.rank, world=group.world, prepared=prepared, state=state)


def _same_settings(group: Group, given: TrainConfig, cfg: TrainConfig):
    mine, lead = given.to_json(), cfg.to_json()
    off = [k for k in lead if mine.get(k) != lead[k]]
    if off:
        k = off[0]
        raise UsageError(f"rank {group.rank} was started with {k}={mine.get(k)!r}, rank 0 with {lead[k]!r}; "
                         f"start every node with the same siftc command")


@contextlib.contextmanager
def _telling_the_others():
    """On rank 0: an error in the block stops the other ranks (LeadStopped) and is raised here."""
    try:
        yield
    except Exception:
        _broadcast(("stop",))
        raise


def _broadcast(message: tuple):
    dist.broadcast_object_list([message], src=0)


def _received() -> tuple:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "stop":
        raise LeadStopped("rank 0 stopped the run")
    return box[0]


def _all_ready(group: Group, error: SiftcError | None):
    """Every rank says whether it could start; if one could not, all stop: that rank and rank 0 say why."""
    every = [None] * group.world
    dist.all_gather_object(every, None if error is None else str(error))
    failed = [(rank, message) for rank, message in enumerate(every) if message]
    if not failed:
        return
    if error is not None:
        raise error
    if group.rank == 0:
        rank, message = failed[0]
        raise UsageError(f"rank {rank} cannot start: {message}")
    raise LeadStopped(f"rank {failed[0][0]} cannot start")


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
    from siftc.train import checkpoint
    from siftc.train.loop import run
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.nproc))
    dist.init_process_group("gloo", rank=rank, world_size=cfg.nproc)
    try:
        run(cfg, run_id, progress, rank=rank, world=cfg.nproc, state=checkpoint.load(Path(cfg.out), run_id))
        # Both ranks finished before either tears down its gloo connections: a rank whose peer has
        # already closed them can abort in gloo's own thread ("terminate called", seen once in CI).
        dist.barrier()
    except SiftcError as e:
        if errors is None:
            raise
        errors.put((type(e), str(e)))
    finally:
        dist.destroy_process_group()
