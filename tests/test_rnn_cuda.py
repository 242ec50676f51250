"""The RNN CUDA kernels (persistent and per step) against torch.nn on the same
GPU (cuDNN) and a float64 torch.nn run on the CPU, by the 2x rule of
tests/test_rnn.py: outputs, final states and every gradient. Also the
fallbacks: per step (forced with BIGKERNELS_RNN_CUDA_LAUNCH=per_step, see
csrc/rnn/cuda/rnn_cuda.cpp), a cooperative launch the GPU refuses, fp16/bf16
hidden sizes too large to keep W_hh on chip; and a long sequence on a grid of
exactly one block per SM, with and without another stream's work beside it."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

import bigkernels
from test_rnn import CELL_IDS, CELLS, check_module

CUDA = torch.cuda.is_available() and bigkernels.backend_info()["cuda_compiled"]
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("cell,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_layers,bidirectional,batch_first", [(1, False, False), (2, True, True)])
def test_matches_torch_on_cuda(cell, nonlinearity, dtype, num_layers, bidirectional, batch_first):
    if nonlinearity == "relu" and dtype != torch.float32 and num_layers > 1:
        pytest.skip("relu behind a rounded layer: kinks flip by chance (see tests/test_rnn.py)")
    check_module(cell, dtype, T=9, B=5, I=7, H=67, num_layers=num_layers, bidirectional=bidirectional,
                 batch_first=batch_first, nonlinearity=nonlinearity or "tanh", device="cuda")


@pytest.mark.parametrize("cell,nonlinearity", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_unsorted_lengths_on_cuda(cell, nonlinearity, bidirectional):
    check_module(cell, torch.float32, T=7, B=5, I=4, H=33, num_layers=2, bidirectional=bidirectional,
                 nonlinearity=nonlinearity or "tanh", lengths=[3, 7, 1, 7, 5], device="cuda")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("T,B,H", [(1, 1, 1), (300, 2, 64), (3, 64, 1024), (2, 8, 3000)])
def test_sizes_on_cuda(cell, T, B, H):
    # H = 3000 in float32 does not fit on chip: the per-step launches
    check_module(cell, torch.float32, T=T, B=B, I=16, H=H, device="cuda")


def test_projection_and_float64_take_the_reference_on_cuda():
    check_module("lstm", torch.float32, T=4, B=3, I=5, H=9, proj_size=4, device="cuda")
    check_module("gru", torch.float64, T=4, B=3, I=5, H=9, device="cuda")


LAUNCH = "BIGKERNELS_RNN_CUDA_LAUNCH"


def rnn_kernel_grids(fn, kernel):
    """The grid (x) of every launch of `kernel` (rnn_forward_kernel or
    rnn_backward_kernel) while fn runs, from the profiler's trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return [e["args"]["grid"][0] for e in events if e.get("cat") == "kernel" and kernel in e.get("name", "")]


def lstm_step(lstm, T, B, dtype):
    """A function that runs lstm forward and backward on a random [T, B, I] input."""
    torch.manual_seed(1)
    x = torch.randn(T, B, lstm.input_size, device="cuda", dtype=dtype, requires_grad=True)

    def step():
        out, _ = lstm(x)
        out.float().square().sum().backward()
    return step


def test_launch_override_picks_the_path(monkeypatch):
    T, H = 5, 67
    step = lstm_step(bigkernels.nn.LSTM(8, H, device="cuda"), T, 3, torch.float32)
    monkeypatch.delenv(LAUNCH, raising=False)
    assert len(rnn_kernel_grids(step, "rnn_forward_kernel")) == 1  # persistent
    assert len(rnn_kernel_grids(step, "rnn_backward_kernel")) == 1
    monkeypatch.setenv(LAUNCH, "per_step")
    assert len(rnn_kernel_grids(step, "rnn_forward_kernel")) == T
    assert len(rnn_kernel_grids(step, "rnn_backward_kernel")) == 2 * T  # gates, then the product with W_hh
    check_module("lstm", torch.float32, T=T, B=3, I=8, H=H, device="cuda")
    monkeypatch.setenv(LAUNCH, "sometimes")
    with pytest.raises(RuntimeError, match="BIGKERNELS_RNN_CUDA_LAUNCH must be auto, per_step or cooperative"):
        step()


