"""How fast is one JEM training iteration? The project's step against the paper's, in one run.

    python bench.py                                   # the configs that suit the device
    python bench.py --configs wrn-16-2 --iters 5      # the CPU goal: at least 1.5x the paper's step
    python bench.py --configs wrn-16-2 --amp         # bf16 on a CPU with AMX-BF16 or AVX512-BF16
    python bench.py --configs wrn-28-10 --amp --compile --cuda_graph --json bench.json   # on a GPU
    python bench.py --configs wrn-16-2 --profile      # how much of the time convolutions take
    python bench.py --configs wrn-10-1 jempp-wrn-10-1 sadajem-wrn-10-1   # each recipe's step

For each named configuration it builds one randomly initialised model and gives identical copies to
the sides (jem/reference.py):

  paper    the paper's iteration, re-implemented in `PaperIteration`: replay buffer on the CPU,
           starts moved to the device every iteration, parameters requiring gradients and
           `retain_graph=True` during SGLD, three separate forward passes for the loss;
  project  the project's iteration as train_wrn_ebm.py runs it (jem/step.py: `iteration_loss`,
           `update`); for a config of a later recipe (JEM++, SADA-JEM), that recipe's iteration
           (`--recipe`: its sampler, chain length, batch norm and optimizer), so its speed-up says
           what the recipe costs or saves against the paper's step on the same network and batch;
  fast     the project's iteration with the opt-in flags given (--amp, --compile, --cuda_graph),
           only when one is given. --amp where bf16 is emulated (jem/run/device.py) falls back to
           float32 with one line, as training does.

First it checks, from one seed, that the project's default step computes the paper's loss,
gradients and updated replay buffer (to float32 rounding; it stops if not), and reports how far the
fast flags move them; a recipe's step computes other things, so its configs skip the check. Then it
times the sides alternately, iteration by iteration, so that a machine shared with other work slows
both alike, and prints per configuration and side:

  s/iter      median wall-clock seconds of one training iteration (SGLD chain, loss, backward,
              step)
  SGLD img/s  images through the sampler per second: batch_size * n_steps / (s/iter)
  peak MiB    on a GPU, torch.cuda.max_memory_allocated over the second iteration of a process
              running only that side (the first also holds cuDNN's trial workspaces); on a CPU,
              the peak resident set size (VmHWM) of such a process over two iterations, Python and
              torch's ~0.7 GiB included
  speed-up    the paper's s/iter divided by this side's
  GFLOP/it    FLOPs of one iteration (convolutions and matrix products, forward and backward),
              counted on an eager step of the side (jem/run/profiling.py); GFLOP/s: per second
  % peak      GFLOP/s over the peak of the side's dtype: on a CPU, a 2048x2048 matrix product
              measured after the timings on the same threads; on a GPU, its dense datasheet peak

With --profile it then runs three more iterations of the paper's and the project's side in turns,
timing each convolution (forward and backward) on its own, and prints the median seconds spent in
convolutions per iteration and their share of it. Both sides run the same convolutions, so the
paper's seconds per iteration divided by the project's convolution seconds is the largest speed-up
a step with the same arithmetic and the same convolution kernels could reach on this device.
"""
import argparse
import copy
import json
import statistics
from contextlib import contextmanager
from dataclasses import asdict

import torch

from jem.flags.common import OneLineErrors
from jem.reference import (CONFIGS, Config, PaperIteration, ProjectIteration,  # noqa: F401
                           make_inputs, project_args)
from jem.run.device import describe_hardware, resolve_amp, select_device
from jem.run.profiling import ConvolutionTimer  # noqa: F401  (tests/test_train_step.py imports it)
from jem.run.profiling import (convolution_profile, count_flops, describe_peak, gpu_description,
                               in_fresh_process, peak_rate, peak_resident_bytes, time_alternately)
from utils import run_cli


