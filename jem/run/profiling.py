"""Measuring a training step: its time, memory, time in convolutions, FLOPs and the device's peak.

bench.py uses these; each also works on its own, e.g. from a notebook:

    flops = count_flops(step, *batch)                   # FLOPs of one call, forward and backward
    rate = flops / seconds_per_step                     # achieved FLOP/s
    peak = peak_rate(device, torch.float32)             # what the hardware can do in that dtype
    print(f"{rate / peak['flops_per_s']:.0%} of {peak['source']}")

FLOPs are counted as torch.utils.flop_counter counts them: the matrix products and convolutions
(2 FLOPs per multiply-add), forward and backward, and nothing else (activations, batch norm and
optimizer updates are memory-bound and add little arithmetic). torch's FlopCounterMode cannot count
the SGLD chain in one region: its module tracker hooks every module's output for the backward
pass, and `torch.autograd.grad(..., [x])` run inside the region raises ("A leaf node was passed to
_will_engine_execute_node ..."). `OperatorFlops` therefore applies FlopCounterMode's own
per-operator formulas (`flop_registry`) below autograd, without the tracker, so one region counts
every forward and every backward of a whole iteration. tests/test_flops.py checks that it gives
the sum of FlopCounterMode's counts of a chain step's forward and of its autograd.grad, counted in
two regions (which works), and 2 * multiply-adds of a known convolution and linear layer.

The peak a step is compared with: on a CPU, the rate of a large matrix product of the same dtype,
measured in the same process on the same threads (no datasheet knows a virtual machine's clock or
its neighbours); on a GPU, the vendor's dense peak of the named GPU (GPU_PEAKS), with the measured
rate of a matrix product beside it.
"""
import multiprocessing
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternately(sides, batch, iters, warmup, device):
    """Seconds per iteration of each side (an object with step(*batch)), timed in turns, the order
    flipping every round, so that a machine shared with other work slows every side alike."""
    for _ in range(warmup):
        for side in sides.values():
            side.step(*batch)
    seconds = {name: [] for name in sides}
    for i in range(iters):
        for name in (list(sides) if i % 2 == 0 else reversed(sides)):
            synchronize(device)
            start = time.perf_counter()
            sides[name].step(*batch)
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


# --------------------------------------------------------------------------------------------------
# Memory.

def peak_resident_bytes():
    """This process's peak resident set size. Linux's VmHWM, unlike ru_maxrss, starts afresh at exec
    (ru_maxrss would report the parent's size, which a spawned child inherits)."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def in_fresh_process(function, *args):
    """function(*args) in a spawned process of its own (a peak is never reset: each needs one)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# --------------------------------------------------------------------------------------------------
# Time in convolutions.

class ConvolutionTimer(TorchDispatchMode):
    """Counts the convolutions, forward and backward, run while it is active and adds up their
    seconds.

    Every convolution reaches the dispatcher as one of these two operators, below autograd. The
    device is synchronised around each one, so on a GPU the seconds are the kernels' own.
    """

    OPERATORS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)

    def __init__(self, device):
        super().__init__()
        self.device, self.seconds, self.calls = device, 0.0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self.OPERATORS:
            return func(*args, **(kwargs or {}))
        synchronize(self.device)
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def convolution_profile(sides, batch, device, rounds=3):
    """Median seconds per iteration in convolutions and in all, of the paper's and the project's
    step (timed in turns, under ConvolutionTimer), and the speed-up ceiling they set: the paper's
    seconds over the project's convolution seconds (the same convolutions and no other work)."""
    names = ("paper", "project")
    conv, total, calls = {name: [] for name in names}, {name: [] for name in names}, {}
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            with ConvolutionTimer(device) as timer:
                sides[name].step(*batch)
            synchronize(device)
            total[name].append(time.perf_counter() - start)
            conv[name].append(timer.seconds)
            calls[name] = timer.calls
    conv = {name: statistics.median(seconds) for name, seconds in conv.items()}
    total = {name: statistics.median(seconds) for name, seconds in total.items()}
    return {"convolution_seconds": conv, "convolution_calls": calls,
            "convolution_share": {name: conv[name] / total[name] for name in names},
            "speedup_ceiling": total["paper"] / conv["project"]}


# --------------------------------------------------------------------------------------------------
# FLOPs.

