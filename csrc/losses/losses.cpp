// The loss family's ops (schemas) and argument checks: cross-entropy of a
// linear layer's output (an LM head), computed without ever holding the
// [tokens x vocabulary] logits: a chunk of rows at a time, or (method
// "blocked", CUDA) a tile of rows x a block of the vocabulary at a time.
#include "losses/losses.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace bigkernels {

Reduction parse_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  TORCH_CHECK_VALUE(name == "none", "bigkernels linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got '",
                    std::string(name), "'");
  return Reduction::kNone;
}

namespace {

// A float dtype's name as Python spells it (the messages' readers write torch.bfloat16).
const char* dtype_name(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    default: return c10::toString(dtype);
  }
}

}  // namespace

bool parse_method(c10::string_view name) {
  if (name == "chunked") return false;
  TORCH_CHECK_VALUE(name == "blocked", "bigkernels linear_cross_entropy: method must be 'chunked' or 'blocked', got '",
                    std::string(name), "'");
  return true;
}

void check_linear_cross_entropy_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& target,
                                     const std::optional<at::Tensor>& bias, const CrossEntropyOptions& options,
                                     int64_t chunk_rows) {
  const char* op = "bigkernels linear_cross_entropy: ";
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
                   "input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(input.dim() == 2, op, "input must be [N, D], got shape ", input.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, op, "weight dtype ", weight.scalar_type(),
                   " does not match input dtype ", dtype);
  TORCH_CHECK_VALUE(weight.device() == input.device(), op, "weight is on ", weight.device(), " but input is on ",
                    input.device());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == input.size(1), op, "weight must be [V, ", input.size(1),
                    "] (input's last dimension), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0, op, "weight must have at least one row (the vocabulary), got shape ",
                    weight.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, "target must be int64 (class indices), got ",
                   target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == input.device(), op, "target is on ", target.device(), " but input is on ",
                    input.device());
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), op, "target must be [", input.size(0),
                    "] (one per row of input), got shape ", target.sizes());
  if (bias.has_value()) {
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, op, "bias dtype ", bias->scalar_type(),
                     " does not match input dtype ", dtype);
    TORCH_CHECK_VALUE(bias->device() == input.device(), op, "bias is on ", bias->device(), " but input is on ",
                      input.device());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op, "bias must be [", weight.size(0),
                      "] (weight's rows), got shape ", bias->sizes());
  }
  TORCH_CHECK_VALUE(options.label_smoothing >= 0 && options.label_smoothing <= 1, op,
                    "label_smoothing must be in [0, 1], got ", options.label_smoothing);
  TORCH_CHECK_VALUE(options.softcap >= 0, op, "softcap must be > 0 (or 0 for none), got ", options.softcap);
  TORCH_CHECK_VALUE(options.z_loss >= 0, op, "z_loss must be >= 0, got ", options.z_loss);
  TORCH_CHECK_VALUE(chunk_rows >= 0, op, "chunk_rows must be >= 0 (0: chosen from the vocabulary), got ", chunk_rows);
  TORCH_CHECK_VALUE(!options.skip_small_gradients || options.blocked, op,
                    "skip_small_gradients needs method 'blocked', got method 'chunked' (whose gradients are exact: "
                    "no tiles to skip)");
}

void check_linear_distillation_args(const at::Tensor& student_input, const at::Tensor& student_weight,
                                    const at::Tensor& teacher_input, const at::Tensor& teacher_weight,
                                    const std::optional<at::Tensor>& target,
                                    const std::optional<at::Tensor>& student_bias,
                                    const std::optional<at::Tensor>& teacher_bias,
                                    const DistillationOptions& options, int64_t chunk_rows) {
  const char* op = "bigkernels linear_distillation_loss: ";
  const int64_t N = student_input.dim() == 2 ? student_input.size(0) : -1;
  // The student as linear_cross_entropy checks it, with a stand-in target when there is none.
  check_linear_cross_entropy_args(student_input, student_weight,
                                  target.has_value() ? *target : at::empty({N < 0 ? 0 : N}, student_input.options().dtype(at::kLong)),
                                  student_bias, CrossEntropyOptions{options.ignore_index, 0.0, 0.0, 0.0}, chunk_rows);
  const at::ScalarType dtype = teacher_input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble, op,
                   "teacher_input must be float16, bfloat16, float32 or float64, got ", dtype);
  TORCH_CHECK_VALUE(teacher_input.dim() == 2 && teacher_input.size(0) == N, op, "teacher_input must be [", N,
                    ", Dt] (as many rows as student_input), got shape ", teacher_input.sizes());
  TORCH_CHECK_TYPE(teacher_weight.scalar_type() == dtype, op, "teacher_weight dtype ", teacher_weight.scalar_type(),
                   " does not match teacher_input dtype ", dtype);
  TORCH_CHECK_VALUE(teacher_weight.dim() == 2 && teacher_weight.size(0) == student_weight.size(0) &&
                        teacher_weight.size(1) == teacher_input.size(1),
                    op, "teacher_weight must be [", student_weight.size(0), ", ", teacher_input.size(1),
                    "] (the student's vocabulary, teacher_input's width), got shape ", teacher_weight.sizes());
  for (const auto& [name, t] : {std::pair{"teacher_input", &teacher_input}, std::pair{"teacher_weight", &teacher_weight}}) {
    TORCH_CHECK_VALUE(t->device() == student_input.device(), op, name, " is on ", t->device(),
                      " but student_input is on ", student_input.device());
  }
  if (teacher_bias.has_value()) {
    TORCH_CHECK_TYPE(teacher_bias->scalar_type() == dtype, op, "teacher_bias dtype ", teacher_bias->scalar_type(),
                     " does not match teacher_input dtype ", dtype);
    TORCH_CHECK_VALUE(teacher_bias->device() == student_input.device(), op, "teacher_bias is on ",
                      teacher_bias->device(), " but student_input is on ", student_input.device());
    TORCH_CHECK_VALUE(teacher_bias->dim() == 1 && teacher_bias->size(0) == student_weight.size(0), op,
                      "teacher_bias must be [", student_weight.size(0), "], got shape ", teacher_bias->sizes());
  }
  TORCH_CHECK_VALUE(options.temperature > 0, op, "temperature must be > 0, got ", options.temperature);
  TORCH_CHECK_VALUE(options.beta >= 0 && options.beta <= 1, op, "beta must be in [0, 1], got ", options.beta);
  TORCH_CHECK_VALUE(options.hard_weight >= 0, op, "hard_weight must be >= 0, got ", options.hard_weight);
  TORCH_CHECK_VALUE(options.hard_weight == 0 || target.has_value(), op, "hard_weight ", options.hard_weight,
                    " needs a target");
  // The blocked kernels make both logits in one tile's loop, from one dtype's operands.
  const at::ScalarType student = student_input.scalar_type();
  TORCH_CHECK_TYPE(!options.blocked || dtype == student, op, "method 'blocked' needs the teacher in the student's "
                   "dtype (", dtype_name(student), "), got teacher_input ", dtype_name(dtype),
                   ": cast it, or use method 'chunked'");
}

}  // namespace bigkernels

