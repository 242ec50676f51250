"""The attention family: bigkernels.ops.attention.scaled_dot_product_attention
against torch's F.scaled_dot_product_attention (its default backend, and the
math backend) on the same inputs."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bigkernels.ops.attention import scaled_dot_product_attention

from .harness import Case, Variant

# (B, H, L, S, D); the first is so small that it times the per-call host overhead
CPU_SHAPES = [(1, 1, 8, 8, 8), (1, 8, 1024, 1024, 64), (1, 8, 4096, 4096, 64)]
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "eager", "math")


def _make(device, B, H, L, S, D, dtype, causal):
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g, device=device, dtype=dtype).requires_grad_()
                   for n in (L, S, S))

        def math():
            with sdpa_kernel(SDPBackend.MATH):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return {
            "bigkernels": Variant(lambda: scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v)),
            "eager": Variant(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v),
                             note="F.scaled_dot_product_attention, torch's default backend"),
            "math": Variant(math, (q, k, v), note="SDPA's math backend (materialises the scores)"),
        }
    return make


def cases(device, full, log=print):
    if device == "cuda":
        log("attention: no CUDA kernel yet (the CPU one runs; CUDA calls take the reference path)")
        return []
    shapes = CPU_SHAPES if full else CPU_SHAPES[:2]
    grid = [(s, dtype, causal) for dtype in (torch.float32, torch.bfloat16) for s in shapes
            for causal in (False, True)]
    if not full:
        grid = [g for g in grid if g[1] == torch.float32 or not g[2]]
    return [
        Case(family="attention", name=f"{DTYPE_NAMES[dtype]} B{B} H{H} L{L} S{S} D{D}{' causal' if causal else ''}",
             params=dict(B=B, H=H, L=L, S=S, D=D, dtype=DTYPE_NAMES[dtype], causal=causal),
             # 4·B·H·L·S·D (QK^T and PV), halved when causal; backward 2.5x the forward
             flops=4.0 * B * H * L * S * D / (2 if causal else 1), backward_flops_factor=2.5,
             make=_make(device, B, H, L, S, D, dtype, causal))
        for (B, H, L, S, D), dtype, causal in grid
    ]
