"""The loss family: bigkernels.linear_cross_entropy (an LM head and its
cross-entropy, fused) against what a PyTorch user runs today: F.linear then
F.cross_entropy (eager, and torch.compile of it), and torchtune's chunked
cross-entropy (the logits made a chunk of rows at a time, each chunk's loss
in float32; autograd still keeps every chunk's logits). Distillation:
bigkernels.linear_distillation_loss against eager KL / JSD on both logits
(reference.py's) and torch.compile of it. On CUDA also our method="blocked"
(with and without skip_small_gradients), and Liger-Kernel's and Cut
Cross-Entropy's fused losses where they are installed.
Time and peak memory. (The teacher is not under no_grad in the eager variants: its
tensors do not require a gradient, which is the same to autograd.)"""

import torch
import torch.nn.functional as F

import bigkernels
from bigkernels import reference

from . import harness
from .harness import Case, Variant

DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16"}
VARIANTS = ("bigkernels", "eager", "compile", "chunked", "blocked", "blocked-skip", "liger", "cce")
# (N tokens, D hidden, V vocabulary): the grid. D 512 / V 32k is a
# small Llama-style model; V 128k is Llama 3's vocabulary, D 2048 Llama 3.2 1B's.
CPU_SHAPES = [(2048, 512, 32000), (2048, 512, 128256), (8192, 512, 32000), (8192, 512, 128256),
              (2048, 2048, 32000), (2048, 2048, 128256), (8192, 2048, 32000), (8192, 2048, 128256)]
GPU_SHAPES = [(8192, 2048, 128256), (16384, 4096, 128256), (8192, 4096, 151936), (32768, 2048, 128256)]
CHUNKS = 8  # torchtune's default num_output_chunks


def _eager(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def _chunked(x, w, t):
    """torchtune's CEWithChunkedOutputLoss: logits per chunk of rows, each
    chunk's cross-entropy in float32, summed and divided by the rows that count."""
    total = sum(F.cross_entropy(F.linear(xc, w).float(), tc, reduction="sum")
                for xc, tc in zip(x.chunk(CHUNKS), t.chunk(CHUNKS)))
    return total / (t != -100).sum()


def _make(device, N, D, V, dtype):
    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, D, generator=gen, device=device).to(dtype).requires_grad_()
        w = (torch.randn(V, D, generator=gen, device=device) * D ** -0.5).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), generator=gen, device=device)
        t[torch.rand(N, generator=gen, device=device) < 0.1] = -100  # some padding, as a real batch has
        compiled = torch.compile(_eager)
        wrt = (x, w)
        return {
            "bigkernels": Variant(lambda: bigkernels.linear_cross_entropy(x, w, t), wrt),
            "eager": Variant(lambda: _eager(x, w, t), wrt),
            "compile": Variant(lambda: compiled(x, w, t), wrt),
            "chunked": Variant(lambda: _chunked(x, w, t), wrt),
            **(_gpu_variants(x, w, t) if x.is_cuda else {}),
        }
    return make


def _gpu_variants(x, w, t):
    """On CUDA: our blocked method (Cut Cross-Entropy's way; exact, and with
    its gradient filter), and Liger-Kernel's and Cut Cross-Entropy's own
    fused losses where they are installed."""
    variants = {
        "blocked": Variant(lambda: bigkernels.linear_cross_entropy(x, w, t, method="blocked"), (x, w)),
        "blocked-skip": Variant(lambda: bigkernels.linear_cross_entropy(x, w, t, method="blocked",
                                                                        skip_small_gradients=True), (x, w)),
    }
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        variants["liger"] = Variant(lambda: liger(w, x, t), (x, w))
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
        variants["cce"] = Variant(lambda: cce(x, w, t), (x, w))
    except ImportError:
        pass
    return variants


# (N, student D, teacher D, V, beta): a student of half the teacher's width
CPU_DISTILLATION = [(2048, 512, 1024, 32000, 0.5), (2048, 512, 1024, 128256, 0.5), (2048, 512, 1024, 32000, 0.0)]
GPU_DISTILLATION = [(8192, 2048, 4096, 128256, 0.5)]
DISTILLATION_OPTIONS = dict(temperature=2.0, hard_weight=0.5)


def _make_distillation(device, N, Ds, Dt, V, beta, dtype):
    def make():
        gen = torch.Generator(device=device).manual_seed(0)
        xs = torch.randn(N, Ds, generator=gen, device=device).to(dtype).requires_grad_()
        ws = (torch.randn(V, Ds, generator=gen, device=device) * Ds ** -0.5).to(dtype).requires_grad_()
        xt = torch.randn(N, Dt, generator=gen, device=device).to(dtype)
        wt = (torch.randn(V, Dt, generator=gen, device=device) * 2 * Dt ** -0.5).to(dtype)
        t = torch.randint(0, V, (N,), generator=gen, device=device)
        t[torch.rand(N, generator=gen, device=device) < 0.1] = -100

        def eager():
            return reference.linear_distillation_loss(xs, ws, xt, wt, t, beta=beta, **DISTILLATION_OPTIONS)
        compiled = torch.compile(eager)
        wrt = (xs, ws)
        return {
            "bigkernels": Variant(lambda: bigkernels.linear_distillation_loss(xs, ws, xt, wt, t, beta=beta,
                                                                              **DISTILLATION_OPTIONS), wrt),
            **({"blocked": Variant(lambda: bigkernels.linear_distillation_loss(
                xs, ws, xt, wt, t, beta=beta, method="blocked", **DISTILLATION_OPTIONS), wrt)} if xs.is_cuda else {}),
            "eager": Variant(eager, wrt),
            "compile": Variant(compiled, wrt),
        }
    return make


def cases(device, full, log=print):
    if device == "cuda":
        shapes, dtypes = (GPU_SHAPES if full else GPU_SHAPES[:1]), (torch.bfloat16,)
    else:
        shapes = CPU_SHAPES if full else CPU_SHAPES[:2]
        dtypes = (torch.float32, torch.bfloat16) if harness.cpu_has_native_bf16() else (torch.float32,)
    distillation = (GPU_DISTILLATION if device == "cuda" else CPU_DISTILLATION if full else CPU_DISTILLATION[:1])
    # FLOPs: the student's forward product; its backward counts 2x it (the
    # teacher's product runs in the forward only, so fwd+bwd is 3.5x).
    return [
        Case(family="losses", name=f"{DTYPE_NAMES[dtype]} {N}x{D}x{V} ce",
             params=dict(N=N, D=D, V=V, dtype=DTYPE_NAMES[dtype], loss="cross_entropy"),
             flops=2.0 * N * D * V, make=_make(device, N, D, V, dtype), measure_memory=True)
        for dtype in dtypes for (N, D, V) in shapes
    ] + [
        Case(family="losses", name=f"{DTYPE_NAMES[dtype]} {N}x{Ds}/{Dt}x{V} distill beta {beta}",
             params=dict(N=N, D=Ds, teacher_D=Dt, V=V, dtype=DTYPE_NAMES[dtype], loss="distillation", beta=beta,
                         **DISTILLATION_OPTIONS),
             flops=2.0 * N * (Ds + Dt) * V, backward_flops_factor=2.0 * Ds / (Ds + Dt),
             make=_make_distillation(device, N, Ds, Dt, V, beta, dtype), measure_memory=True)
        for dtype in dtypes for (N, Ds, Dt, V, beta) in distillation
    ]
