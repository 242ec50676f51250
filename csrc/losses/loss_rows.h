// What the loss family's row passes read and write, on any device: a chunk
// of rows of logits and the per-row vectors around them, as raw pointers.
// Included by the CPU kernels (cpu/loss_kernels.cpp) and the CUDA ones
// (cuda/loss_kernels.cu), so it holds nothing but plain types.
#pragma once

#include <cstdint>

namespace bigkernels {

// A chunk of rows of logits, V wide and `ld` apart, in the dtype; the passes
// turn them into the gradient of the loss with respect to the logits in
// place. The other vectors are in the compute type: float, or double for
// double. No row is ignored here (the caller leaves those rows out).
struct CrossEntropyRows {
  void* logits;
  int64_t V, ld;
  const int64_t* target;  // each in [0, V)
  double label_smoothing, softcap, z_loss;  // softcap 0: none
  void* lse;   // per row: written, or read when lse_given
  void* loss;  // per row, written (null: not wanted)
  bool lse_given;  // the backward's case: lse from the forward, no loss
  bool grad;       // write the gradient over the logits
  const void* row_scale;  // per row: the gradient's factor (null: `scale` for every row)
  double scale;
};

// Distillation: a chunk of the student's logits (dtype, rows `ld` apart),
// which become the gradient over them in place, and the teacher's (in the
// compute type, rows `ld` apart). Soft loss per row, with Q = softmax(s / T)
// and P = softmax(t / T): beta 0: KL(P || Q); beta 1: KL(Q || P); else
// beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q; times
// T^2, plus hard_weight * cross-entropy(s, target) when target is not null.
struct DistillationRows {
  void* student;
  const void* teacher;
  int64_t V, ld;
  const int64_t* target;  // null: no hard term; else each in [0, V)
  double temperature, beta, hard_weight;
  void* loss;  // per row, written
  bool grad;
  const void* row_scale;  // per row: the gradient's factor (null: `scale` for every row)
  double scale;
};

}  // namespace bigkernels
