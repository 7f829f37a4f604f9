"""
The run helpers every command shares: one process or many (torchrun), the device and its precision, the
one-line errors, the time and the GPU's peak for the progress lines. Nothing here knows CCA's data; of its model,
only how to count its FLOPs.

    from runtime import setup, cleanup, exit_rank, print0
    rank, world, device = setup(args.device)   # torchrun: a process group; plain python: one process
    ...
    cleanup(finished)                           # from a command's main; `exit_rank(main)` as the script's last line
"""

import argparse
import datetime
import multiprocessing
import os
import signal
import sys
from contextlib import contextmanager, suppress

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from cca import build_model

# -----------------------------------------------------------------------------
# distributed: `python X.py` is one process with no process group; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK


def setup(device_arg, timeout_s=None):
    """(rank, world size, device). Under torchrun: a process group (nccl on CUDA, gloo on the CPU), one GPU per
    local rank, collectives that give up after `timeout_s` (default: torch's); else one process on `device_arg`
    (default: the GPU when there is one)."""
    if "RANK" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available() and device_arg != "cpu"
        timeout = {} if timeout_s is None else dict(timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(backend="nccl" if cuda else "gloo", **timeout)
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
    else:
        rank, world = 0, 1
        device = default_device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # DDP and set_device want an index
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return rank, world, device


def cleanup(finished):
    """Tear the process group down. After a finished run every rank first waits at a barrier, so that no rank
    leaves while rank 0 still validates and saves. After an error there is no barrier: the other ranks may never
    reach it."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def exit_rank(main):
    """Run a command's main; under torchrun, leave with os._exit once it has returned, after flushing the output.

    A rank must not go through the interpreter's finalization: gloo's worker threads outlive
    destroy_process_group, and one that drops the last reference to a collective's Python-owned tensors (the last
    all_gather or all_reduce) asks for the GIL; during finalization Python ends such a thread with pthread_exit,
    which unwinds through a noexcept destructor and aborts the whole process ("terminate called without an
    active exception", SIGABRT) after the run has finished. docs/LOG.md has the backtrace. Everything a command
    writes (checkpoints, an index, JSON) is complete and renamed into place before main returns."""
    if "RANK" not in os.environ:  # one process, no process group: an ordinary exit
        return main()
    try:
        main()
        code = 0
    except SystemExit as e:  # main's one-line errors and argparse's exits
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print0(*a, **kw):
    """print on rank 0 only (every process when there is no process group), flushed."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# -----------------------------------------------------------------------------
# device, precision and mode


def default_device(name=None):
    """torch.device(name), or by default the GPU when there is one, else the CPU."""
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def device_arg(text):
    """argparse type of --device: a device this machine has, or a flag error now rather than a traceback later."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                                         "use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def number(kind=int, low=None, above=None, high=None):
    """argparse type of a numeric flag: `kind` (int or float), at least `low`, above `above`, at most `high`; a value
    outside is a flag error naming the bound, before anything runs. The one check every command's numbers share."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if low is not None and v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        if above is not None and not v > above:
            raise argparse.ArgumentTypeError(f"must be above {above}, got {text}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def output_folder(path, what="output folder"):
    """Refuse, with one line, an output folder that is a file or cannot be written; create it when missing."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path}: is a file, not a folder: give a folder as the {what}")
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: the {what} cannot be written (read-only?)")
    return path


def output_file(path, what="output file"):
    """Refuse, with one line, an output file that names a folder or whose folder is a file or read-only; create its
    folder when missing. Called before the work whose result it receives, not after."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path}: is a folder: give a file name as the {what}")
    output_folder(os.path.dirname(os.path.abspath(path)), f"folder of the {what}")
    return path


@contextmanager
def held(path, what):
    """Hold `path` (a lock file holding the holder's pid) for the block: one live process at a time writes `what`.
    Another live holder is refused with one line naming it; a lock left by a process that is gone is taken over.
    The lock appears whole or not at all: the pid is written to a file of this process's own, then hard-linked."""
    mine = f"{path}.{os.getpid()}.tmp"
    with open(mine, "w") as f:
        f.write(str(os.getpid()))
    try:
        for _ in range(3):
            try:
                os.link(mine, path)  # fails if the lock exists
                break
            except FileExistsError:
                try:
                    pid = int(open(path).read().strip())
                except FileNotFoundError:  # its holder just left: try again
                    continue
                except (OSError, ValueError):
                    pid = 0
                if pid > 0 and pid != os.getpid() and _alive(pid):
                    raise OSError(f"{what} is being written by another run (process {pid}; {path}): wait for it, or "
                                  "choose another output") from None
                with suppress(FileNotFoundError):
                    os.remove(path)  # its writer is gone
        else:
            raise OSError(f"{path}: cannot take the lock of {what}")
    finally:
        os.remove(mine)
    try:
        yield
    finally:
        with suppress(OSError, ValueError):
            if int(open(path).read().strip()) == os.getpid():  # ours still, not a lock another process took over
                os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent alone, which ends the workers
    # the pool ends its workers with SIGTERM: not the parent's handler (Ctrl-C's), under which a worker waiting on
    # the task queue's lock could outlive it and hang the parent's join
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


@contextmanager
def worker_pool(workers):
    """A process pool whose workers ignore Ctrl-C: closed and joined when the block ends, terminated when it is left by
    an error or Ctrl-C. SIGINT and SIGTERM are held back while it forks: one arriving during a fork would be raised
    inside an at-fork hook, where Python prints it and drops it, and the command would run on."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        pool = multiprocessing.Pool(workers, initializer=_worker_init)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        raise
    with pool:  # on an error or Ctrl-C: terminate
        signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a signal held back during the forks is raised here
        yield pool
        pool.close()  # done: the workers finish and leave by themselves
        pool.join()


def model_device(model):
    """The device a model's weights are on."""
    return next(model.parameters()).device


def autocast(device, enabled=None):
    """bf16 autocast on `device`: on for CUDA and off elsewhere (the CPU runs fp32), unless `enabled` says otherwise."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" if enabled is None else enabled)


@contextmanager
def evaluating(model):
    """model in eval mode inside the block; its own mode (train or eval) restored after, on an error too."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# -----------------------------------------------------------------------------
# what a command prints


def error_message(e):
    """An error's message for the one `error: ...` line of a command. An exception raised in a DataLoader worker
    comes back re-raised by torch as "Caught OSError in DataLoader worker process 0." and the worker's traceback,
    whose last line holds the original message (the one that names the file): that message, without its type."""
    lines = str(e).strip().splitlines()
    if lines and lines[0].startswith("Caught ") and " in DataLoader worker process " in lines[0]:
        return lines[-1].split(": ", 1)[-1]
    return str(e)


def fmt_time(s):
    """Seconds as h:mm:ss, for ETAs and durations."""
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -----------------------------------------------------------------------------
# model FLOPs utilisation (MFU): FLOPs counted per image, against the GPU's dense bf16 peak

# Dense (no sparsity) bf16 tensor-core peaks of NVIDIA's data sheets, in TFLOP/s: the first entry whose words all
# appear in torch.cuda.get_device_name() (case ignored) is the GPU.
GPU_PEAKS = [(("h100", "pcie"), "H100 PCIe", 756), (("h100", "nvl"), "H100 NVL", 835), (("h100",), "H100 SXM", 989),
             (("h200", "nvl"), "H200 NVL", 835), (("h200",), "H200 SXM", 989), (("a100",), "A100", 312)]


def gpu_peak(device):
    """(name, dense bf16 FLOP/s) of a known CUDA GPU, else None: no MFU without a peak."""
    name = torch.cuda.get_device_name(device).lower()
    for words, label, tflops in GPU_PEAKS:
        if all(w in name for w in words):
            return f"{label} {tflops} TFLOP/s dense bf16", tflops * 1e12
    return None


def training_flops(cfg):
    """FLOPs of one image in a training step: forward and backward of a triplet (3 images), divided by 3, counted
    by torch's FlopCounterMode on the meta device, where nothing is allocated or computed. It counts matmuls,
    convolutions and attention (as its two matmuls), not norms or element-wise ops: eq. 9's loss is element-wise,
    so the backward of the embeddings' sum has the training step's count."""
    with torch.device("meta"):
        model = build_model(cfg)
        x, c = torch.zeros(3, 3, cfg.img_size, cfg.img_size), torch.zeros(3, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x, c).sum().backward()
    return counter.get_total_flops() / 3