TORCH_LIBRARY_FRAGMENT(bigkernels, m) {
  // loss = cross_entropy(cap(input @ weight^T + bias), target) reduced
  // ('none': [N], 0 for ignored rows; 'mean' over the rows that count, 0
  // when none does; 'sum'), and each row's log-sum-exp of its (capped)
  // logits (0 for ignored rows), both in float32 (float64 for double): the
  // Python front rounds the loss to input's dtype, except under autocast.
  // chunk_rows: rows whose logits are held at once (0: chosen from V).
  // method: "chunked", chunks of rows with the whole vocabulary (each chunk's
  // logits made once: chunks.cpp); "blocked", Cut Cross-Entropy's way, the
  // logits a tile (rows x a block of the vocabulary) at a time, never a row's
  // full logits (CUDA only; chunk_rows unused). skip_small_gradients: with
  // "blocked", the backward skips tiles whose softmax is below the dtype's
  // resolution (not exact; off by default; "chunked" refuses it).
  m.def("linear_cross_entropy(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
        "float label_smoothing, float softcap, float z_loss, str reduction, int chunk_rows, str method, "
        "bool skip_small_gradients) -> (Tensor loss, Tensor lse)");
  // The same, and the gradients in grad_mask (input, weight, bias) of the
  // reduced loss, computed in the same pass over the chunks (reduction 'mean'
  // or 'sum'; the backward scales them by the loss's gradient). Those not in
  // grad_mask come back empty. method and skip_small_gradients as above.
  m.def("linear_cross_entropy_forward(Tensor input, Tensor weight, Tensor target, Tensor? bias, int ignore_index, "
        "float label_smoothing, float softcap, float z_loss, str reduction, int chunk_rows, str method, "
        "bool skip_small_gradients, bool[3] grad_mask) -> "
        "(Tensor loss, Tensor lse, Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The gradients of sum(grad_loss * loss rows) (reduction 'none'), from the
  // forward's lse: each chunk's (or tile's) logits are computed again.
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor target, Tensor? bias, "
        "Tensor lse, int ignore_index, float label_smoothing, float softcap, float z_loss, int chunk_rows, "
        "str method, bool skip_small_gradients, bool[3] grad_mask) -> "
        "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // T^2 * soft(teacher || student) + hard_weight * cross_entropy(student,
  // target) per row (the soft loss: beta 0 forward KL, 1 reverse KL, else the
  // generalized Jensen-Shannon divergence), reduced as linear_cross_entropy's
  // (rows whose target is ignore_index count nowhere), in float32 (float64
  // for a double student). The teacher gets no gradient.
  // method: "chunked" as linear_cross_entropy's; "blocked" makes both logits
  // a tile at a time (CUDA only; student and teacher in one dtype;
  // chunk_rows unused).
  m.def("linear_distillation_loss(Tensor student_input, Tensor student_weight, Tensor teacher_input, "
        "Tensor teacher_weight, Tensor? target, Tensor? student_bias, Tensor? teacher_bias, float temperature, "
        "float beta, float hard_weight, int ignore_index, str reduction, int chunk_rows, str method) -> Tensor");
  // The same and, in grad_mask, the gradients of the student's input, weight
  // and bias: of the reduced loss, or with grad_loss ([N]; reduction 'none',
  // the backward) of sum(grad_loss * loss rows). method as above.
  m.def("linear_distillation_loss_forward(Tensor student_input, Tensor student_weight, Tensor teacher_input, "
        "Tensor teacher_weight, Tensor? target, Tensor? student_bias, Tensor? teacher_bias, float temperature, "
        "float beta, float hard_weight, int ignore_index, str reduction, int chunk_rows, str method, "
        "Tensor? grad_loss, bool[3] grad_mask) -> (Tensor loss, Tensor grad_input, Tensor grad_weight, "
        "Tensor grad_bias)");
}
