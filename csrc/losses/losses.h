// Host-side pieces of the loss ops (linear + cross-entropy) shared by their
// implementations: options, argument checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace bigkernels {

enum class Reduction { kNone, kMean, kSum };
Reduction parse_reduction(c10::string_view name);
// The method's name: "chunked" (false) or "blocked" (true).
bool parse_method(c10::string_view name);

// What turns a row's logits z into its loss: z -> softcap * tanh(z / softcap)
// when softcap > 0, then cross-entropy with label smoothing, plus
// z_loss * lse^2. Rows whose target is ignore_index count nowhere. blocked:
// method "blocked" (the logits a tile at a time, never a row's; CUDA only);
// skip_small_gradients (blocked only): the backward skips tiles whose softmax
// is below the dtype's resolution (not exact).
struct CrossEntropyOptions {
  int64_t ignore_index;
  double label_smoothing;
  double softcap;  // 0: none
  double z_loss;
  bool blocked = false;
  bool skip_small_gradients = false;
};

// Checks the arguments of the linear_cross_entropy ops: input [N, D] (float16,
// bfloat16, float32 or float64), weight [V, D] and bias [V] in its dtype and
// on its device, target [N] int64, the options' ranges (skip_small_gradients
// only with blocked). Messages name the
// argument and show the bad value. (Targets out of range are checked by the
// kernels, which read them.)
void check_linear_cross_entropy_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
                                     const std::optional<at::Tensor>& bias, const CrossEntropyOptions& options,
                                     int64_t chunk_rows);

// blocked: method "blocked" (both logits a tile at a time, never a row's;
// CUDA only; the teacher in the student's dtype).
struct DistillationOptions {
  double temperature;  // > 0
  double beta;         // in [0, 1]
  double hard_weight;  // >= 0; > 0 needs a target
  int64_t ignore_index;
  bool blocked = false;
};

// The checks of the linear_distillation_loss ops: the student's input [N, Ds],
// weight [V, Ds] and bias [V] as linear_cross_entropy's; the teacher's input
// [N, Dt], weight [V, Dt] and bias [V] in one floating dtype of their own
// (with blocked, the student's), on the student's device; target [N] int64
// or none; the options' ranges.
void check_linear_distillation_args(const at::Tensor& student_input, const at::Tensor& student_weight,
                                    const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
                                    const std::optional<at::Tensor>& target,
                                    const std::optional<at::Tensor>& student_bias,
                                    const std::optional<at::Tensor>& teacher_bias,
                                    const DistillationOptions& options, int64_t chunk_rows);

}  // namespace bigkernels
