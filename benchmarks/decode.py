"""The decode family: one decoding step of attention against a KV cache,
bigkernels.attention_with_kvcache (the new token's key and value written into
the cache, then attention over it) against what PyTorch users run today on
the same step: F.scaled_dot_product_attention over the same [B, capacity, Hkv,
D] cache (flash-attention's layout) after writing the token into it, and over
a [B, Hkv, capacity, D] cache as transformers' StaticCache keeps it
(index_copy_, then SDPA over the filled part: its best eager path). GQA runs
as SDPA's enable_gqa. Llama-3-8B's attention: 32 query heads, 8 KV heads,
head dim 128. Decoding is memory-bound: the table shows the GB/s of K and V
read, and the "copy" variant, a torch copy_ that reads and writes as many
bytes in all as the step must read, timed in the same rounds (this shared
host's bandwidth moves by 1.5x over minutes), so that "x copy" is our share
of this machine's copy bandwidth."""

import torch
import torch.nn.functional as F

import bigkernels

from .harness import Case, Variant

DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "sdpa", "sdpa-static", "flash-attn", "copy")
H, HKV, D = 32, 8, 128
CPU_FULL = [(B, S) for B in (1, 8) for S in (1024, 8192, 32768)]
CPU_SHORT = [(1, 8192)]
GPU_FULL = [(B, S) for B in (1, 8, 64) for S in (1024, 8192, 32768, 131072) if B * S <= 2 ** 20]


def _make(device, B, S, dtype):
    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        capacity = S + 64  # room left, as a cache allocated ahead has
        randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
        q, k_new, v_new = randn(B, 1, H, D), randn(B, 1, HKV, D), randn(B, 1, HKV, D)
        k_cache, v_cache = randn(B, capacity, HKV, D), randn(B, capacity, HKV, D)
        # each step writes the same position: S - 1 keys in the cache, the new one makes S
        seqlens = torch.full((B,), S - 1, dtype=torch.int32, device=device)
        k_static, v_static = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()
        position = torch.tensor([S - 1], device=device)
        # copy_ of half the K and V bytes: as many bytes moved as the step reads
        copy_src = k_cache[:, :S]
        copy_dst = torch.empty_like(copy_src)

        def ours():
            return bigkernels.attention_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                                     causal=True)

        def sdpa():
            k_cache[:, S - 1] = k_new[:, 0]
            v_cache[:, S - 1] = v_new[:, 0]
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache[:, :S].transpose(1, 2),
                                                 v_cache[:, :S].transpose(1, 2), enable_gqa=True)
            return out.transpose(1, 2)

        def sdpa_static():
            k_static.index_copy_(2, position, k_new.transpose(1, 2))
            v_static.index_copy_(2, position, v_new.transpose(1, 2))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_static[:, :, :S], v_static[:, :, :S],
                                                 enable_gqa=True)
            return out.transpose(1, 2)

        variants = {
            "bigkernels": Variant(ours, backward=False),
            "sdpa": Variant(sdpa, backward=False, note="write the token, then SDPA over the same [B, S, Hkv, D] cache"),
            "sdpa-static": Variant(sdpa_static, backward=False,
                                   note="index_copy_, then SDPA over a [B, Hkv, S, D] cache (StaticCache's layout)"),
            "copy": Variant(lambda: copy_dst.copy_(copy_src), backward=False,
                            note="copy_ of K's bytes: reads and writes as many bytes as the step reads"),
        }
        if device == "cuda":
            try:
                from flash_attn import flash_attn_with_kvcache
                variants["flash-attn"] = Variant(
                    lambda: flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                                    causal=True), backward=False, note="flash_attn_with_kvcache")
            except ImportError:
                pass
        return variants
    return make


def _case(device, B, S, dtype):
    elem = torch.empty((), dtype=dtype).element_size()
    return Case(family="decode", name=f"{DTYPE_NAMES[dtype]} decode B{B} H{H}/{HKV} S{S} D{D}",
                params=dict(B=B, H=H, Hkv=HKV, L=1, S=S, D=D, dtype=DTYPE_NAMES[dtype]),
                flops=4.0 * B * H * S * D, bytes=2.0 * B * S * HKV * D * elem,  # K and V, each read once
                make=_make(device, B, S, dtype))


def cases(device, full, log=print):
    shapes = (GPU_FULL if full else [(1, 8192), (8, 8192)]) if device == "cuda" else (CPU_FULL if full else CPU_SHORT)
    dtypes = (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16)
    return [_case(device, B, S, dtype) for dtype in dtypes for B, S in shapes]
