// The attention family's CPU block loops, compiled once per CPU capability
// (attention_kernels.cpp; common/capability.h) and called through this table.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "common/capability.h"

namespace bigkernels {

// Raw pointers and strides (in elements) of one attention call. Every
// [B, H, L|S, D] tensor is read or written in place through its batch, head
// and position strides with a contiguous last dim (Hugging Face's
// [B, L, H, D] views included); the rest is contiguous.
struct AttentionCpuParams {
  c10::ScalarType dtype;
  const void *q, *k, *v;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, head, position
  const void* mask;  // null, bool, or dtype; broadcast dims have stride 0
  bool mask_is_bool;
  int64_t mask_strides[4];  // batch, head, query, key
  int64_t B, Hq, Hkv, L, S, E, Ev;
  // The backward's K and V in the compute type (float; double for double),
  // converted once per call by the op (K and V themselves when already in
  // it; strides k_c_strides, v_c_strides).
  const void *k_c, *v_c;
  int64_t k_c_strides[3], v_c_strides[3];
  // Or the bf16 backward on ATen's BLAS micro-kernel (AMX or AVX512-BF16),
  // K and V read in place through k, v (k_c, v_c unused); never with dropout
  // or a mask gradient.
  bool packed_backward;
  // bf16/fp16 forward where ATen's BLAS has a micro-kernel for the dtype
  // (bf16: AMX or AVX512-BF16; fp16: AMX-FP16): K and V packed once per call as
  // its B operand, pairs of rows interleaved ("VNNI"), per key block,
  // zero-padded: k_vnni [B, Hkv, blocks, E / 2, vnni_keys, 2] (K^T) and
  // v_vnni [B, Hkv, blocks, vnni_keys / 2, Ev, 2], vnni_keys keys per block.
  // Both products then run there. Null otherwise.
  void *k_vnni, *v_vnni;
  int64_t vnni_keys;
  double scale;
  // Dropout of the probabilities (0: none): element (b, h, i, j) is kept when
  // counter_uniform(dropout_seed, dropout_offset + ((b * Hq + h) * L + i) * S + j)
  // >= dropout_p (dropout_offset: 0, or where a varlen call's sequence starts).
  double dropout_p;
  uint64_t dropout_seed, dropout_offset;
  int64_t window_left, window_right, diagonal_offset;  // -1: unbounded
  // Per-batch key lengths (a KV cache's, after the append), null: S for
  // every batch. With them each batch's diagonal is its own bottom-right
  // one, seqlens_k[b] - L (flash-attention's), and diagonal_offset is unused.
  const int64_t* seqlens_k;
  // A paged K and V (vLLM's [pages, page_size, Hkv, D]; k_strides and
  // v_strides are then page, head, row): key j of batch b is row
  // j % page_size of page block_table[b * block_table_stride + j / page_size].
  // Null: K and V are [B, Hkv, S, D] views. Never with k_vnni.
  const int64_t* block_table;
  int64_t block_table_stride, page_size;
  // Gemma-2's logit softcap (0: none): a scaled score x becomes
  // softcap * tanh(x / softcap); then ALiBi (null: none) adds
  // -slope * |i + diagonal - j|, slopes [B or 1, Hq] in the compute type
  // (alibi_batch_stride 0 or Hq), as flash-attention orders them. Neither
  // with k_vnni.
  double softcap;
  const void* alibi_slopes;
  int64_t alibi_batch_stride;
  // forward: out [B, Hq, L, Ev] (dtype; strides out_strides: batch, head,
  // position), lse [B, Hq, L] (float; double for double). With the keys
  // split (splits > 1), each split writes its rows' normalised output and
  // lse in the compute type to split_out [splits, B, Hq, L, Ev] and
  // split_lse [splits, B, Hq, L] instead, for the op to combine.
  void* out;
  int64_t out_strides[3];
  void* lse;
  int64_t splits;
  // The forward's heads per task (a GQA group's heads packed with each block
  // of positions): backward recomputes the scores the way the forward did.
  int64_t heads_per_task;
  void *split_out, *split_lse;
  // backward: out and lse are the forward's; also grad_out [B, Hq, L, Ev] and
  // the gradients, each with its strides (the op lays the gradients out like
  // q, k and v, so that the caller's views back to [B, L, H, D] copy nothing).
  const void* grad_out;
  int64_t grad_out_strides[3];
  void *grad_q, *grad_k, *grad_v;
  int64_t grad_q_strides[3], grad_k_strides[3], grad_v_strides[3];
  void* grad_mask;  // null, or [B, Hq, L, S] in the compute type, zeroed: gets dS (the scores' gradient)
};

// Query rows per forward task (and per backward block), and keys per block.
constexpr int64_t kAttentionBlockRows = 64, kAttentionKeyBlock = 64;
// The most keys per block of k_vnni and v_vnni (and per block of the forward
// that reads them). Measured on MiniLM, BERT L512, GPT-2 and Llama prefill
// shapes (bf16, AMX): 128 beat 64 by 1.05-1.25x and 256 by 1.03-1.1x.
constexpr int64_t kAttentionPackedKeyBlock = 128;

// One forward task: the query heads [h0, h1) of batch b, all sharing key head
// h0 / (Hq / Hkv), at positions [i0, i1), as (h1 - h0) * (i1 - i0) <=
// kAttentionBlockRows rows (head-major), against the keys [j_begin, j_end)
// (split number `split`; the whole of S when the keys are not split).
// Packing a GQA group's heads into one task reads its keys once for all of
// them, which is what decoding (L = 1) needs. Or, decoding a cache whose
// heads lie side by side per key, several whole groups (every head) in one
// task, scores by rows, which reads the cache as one stream.
struct AttentionForwardTask {
  int64_t b, h0, h1, i0, i1, j_begin, j_end, split;
};

struct AttentionCpuKernels {
  void (*forward_task)(const AttentionCpuParams& p, const AttentionForwardTask& t);
  // Packs key block `block` of key head hkv of batch b into k_vnni and v_vnni.
  void (*pack_key_block)(const AttentionCpuParams& p, int64_t b, int64_t hkv, int64_t block);
  // Every gradient of key head hkv of batch b (and of the query heads that share it).
  void (*backward_head)(const AttentionCpuParams& p, int64_t b, int64_t hkv);
};

BK_DECLARE_CAPABILITY_TABLE(AttentionCpuKernels, attention_cpu_kernels)

}  // namespace bigkernels
