// The loss family's ops on any device: the chunk loop (chunks.cpp) given the
// device's product and row passes (and its blocked kernels, where it has
// them), and the registration of the ops for a device (cpu/losses_cpu.cpp,
// cuda/losses_cuda.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "losses/loss_rows.h"
#include "losses/losses.h"

namespace bigkernels {

// Cut Cross-Entropy's way (method "blocked"), on devices that have it: the
// rows' lse, loss and gradients with the logits made a tile at a time. x and
// target: the rows that count, contiguous; lse_given (backward): their lse
// from the forward (compute type), and then no loss is computed; row_scale
// (undefined: `scale` for every row) weighs each row's gradient.
struct BlockedResults {
  at::Tensor loss_rows, lse;  // [rows] compute type (loss_rows undefined when lse_given)
  at::Tensor grad_input, grad_weight, grad_bias;  // [rows, D] and [V, D] in x's dtype, [V] compute type; undefined where not in grad_mask
};

// Distillation the same way (method "blocked"): xs/xt and target the rows
// that count, contiguous (target undefined: no hard term); row_scale
// (undefined: `scale` for every row) weighs each row's gradient.
struct BlockedDistillationResults {
  at::Tensor loss_rows;  // [rows] compute type
  at::Tensor grad_input, grad_weight, grad_bias;  // [rows, Ds] and [V, Ds] in the dtype, [V] compute type; undefined where not in grad_mask
};

struct LossDevice {
  // x [n, K] @ w [V, K]^T (+ b), a new [n, V] tensor in x's dtype
  at::Tensor (*product)(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b);
  // the passes over all `rows` rows of a chunk
  void (*cross_entropy_rows)(at::ScalarType dtype, const CrossEntropyRows& a, int64_t rows);
  void (*distillation_rows)(at::ScalarType dtype, const DistillationRows& a, int64_t rows);
  // null where the device has no blocked kernels (the CPU), as is distillation_blocked
  BlockedResults (*cross_entropy_blocked)(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                                          const at::Tensor& target, const CrossEntropyOptions& options,
                                          std::array<bool, 3> grad_mask, const at::Tensor& lse_given,
                                          const at::Tensor& row_scale, double scale);
  BlockedDistillationResults (*distillation_blocked)(
      const at::Tensor& xs, const at::Tensor& ws, const std::optional<at::Tensor>& bs, const at::Tensor& xt,
      const at::Tensor& wt, const std::optional<at::Tensor>& bt, const at::Tensor& target,
      const DistillationOptions& options, std::array<bool, 3> grad_mask, const at::Tensor& row_scale, double scale);
};

// The ops' bodies (schemas in losses.cpp), for a device.
std::tuple<at::Tensor, at::Tensor> linear_cross_entropy(
    const LossDevice& device, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
    double z_loss, c10::string_view reduction, int64_t chunk_rows, c10::string_view method,
    bool skip_small_gradients);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const LossDevice& device, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
    const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
    double z_loss, c10::string_view reduction, int64_t chunk_rows, c10::string_view method,
    bool skip_small_gradients, std::array<bool, 3> grad_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const LossDevice& device, const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& target, const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index,
    double label_smoothing, double softcap, double z_loss, int64_t chunk_rows, c10::string_view method,
    bool skip_small_gradients, std::array<bool, 3> grad_mask);
at::Tensor linear_distillation_loss(const LossDevice& device, const at::Tensor& student_input,
                                    const at::Tensor& student_weight, const at::Tensor& teacher_input,
                                    const at::Tensor& teacher_weight, const std::optional<at::Tensor>& target,
                                    const std::optional<at::Tensor>& student_bias,
                                    const std::optional<at::Tensor>& teacher_bias, double temperature, double beta,
                                    double hard_weight, int64_t ignore_index, c10::string_view reduction,
                                    int64_t chunk_rows, c10::string_view method);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_distillation_loss_forward(
    const LossDevice& device, const at::Tensor& student_input, const at::Tensor& student_weight,
    const at::Tensor& teacher_input, const at::Tensor& teacher_weight, const std::optional<at::Tensor>& target,
    const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
    double temperature, double beta, double hard_weight, int64_t ignore_index, c10::string_view reduction,
    int64_t chunk_rows, c10::string_view method, const std::optional<at::Tensor>& grad_loss,
    std::array<bool, 3> grad_mask);