def test_refused_cooperative_launch_falls_back_per_step(monkeypatch):
    # "cooperative" launches a block per unit cooperatively: 4000 blocks of
    # 64 KB of shared memory cannot all be resident, so the GPU refuses, and
    # the launches per step that follow keep that grid (the auto choice per
    # step has about 3 units per block). The refusal must leave no error behind
    # for the next launch check (check_module runs many).
    monkeypatch.setenv(LAUNCH, "cooperative")
    T, H = 3, 4000
    step = lstm_step(bigkernels.nn.LSTM(8, H, device="cuda"), T, 2, torch.float32)
    assert rnn_kernel_grids(step, "rnn_forward_kernel") == [H] * T
    assert rnn_kernel_grids(step, "rnn_backward_kernel") == [H] * (2 * T)
    check_module("lstm", torch.float32, T=T, B=2, I=8, H=H, device="cuda")


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp16_bf16_beyond_on_chip_weights(cell, dtype):
    # Not even one unit's 16-row tile of W_hh (7000 columns, 224 KB) fits with
    # the forward's other buffers in 227 KB (H100, H200; 163 KB on an A100): the
    # forward streams W_hh a depth slice at a time, every step.
    check_module(cell, dtype, T=3, B=2, I=8, H=7000, device="cuda")


def stress(dtype_name, busy):
    """Run in a subprocess by test_long_sequence_on_a_grid_of_every_sm: an LSTM
    whose persistent grid is exactly one block per SM, T = 2000, forward and
    backward, against the per-step launches; with busy, a side stream keeps
    the GPU full of matmuls meanwhile. A grid barrier that lets a block run
    ahead gives other values; one that never opens hangs (hence the timeout)."""
    dtype = getattr(torch, dtype_name)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    H, T, B = 2 * sms, 2000, 4  # units = ceil(H / sms) = 2: a grid of H / 2 = sms blocks
    torch.manual_seed(0)
    lstm = bigkernels.nn.LSTM(16, H, device="cuda", dtype=dtype)
    x = torch.randn(T, B, 16, device="cuda", dtype=dtype)
    grad_out = torch.randn(T, B, H, device="cuda", dtype=dtype)

    def run():
        xx = x.clone().requires_grad_()
        out, (h, c) = lstm(xx)
        grads = torch.autograd.grad(out, [xx, *lstm.parameters()], grad_out)
        return [out, h, c, *grads]

    os.environ[LAUNCH] = "auto"
    with torch.no_grad():
        assert rnn_kernel_grids(lambda: lstm(x), "rnn_forward_kernel") == [sms], "not one persistent grid of sms"
    if busy:
        side = torch.cuda.Stream()
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        side.wait_stream(torch.cuda.current_stream())  # a is written
        with torch.cuda.stream(side):
            for _ in range(1000):  # about 200 ms on an H100, longer than the RNN's own work
                a = torch.tanh(a @ a)
    persistent = run()
    os.environ[LAUNCH] = "per_step"
    per_step = run()
    torch.cuda.synchronize()
    # The same arithmetic on either path (each sum's order does not depend on the grid).
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    names = ["output", "h_n", "c_n", "grad input"] + [f"grad {n}" for n, _ in lstm.named_parameters()]
    for name, p, s in zip(names, persistent, per_step):
        torch.testing.assert_close(p, s, **tolerance, msg=lambda m: f"{name}: {m}")
    print("stress passed")


@pytest.mark.parametrize("busy", [False, True], ids=["alone", "beside_a_busy_stream"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_sequence_on_a_grid_of_every_sm(dtype, busy):
    tests = os.path.dirname(os.path.abspath(__file__))
    code = f"import sys; sys.path.insert(0, {tests!r}); import test_rnn_cuda; test_rnn_cuda.stress({dtype!r}, {busy})"
    env = {k: v for k, v in os.environ.items() if k != LAUNCH}
    try:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:  # seconds of work at most: T = 2000 steps of a few microseconds, twice
        pytest.fail("the persistent RNN did not finish in 60 s: a grid barrier that never opens?")
    assert run.returncode == 0 and "stress passed" in run.stdout, (run.stdout + run.stderr)[-4000:]
