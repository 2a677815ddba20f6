"""jem/run/profiling.py: FLOPs counted as 2 * multiply-adds, forward and backward, the SGLD chain's
autograd.grad included; the peak a step is compared with; bench.py's FLOP columns."""
import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import Config, PaperIteration, ProjectIteration, flops_of_side, side_dtype
from jem.model import JEM
from jem.run.profiling import OperatorFlops, count_flops, datasheet_peak, matmul_rate, peak_rate

CPU = torch.device("cpu")


def test_a_convolution_and_a_linear_layer_count_two_flops_per_multiply_add():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    multiply_adds = 2 * 8 * 16 * 16 * (3 * 3 * 3)  # batch, out channels, pixels, kernel volume
    assert count_flops(conv, x) == 2 * multiply_adds
    linear = torch.nn.Linear(64, 10)
    assert count_flops(linear, torch.randn(5, 64)) == 2 * 5 * 64 * 10


def test_a_weight_and_input_backward_count_twice_the_forward():
    """The backward of a convolution computes two products of the forward's size (input and weight
    gradients); an input gradient alone, the chain's, computes one."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    forward = count_flops(conv, x)
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward
    conv.requires_grad_(False)
    assert count_flops(lambda: torch.autograd.grad(conv(x).sum(), [x])) == 2 * forward


def test_the_chain_step_counts_forward_and_autograd_grad_as_flopcountermode_does_in_two_regions():
    """FlopCounterMode raises on autograd.grad run inside its region; counted in two regions, the
    forward and the input gradient add up to what OperatorFlops counts in one."""
    torch.manual_seed(0)
    model = JEM(10, 1, n_classes=10).requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    with OperatorFlops() as counter:
        torch.autograd.grad(model(x).sum(), [x])
    with FlopCounterMode(display=False) as forward:
        energy = model(x).sum()
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(energy, [x])
    assert backward.get_total_flops() > 0.9 * forward.get_total_flops() > 0
    assert counter.total == forward.get_total_flops() + backward.get_total_flops()
    assert counter.by_operator["aten.convolution_backward"] == \
        backward.get_flop_counts()["Global"][torch.ops.aten.convolution_backward]
    with pytest.raises(RuntimeError, match="autograd.grad"):  # why OperatorFlops exists
        with FlopCounterMode(display=False):
            torch.autograd.grad(model(x).sum(), [x])


def test_an_iteration_counts_every_chain_step_and_the_loss_pass():
    """The paper's and the project's step do the same arithmetic: n_steps chain steps (a forward and
    an input gradient of the sampled batch) and the loss pass (forwards of the data, samples and
    labeled batches, and the backward of all three)."""
    config = Config(depth=10, width=1, batch_size=4, n_steps=3)
    torch.manual_seed(0)
    model = JEM(config.depth, config.width, n_classes=10)
    buffer_images = torch.rand(20, 3, 32, 32) * 2 - 1
    batch = (torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1,
             torch.randint(0, 10, (4,)))
    paper = count_flops(
        PaperIteration(copy.deepcopy(model), buffer_images, config, CPU).step, *batch)
    project = count_flops(
        ProjectIteration(copy.deepcopy(model), buffer_images, config, CPU).step, *batch)
    frozen = copy.deepcopy(model).requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    chain_step = count_flops(lambda: torch.autograd.grad(frozen(x).sum(), [x]))
    forward = count_flops(frozen, x)
    loss_pass = paper - config.n_steps * chain_step
    assert paper == project
    # three forwards, and a backward of weights and inputs of about twice each forward
    assert 3 * 2.5 * forward < loss_pass < 3 * 3.1 * forward


def test_bench_counts_the_eager_arithmetic_of_a_compiled_side(monkeypatch):
    """--compile and --cuda_graph run the eager step's arithmetic: the fast side counts eagerly."""
    config = Config(depth=10, width=1, batch_size=4, n_steps=2)
    opts = type("Opts", (), {})()
    opts.amp, opts.compile, opts.cuda_graph = False, True, True
    torch.manual_seed(0)
    model = JEM(config.depth, config.width, n_classes=10)
    buffer_images = torch.rand(20, 3, 32, 32) * 2 - 1
    batch = (torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    fast = flops_of_side("fast", model, buffer_images, config, CPU, opts, batch)
    project = flops_of_side("project", model, buffer_images, config, CPU, opts, batch)
    assert fast == project > 0 and compiled == []
    assert side_dtype("fast", opts) == "float32"
    opts.amp = True
    assert side_dtype("fast", opts) == "bfloat16" and side_dtype("project", opts) == "float32"


def test_the_peak_is_a_measured_matmul_on_a_cpu_and_the_datasheet_on_a_named_gpu():
    rate = matmul_rate(CPU, torch.float32, size=256, repeats=2)
    assert rate > 1e8  # at least 0.1 GFLOP/s: it is FLOP/s, not seconds
    peak = peak_rate(CPU, torch.float32)
    assert peak["flops_per_s"] == peak["matmul_flops_per_s"] and "measured" in peak["source"]
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == ("H100 SXM", 989.4e12)
    assert datasheet_peak("NVIDIA H100 PCIe", torch.float32) == ("H100 PCIe", 378.0e12)
    assert datasheet_peak("NVIDIA H200", torch.float32)[0] == "H200 SXM"
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16)[1] == 312e12
    assert datasheet_peak("NVIDIA L40S", torch.bfloat16)[0] == "L40S"  # not the L4
    assert datasheet_peak("NVIDIA L4", torch.bfloat16)[0] == "L4"
    assert datasheet_peak("NVIDIA GeForce RTX 4090", torch.float32)[0] == "GeForce RTX 4090"
    assert datasheet_peak("Tesla T4", torch.bfloat16) is None  # unknown: the measured matmul
