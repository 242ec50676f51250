"""Fused LM-head losses: a linear layer and the cross-entropy of its output,
and knowledge distillation between two such layers, without the
[tokens x vocabulary] logits in memory. Argument checks, fake
implementations, and the fallback to PyTorch where the kernels are absent.

The ops (bigkernels::linear_cross_entropy and its _forward / _backward,
bigkernels::linear_distillation_loss and its _forward) are
defined in csrc/losses/losses.cpp, with kernels for the CPU
(csrc/losses/cpu/) and CUDA (csrc/losses/cuda/, in builds compiled with
CUDA; never run on a GPU yet) and autograd in C++ (csrc/losses/losses_autograd.cpp).
Elsewhere (other devices, a CPU-only build on a CUDA tensor, no extension)
the same results come from reference.py's PyTorch ops, which do hold the logits.
"""

import torch

from .. import _ext, reference
from .._info import BUILD_INFO
from ._autocast import autocast_dtype, autocast_inputs, autocast_runs_in_float32

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_METHODS = ("chunked", "blocked")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(input, weight, target, bias, ignore_index, label_smoothing, reduction, softcap, z_loss, chunk_rows,
           method="chunked", skip_small_gradients=False, prefix=""):
    """Raises TypeError/ValueError naming the bad argument (targets out of
    range are found by the kernel, which reads them). prefix: the argument
    names' ("student_" for the distillation's student); target None: none
    to check (distillation without a hard term)."""
    input_, weight_, bias_ = prefix + "input", prefix + "weight", prefix + "bias"
    for name, t in ((input_, input), (weight_, weight)) + ((("target", target),) if target is not None else ()):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{input_} must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError(f"{input_} must have at least 1 dimension ([..., D]), got a 0-d tensor")
    if weight.dtype != input.dtype:
        raise TypeError(f"{weight_} dtype {weight.dtype} does not match {input_} dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"{weight_} is on {weight.device} but {input_} is on {input.device}")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1]:
        raise ValueError(f"{weight_} must be [V, {input.shape[-1]}] ({input_}'s last dimension), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_} must have at least one row (the vocabulary), got shape "
                         f"{tuple(weight.shape)}")
    if target is not None:
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64 (class indices), got {target.dtype}")
        if target.device != input.device:
            raise ValueError(f"target is on {target.device} but {input_} is on {input.device}")
        if tuple(target.shape) != tuple(input.shape[:-1]):
            raise ValueError(f"target must have shape {tuple(input.shape[:-1])} ({input_}'s leading dimensions), "
                             f"got {tuple(target.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"{bias_} must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != input.dtype:
            raise TypeError(f"{bias_} dtype {bias.dtype} does not match {input_} dtype {input.dtype}")
        if bias.device != input.device:
            raise ValueError(f"{bias_} is on {bias.device} but {input_} is on {input.device}")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_} must be [{weight.shape[0]}] ({weight_}'s rows), got {tuple(bias.shape)}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not _is_number(label_smoothing) or not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if softcap is not None and (not _is_number(softcap) or not softcap > 0):
        raise ValueError(f"softcap must be a number > 0 or None, got {softcap!r}")
    if not _is_number(z_loss) or not z_loss >= 0:
        raise ValueError(f"z_loss must be a number >= 0, got {z_loss!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be an int >= 1 or None, got {chunk_rows!r}")
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be 'chunked' or 'blocked', got {method!r}")
    if not isinstance(skip_small_gradients, bool):
        raise TypeError(f"skip_small_gradients must be a bool, got {skip_small_gradients!r}")
    if skip_small_gradients and method != "blocked":
        raise ValueError(f"skip_small_gradients=True needs method='blocked', got method={method!r} (whose "
                         f"gradients are exact: no tiles to skip)")
    # Here, not in the op alone: the fallback without the extension raises it too.
    if method == "blocked" and input.device.type != "cuda":
        raise NotImplementedError(f"method='blocked' runs on CUDA only (Cut Cross-Entropy's tiles); on "
                                  f"{input.device.type} use method='chunked'")


def _has_kernel(device):
    """Whether the compiled op has a kernel for device: the CPU's, or CUDA's
    when this build compiled the CUDA kernels."""
    if not _ext.LOADED:
        return False
    return device.type == "cpu" or (device.type == "cuda" and BUILD_INFO["cuda_compiled"])


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                         reduction="mean", softcap=None, z_loss=0.0, return_lse=False, chunk_rows=None,
                         method="chunked", skip_small_gradients=False):
    """F.cross_entropy(F.linear(input, weight, bias), target, ...) without the
    logits in memory: input [..., D], weight [V, D], target [...] (int64).

    softcap: the logits become softcap * tanh(logits / softcap) first (Gemma 2).
    z_loss: z_loss * lse^2 is added to each row's loss (PaLM), lse being the
    row's log-sum-exp. ignore_index rows count nowhere and cost nothing;
    'mean' divides by the rows that count, and is 0 (with zero gradients)
    when none does, where torch's gives NaN. return_lse: also the rows' lse
    (float32; float64 for double inputs; 0 for ignored rows), without a
    gradient. chunk_rows: rows whose logits are held at once (default: 8M
    logits' worth, at least 256 rows); fewer saves memory, more runs fewer
    passes over the weight's gradient.

    method: "chunked" (default), chunks of rows with the whole vocabulary,
    each chunk's logits made once. "blocked": Cut Cross-Entropy's way, the
    logits a tile (rows x a block of the vocabulary) at a time, so it never
    holds a row's logits (workspace: per-row statistics plus float32
    accumulators for the gradients, [rows, D] and [V, D]); it runs on CUDA
    only (NotImplementedError elsewhere), chunk_rows does not apply, and its
    gradients are summed with atomics: close to the chunked method's, not
    bit-identical run to run. skip_small_gradients (method "blocked" only):
    the backward skips a tile's gradient products when every softmax
    probability in it is below the dtype's unit roundoff / 16 (2^-12 for
    bfloat16, 2^-15 float16, 2^-28 float32, 2^-57 float64) and
    label_smoothing is 0. Not exact, so off by default.

    Gradients flow to input, weight and bias, computed in the forward pass
    when the reduction is 'mean' or 'sum' (the backward scales them)."""
    _check(input, weight, target, bias, ignore_index, label_smoothing, reduction, softcap, z_loss, chunk_rows,
           method, skip_small_gradients)
    float32_loss = autocast_runs_in_float32(input)
    loss, lse = _linear_cross_entropy(input, weight, target, bias, ignore_index, label_smoothing, reduction, softcap,
                                      z_loss, chunk_rows, method=method,
                                      skip_small_gradients=skip_small_gradients)
    # torch's autocast runs cross_entropy in float32: the loss stays so there
    loss = loss.float() if float32_loss else loss.to(input.dtype)
    return (loss, lse) if return_lse else loss


def _linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                          reduction="mean", softcap=None, z_loss=0.0, chunk_rows=None, *, method="chunked",
                          skip_small_gradients=False):
    """linear_cross_entropy without its checks: (loss, lse), the loss in
    float32 (float64 for double) whatever input's dtype, as Hugging Face's
    causal-LM loss has it. The PyTorch fallback ignores method (the same
    numbers, exact gradients)."""
    input, weight, bias = autocast_inputs(input, weight, bias)
    lead = input.shape[:-1]
    x, t = input.reshape(-1, input.shape[-1]), target.reshape(-1)
    if _has_kernel(x.device):
        loss, lse = torch.ops.bigkernels.linear_cross_entropy(
            x, weight, t, bias, ignore_index, float(label_smoothing), float(softcap or 0.0), float(z_loss),
            reduction, int(chunk_rows or 0), method, skip_small_gradients)
    else:
        loss, lse = reference.linear_cross_entropy(x, weight, t, bias, ignore_index, label_smoothing,
                                                   softcap or 0.0, z_loss, reduction)
        loss = loss.to(lse.dtype)
    return (loss.reshape(lead) if reduction == "none" else loss), lse.reshape(lead)


