"""Device and precision: which accelerator to run on, whether bf16 autocast pays there, torch.compile."""
import functools
import time

import torch

from errors import UserError


def pick_device(name):
    """torch.device for auto, cuda, mps or cpu; auto prefers cuda, then mps."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    elif name == "cuda":
        if not cuda:
            raise UserError("--device cuda: no CUDA GPU is available to PyTorch here; use --device cpu or auto")
        return torch.device("cuda")
    elif name == "mps":
        if not mps:
            raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
        return torch.device("mps")
    elif name == "cpu":
        return torch.device("cpu")
    else:
        raise UserError(f"unknown --device {name!r}; choose auto, cuda, mps or cpu")


def sync(device):
    """Wait for the device's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


@functools.lru_cache(maxsize=None)
def bf16_is_faster(device):
    """Time a 512x512 matmul in fp32 and bf16 on a CPU: bf16 only pays where it is native. Measured once
    per process; pick_precision asks it for CPUs only (on a GPU so short a timing cannot decide). Small on
    purpose: where bf16 is emulated (CPUs without AVX-512 bf16 or AMX) one 1024x1024 bf16 matmul took
    3.8 s here, against 0.06 s in fp32. The fastest of three timings of each, so that a busy moment of the
    machine cannot decide: where bf16 is native it takes half fp32's time (0.50 here), and one evaluation
    in nineteen had fallen back to fp32 when the check summed three timings."""
    a = torch.randn(512, 512, device=device)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        b = a.to(dtype)
        b @ b  # warm-up
        best = float("inf")
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            b @ b
            sync(device)
            best = min(best, time.perf_counter() - t0)
        times[dtype] = best
    return times[torch.bfloat16] < 0.7 * times[torch.float32]


def pick_precision(name, device):
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    elif name == "bf16":
        if device.type == "mps":
            raise UserError("--precision bf16 is not supported on MPS; use --precision fp32 or auto")
        return torch.bfloat16
    elif name == "auto":
        # bf16 only on a CPU that runs it natively. Never on MPS (unproven there) nor CUDA: this small network
        # is launch-bound on a GPU, where autocast's casts cost more than bf16 saves (an H100 trained 4,237
        # images/s in fp32 against 3,250 in bf16 at batch 64, bench.py), and a matmul timed there to decide
        # is too short to tell the two apart (runs started side by side chose differently).
        return torch.bfloat16 if device.type == "cpu" and bf16_is_faster(device) else None
    else:
        raise UserError(f"unknown --precision {name!r}; choose auto, fp32 or bf16")


def pick_hardware(device="auto", precision="auto", compile=False):
    """(device, autocast dtype or None) from the names, each checked for this machine."""
    device = pick_device(device)
    if compile and device.type == "mps":
        raise UserError("--compile is not supported on MPS; drop --compile")
    return device, pick_precision(precision, device)


def autocast(device, dtype):
    """bf16 autocast when dtype is set, else a no-op context."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def maybe_compile(model, compile):
    """torch.compile when asked. The compiled wrapper shares the model's parameters, and checkpoints
    always save the plain model, so they load without compiling."""
    return torch.compile(model) if compile else model


def rng_state(device):
    """The global generators' states (CPU and the device's), for an exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])
