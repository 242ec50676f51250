// Raw-pointer entry points of the loss family's CUDA row passes
// (loss_kernels.cu). The .cu file sees only this header and CUDA's own, which
// keeps nvcc's compile times short and lets tests/cuda_emulation/losses/ call
// the launchers directly; tensors, products and checks live in
// losses_cuda.cpp and ../chunks.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "losses/loss_rows.h"

namespace bigkernels {
namespace cuda {

enum class LossDType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// The passes over `rows` rows of a chunk, with the CPU rows' contract
// (losses/loss_rows.h, cpu/loss_kernels.cpp): a block of kLossRowThreads per
// row, grid-striding over rows; max_blocks caps the grid (0: the launcher's
// choice; the tests set a small cap to run the stride).
constexpr int kLossRowThreads = 256;
cudaError_t launch_cross_entropy_rows(const CrossEntropyRows& a, int64_t rows, LossDType dtype, int64_t max_blocks,
                                      cudaStream_t stream);
cudaError_t launch_distillation_rows(const DistillationRows& a, int64_t rows, LossDType dtype, int64_t max_blocks,
                                     cudaStream_t stream);

// Cut Cross-Entropy's way (method "blocked", blocked_kernels.cu): the logits
// made a tile of kBlockedRows rows x kBlockedCols vocabulary entries at a
// time on the tensor cores (fp16, bf16: mma.sync) or the FMA units (fp32,
// fp64), never a row's whole logits. Two passes:
//  - statistics: per row and per vocabulary split (the grid's y; `splits`
//    splits of whole tiles), the max of the (capped) logits, the sum of
//    exp(z - max) and the sum of z, into part_* [splits, N]; and the target's
//    logit, into target_logit [N] (the host combines them into lse and loss);
//  - gradients: per tile, the logits again and G = dloss/dz from lse, then
//    dX += G W, dW += G^T X and db += the columns of G, summed into the
//    compute-type buffers with atomics (so not bit-identical run to run).
//    skip_below > 0 skips a tile's products when every probability in it is
//    below it and the tile holds no target (with label_smoothing 0 only).
// Every vector and buffer is in the compute type (float; double for fp64).
struct BlockedCrossEntropy {
  const void* x;          // [N, D], rows D apart, in the dtype
  const void* w;          // [V, D]
  const void* bias;       // [V] or null
  const int64_t* target;  // [N], each in [0, V)
  int64_t N, D, V;
  double softcap;  // 0: none
  // the statistics pass
  int64_t splits;
  void *part_max, *part_sum, *part_logit_sum;  // [splits, N]
  void* target_logit;                          // [N]
  // the gradient pass
  const void* lse;  // [N]
  double label_smoothing, z_loss;
  const void* row_scale;  // [N]: each row's gradient factor (null: `scale` for every row)
  double scale;
  double skip_below;  // 0: exact
  void *grad_x, *grad_w, *grad_b;  // [N, D], [V, D], [V], summed into (null: not wanted)
};
constexpr int kBlockedRows = 64, kBlockedCols = 128;
cudaError_t launch_blocked_statistics(const BlockedCrossEntropy& p, LossDType dtype, cudaStream_t stream);
cudaError_t launch_blocked_gradients(const BlockedCrossEntropy& p, LossDType dtype, cudaStream_t stream);

// Distillation the same way (blocked_kernels.cu), student and teacher in one
// dtype; each tile makes the teacher's logits t, then the student's s (both
// with their bias). Three passes, each over every tile of its rows:
//  - statistics, per row and split: into part [5, splits, N], the max of s,
//    sum exp((s - max s) / T), sum exp(s - max s) (the hard term's, with a
//    target), the max of t and sum exp((t - max t) / T); and s at the
//    target into target_logit [N] (with a target);
//  - terms, from row_stats: into part [2, splits, N] the soft loss's sums,
//    as the row passes (loss_rows.h): forward KL sum P (log P - log Q),
//    reverse KL sum Q (log Q - log P), the JSD's sum P (log P - log M) and
//    sum Q (log Q - log M);
//  - gradients, from row_stats: G = dloss/ds, then grad_x += G W_s,
//    grad_w += G^T X_s, grad_b += G's column sums (atomics, as above).
// row_stats [6, N]: max s, log sum_q, log sum of the hard term, max t,
// log sum_p, and sum Q g (the KL's and JSD's gradient's correction).
struct BlockedDistillation {
  const void *xs, *ws, *bs;  // the student: [N, Ds], [V, Ds], [V] or null
  const void *xt, *wt, *bt;  // the teacher: [N, Dt], [V, Dt], [V] or null
  const int64_t* target;     // [N] or null: no hard term
  int64_t N, Ds, Dt, V;
  double temperature, beta, hard_weight;
  int64_t splits;
  void* part;
  void* target_logit;
  const void* row_stats;
  const void* row_scale;  // [N] or null: `scale` for every row
  double scale;
  void *grad_x, *grad_w, *grad_b;
};
cudaError_t launch_blocked_distillation_statistics(const BlockedDistillation& p, LossDType dtype, cudaStream_t stream);
cudaError_t launch_blocked_distillation_terms(const BlockedDistillation& p, LossDType dtype, cudaStream_t stream);
cudaError_t launch_blocked_distillation_gradients(const BlockedDistillation& p, LossDType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