// Registers the five ops' kernels for one device (its TORCH_LIBRARY_IMPL
// calls this), each the body above with `device` bound.
template <const LossDevice* device>
void register_loss_ops(torch::Library& m) {
  struct Bound {
    static std::tuple<at::Tensor, at::Tensor> cross_entropy(
        const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
        const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
        double z_loss, c10::string_view reduction, int64_t chunk_rows, c10::string_view method,
        bool skip_small_gradients) {
      return linear_cross_entropy(*device, input, weight, target, bias, ignore_index, label_smoothing, softcap,
                                  z_loss, reduction, chunk_rows, method, skip_small_gradients);
    }
    static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy_forward(
        const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
        const std::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double softcap,
        double z_loss, c10::string_view reduction, int64_t chunk_rows, c10::string_view method,
        bool skip_small_gradients, std::array<bool, 3> grad_mask) {
      return linear_cross_entropy_forward(*device, input, weight, target, bias, ignore_index, label_smoothing,
                                          softcap, z_loss, reduction, chunk_rows, method, skip_small_gradients,
                                          grad_mask);
    }
    static std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_backward(
        const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
        const std::optional<at::Tensor>& bias, const at::Tensor& lse, int64_t ignore_index, double label_smoothing,
        double softcap, double z_loss, int64_t chunk_rows, c10::string_view method, bool skip_small_gradients,
        std::array<bool, 3> grad_mask) {
      return linear_cross_entropy_backward(*device, grad_loss, input, weight, target, bias, lse, ignore_index,
                                           label_smoothing, softcap, z_loss, chunk_rows, method,
                                           skip_small_gradients, grad_mask);
    }
    static at::Tensor distillation(const at::Tensor& student_input, const at::Tensor& student_weight,
                                   const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
                                   const std::optional<at::Tensor>& target,
                                   const std::optional<at::Tensor>& student_bias,
                                   const std::optional<at::Tensor>& teacher_bias, double temperature, double beta,
                                   double hard_weight, int64_t ignore_index, c10::string_view reduction,
                                   int64_t chunk_rows, c10::string_view method) {
      return linear_distillation_loss(*device, student_input, student_weight, teacher_input, teacher_weight, target,
                                      student_bias, teacher_bias, temperature, beta, hard_weight, ignore_index,
                                      reduction, chunk_rows, method);
    }
    static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> distillation_forward(
        const at::Tensor& student_input, const at::Tensor& student_weight, const at::Tensor& teacher_input,
        const at::Tensor& teacher_weight, const std::optional<at::Tensor>& target,
        const std::optional<at::Tensor>& student_bias, const std::optional<at::Tensor>& teacher_bias,
        double temperature, double beta, double hard_weight, int64_t ignore_index, c10::string_view reduction,
        int64_t chunk_rows, c10::string_view method, const std::optional<at::Tensor>& grad_loss,
        std::array<bool, 3> grad_mask) {
      return linear_distillation_loss_forward(*device, student_input, student_weight, teacher_input, teacher_weight,
                                              target, student_bias, teacher_bias, temperature, beta, hard_weight,
                                              ignore_index, reduction, chunk_rows, method, grad_loss, grad_mask);
    }
  };
  m.impl("linear_cross_entropy", &Bound::cross_entropy);
  m.impl("linear_cross_entropy_forward", &Bound::cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &Bound::cross_entropy_backward);
  m.impl("linear_distillation_loss", &Bound::distillation);
  m.impl("linear_distillation_loss_forward", &Bound::distillation_forward);
}

}  // namespace bigkernels