DEFAULT_CONFIGS = {"cpu": ["wrn-10-1", "wrn-16-2"], "cuda": list(CONFIGS)}
FAST_FLAGS = ("amp", "compile", "cuda_graph")


def parse_args(argv=None):
    parser = OneLineErrors(description="Time the JEM training iteration against the paper's.")
    add = parser.add_argument
    add("--configs", nargs="+", choices=list(CONFIGS), default=None,
        help="configurations to run (default: wrn-10-1 wrn-16-2 on a CPU, all on a GPU)")
    add("--iters", type=int, default=10, help="timed iterations per side")
    add("--warmup", type=int, default=2, help="untimed iterations per side first")
    add("--device", type=str, default=None, help="cuda or cpu (default: cuda if available)")
    add("--amp", action="store_true",
        help="add a side in bf16 mixed precision (GPU, or a CPU with native bf16)")
    add("--compile", action="store_true", help="add a side with torch.compile of the network")
    add("--cuda_graph", action="store_true",
        help="add a side replaying the SGLD chain as a CUDA graph")
    add("--profile", action="store_true",
        help="also measure the time in convolutions and the speed-up ceiling it sets")
    add("--seed", type=int, default=0)
    add("--json", type=str, default=None, help="also write the results to this JSON file")
    add("--skip_memory", action="store_true",
        help="leave out peak memory, a fresh process per side (quick checks)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# The inputs: one model, one replay buffer, one batch, all from the seed.


# --------------------------------------------------------------------------------------------------
# The two ways of running an iteration.


def side_steps(name, config):
    """Chain steps per iteration of a side: the config's for the paper's step, the recipe's for its
    own."""
    return config.n_steps if name == "paper" else project_args(config).n_steps


def make_side(name, model, buffer_images, config, device, opts):
    if name == "paper":
        return PaperIteration(model, buffer_images, config, device)
    flags = [flag for flag in FAST_FLAGS if getattr(opts, flag)] if name == "fast" else []
    return ProjectIteration(model, buffer_images, config, device, flags)


def side_names(opts):
    return ["paper",
            "project"] + (["fast"] if any(getattr(opts, flag) for flag in FAST_FLAGS) else [])


# --------------------------------------------------------------------------------------------------
# Same math: one step of each side from the same seed.

def one_step(side, batch, buffer_before, seed):
    """The loss, the change to the replay buffer and every gradient of one step from the seed."""
    torch.manual_seed(seed)
    loss = side.step(*batch)
    grads = {name: p.grad.detach().clone() for name, p in side.model.named_parameters()
             if p.grad is not None}
    return {"loss": loss.float(), "buffer": side.buffer_images().detach().cpu() - buffer_before,
            **grads}


def relative_errors(reference, other):
    """||other - reference|| / ||reference|| for each tensor (the norm ratio is the float32 rounding
    scale)."""
    if reference.keys() != other.keys():
        raise SystemExit("gradients of different parameters: "
                         f"{sorted(reference.keys() ^ other.keys())}")
    errors = {}
    for name, ref in reference.items():
        ref, val = ref.double().cpu(), other[name].double().cpu()
        errors[name] = ((val - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return errors


@contextmanager
def exact_float32():
    """No TF32 in convolutions and matrix products while the check runs (its error would hide real
    ones)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_same_step(config, device, opts):
    """Relative errors of the project's step (and of the fast one) against the paper's.

    Stops the benchmark unless the project's default step gives the paper's loss, gradients and
    buffer update to float32 rounding (torch.testing.assert_close's float32 tolerances, element by
    element; the buffer's pixels to 1e-4). The norm-wise relative errors it reports reach 1e-4 for
    some gradients: the p(x) gradient is a difference of two near-equal terms, which magnifies
    rounding; the paper's own step moves as much when only its memory layout changes.
    """
    model, buffer_images, batch = make_inputs(config, device, opts.seed)
    with exact_float32():
        paper = one_step(PaperIteration(copy.deepcopy(model), buffer_images, config, device,
                                        rng_device=device),
                         batch, buffer_images, opts.seed)
        project_side = ProjectIteration(copy.deepcopy(model), buffer_images, config, device)
        project = one_step(project_side, batch, buffer_images, opts.seed)
    for name in paper:
        try:
            # The chains' pixels pass through n_steps gradient steps, each taken at a point that
            # rounding moved a little: they may differ by more than float32's rtol, but far less
            # than 1e-4, 1/80 of an 8-bit level.
            tolerance = dict(rtol=0, atol=1e-4) if name == "buffer" else {}
            torch.testing.assert_close(project[name], paper[name], **tolerance)
        except AssertionError as e:
            raise SystemExit(f"the project's step differs from the paper's on {config} in {name}: "
                             f"{e}")
    errors = {"project": summarize(relative_errors(paper, project))}
    if "fast" in side_names(opts):
        fast_side = make_side("fast", copy.deepcopy(model), buffer_images, config, device, opts)
        fast = one_step(fast_side, batch, buffer_images, opts.seed)
        errors["fast"] = summarize(relative_errors(paper, fast))
    return errors


def summarize(errors):
    """The loss's error, the buffer's, and the worst gradient's."""
    grads = {k: v for k, v in errors.items() if k not in ("loss", "buffer")}
    worst = max(grads, key=grads.get)
    return {"loss": errors["loss"], "buffer": errors["buffer"], "worst_grad": errors[worst],
            "worst_grad_name": worst, "max": max(errors.values())}


# --------------------------------------------------------------------------------------------------
# Time and memory.

def peak_memory_of_side(name, config, device_name, opts):
    """Peak memory (bytes) of this process running only `name` (meant for a fresh process).

    On a GPU the peak of the second iteration: the first also holds cuDNN's trial workspaces.
    """
    device = select_device(device_name)
    model, buffer_images, batch = make_inputs(config, device, opts.seed)
    side = make_side(name, model, buffer_images, config, device, opts)
    side.step(*batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        side.step(*batch)
        return torch.cuda.max_memory_allocated(device)
    side.step(*batch)
    return peak_resident_bytes()


# --------------------------------------------------------------------------------------------------
# FLOPs and the share of the peak.

def side_dtype(name, opts):
    """The dtype of a side's convolutions: bf16 on the fast side under --amp, else float32."""
    return "bfloat16" if name == "fast" and opts.amp else "float32"


def flops_of_side(name, model, buffer_images, config, device, opts, batch):
    """FLOPs of one iteration of the side, counted on an eager copy of it: --compile and
    --cuda_graph run the eager step's arithmetic where a dispatch-level counter cannot see it."""
    eager = argparse.Namespace(**{**vars(opts), "compile": False, "cuda_graph": False})
    side = make_side(name, copy.deepcopy(model), buffer_images, config, device, eager)
    return count_flops(side.step, *batch)


# --------------------------------------------------------------------------------------------------

def bench_config(name, device, opts):
    config = CONFIGS[name]
    errors = check_same_step(config, device, opts) if config.recipe == "jem" else {}
    model, buffer_images, batch = make_inputs(config, device, opts.seed)
    names = side_names(opts)
    sides = {side: make_side(side, copy.deepcopy(model), buffer_images, config, device,
                             opts) for side in names}
    seconds = time_alternately(sides, batch, opts.iters, opts.warmup, device)
    medians = {side: statistics.median(seconds[side]) for side in names}
    dtypes = dict.fromkeys(side_dtype(side, opts) for side in names)
    # the peak rates right after the timings: a machine shared with other work slows both alike
    peaks = {dtype: peak_rate(device, getattr(torch, dtype)) for dtype in dtypes}
    profiled = convolution_profile(sides, batch, device) if opts.profile else None
    del sides
    # each side's peak memory in a fresh process of its own (a peak is never reset)
    memory = {side: None if opts.skip_memory else
              in_fresh_process(peak_memory_of_side, side, config, str(device), opts)
              for side in names}
    flops = {side: flops_of_side(side, model, buffer_images, config, device, opts, batch)
             for side in names}
    results = {}
    for side in names:
        median, n_steps = medians[side], side_steps(side, config)
        dtype, rate = side_dtype(side, opts), flops[side] / median
        results[side] = {"n_steps": n_steps, "seconds_per_iter": median,
                         "sgld_images_per_s": config.batch_size * n_steps / median,
                         "peak_memory_mib": memory[side] and memory[side] / 2 ** 20,
                         "speedup": medians["paper"] / median,
                         "dtype": dtype, "flops_per_iter": flops[side], "flops_per_s": rate,
                         "share_of_peak": rate / peaks[dtype]["flops_per_s"],
                         "share_of_matmul": rate / peaks[dtype]["matmul_flops_per_s"],
                         "seconds": seconds[side]}
    return {"config": name, **asdict(config), "sides": results, "check": errors, "peaks": peaks,
            "profile": profiled}


def print_header(device, opts):
    flags = " ".join(f"--{flag}" for flag in FAST_FLAGS if getattr(opts, flag)) or "none"
    print(f"device: {describe_hardware(device)} | fast flags: {flags} | "
          f"{opts.iters} timed iterations per side after {opts.warmup} warm-up, alternating")
    if device.type == "cuda":
        gpu = gpu_description(device)
        print(f"GPU: {gpu['name']} (compute capability {gpu['capability']}), driver "
              f"{gpu['driver']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}, torch {gpu['torch']}")
    print(f"{'config':<17} {'batch':>5}  {'side':<8} {'steps':>5} {'s/iter':>8} {'SGLD img/s':>10} "
          f"{'peak MiB':>9} {'speed-up':>8} {'GFLOP/it':>9} {'GFLOP/s':>9} {'% peak':>7}")


def print_result(result):
    first = True
    for side, r in result["sides"].items():
        lead = f"{result['config']:<17} {result['batch_size']:>5}" if first else " " * 23
        print(f"{lead}  {side:<8} {r['n_steps']:>5} {r['seconds_per_iter']:>8.3f} "
              f"{r['sgld_images_per_s']:>10.1f} {r['peak_memory_mib'] or float('nan'):>9.0f} "
              f"{r['speedup']:>7.2f}x {r['flops_per_iter'] / 1e9:>9.1f} "
              f"{r['flops_per_s'] / 1e9:>9.1f} {r['share_of_peak']:>7.1%}")
        first = False
    for dtype, peak in result["peaks"].items():
        print(f"{'':<23}  peak {dtype}: {describe_peak(peak)}")
    for side, e in result["check"].items():
        print(f"{'':<23}  check {side} vs paper, relative error: loss {e['loss']:.1e}, buffer "
              f"{e['buffer']:.1e}, worst gradient {e['worst_grad']:.1e} ({e['worst_grad_name']})")
    if result["profile"]:
        conv, share = result["profile"]["convolution_seconds"],
        result["profile"]["convolution_share"]
        print(f"{'':<23}  convolutions: paper {conv['paper']:.3f} s ({share['paper']:.0%} of its "
              f"s/iter), project {conv['project']:.3f} s ({share['project']:.0%}); same "
              f"convolutions cap the speed-up at {result['profile']['speedup_ceiling']:.2f}x")


def main(argv=None):
    opts = parse_args(argv)
    device = select_device(opts.device)
    opts.amp = resolve_amp(opts.amp, device)
    names = opts.configs or DEFAULT_CONFIGS[device.type]
    print_header(device, opts)
    results = []
    for name in names:
        results.append(bench_config(name, device, opts))
        print_result(results[-1])
    if opts.json:
        report = {"device": describe_hardware(device), "torch": torch.__version__,
                  "options": vars(opts),
                  "gpu": gpu_description(device) if device.type == "cuda" else None,
                  "results": results}
        with open(opts.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    run_cli(main)
