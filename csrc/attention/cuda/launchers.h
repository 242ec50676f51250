// Raw-pointer entry points of the CUDA attention kernels: fp16 and bf16 on
// tensor cores (sm_80+), fp32 and fp64 on a plain SIMT kernel (any GPU). The
// .cu files see only this header and CUDA's own; tensors, streams and checks
// live in attention_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace bigkernels {
namespace cuda {

enum class AttentionDType : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// One attention call, strides in elements. q, k, v: any batch/head/position
// strides, contiguous last dim; base pointers 16-byte aligned, position
// strides multiples of 8, E and Ev multiples of 8 (the op pads otherwise).
struct AttentionParams {
  AttentionDType dtype;
  const void *q, *k, *v;
  int64_t q_strides[3], k_strides[3], v_strides[3];  // batch, head, position
  const void* mask;  // null, bool, or the inputs' dtype; broadcast dims have stride 0
  bool mask_is_bool;
  int64_t mask_strides[4];  // batch, head, query, key
  int64_t B, Hq, Hkv, L, S, E, Ev;
  float scale;
  // Element (b, h, i, j) is kept when counter_uniform(dropout_seed,
  // ((b * Hq + h) * L + i) * S + j) >= dropout_p (common/counter_rng.h),
  // as on the CPU: the same seed drops the same elements on both devices
  // (packed sequences: see cu_seqlens_q).
  float dropout_p;
  uint64_t dropout_seed;
  int64_t window_left, window_right, diagonal_offset;  // key j is allowed for query i when
                                                       // j - (i + offset) is in [-left, right]; -1: unbounded
  // Gemma-2's softcap (0: none): a scaled score x becomes softcap * tanh(x /
  // softcap); then ALiBi (null: none) adds -slope * |i + diagonal_offset - j|,
  // slopes [B or 1, Hq] in lse's type (alibi_batch_stride Hq or 0); both
  // before the mask, as on the CPU.
  float softcap;
  const void* alibi_slopes;
  int64_t alibi_batch_stride;
  // Sequences packed end to end (varlen; null: the [B, ...] layouts here):
  // batch b is sequence b, its queries rows cu_seqlens_q[b] .. [b + 1] of q
  // (q_strides[0] is 0, rows position strides apart), its keys likewise of
  // k and v; L and S are the longest. Each has its own bottom-right
  // diagonal, S_b - L_b (diagonal_offset unused), and its dropout counters
  // start at dropout_offsets[b] (element (b, h, i, j): dropout_offsets[b] +
  // (h * L_b + i) * S_b + j; null without dropout). out, lse, delta,
  // grad_out and grad_q are then head-major over the packed rows,
  // [Hq, total_q, ...], and grad_k, grad_v [Hkv, total_k, ...].
  const int64_t *cu_seqlens_q, *cu_seqlens_k, *dropout_offsets;
  int64_t total_q, total_k;
  // Per-batch key counts in the [B, ...] layouts (a KV cache's after the
  // append; null: S for every batch): batch b attends to its first
  // seqlens_k[b] keys, bottom-right (diagonal seqlens_k[b] - L). Forward only.
  const int64_t* seqlens_k;
  // A paged K and V (vLLM's [pages, page_size, Hkv, D]; k_strides and
  // v_strides are then page, head, row): key j of batch b is row
  // j % page_size of page block_table[b * block_table_stride + j / page_size].
  // Null: K and V are [B, Hkv, S, D] views. The decoding kernel only.
  const int64_t* block_table;
  int64_t block_table_stride, page_size;
  // Decoding (launch_attention_decode): the keys in `splits` ranges of
  // keys_per_split; with more than one, each split's normalised rows and lse
  // go to split_out [splits, B, Hq, L, Ev] and split_lse [splits, B, Hq, L]
  // (lse's type), which a second kernel merges into out and lse.
  int64_t splits, keys_per_split;
  void *split_out, *split_lse;
  void* out;  // [B, Hq, L, Ev], contiguous
  void* lse;  // [B, Hq, L], float (double for fp64)
  // Backward: grad_out like out; delta[B, Hq, L] = rowsum(grad_out * out)
  // in lse's type; grads contiguous [B, H, positions, dims].
  const void* grad_out;
  const void* delta;
  void *grad_q, *grad_k, *grad_v;
  void* grad_mask;  // null, or [B, Hq, L, S] in lse's type, zeroed: the dQ kernel writes dS there
};

constexpr int kAttentionThreads = 128;  // threads per block, every attention kernel

// Query rows (a GQA group's heads x positions) per block of the decoding
// kernel: their q and output sums live in registers, kD / 32 of each per lane
// (16 rows at head dim 128 spilled; half as many for double).
constexpr int attention_decode_rows_per_block(int element_size, int head_dim_bucket) {
  return (head_dim_bucket <= 128 ? 8 : 4) / (element_size == 8 ? 2 : 1);
}

// Head dims one thread of the SIMT kernels owns: 32 floats, 16 doubles (so
// that the dK/dV kernel's four such arrays fit in 255 registers).
constexpr int attention_simt_dims_per_thread(int element_size) { return element_size == 8 ? 16 : 32; }

// Rows (queries; keys for dK/dV) that one block owns: the grid's second
// dimension is ceil(rows / this), at most 65535. The tensor-core kernels
// give each of 4 warps 16 rows; the SIMT kernels give each row
// kD / dims-per-thread threads.
constexpr int attention_rows_per_block(bool tensor_cores, int element_size, int head_dim_bucket) {
  return tensor_cores ? 64
                      : kAttentionThreads * attention_simt_dims_per_thread(element_size) / head_dim_bucket;
}

// Whether the kernels' 16-byte copies can read a tensor of `dim` dims in
// place: a contiguous last dim of a multiple of 8 elements, strides of
// multiples of 8 elements (where the dim has more than one entry), a 16-byte
// aligned start. A contiguous view can fail the last: a storage offset.
inline bool attention_readable_in_chunks(const void* data, int dim, const int64_t* sizes, const int64_t* strides) {
  if (sizes[dim - 1] % 8 != 0 || (sizes[dim - 1] > 1 && strides[dim - 1] != 1)) return false;
  if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
  for (int d = 0; d + 1 < dim; ++d)
    if (sizes[d] > 1 && strides[d] % 8 != 0) return false;
  return true;
}

// The head dims the kernels are built for: E and Ev are padded (with zeros,
// in shared memory) up to the next of these.
constexpr int kAttentionHeadDims[] = {64, 128, 256};

inline int attention_head_dim_bucket(int64_t dim) {
  for (int d : kAttentionHeadDims)
    if (dim <= d) return d;
  return 0;  // too large
}

// One instantiation per (dtype, head-dim bucket) and .cu file
// (attention_<dtype>_hdim<D>.cu), so that the build runs in parallel.
template <typename T, int kD>
cudaError_t launch_attention_forward(const AttentionParams& p, cudaStream_t stream);
template <typename T, int kD>
cudaError_t launch_attention_backward(const AttentionParams& p, cudaStream_t stream);
// float and double (attention_simt.cuh, attention_simt_hdim<D>.cu).
template <typename T, int kD>
cudaError_t launch_attention_forward_simt(const AttentionParams& p, cudaStream_t stream);
template <typename T, int kD>
cudaError_t launch_attention_backward_simt(const AttentionParams& p, cudaStream_t stream);
// Decoding, every dtype (attention_decode.cuh, attention_decode.cu): a few
// rows per key head against long keys, split over the GPU; q, k, v need only
// a contiguous last dim (no alignment, no padding).
template <typename T, int kD>
cudaError_t launch_attention_decode(const AttentionParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