class OperatorFlops(TorchDispatchMode):
    """FLOPs of every operator run while it is active, by FlopCounterMode's formulas (see the top).

    `total` is their sum; `by_operator` maps each counted operator (e.g.
    'aten.convolution_backward') to its FLOPs.
    """

    def __init__(self):
        super().__init__()
        self.total, self.by_operator = 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            name = str(func.overloadpacket)
            self.total += flops
            self.by_operator[name] = self.by_operator.get(name, 0) + flops
        return out


def count_flops(function, *args):
    """FLOPs of one call function(*args), forward and backward (OperatorFlops)."""
    with OperatorFlops() as counter:
        function(*args)
    return counter.total


# --------------------------------------------------------------------------------------------------
# The peak.

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' datasheets: bf16 with float32
# accumulation, and TF32, which float32 convolutions and matrix products use on these GPUs (the
# project turns it on: run.device.select_device). The first pattern found in the device's name wins.
GPU_PEAKS = [
    # pattern of torch.cuda.get_device_name, name, bf16, tf32
    (r"H200 NVL", "H200 NVL", 835.5, 417.5),
    (r"H200", "H200 SXM", 989.4, 494.7),
    (r"H100 NVL", "H100 NVL", 835.5, 417.5),
    (r"H100 PCIe", "H100 PCIe", 756.5, 378.0),
    (r"H100|GH200", "H100 SXM", 989.4, 494.7),
    (r"A100", "A100", 312.0, 156.0),
    (r"L40S", "L40S", 362.1, 183.0),
    (r"L4\b", "L4", 121.0, 60.0),
    (r"RTX 4090", "GeForce RTX 4090", 165.2, 82.6),
    (r"RTX 3090", "GeForce RTX 3090", 71.0, 35.6),
    (r"A10\b", "A10", 125.0, 62.5),
]
MATMUL_SIZE = {"cpu": 2048, "cuda": 8192}  # side of the square matrix product of the measured rate


def datasheet_peak(gpu_name, dtype):
    """(name, FLOP/s) of the dense peak of this GPU for dtype (float32 read as TF32), or None."""
    for pattern, name, bf16, tf32 in GPU_PEAKS:
        if re.search(pattern, gpu_name):
            return name, (bf16 if dtype == torch.bfloat16 else tf32) * 1e12
    return None


def matmul_rate(device, dtype, size=None, repeats=5):
    """Median FLOP/s of a size x size matrix product in dtype on this device and these threads.

    Each timed repeat runs enough products to last about 0.1 s, after one untimed one.
    """
    size = size or MATMUL_SIZE.get(device.type, 2048)
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    synchronize(device)
    start = time.perf_counter()
    torch.mm(a, b)
    synchronize(device)
    calls = max(1, int(0.1 / max(time.perf_counter() - start, 1e-6)))
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        synchronize(device)
        rates.append(2 * size ** 3 * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def peak_rate(device, dtype):
    """The rate a step in dtype is compared with, and where it comes from (see the top):
    {'flops_per_s', 'source', 'matmul_flops_per_s', 'matmul_size'}."""
    size = MATMUL_SIZE.get(device.type, 2048)
    measured = matmul_rate(device, dtype, size)
    dtype_name = str(dtype).replace("torch.", "")
    found = datasheet_peak(torch.cuda.get_device_name(device), dtype) \
        if device.type == "cuda" else None
    if found:
        name, rate = found
        kind = "bf16" if dtype == torch.bfloat16 else "tf32"
        source = f"{name} datasheet, dense {kind}"
    else:
        rate, source = measured, f"{size}x{size} {dtype_name} matmul, measured"
    return {"flops_per_s": rate, "source": source, "matmul_flops_per_s": measured,
            "matmul_size": size}


def describe_peak(peak):
    """'289 GFLOP/s (2048x2048 float32 matmul, measured)'; a datasheet's with the measured rate."""
    size = peak["matmul_size"]
    measured = f"; {size}x{size} matmul measured {peak['matmul_flops_per_s'] / 1e9:.0f}" \
        if "datasheet" in peak["source"] else ""
    return f"{peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['source']}{measured})"


def gpu_description(device):
    """Name, compute capability, NVIDIA driver, CUDA and cuDNN versions of a CUDA device."""
    driver = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader",
                 f"--id={device.index or 0}"]
        result = subprocess.run(query, capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.strip():
            driver = result.stdout.strip()
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "driver": driver, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "torch": torch.__version__}
