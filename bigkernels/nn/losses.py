"""Loss modules over the fused LM-head losses of bigkernels.ops.losses."""

import torch

from ..ops.losses import linear_cross_entropy, linear_distillation_loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """nn.CrossEntropyLoss applied to a linear layer's output, fused:
    forward(input [..., D], weight [V, D], target [...], bias=None) equals
    CrossEntropyLoss(...)(F.linear(input, weight, bias) [capped], target)
    without the [tokens x V] logits in memory (bigkernels.linear_cross_entropy
    says how, and what softcap, z_loss, chunk_rows, method and
    skip_small_gradients do). Its arguments follow
    F.linear's order, input first (Liger's module takes the weight first)."""

    def __init__(self, ignore_index=-100, label_smoothing=0.0, reduction="mean", softcap=None, z_loss=0.0,
                 chunk_rows=None, method="chunked", skip_small_gradients=False):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.softcap, self.z_loss, self.chunk_rows = softcap, z_loss, chunk_rows
        self.method, self.skip_small_gradients = method, skip_small_gradients

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, ignore_index=self.ignore_index,
                                    label_smoothing=self.label_smoothing, reduction=self.reduction,
                                    softcap=self.softcap, z_loss=self.z_loss, chunk_rows=self.chunk_rows,
                                    method=self.method, skip_small_gradients=self.skip_small_gradients)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"reduction={self.reduction!r}, softcap={self.softcap}, z_loss={self.z_loss}, "
                f"method={self.method!r}, skip_small_gradients={self.skip_small_gradients}")


class LinearDistillationLoss(torch.nn.Module):
    """Knowledge distillation between a teacher's LM head and a student's,
    fused: forward(student_input, student_weight, teacher_input,
    teacher_weight, target=None, student_bias=None, teacher_bias=None) is
    bigkernels.linear_distillation_loss with this module's options (which
    says what temperature, beta, hard_weight, chunk_rows and method do)."""

    def __init__(self, temperature=1.0, beta=0.0, hard_weight=0.0, ignore_index=-100, reduction="mean",
                 chunk_rows=None, method="chunked"):
        super().__init__()
        self.temperature, self.beta, self.hard_weight = temperature, beta, hard_weight
        self.ignore_index, self.reduction, self.chunk_rows = ignore_index, reduction, chunk_rows
        self.method = method

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, target=None, student_bias=None,
                teacher_bias=None):
        return linear_distillation_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                        student_bias=student_bias, teacher_bias=teacher_bias,
                                        temperature=self.temperature, beta=self.beta, hard_weight=self.hard_weight,
                                        ignore_index=self.ignore_index, reduction=self.reduction,
                                        chunk_rows=self.chunk_rows, method=self.method)

    def extra_repr(self):
        return (f"temperature={self.temperature}, beta={self.beta}, hard_weight={self.hard_weight}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, method={self.method!r}")
