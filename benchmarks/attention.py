"""The attention family: bigkernels.ops.attention.scaled_dot_product_attention
against torch's F.scaled_dot_product_attention on the same inputs: on the CPU
its default backend and the math one over a matrix of shapes drawn from real
models (CPU_MATRIX); on CUDA each backend by name (flash, efficient, cuDNN,
math), at 16k tokens per batch as flash-attention measures."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bigkernels.ops.attention import scaled_dot_product_attention

from .harness import Case, Variant

# The CPU shape matrix, drawn from the models people run (Hugging Face
# configs): (label, B, Hq, Hkv, L, S, D, mask, causal, training).
# mask "padding": a bool key-padding mask whose sequences keep between half
# and all of their keys, as a tokenizer's padding gives, materialised
# [B, 1, L, S] as transformers' sdpa_mask hands it to attention backends;
# training rows also time forward+backward. Encoder and prefill rows are in
# Hugging Face's layout ([B, L, H, D] tensors seen as [B, H, L, D]) and
# include the backend's transpose back to [B, L, H, D]; decoding rows read
# a [B, Hkv, S, D] cache, as transformers' DynamicCache stores it.
CPU_MATRIX = [
    ("MiniLM", 64, 12, 12, 128, 128, 32, "padding", False, True),
    ("MiniLM no mask", 64, 12, 12, 128, 128, 32, None, False, True),
    ("BERT L64", 32, 12, 12, 64, 64, 64, "padding", False, True),
    ("BERT L512", 16, 12, 12, 512, 512, 64, "padding", False, True),
    ("GPT-2 L1024", 2, 12, 12, 1024, 1024, 64, None, True, True),
    ("Llama prefill", 4, 8, 8, 256, 256, 64, None, True, True),
    ("Llama-3 prefill GQA 4:1", 1, 32, 8, 1024, 1024, 128, None, True, True),
    ("Qwen2 prefill GQA 8:1", 1, 16, 2, 2048, 2048, 64, None, True, False),
    ("Llama-3 prefill L4096", 1, 8, 2, 4096, 4096, 128, None, True, False),
    ("decode MHA", 1, 32, 32, 1, 4096, 128, None, False, False),
    ("decode GQA 4:1 S512", 1, 32, 8, 1, 512, 128, None, False, False),
    ("decode GQA 4:1 S4k", 1, 32, 8, 1, 4096, 128, None, False, False),
    ("decode GQA 4:1 S32k", 1, 32, 8, 1, 32768, 128, None, False, False),
    ("decode GQA 4:1 B16", 16, 32, 8, 1, 4096, 128, None, False, False),
    ("decode 4 tokens GQA 4:1", 1, 32, 8, 4, 4096, 128, None, False, False),
    ("long sequence", 1, 8, 8, 1024, 1024, 64, None, False, True),
]
# Gemma 2's capped scores (attn_logit_softcapping 50; 2B: 8 query heads on 4
# KV heads, head dim 256), causal prefill, forward and forward+backward:
# (label, B, Hq, Hkv, L, D, softcap). SDPA cannot cap scores, so what such
# users run is transformers' eager attention (_eager_softcap).
CPU_SOFTCAP = [("Gemma-2 2B prefill", 1, 8, 4, 1024, 256, 50.0)]
# the short run (`python -m benchmarks`): one row of each kind
CPU_SHORT = ("MiniLM", "BERT L512", "Llama prefill", "decode GQA 4:1 S4k", "long sequence")
CPU_MATH_MAX_SCORES = 2 ** 27  # SDPA's math backend materialises B*H*L*S scores: 512 MiB in fp32
GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_MATH_MAX_SEQLEN = 4096  # beyond it the math backend's L x S scores cost minutes and tens of GiB
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "eager", "flash", "efficient", "cudnn", "math", "eager-softcap")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _sdpa(backend, q, k, v, causal):
    def run():
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _make_cpu(B, Hq, Hkv, L, S, D, mask, causal, training, dtype):
    def make():
        g = torch.Generator().manual_seed(0)
        gqa = Hq != Hkv
        if L == 1 or not training and L < 16:  # decoding: a [B, Hkv, S, D] cache
            q = torch.randn(B, Hq, L, D, generator=g, dtype=dtype)
            k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=dtype) for _ in range(2))
            back = False
        else:  # Hugging Face's projections, [B, L, H, D] seen as [B, H, L, D]
            q = torch.randn(B, L, Hq, D, generator=g, dtype=dtype).transpose(1, 2)
            k, v = (torch.randn(B, S, Hkv, D, generator=g, dtype=dtype).transpose(1, 2) for _ in range(2))
            back = True
        for t in (q, k, v):
            t.requires_grad_(training)
        attn_mask = None
        if mask == "padding":
            keep = torch.randint(S // 2, S + 1, (B,), generator=g)
            attn_mask = (torch.arange(S)[None, :] < keep[:, None])[:, None, None, :].expand(B, 1, L, S).contiguous()

        def call(fn):
            def run():
                out = fn(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=gqa)
                return out.transpose(1, 2).contiguous() if back else out  # what the HF backend returns
            return run
        wrt = (q, k, v) if training else ()
        variants = {
            "bigkernels": Variant(call(scaled_dot_product_attention), wrt, backward=training),
            "eager": Variant(call(F.scaled_dot_product_attention), wrt, backward=training,
                             note="F.scaled_dot_product_attention, torch's default backend")}
        if B * Hq * L * S <= CPU_MATH_MAX_SCORES:
            def math(*args, **kwargs):
                with sdpa_kernel(SDPBackend.MATH):
                    return F.scaled_dot_product_attention(*args, **kwargs)
            variants["math"] = Variant(call(math), wrt, backward=training,
                                       note="SDPA's math backend (materialises the scores)")
        return variants
    return make


def _eager_softcap(q, k, v, softcap):
    """transformers' eager_attention_forward as Gemma 2 runs it: K and V
    repeated per query head, the scores capped, the causal mask added, the
    softmax in float32."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    L, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores + torch.full((L, S), float("-inf"), dtype=q.dtype).triu(1)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _softcap_case(label, B, Hq, Hkv, L, D, softcap, dtype):
    def make():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, L, Hq, D, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
        k, v = (torch.randn(B, L, Hkv, D, generator=g, dtype=dtype).transpose(1, 2).requires_grad_()
                for _ in range(2))
        back = lambda out: out.transpose(1, 2).contiguous()  # noqa: E731 -- what the HF backend returns
        return {
            "bigkernels": Variant(lambda: back(scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                            softcap=softcap)), (q, k, v)),
            "eager-softcap": Variant(lambda: back(_eager_softcap(q, k, v, softcap)), (q, k, v),
                                     note="transformers' eager attention with the softcap (SDPA cannot cap)"),
        }
    name = f"{DTYPE_NAMES[dtype]} {label}: B{B} H{Hq}/{Hkv} L{L} D{D} causal softcap {softcap:g}"
    return Case(family="attention", name=name,
                params=dict(model=label, B=B, H=Hq, Hkv=Hkv, L=L, S=L, D=D, dtype=DTYPE_NAMES[dtype], causal=True,
                            softcap=softcap),
                flops=2.0 * B * Hq * L * L * D, backward_flops_factor=2.5, make=make)


