"""Several processes under torchrun: the process group, each process's share of a batch, and the decisions
that every process must take together (stop at this step, the checkpoint was written).

    torchrun --nproc_per_node=2 run.py --mode train

DistributedDataParallel averages the gradients; everything else follows from one rule: every process draws
the same random numbers as one process would for the whole global batch, and keeps only its share. So N
processes train the same run as one process at the same --batch-size, up to the order in which gradients
are summed. Started by plain `python`, World() is one process and every method is the identity, so a
single-process run does exactly what it did before.
"""
import datetime
import os
import re
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from errors import UserError

# A collective that waits longer than this ends the run with an error: a process died or stopped answering.
# Long enough for rank 0's work that the others wait for (a checkpoint, a --eval-every evaluation on a CPU).
TIMEOUT = datetime.timedelta(minutes=30)


def launched():
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank():
    """This process's rank under torchrun, 0 otherwise (readable before the process group exists)."""
    return int(os.environ.get("RANK", "0"))


def local_rank():
    """This process's rank on its machine under torchrun, 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def use_local_gpu():
    """Under torchrun, make this process's GPU the current one before anything touches CUDA (otherwise every
    process would open a context on GPU 0 at its first CUDA call)."""
    if launched() and torch.cuda.is_available() and local_rank() < torch.cuda.device_count():
        torch.cuda.set_device(local_rank())


class World:
    """The processes of one training: rank 0 writes, all of them train and decide together."""

    def __init__(self, rank=0, size=1, device=None, control=None):
        self.rank, self.size, self.device, self.control = rank, size, device, control

    @property
    def main(self):
        return self.rank == 0

    @property
    def machine_main(self):
        """The first process on its machine: it alone fetches what every process there reads (the data)."""
        return self.size == 1 or local_rank() == 0

    def share(self, n):
        """This process's slice of a batch of n (n divides by the world size: check_batch)."""
        part = n // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def check_batch(self, batch_size):
        if batch_size % self.size:
            fit = max(self.size, batch_size // self.size * self.size)
            raise UserError(f"--batch-size {batch_size} is the global batch and must divide among the {self.size} "
                            f"processes; pass a multiple of {self.size}, such as {fit}", everywhere=True)

    def wrap(self, model):
        """The network as the training step calls it: DDP averages its gradients over the processes."""
        if self.size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)

    def largest(self, *values):
        """Each value's largest over the processes: one small Gloo all-reduce on the CPU, no device sync."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return tuple(t.tolist())

    def same(self, value, what):
        """Check that every process holds the same number (the step of the checkpoint each one resumes)."""
        low, high = self.largest(-value, value)
        if -low != high:
            raise UserError(f"the processes {what} differ ({-low:g} against {high:g}); give every machine the same "
                            f"file, on a filesystem they share, with --checkpoint PATH", everywhere=True)

    def all_ok(self, ok, what):
        """Whether every process succeeded at `what`; the ones that did raise a one-line error (printed by
        rank 0 only) if another did not, so every process stops at the same point."""
        if self.size > 1 and self.largest(float(not ok))[0] and ok:
            raise UserError(f"{what} failed in another process of this run; see its error", everywhere=True)

    def mean_(self, tensor):
        """Average a device tensor over the processes, in place (the loss, at log points)."""
        if self.size > 1:
            dist.all_reduce(tensor)
            tensor /= self.size
        return tensor


def start(device):
    """(World, device) of this process. Under torchrun with several processes: join the process group (NCCL
    on CUDA, each process on the GPU of its local rank; Gloo on the CPU), print only on rank 0, and let
    SIGTERM (torchrun ends every process when one fails) unwind cleanly. Otherwise one process on device."""
    if not launched():
        return World(device=device), device
    if device.type == "mps":
        raise UserError("torchrun with several processes needs --device cuda or cpu (MPS is one GPU with no "
                        "collective backend); run python run.py alone on a Mac", everywhere=True)
    local = local_rank()
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"--nproc_per_node asks for GPU {local} but this machine has "
                            f"{torch.cuda.device_count()}; start at most that many processes per machine",
                            everywhere=True)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    # Decisions (stop here? written?) go over Gloo on the CPU, so they never wait for the GPU's queue.
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if device.type == "cuda" else None
    world = World(dist.get_rank(), dist.get_world_size(), device, control)
    if not world.main:
        sys.stdout = open(os.devnull, "w")  # one log, one progress bar: rank 0's
    signal.signal(signal.SIGTERM, terminated)
    return world, device


def terminated(signum, frame):
    raise UserError("stopped by SIGTERM (torchrun stops every process when one of them fails; see its error "
                    "above); the last checkpoint is kept")


def stop(world):
    """Leave the process group at the end of a run that went well (a no-op for one process). After an error
    the process just exits: with NCCL, leaving could block on an operation a lost process never answers."""
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def end_process(code):
    """Exit with `code`. Under torchrun the interpreter's teardown is skipped (os._exit after flushing): with
    Gloo on the CPU (torch 2.14) it aborted one run in three here, after the run had finished and every file
    was written ("terminate called without an active exception", exit -6), and torchrun then reported the
    whole run as failed. Nothing is left to do at that point: checkpoints are fsynced, the lock is the OS's."""
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    else:
        sys.exit(code)


def peer_lost(error):
    """Whether an exception is a collective's failing because another process died or timed out: NCCL raises
    DistError; Gloo raises a plain RuntimeError naming itself or the lost connection."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return (type(error) is RuntimeError
            and any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")))


def peer_failed(error):
    """The one-line error for a collective that failed because another process is gone."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0][:120]  # Gloo's "[.../pair.cc:545] Read error ..."
    return UserError(f"another process of this torchrun run ended or stopped answering ({reason}); every process "
                     f"stops, and the last checkpoint is kept")
