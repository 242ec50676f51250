"""The attention family: bigkernels.ops.attention.scaled_dot_product_attention
against torch's F.scaled_dot_product_attention on the same inputs: on the CPU
its default backend and the math one; on CUDA each backend by name (flash,
efficient, cuDNN, math), at 16k tokens per batch as flash-attention measures."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bigkernels.ops.attention import scaled_dot_product_attention

from .harness import Case, Variant

# (B, H, L, S, D); the first is so small that it times the per-call host overhead
CPU_SHAPES = [(1, 1, 8, 8, 8), (1, 8, 1024, 1024, 64), (1, 8, 4096, 4096, 64)]
# GPU: bf16, B = 16384 / L sequences, H = 2048 / D heads (flash-attention's convention)
GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_MATH_MAX_SEQLEN = 4096  # beyond it the math backend's L x S scores cost minutes and tens of GiB
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "eager", "flash", "efficient", "cudnn", "math")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _sdpa(backend, q, k, v, causal):
    def run():
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _make(device, B, H, L, S, D, dtype, causal):
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g, device=device, dtype=dtype).requires_grad_()
                   for n in (L, S, S))
        variants = {"bigkernels": Variant(lambda: scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v))}
        if device == "cuda":
            for backend in SDPA_BACKENDS:
                if backend != "math" or L <= GPU_MATH_MAX_SEQLEN:
                    variants[backend] = Variant(_sdpa(backend, q, k, v, causal), (q, k, v),
                                                note=f"F.scaled_dot_product_attention, {backend} backend")
        else:
            variants["eager"] = Variant(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v),
                                        note="F.scaled_dot_product_attention, torch's default backend")
            variants["math"] = Variant(_sdpa("math", q, k, v, causal), (q, k, v),
                                       note="SDPA's math backend (materialises the scores)")
        return variants
    return make


def _case(device, B, H, L, S, D, dtype, causal):
    return Case(family="attention", name=f"{DTYPE_NAMES[dtype]} B{B} H{H} L{L} S{S} D{D}{' causal' if causal else ''}",
                params=dict(B=B, H=H, L=L, S=S, D=D, dtype=DTYPE_NAMES[dtype], causal=causal),
                # 4·B·H·L·S·D (QK^T and PV), halved when causal; backward 2.5x the forward
                flops=4.0 * B * H * L * S * D / (2 if causal else 1), backward_flops_factor=2.5,
                make=_make(device, B, H, L, S, D, dtype, causal))


def cases(device, full, log=print):
    if device == "cuda":
        seqlens = GPU_SEQLENS if full else (1024, 4096)
        return [_case(device, 16384 // L, 2048 // D, L, L, D, torch.bfloat16, causal)
                for D in (64, 128) for L in seqlens for causal in (False, True)]
    shapes = CPU_SHAPES if full else CPU_SHAPES[:2]
    grid = [(s, dtype, causal) for dtype in (torch.float32, torch.bfloat16) for s in shapes
            for causal in (False, True)]
    if not full:
        grid = [g for g in grid if g[1] == torch.float32 or not g[2]]
    return [_case(device, B, H, L, S, D, dtype, causal) for (B, H, L, S, D), dtype, causal in grid]
