"""bigkernels: fused kernels for the building blocks of large models.

    import bigkernels
    y = bigkernels.dense(x, weight, bias, activation="gelu")   # act(x @ weight.T + bias)
    o = bigkernels.scaled_dot_product_attention(q, k, v, is_causal=True)  # F.scaled_dot_product_attention
    o = bigkernels.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=n, causal=True)  # decoding
    o = bigkernels.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)  # packed sequences
    y, h = bigkernels.layer_norm(x, weight, bias, residual=h)   # F.layer_norm(x + h), and x + h
    layer = bigkernels.nn.Linear(1024, 4096, activation="gelu")
    loss = bigkernels.linear_cross_entropy(h, lm_head.weight, labels)  # no [tokens x vocab] logits
    model = bigkernels.optimize(model)                          # swap torch.nn layers for ours
"""

from . import _ext  # noqa: F401  (first: loads the compiled ops, or warns why not)
from .ops.dense import dense
from .ops.attention import scaled_dot_product_attention
from .ops.kvcache import attention_with_kvcache
from .ops.varlen import varlen_attention
from .ops.norm import layer_norm, rms_norm
from .ops.losses import linear_cross_entropy, linear_distillation_loss
from . import nn, models
from ._optimize import optimize
from ._info import backend_info, __version__

__all__ = ["dense", "scaled_dot_product_attention", "attention_with_kvcache", "varlen_attention", "layer_norm", "rms_norm",
           "linear_cross_entropy", "linear_distillation_loss", "optimize", "backend_info", "nn",
           "models", "__version__"]
