"""The RNN CUDA kernels (persistent and per step) against torch.nn on the same
GPU (cuDNN) and a float64 torch.nn run on the CPU, by the 2x rule of
tests/test_rnn.py: outputs, final states and every gradient."""

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
