"""The varlen family: attention over a batch of sequences of different
lengths, training (forward and backward). bigkernels.varlen_attention runs
the sequences packed end to end, with no padding, against what PyTorch
users run today on the same batch:
- "sdpa": F.scaled_dot_product_attention on the batch padded to its longest
  sequence, with the padding mask transformers builds (keys; causal models:
  causal and keys, as a [B, 1, L, L] bool mask);
- "sdpa-blockmask": F.scaled_dot_product_attention over the packed tokens as
  one sequence with a block-diagonal mask, what transformers' padding-free
  training (DataCollatorWithFlattening) runs on its "sdpa" backend;
- "bigkernels-padded": our own scaled_dot_product_attention on the padded
  batch, which shows what skipping the padding buys;
- "flash-attn": flash_attn_varlen_func (GPU, when installed).
Lengths are drawn with a fixed seed so that half the padded batch is
padding; the TFLOP/s count only the real
sequences' work. Shapes from Hugging Face configs: MiniLM-L6 (12 heads,
head dim 32), BERT-base (12, 64), GPT-2 (12, 64, causal), Qwen2.5-0.5B
(14 query / 2 KV heads, 64, causal)."""

import torch
import torch.nn.functional as F

import bigkernels

from .harness import Case, Variant

DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "sdpa", "sdpa-blockmask", "bigkernels-padded", "flash-attn")
# name, B, longest L, heads, KV heads, head dim, causal
CPU_MATRIX = [
    ("MiniLM", 32, 128, 12, 12, 32, False),
    ("BERT", 8, 512, 12, 12, 64, False),
    ("GPT-2", 8, 1024, 12, 12, 64, True),
    ("Qwen2.5-0.5B", 4, 2048, 14, 2, 64, True),
]
CPU_SHORT = ("MiniLM",)
GPU_MATRIX = [
    ("BERT", 64, 512, 12, 12, 64, False),
    ("Llama", 16, 2048, 32, 8, 128, True),
    ("Qwen2.5-0.5B", 16, 4096, 14, 2, 64, True),
]


def lengths(B, L, seed=0):
    """B lengths, the first L and the others random in [1, L] with the total
    B * L / 2: half the padded batch is padding (a few lengths of a random
    draw would leave anything from a third to two thirds)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(B - 1, generator=gen, dtype=torch.float64) + 0.05
    others = (weights / weights.sum() * (B * L / 2 - L)).round().clamp(1, L).long()
    return [L] + others.tolist()


def _make(device, B, L, H, Hkv, D, causal, dtype):
    def make():
        lens = lengths(B, L)
        T = sum(lens)
        gen = torch.Generator(device=device).manual_seed(0)
        randn = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
        q, k, v = randn(T, H, D).requires_grad_(), randn(T, Hkv, D).requires_grad_(), randn(T, Hkv, D).requires_grad_()
        cu = torch.tensor([0] + lens, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        # the same tokens padded, [B, H, L, D] views of [B, L, H, D] as transformers' projections give them
        keep = torch.arange(L, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]  # [B, L]

        def padded(x):
            out = x.new_zeros(B, L, x.shape[1], D)
            out[keep] = x.detach()
            return out.transpose(1, 2).requires_grad_()

        qp, kp, vp = padded(q), padded(k), padded(v)
        mask = keep[:, None, None, :]
        if causal:
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=device).tril()
        sequence = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(lens, device=device))
        block = sequence[:, None] == sequence[None, :]
        if causal:
            block = block & torch.ones(T, T, dtype=torch.bool, device=device).tril()
        qf, kf, vf = (x.detach().transpose(0, 1)[None].requires_grad_() for x in (q, k, v))  # [1, H, T, D]
        gqa = H != Hkv
        variants = {
            "bigkernels": Variant(lambda: bigkernels.varlen_attention(q, k, v, cu, cu, L, L, causal=causal),
                                  (q, k, v)),
            "sdpa": Variant(lambda: F.scaled_dot_product_attention(qp, kp, vp, mask, enable_gqa=gqa), (qp, kp, vp),
                            note="the padded batch, transformers' padding mask"),
            "bigkernels-padded": Variant(
                lambda: bigkernels.scaled_dot_product_attention(qp, kp, vp, mask, enable_gqa=gqa), (qp, kp, vp),
                note="ours on the padded batch, the same mask"),
        }
        if T * T <= 2 ** 26:  # a [T, T] mask of at most 64 MiB
            variants["sdpa-blockmask"] = Variant(
                lambda: F.scaled_dot_product_attention(qf, kf, vf, block, enable_gqa=gqa), (qf, kf, vf),
                note="the packed tokens with a block-diagonal mask (transformers' padding-free sdpa)")
        if device == "cuda":
            try:
                from flash_attn import flash_attn_varlen_func
                variants["flash-attn"] = Variant(
                    lambda: flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=causal), (q, k, v),
                    note="flash_attn_varlen_func")
            except ImportError:
                pass
        return variants
    return make


def _case(device, name, B, L, H, Hkv, D, causal, dtype):
    lens = lengths(B, L)
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lens)
    padding = 1 - sum(lens) / (B * L)
    return Case(family="varlen",
                name=f"{DTYPE_NAMES[dtype]} {name} B{B} L<={L} H{H}/{Hkv} D{D}{' causal' if causal else ''} "
                     f"pad {padding:.0%}",
                params=dict(B=B, H=H, Hkv=Hkv, L=L, S=L, D=D, dtype=DTYPE_NAMES[dtype], causal=causal,
                            padding=round(padding, 3)),
                flops=4.0 * H * D * pairs, backward_flops_factor=2.5,
                make=_make(device, B, L, H, Hkv, D, causal, dtype))


def cases(device, full, log=print):
    if device == "cuda":
        return [_case(device, *row, torch.bfloat16) for row in GPU_MATRIX]
    rows = CPU_MATRIX if full else [r for r in CPU_MATRIX if r[0] in CPU_SHORT]
    return [_case(device, *row, dtype) for dtype in (torch.float32, torch.bfloat16) for row in rows]