def _cpu_case(label, B, Hq, Hkv, L, S, D, mask, causal, training, dtype):
    mask_text = " padding" if mask else ""
    name = f"{DTYPE_NAMES[dtype]} {label}: B{B} H{Hq}/{Hkv} L{L} S{S} D{D}{mask_text}{' causal' if causal else ''}"
    return Case(family="attention", name=name,
                params=dict(model=label, B=B, H=Hq, Hkv=Hkv, L=L, S=S, D=D, dtype=DTYPE_NAMES[dtype],
                            causal=causal, mask=mask or "none"),
                flops=4.0 * B * Hq * L * S * D / (2 if causal else 1), backward_flops_factor=2.5,
                make=_make_cpu(B, Hq, Hkv, L, S, D, mask, causal, training, dtype))


def _make_gpu(device, B, H, L, S, D, dtype, causal):
    def make():
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=g, device=device, dtype=dtype).requires_grad_()
                   for n in (L, S, S))
        variants = {"bigkernels": Variant(lambda: scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v))}
        for backend in SDPA_BACKENDS:
            if backend != "math" or L <= GPU_MATH_MAX_SEQLEN:
                variants[backend] = Variant(_sdpa(backend, q, k, v, causal), (q, k, v),
                                            note=f"F.scaled_dot_product_attention, {backend} backend")
        return variants
    return make


def _gpu_case(device, B, H, L, S, D, dtype, causal):
    return Case(family="attention", name=f"{DTYPE_NAMES[dtype]} B{B} H{H} L{L} S{S} D{D}{' causal' if causal else ''}",
                params=dict(B=B, H=H, L=L, S=S, D=D, dtype=DTYPE_NAMES[dtype], causal=causal),
                # 4·B·H·L·S·D (QK^T and PV), halved when causal; backward 2.5x the forward
                flops=4.0 * B * H * L * S * D / (2 if causal else 1), backward_flops_factor=2.5,
                make=_make_gpu(device, B, H, L, S, D, dtype, causal))


def cases(device, full, log=print):
    if device == "cuda":
        seqlens = GPU_SEQLENS if full else (1024, 4096)
        return [_gpu_case(device, 16384 // L, 2048 // D, L, L, D, torch.bfloat16, causal)
                for D in (64, 128) for L in seqlens for causal in (False, True)]
    rows = CPU_MATRIX if full else [r for r in CPU_MATRIX if r[0] in CPU_SHORT]
    dtypes = (torch.float32, torch.bfloat16) if full else (torch.float32,)
    return ([_cpu_case(*row, dtype) for dtype in dtypes for row in rows]
            + [_softcap_case(*row, dtype) for dtype in dtypes for row in (CPU_SOFTCAP if full else [])])
