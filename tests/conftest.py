import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Floor added to the error bound, per dtype, relative to the reference's scale.
FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def device_params(cpu_dtypes, cuda_dtypes):
    """(device, dtype) pairs; the CUDA ones are marked and skip without a GPU."""
    cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]
    return [pytest.param("cpu", d, id=f"cpu-{str(d)[6:]}") for d in cpu_dtypes] + [
        pytest.param("cuda", d, id=f"cuda-{str(d)[6:]}", marks=cuda) for d in cuda_dtypes
    ]


def assert_close(name, out, out_torch, out_ref, floor=None):
    """The flash-attention rule: our error against the float64 reference may be
    at most twice PyTorch's own error in the same dtype, plus a small floor
    (FLOOR[dtype] unless given, relative to the reference's scale)."""
    assert out.shape == out_ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(out_ref.shape)}"
    assert out.dtype == out_torch.dtype, f"{name}: dtype {out.dtype} != {out_torch.dtype}"
    ours = (out.double() - out_ref).abs().max().item() if out.numel() else 0.0
    theirs = (out_torch.double() - out_ref).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, out_ref.abs().max().item()) if out.numel() else 1.0
    bound = 2 * theirs + (FLOOR[out.dtype] if floor is None else floor) * scale
    if os.environ.get("BIGKERNELS_PRINT_ERRORS") == "1":  # scripts/gpu_check.sh: what a real GPU's rounding gives
        print(f"\nobserved-error {ours / bound:.3f} of the bound: {os.environ.get('PYTEST_CURRENT_TEST', '?')} "
              f"{name} {out.dtype}: ours {ours:.3g}, torch's {theirs:.3g}")
    assert ours <= bound, f"{name}: max error {ours:.3g} > bound {bound:.3g} (torch's own error {theirs:.3g})"
