// The attention family's CPU block loops, compiled once per CPU capability
// (attention_kernels.cpp; common/capability.h) and called through this table.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/capability.h"

namespace bigkernels {

// Raw pointers and strides (in elements) of one attention call. q is read in
// place (any strides, contiguous last dim); every other tensor is contiguous.
struct AttentionCpuParams {
  c10::ScalarType dtype;
  const void* q;
  int64_t q_strides[3];  // batch, head, position
  const void* mask;  // null, bool, or dtype; broadcast dims have stride 0
  bool mask_is_bool;
  int64_t mask_strides[4];  // batch, head, query, key
  int64_t B, Hq, Hkv, L, S, E, Ev;
  // K and V in the compute type (float; double for double), converted once
  // per call by the op. k_t and v_t hold them transposed in key blocks,
  // [B, Hkv, ceil(S / kAttentionKeyBlock), E (or Ev), kAttentionKeyBlock],
  // zero-padded, so that one block's rows are contiguous; v_c [B, Hkv, S, Ev]
  // and k_c [B, Hkv, S, E] are plain. The forward reads k_t and v_c, the
  // backward k_t, v_t and k_c.
  const void *k_t, *v_c, *k_c, *v_t;
  double scale;
  // Dropout of the probabilities (0: none): element (b, h, i, j) is kept when
  // counter_uniform(dropout_seed, ((b * Hq + h) * L + i) * S + j) >= dropout_p.
  double dropout_p;
  uint64_t dropout_seed;
  int64_t window_left, window_right, diagonal_offset;  // -1: unbounded
  // forward: out [B, Hq, L, Ev] (dtype), lse [B, Hq, L] (float; double for double)
  void* out;
  void* lse;
  // backward: also grad_out [B, Hq, L, Ev] (contiguous), grads (contiguous, like q, k, v)
  const void* grad_out;
  void *grad_q, *grad_k, *grad_v;
  void* grad_mask;  // null, or [B, Hq, L, S] in the compute type, zeroed: gets dS (the scores' gradient)
};

// Query rows per forward task (and per backward block), and keys per block.
constexpr int64_t kAttentionBlockRows = 64, kAttentionKeyBlock = 64;

struct AttentionCpuKernels {
  // Query rows [i0, i1) of head h of batch b.
  void (*forward_block)(const AttentionCpuParams& p, int64_t b, int64_t h, int64_t i0, int64_t i1);
  // Every gradient of key head hkv of batch b (and of the query heads that share it).
  void (*backward_head)(const AttentionCpuParams& p, int64_t b, int64_t hkv);
};

BK_DECLARE_CAPABILITY_TABLE(AttentionCpuKernels, attention_cpu_kernels)

}  // namespace bigkernels
