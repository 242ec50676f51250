// Host-side pieces of the attention ops shared by the devices: argument
// checks and sizes. Inputs are 4-d [B, H, L, E] (Python turns 3-d into H = 1).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace bigkernels {

struct AttentionShape {
  int64_t B, Hq, Hkv, L, S, E, Ev;
};

// Checks dtypes, devices, shapes and the scalar options (the messages name
// the argument) and returns the sizes. window_left/right: -1 or >= 0;
// dropout_p in [0, 1).
AttentionShape check_attention_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    const std::optional<at::Tensor>& attn_mask, int64_t window_left,
                                    int64_t window_right, double dropout_p);

// softcap (>= 0, finite; 0: none) and alibi_slopes (float32/float64 [Hq] or
// [B, Hq] on query's device), for every attention op; `op` names the caller.
void check_score_options(const char* op, const at::Tensor& query, const AttentionShape& s, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes);

// attention_kvcache_forward's inputs: query [B, Lq, H, D]; the caches
// [B, capacity, Hkv, D|Dv] (unit last stride: they are written in place), or
// pages [num_pages, page_size, Hkv, D|Dv] with block_table [B, max_pages]
// (int32/int64); new k, v [B, Lk, Hkv, D|Dv] or neither; cache_seqlens [B]
// (int32/int64); alibi_slopes float32/float64 [H] or [B, H]; softcap >= 0.
// Checks what needs no reading of a tensor's values (the devices check
// cache_seqlens' and block_table's); returns the sizes with S = the cache's
// capacity per batch.
AttentionShape check_kvcache_args(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                  int64_t window_left, int64_t window_right, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes);

// varlen_attention_forward's inputs: sequences packed end to end, query
// [total_q, H, D], key [total_k, Hkv, D], value [total_k, Hkv, Dv];
// cu_seqlens_q and cu_seqlens_k [sequences + 1] (int32/int64) on query's
// device; max_seqlen_q, max_seqlen_k >= 0; the options as
// check_attention_args' and check_score_options'. Checks what needs no
// reading of a tensor's values (the devices check cu_seqlens'); returns the
// sizes with B = the sequences, L = max_seqlen_q and S = max_seqlen_k.
AttentionShape check_varlen_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
                                 int64_t window_right, double dropout_p, double softcap,
                                 const std::optional<at::Tensor>& alibi_slopes);

// The sequences of a varlen call, read from cu_seqlens_q and cu_seqlens_k
// (on the CPU; the CUDA op copies them over) and checked: from 0,
// non-decreasing, ending at the totals, none longer than the max lengths.
// Sequence b's query rows start at q_start[b], L(b) of them; its keys likewise.
struct VarlenSequences {
  std::vector<int64_t> q_start, k_start;  // sequences + 1 each
  int64_t count() const { return static_cast<int64_t>(q_start.size()) - 1; }
  int64_t L(int64_t b) const { return q_start[b + 1] - q_start[b]; }
  int64_t S(int64_t b) const { return k_start[b + 1] - k_start[b]; }
  int64_t longest_L() const;
  int64_t longest_S() const;
  // Each sequence's first dropout counter: the sequences before it count
  // H * L_b * S_b elements each (the ops' schema comment).
  std::vector<int64_t> dropout_offsets(int64_t H) const;
};

VarlenSequences read_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                               int64_t total_k, int64_t max_seqlen_q, int64_t max_seqlen_k);

// Each batch's keys after a KV-cache append, cache_seqlens + Lk, read on the
// CPU (int64 [B]) and checked to lie within the capacity (the message names
// cache_seqlens).
at::Tensor kvcache_lengths(const at::Tensor& cache_seqlens, int64_t capacity, int64_t Lk);

// block_table as int64 on the CPU, its pages in use (those holding each
// batch's first lengths[b] keys, page_size a page) checked to be pages of
// the caches' num_pages (the others are never read).
at::Tensor kvcache_pages(const at::Tensor& block_table, const at::Tensor& lengths, int64_t page_size,
                         int64_t num_pages);

// varlen_attention_backward's own inputs: grad_output and output
// [total_q, H, Dv], lse of lse_dtype [H, total_q].
void check_varlen_backward_args(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
                                const at::Tensor& query, const AttentionShape& s);

// The log-sum-exp's dtype on every device: float32, float64 for float64
// inputs (a float32 lse would limit a float64 backward to float32 precision).
at::ScalarType lse_dtype(const at::Tensor& query);

// The backward's own inputs: grad_output and output shaped like the forward's
// output, lse of lse_dtype shaped [B, H, L].
void check_attention_backward_args(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
                                   const at::Tensor& query, const AttentionShape& s);

// For grad_mask: a zeroed [B, Hq, L, S] buffer (dtype: the kernels' type)
// that the backward kernels fill with the scores' gradient, or an undefined
// tensor without grad_mask; then its sum to the mask's shape, in the mask's
// dtype (an empty tensor like query's when there is none).
at::Tensor grad_mask_buffer(const std::optional<at::Tensor>& mask, bool grad_mask, const AttentionShape& s,
                            at::ScalarType dtype);
at::Tensor reduce_grad_mask(const at::Tensor& buffer, const std::optional<at::Tensor>& mask,
                            const at::Tensor& query);

// The mask as a [B, Hq, L, S] view: broadcast dims get stride 0, nothing is copied.
at::Tensor broadcast_mask(const at::Tensor& mask, const AttentionShape& s);

}  // namespace bigkernels