def _check_distillation(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                        teacher_bias, temperature, beta, hard_weight, ignore_index, reduction, chunk_rows,
                        method="chunked"):
    """Raises TypeError/ValueError naming the bad argument, and
    NotImplementedError for method 'blocked' off CUDA."""
    for name, t in (("student_input", student_input), ("student_weight", student_weight),
                    ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _check(student_input, student_weight, target, student_bias, ignore_index, 0.0, reduction, None, 0.0, chunk_rows,
           prefix="student_")
    if teacher_input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"teacher_input must be float16, bfloat16, float32 or float64, got {teacher_input.dtype}")
    if tuple(teacher_input.shape[:-1]) != tuple(student_input.shape[:-1]):
        raise ValueError(f"teacher_input has leading shape {tuple(teacher_input.shape[:-1])} but student_input has "
                         f"{tuple(student_input.shape[:-1])}: one teacher row per student row")
    for name, t in (("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != teacher_input.dtype:
            raise TypeError(f"{name} dtype {t.dtype} does not match teacher_input dtype {teacher_input.dtype}")
    for name, t in (("teacher_input", teacher_input), ("teacher_weight", teacher_weight),
                    ("teacher_bias", teacher_bias)):
        if t is not None and t.device != student_input.device:
            raise ValueError(f"{name} is on {t.device} but student_input is on {student_input.device}")
    V = student_weight.shape[0]
    if tuple(teacher_weight.shape) != (V, teacher_input.shape[-1]):
        raise ValueError(f"teacher_weight must be [{V}, {teacher_input.shape[-1]}] (the student's vocabulary, "
                         f"teacher_input's last dimension), got {tuple(teacher_weight.shape)}")
    if teacher_bias is not None and tuple(teacher_bias.shape) != (V,):
        raise ValueError(f"teacher_bias must be [{V}], got {tuple(teacher_bias.shape)}")
    if not _is_number(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not _is_number(beta) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if not _is_number(hard_weight) or not hard_weight >= 0:
        raise ValueError(f"hard_weight must be a number >= 0, got {hard_weight!r}")
    if hard_weight and target is None:
        raise ValueError(f"hard_weight={hard_weight} needs a target")
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be 'chunked' or 'blocked', got {method!r}")
    if method == "blocked":
        # The dtypes the kernels will see: autocast casts both sides alike.
        student_dtype, teacher_dtype = autocast_dtype(student_input), autocast_dtype(teacher_input)
        if teacher_dtype != student_dtype:
            student_name, teacher_name = (str(d).replace("torch.", "") for d in (student_dtype, teacher_dtype))
            raise TypeError(f"method 'blocked' needs the teacher in the student's dtype ({student_name}), got "
                            f"teacher_input {teacher_name}: cast it, or use method 'chunked'")
        # Here, not in the op alone: the fallback without the extension raises it too.
        if student_input.device.type != "cuda":
            raise NotImplementedError(f"method='blocked' runs on CUDA only (Cut Cross-Entropy's tiles); on "
                                      f"{student_input.device.type} use method='chunked'")


def linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target=None, *,
                             student_bias=None, teacher_bias=None, temperature=1.0, beta=0.0, hard_weight=0.0,
                             ignore_index=-100, reduction="mean", chunk_rows=None, method="chunked"):
    """Knowledge distillation from a teacher's LM head to a student's, without
    either [tokens x V] logits matrix in memory: student_input [..., Ds],
    student_weight [V, Ds], teacher_input [..., Dt], teacher_weight [V, Dt].

    With Q = softmax(student logits / T) and P = softmax(teacher logits / T),
    the soft loss of a row is KL(P || Q) for beta=0 (Hinton's), KL(Q || P) for
    beta=1, and in between the generalized Jensen-Shannon divergence
    beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q (as
    Liger's JSD: it tends to 0 at both ends, which are the KLs instead). It
    is scaled by T^2, and hard_weight * cross-entropy of the student's logits
    (T = 1) on target is added when hard_weight > 0. Rows whose target is
    ignore_index count in neither term; 'mean' divides by the rows that count
    (0 when none does). Gradients reach the student's input, weight and bias;
    the teacher (any float dtype, under no_grad or not) gets none.
    chunk_rows as in linear_cross_entropy.

    method: "chunked" (default), chunks of rows with the whole vocabulary,
    the teacher's and the student's logits of a chunk made once.
    "blocked": never holds a row's logits, teacher's or student's: three
    passes over the vocabulary's tiles (statistics, the divergence's sums,
    gradients) with both products made in each (the teacher's three times,
    where the chunked method makes it once), its gradients summed with
    atomics (close to the chunked method's, not bit-identical run to run).
    It runs on CUDA only (NotImplementedError elsewhere), needs the teacher
    in the student's dtype (TypeError otherwise; under autocast, as autocast
    casts them), and chunk_rows does not apply."""
    _check_distillation(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                        teacher_bias, temperature, beta, hard_weight, ignore_index, reduction, chunk_rows, method)
    float32_loss = autocast_runs_in_float32(student_input)
    student_input, student_weight, student_bias = autocast_inputs(student_input, student_weight, student_bias)
    teacher_input, teacher_weight, teacher_bias = autocast_inputs(teacher_input, teacher_weight, teacher_bias)
    lead = student_input.shape[:-1]
    xs, xt = student_input.reshape(-1, student_input.shape[-1]), teacher_input.reshape(-1, teacher_input.shape[-1])
    t = None if target is None else target.reshape(-1)
    if _has_kernel(xs.device):
        loss = torch.ops.bigkernels.linear_distillation_loss(
            xs, student_weight, xt, teacher_weight, t, student_bias, teacher_bias, float(temperature), float(beta),
            float(hard_weight), ignore_index, reduction, int(chunk_rows or 0), method)
    else:
        # the teacher frozen, as in the kernels (method ignored: the same numbers)
        teacher = [None if a is None else a.detach() for a in (xt, teacher_weight, teacher_bias)]
        loss = reference.linear_distillation_loss(xs, student_weight, teacher[0], teacher[1], t, student_bias,
                                                  teacher[2], temperature, beta, hard_weight, ignore_index, reduction)
    loss = loss.float() if float32_loss else loss.to(student_input.dtype)
    return loss.reshape(lead) if reduction == "none" else loss


def _register():
    """Fake implementations for the compiled ops (autograd is in C++)."""

    def stats_dtype(input):
        return torch.float64 if input.dtype == torch.float64 else torch.float32

    def loss_and_lse(input, reduction):
        rows = input.shape[0]
        loss = input.new_empty((rows,) if reduction == "none" else (), dtype=stats_dtype(input))
        return loss, input.new_empty((rows,), dtype=stats_dtype(input))

    @torch.library.register_fake("bigkernels::linear_cross_entropy")
    def _fake(input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss, reduction, chunk_rows,
              method, skip_small_gradients):
        return loss_and_lse(input, reduction)

    def grads(input, weight, bias, grad_mask):
        def like(t, wanted):
            return torch.empty_like(t, memory_format=torch.contiguous_format) if wanted else input.new_empty((0,))
        return (like(input, grad_mask[0]), like(weight, grad_mask[1]),
                like(bias, grad_mask[2] and bias is not None) if bias is not None else input.new_empty((0,)))

    @torch.library.register_fake("bigkernels::linear_cross_entropy_forward")
    def _forward_fake(input, weight, target, bias, ignore_index, label_smoothing, softcap, z_loss, reduction,
                      chunk_rows, method, skip_small_gradients, grad_mask):
        return (*loss_and_lse(input, reduction), *grads(input, weight, bias, grad_mask))

    @torch.library.register_fake("bigkernels::linear_distillation_loss")
    def _distillation_fake(student_input, student_weight, teacher_input, teacher_weight, target, student_bias,
                           teacher_bias, temperature, beta, hard_weight, ignore_index, reduction, chunk_rows,
                           method):
        return loss_and_lse(student_input, reduction)[0]

    @torch.library.register_fake("bigkernels::linear_distillation_loss_forward")
    def _distillation_forward_fake(student_input, student_weight, teacher_input, teacher_weight, target,
                                   student_bias, teacher_bias, temperature, beta, hard_weight, ignore_index,
                                   reduction, chunk_rows, method, grad_loss, grad_mask):
        return (loss_and_lse(student_input, reduction)[0],
                *grads(student_input, student_weight, student_bias, grad_mask))

    @torch.library.register_fake("bigkernels::linear_cross_entropy_backward")
    def _backward_fake(grad_loss, input, weight, target, bias, lse, ignore_index, label_smoothing, softcap, z_loss,
                       chunk_rows, method, skip_small_gradients, grad_mask):
        return grads(input, weight, bias, grad_mask)


if _ext.LOADED:
    _register()
