"""Numeric precision and the machine it runs on: where bf16 runs, and whether it pays.

`--amp` trains and evaluates in bf16 mixed precision: every forward pass (the SGLD chain's, the
loss's, SAM's second one) runs under torch's bf16 autocast, so convolutions and matrix products take
bf16 inputs while the weights, the optimizer, the replay buffer and the chain's iterate x stay
float32. Two details make it learn as well as float32 (docs/performance.md, "A bf16 that learns"):

- the chain's forward passes run without autocast's cache of bf16 copies
(`jem/sampler.py` `uncached_autocast`): x
  moves in place every step, and a cached copy would show every step the chain's start;
- the energy, logsumexp of the logits, is taken in float32 (`models.JEM.px_score`), so the energy
gap and
  the divergence check keep float32's resolution.

bf16 pays only where the hardware computes it: GPUs from NVIDIA's Ampere on (compute capability
8.0), CPUs with AMX-BF16 or AVX512-BF16 (x86) or the BF16 extension (Arm). Elsewhere torch emulates
it, slower than float32, so `--amp` there prints one line and trains in float32 (`resolve_amp`).
"""
import os
import platform

import torch

from jem.errors import UserError

AMP_DTYPE = torch.bfloat16
# torch.cpu.get_capabilities() names of native bf16
# arithmetic, in the order a description prefers them
CPU_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16", "sve_bf16": "SVE-BF16",
                     "bf16": "BF16"}


def autocast(device, enabled):
    """The bf16 autocast region of `--amp` on `device` (a no-op context when not enabled)."""
    return torch.autocast(device.type, dtype=AMP_DTYPE, enabled=enabled)


def cpu_model():
    """The CPU's marketing name, e.g. 'AMD EPYC 9654 96-Core Processor'."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_bf16_features():
    """The native bf16 instruction sets of this CPU, as torch detects them (e.g. ['AMX-BF16',
    'AVX512-BF16'])."""
    try:
        capabilities = torch.cpu.get_capabilities()
    # a torch without get_capabilities cannot tell: assume emulation, the safe side
    except AttributeError:
        return []
    return [name for key, name in CPU_BF16_FEATURES.items() if capabilities.get(key)]


def native_bf16(device):
    """Whether `device` computes bf16 in hardware (else torch emulates it, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return bool(cpu_bf16_features())
    return True  # other back ends (mps, xpu) decide for themselves


def describe_hardware(device):
    """One line naming the processor that computes and its bf16 support, for logs, args.json and
    benchmarks."""
    if device.type == "cuda":
        bf16 = "native bf16" if native_bf16(device) else "bf16 emulated"
        return (f"{torch.cuda.get_device_name(device)} ({bf16}), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")

    if device.type == "cpu":
        features = cpu_bf16_features()
        bf16 = f"native bf16: {', '.join(features)}" if features else "no native bf16"
        threads = torch.get_num_threads()
        return (f"{cpu_model()} ({os.cpu_count()} cores, {threads} "
                f"thread{'s' if threads > 1 else ''}; {bf16}), torch {torch.__version__}")
    return f"{device.type}, torch {torch.__version__}"


def resolve_amp(amp, device, say=print):
    """Whether to run in bf16: `--amp` (amp) where the hardware computes bf16; where it is emulated,
    one line that says so, and float32."""
    if amp and not native_bf16(device):
        processor = cpu_model() if device.type == "cpu" else torch.cuda.get_device_name(device)
        say(f"--amp: {processor} has no native bf16 (AMX-BF16, AVX512-BF16 or an Ampere GPU): "
            "emulated bf16 is slower than float32, so this run uses float32")
        return False
    return amp


def select_device(name=None):
    """`--device` or, when not given, cuda if available else cpu. Enables cudnn autotuning on
    GPU."""
    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but no CUDA GPU is visible; use --device "
                        "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        # Input sizes never change in JEM, so let cudnn pick the fastest convolution algorithms.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device
