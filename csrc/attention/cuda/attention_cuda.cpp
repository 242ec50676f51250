// CUDA implementations of the attention ops: checks, the layout the kernels
// need, raw-pointer launches on the current stream. fp16 and bf16 run on
// tensor cores (attention_kernels.cuh, sm_80+), float32 and float64 on the
// SIMT kernels (attention_simt.cuh, any GPU).
#include <ATen/cuda/CUDAContext.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_put.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "attention/cuda/launchers.h"

namespace bigkernels {
namespace {

int64_t round_up8(int64_t n) { return (n + 7) / 8 * 8; }

bool readable_in_chunks(const at::Tensor& t) {
  return cuda::attention_readable_in_chunks(t.const_data_ptr(), static_cast<int>(t.dim()), t.sizes().data(),
                                            t.strides().data());
}

// t itself when the kernels can read it in place, else a contiguous copy
// with the last dim zero-padded to a multiple of 8 (zeros change no score
// and give output columns that are cut off again).
at::Tensor kernel_layout(const at::Tensor& t) {
  if (readable_in_chunks(t)) return t;
  return at::constant_pad_nd(t, {0, round_up8(t.size(-1)) - t.size(-1)}).contiguous();
}

// grad_output as the backward kernels read it: contiguous, `width` wide (the
// padded Ev), 16-byte aligned. contiguous() alone would keep a view with an
// odd storage offset, which the kernels' 16-byte copies cannot read.
at::Tensor contiguous_for_kernels(const at::Tensor& t, int64_t width) {
  if (t.size(-1) == width && t.is_contiguous() && readable_in_chunks(t)) return t;
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes.back() = width;
  at::Tensor out = t.size(-1) == width ? at::empty(sizes, t.options()) : at::zeros(sizes, t.options());
  out.narrow(-1, 0, t.size(-1)).copy_(t);  // a fresh allocation: aligned
  return out;
}

// The first `n` entries of the last dim, contiguous.
at::Tensor cut_last_dim(const at::Tensor& t, int64_t n) {
  return t.size(-1) == n ? t : t.narrow(-1, 0, n).contiguous();
}

bool on_tensor_cores(const at::Tensor& q) {
  return q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16;
}

void check_cuda_args(const at::Tensor& q, const AttentionShape& s) {
  const int bucket = cuda::attention_head_dim_bucket(std::max(s.E, s.Ev));
  TORCH_CHECK_VALUE(bucket != 0, "bigkernels.attention: the CUDA kernels take head dims up to 256, got ", s.E,
                    " and ", s.Ev);
  if (on_tensor_cores(q)) {
    int major = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.device().index()));
    TORCH_CHECK(major >= 8, "bigkernels.attention: ", q.scalar_type(), " runs on tensor cores (mma.sync bf16, "
                "cp.async), which need compute capability 8.0 or newer; this GPU has ", major, ".x");
  }
  // One block per `rows` queries (keys in dK/dV) in the grid's y, at most 65535 of them.
  const int64_t rows = cuda::attention_rows_per_block(on_tensor_cores(q), q.element_size(), bucket);
  TORCH_CHECK_VALUE((s.L + rows - 1) / rows <= 65535 && (s.S + rows - 1) / rows <= 65535,
                    "bigkernels.attention: the CUDA kernels take at most ", 65535 * rows, " queries and keys for ",
                    q.scalar_type(), " at head dim ", std::max(s.E, s.Ev), "; got L = ", s.L, ", S = ", s.S);
  TORCH_CHECK_VALUE(s.B * s.Hq <= INT32_MAX, "bigkernels.attention: batch x heads = ", s.B * s.Hq,
                    " is too many for the CUDA grid (at most ", INT32_MAX, ")");
}

cuda::AttentionParams make_params(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& mask4, double scale, int64_t window_left,
                                  int64_t window_right, int64_t diagonal_offset, double dropout_p,
                                  int64_t dropout_seed) {
  cuda::AttentionParams p{};
  switch (q.scalar_type()) {
    case at::kHalf: p.dtype = cuda::AttentionDType::kFloat16; break;
    case at::kBFloat16: p.dtype = cuda::AttentionDType::kBFloat16; break;
    case at::kFloat: p.dtype = cuda::AttentionDType::kFloat32; break;
    default: p.dtype = cuda::AttentionDType::kFloat64; break;  // the checks admit nothing else
  }
  p.q = q.const_data_ptr(), p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.q_strides[d] = q.stride(d), p.k_strides[d] = k.stride(d), p.v_strides[d] = v.stride(d);
  }
  if (mask4.defined()) {
    p.mask = mask4.const_data_ptr();
    p.mask_is_bool = mask4.scalar_type() == at::kBool;
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask4.stride(d);
  }
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.L = s.L, p.S = s.S;
  p.E = q.size(3), p.Ev = v.size(3);  // the padded widths
  // With no head dim every score is 0 whatever the scale (1 / sqrt(0) would make it NaN).
  p.scale = s.E == 0 ? 0.f : static_cast<float>(scale);
  p.dropout_p = static_cast<float>(dropout_p);
  p.dropout_seed = static_cast<uint64_t>(dropout_seed);
  p.window_left = window_left, p.window_right = window_right, p.diagonal_offset = diagonal_offset;
  return p;
}

// The kernel for the dtype and the head-dim bucket.
template <bool kForward, typename T>
cudaError_t launch_for(const cuda::AttentionParams& p, cudaStream_t stream, int bucket) {
  constexpr bool kSimt = std::is_same_v<T, float> || std::is_same_v<T, double>;
  const auto go = [&](auto dim) {
    constexpr int kD = decltype(dim)::value;
    if constexpr (kSimt) {
      return kForward ? cuda::launch_attention_forward_simt<T, kD>(p, stream)
                      : cuda::launch_attention_backward_simt<T, kD>(p, stream);
    } else {
      return kForward ? cuda::launch_attention_forward<T, kD>(p, stream)
                      : cuda::launch_attention_backward<T, kD>(p, stream);
    }
  };
  switch (bucket) {
    case 64: return go(std::integral_constant<int, 64>{});
    case 128: return go(std::integral_constant<int, 128>{});
    default: return go(std::integral_constant<int, 256>{});
  }
}

template <bool kForward>
void launch(const cuda::AttentionParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int bucket = cuda::attention_head_dim_bucket(std::max(p.E, p.Ev));
  cudaError_t e = cudaSuccess;
  switch (p.dtype) {
    case cuda::AttentionDType::kFloat16: e = launch_for<kForward, __half>(p, stream, bucket); break;
    case cuda::AttentionDType::kBFloat16: e = launch_for<kForward, __nv_bfloat16>(p, stream, bucket); break;
    case cuda::AttentionDType::kFloat32: e = launch_for<kForward, float>(p, stream, bucket); break;
    case cuda::AttentionDType::kFloat64: e = launch_for<kForward, double>(p, stream, bucket); break;
  }
  C10_CUDA_CHECK(e);
}

// The softcap and ALiBi's slopes (kept alive in `slopes`, in lse's type) into p.
void set_score_options(cuda::AttentionParams& p, const at::Tensor& query, double softcap,
                       const std::optional<at::Tensor>& alibi_slopes, at::Tensor& slopes) {
  p.softcap = static_cast<float>(softcap);
  if (!alibi_slopes.has_value()) return;
  slopes = alibi_slopes->to(lse_dtype(query)).contiguous();
  p.alibi_slopes = slopes.const_data_ptr();
  p.alibi_batch_stride = slopes.dim() == 2 ? p.Hq : 0;
}

// The decoding kernel for the dtype and the head-dim bucket.
template <typename T>
cudaError_t launch_decode_for(const cuda::AttentionParams& p, cudaStream_t stream, int bucket) {
  switch (bucket) {
    case 64: return cuda::launch_attention_decode<T, 64>(p, stream);
    case 128: return cuda::launch_attention_decode<T, 128>(p, stream);
    default: return cuda::launch_attention_decode<T, 256>(p, stream);
  }
}

// Rows per key head (a GQA group's heads x the new queries) up to which a
// call runs the decoding kernel (two of its row groups); past it, the forward
// kernels' 64-row tiles have rows enough.
constexpr int64_t kMaxDecodeRows = 16;

bool decoding_shape(const AttentionShape& s) { return s.Hq / s.Hkv * s.L <= kMaxDecodeRows; }

// t, or a contiguous copy when its last dim is strided: the decoding kernel
// reads any other strides.
at::Tensor unit_last(const at::Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// The decoding kernel over p (q, k, v, out [B, Hq, L, Ev] and lse [B, Hq, L]
// set): the keys split until the blocks fill every SM twice, each split of
// 256+ keys, the splits then merged by the combine kernel.
void launch_decode(cuda::AttentionParams& p, const AttentionShape& s, const at::Tensor& query) {
  const int bucket = cuda::attention_head_dim_bucket(std::max(s.E, s.Ev));
  const int64_t rows_per_block = cuda::attention_decode_rows_per_block(query.element_size(), bucket);
  const int64_t row_groups = (s.Hq / s.Hkv * s.L + rows_per_block - 1) / rows_per_block;
  const int64_t blocks = s.B * s.Hkv * row_groups, sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  p.splits = std::max<int64_t>(1, std::min((2 * sms + blocks - 1) / blocks, (s.S + 255) / 256));
  p.keys_per_split = std::max<int64_t>(1, (s.S + p.splits - 1) / p.splits);
  p.splits = std::max<int64_t>(1, (s.S + p.keys_per_split - 1) / p.keys_per_split);
  TORCH_CHECK_VALUE(p.splits <= 65535, "bigkernels attention: too many keys for the CUDA decoding grid");
  TORCH_CHECK_VALUE(blocks <= INT32_MAX, "bigkernels attention: batch x key heads = ", s.B * s.Hkv,
                    " is too many for the CUDA decoding grid");
  at::Tensor split_out, split_lse;
  if (p.splits > 1) {
    const at::TensorOptions acc = query.options().dtype(lse_dtype(query));  // the kernel's accumulator type
    split_out = at::empty({p.splits, s.B, s.Hq, s.L, s.Ev}, acc);
    split_lse = at::empty({p.splits, s.B, s.Hq, s.L}, acc);
    p.split_out = split_out.mutable_data_ptr(), p.split_lse = split_lse.mutable_data_ptr();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t e = cudaSuccess;
  switch (p.dtype) {
    case cuda::AttentionDType::kFloat16: e = launch_decode_for<__half>(p, stream, bucket); break;
    case cuda::AttentionDType::kBFloat16: e = launch_decode_for<__nv_bfloat16>(p, stream, bucket); break;
    case cuda::AttentionDType::kFloat32: e = launch_decode_for<float>(p, stream, bucket); break;
    case cuda::AttentionDType::kFloat64: e = launch_decode_for<double>(p, stream, bucket); break;
  }
  C10_CUDA_CHECK(e);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value,
                                                          const std::optional<at::Tensor>& attn_mask,
                                                          double scale, int64_t window_left,
                                                          int64_t window_right, int64_t diagonal_offset,
                                                          double dropout_p, int64_t dropout_seed, double softcap,
                                                          const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_attention_args(query, key, value, attn_mask, window_left, window_right, dropout_p);
  check_cuda_args(query, s);
  check_score_options("bigkernels.attention", query, s, softcap, alibi_slopes);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, query.options().dtype(lse_dtype(query)));
  if (s.B * s.Hq * s.L == 0) return {at::empty({s.B, s.Hq, s.L, s.Ev}, query.options()), lse};
  if (!attn_mask.has_value() && dropout_p == 0 && decoding_shape(s)) {
    // Decoding shapes (a few rows per key head against many keys, e.g. a
    // generate() step): the decoding kernel, attention_with_kvcache's, reads
    // each K and V row once over every SM. The backward needs only out and lse.
    const at::Tensor q = unit_last(query), k = unit_last(key), v = unit_last(value);
    cuda::AttentionParams p = make_params(s, q, k, v, at::Tensor(), scale, window_left, window_right,
                                          diagonal_offset, 0.0, 0);
    at::Tensor slopes;
    set_score_options(p, query, softcap, alibi_slopes, slopes);
    at::Tensor out = at::empty({s.B, s.Hq, s.L, s.Ev}, query.options());
    p.out = out.mutable_data_ptr();
    p.lse = lse.mutable_data_ptr();
    launch_decode(p, s, query);
    return {out, lse};
  }
  const at::Tensor q = kernel_layout(query), k = kernel_layout(key), v = kernel_layout(value);
  const at::Tensor mask4 = attn_mask.has_value() ? broadcast_mask(*attn_mask, s) : at::Tensor();
  cuda::AttentionParams p = make_params(s, q, k, v, mask4, scale, window_left, window_right, diagonal_offset,
                                        dropout_p, dropout_seed);
  at::Tensor slopes;
  set_score_options(p, query, softcap, alibi_slopes, slopes);
  at::Tensor out = at::empty({s.B, s.Hq, s.L, p.Ev}, query.options());
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  launch<true>(p);
  return {cut_last_dim(out, s.Ev), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& output, const at::Tensor& lse, double scale,
    int64_t window_left, int64_t window_right, int64_t diagonal_offset, double dropout_p, int64_t dropout_seed,
    bool grad_mask, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_attention_args(query, key, value, attn_mask, window_left, window_right, dropout_p);
  check_cuda_args(query, s);
  check_score_options("bigkernels.attention_backward", query, s, softcap, alibi_slopes);
  check_attention_backward_args(grad_output, output, lse, query, s);
  const c10::cuda::CUDAGuard guard(query.device());
  at::Tensor grad_mask_full = grad_mask_buffer(attn_mask, grad_mask, s, lse_dtype(query));
  if (s.B * s.Hq * s.L == 0 || s.S == 0) {  // no score: every gradient is 0
    return {at::zeros_like(query, at::MemoryFormat::Contiguous), at::zeros_like(key, at::MemoryFormat::Contiguous),
            at::zeros_like(value, at::MemoryFormat::Contiguous), reduce_grad_mask(grad_mask_full, attn_mask, query)};
  }
  const at::Tensor q = kernel_layout(query), k = kernel_layout(key), v = kernel_layout(value);
  const at::Tensor mask4 = attn_mask.has_value() ? broadcast_mask(*attn_mask, s) : at::Tensor();
  cuda::AttentionParams p = make_params(s, q, k, v, mask4, scale, window_left, window_right, diagonal_offset,
                                        dropout_p, dropout_seed);
  at::Tensor slopes;
  set_score_options(p, query, softcap, alibi_slopes, slopes);
  // delta = rowsum(dO * O), the softmax gradient's shared term, in lse's type
  const at::Tensor delta =
      at::mul(grad_output.to(lse_dtype(query)), output.to(lse_dtype(query))).sum(-1).contiguous();
  const at::Tensor grad_out = contiguous_for_kernels(grad_output.to(query.scalar_type()), p.Ev);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_q = at::empty({s.B, s.Hq, s.L, p.E}, query.options());
  at::Tensor grad_k = at::empty({s.B, s.Hkv, s.S, p.E}, query.options());
  at::Tensor grad_v = at::empty({s.B, s.Hkv, s.S, p.Ev}, query.options());
  p.lse = const_cast<void*>(lse_c.const_data_ptr());  // read only in backward
  p.delta = delta.const_data_ptr();
  p.grad_out = grad_out.const_data_ptr();
  p.grad_q = grad_q.mutable_data_ptr(), p.grad_k = grad_k.mutable_data_ptr(), p.grad_v = grad_v.mutable_data_ptr();
  p.grad_mask = grad_mask_full.defined() ? grad_mask_full.mutable_data_ptr() : nullptr;
  launch<false>(p);
  return {cut_last_dim(grad_q, s.E), cut_last_dim(grad_k, s.E), cut_last_dim(grad_v, s.Ev),
          reduce_grad_mask(grad_mask_full, attn_mask, query)};
}

// A varlen call's params: the packed [total, H, D] tensors as the kernels'
// [1, H, total, D] views (kernel_layout; their batch strides 0), the
// sequences' offsets on the device (int64), their lengths as L and S, and,
// with dropout, each sequence's first counter (VarlenSequences::
// dropout_offsets, as on the CPU). Keeps what it allocates alive in `keep`.
cuda::AttentionParams varlen_params(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                    const VarlenSequences& seqs, const AttentionShape& s, double scale,
                                    int64_t window_left, int64_t window_right, double dropout_p, int64_t dropout_seed,
                                    std::vector<at::Tensor>& keep) {
  const auto one_batch = [](const at::Tensor& t) { return kernel_layout(t.unsqueeze(0).transpose(1, 2)); };
  const at::Tensor q = one_batch(query), k = one_batch(key), v = one_batch(value);
  cuda::AttentionParams p = make_params(s, q, k, v, at::Tensor(), scale, window_left, window_right, 0, dropout_p,
                                        dropout_seed);
  p.q_strides[0] = p.k_strides[0] = p.v_strides[0] = 0;  // batch b is sequence b, from its own rows
  const at::Tensor cu_q = cu_seqlens_q.to(at::kLong).contiguous(), cu_k = cu_seqlens_k.to(at::kLong).contiguous();
  p.cu_seqlens_q = cu_q.const_data_ptr<int64_t>(), p.cu_seqlens_k = cu_k.const_data_ptr<int64_t>();
  p.total_q = query.size(0), p.total_k = key.size(0);
  keep = {q, k, v, cu_q, cu_k};
  if (dropout_p > 0) {
    const std::vector<int64_t> offsets = seqs.dropout_offsets(s.Hq);
    keep.push_back(at::tensor(offsets, at::TensorOptions().dtype(at::kLong)).to(query.device()));
    p.dropout_offsets = keep.back().const_data_ptr<int64_t>();
  }
  return p;
}

// The varlen call's shape with the sequences' true longest lengths (the
// grid's extent; max_seqlen_* may be larger).
AttentionShape varlen_shape(const AttentionShape& s, const VarlenSequences& seqs) {
  return {s.B, s.Hq, s.Hkv, seqs.longest_L(), seqs.longest_S(), s.E, s.Ev};
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_cuda(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, int64_t dropout_seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape checked = check_varlen_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, window_left, window_right, dropout_p, softcap,
                                                   alibi_slopes);
  const c10::cuda::CUDAGuard guard(query.device());
  const VarlenSequences seqs =
      read_sequences(cu_seqlens_q, cu_seqlens_k, query.size(0), key.size(0), max_seqlen_q, max_seqlen_k);
  const AttentionShape s = varlen_shape(checked, seqs);
  check_cuda_args(query, s);
  const int64_t total_q = query.size(0);
  at::Tensor lse = at::empty({s.Hq, total_q}, query.options().dtype(lse_dtype(query)));
  if (total_q == 0 || s.Hq == 0) return {at::empty({total_q, s.Hq, s.Ev}, query.options()), lse};
  std::vector<at::Tensor> keep;
  cuda::AttentionParams p = varlen_params(query, key, value, cu_seqlens_q, cu_seqlens_k, seqs, s, scale,
                                          window_left, window_right, dropout_p, dropout_seed, keep);
  at::Tensor slopes;
  set_score_options(p, query, softcap, alibi_slopes, slopes);
  at::Tensor out = at::empty({s.Hq, total_q, p.Ev}, query.options());  // head-major, as the kernels write it
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  launch<true>(p);
  return {out.narrow(-1, 0, s.Ev).transpose(0, 1).contiguous(), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const at::Tensor& output, const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
    double dropout_p, int64_t dropout_seed, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape checked = check_varlen_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                   max_seqlen_k, window_left, window_right, dropout_p, softcap,
                                                   alibi_slopes);
  check_varlen_backward_args(grad_output, output, lse, query, checked);
  const int64_t total_q = query.size(0), total_k = key.size(0);
  const c10::cuda::CUDAGuard guard(query.device());
  const VarlenSequences seqs = read_sequences(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k);
  const AttentionShape s = varlen_shape(checked, seqs);
  check_cuda_args(query, s);
  if (total_q == 0 || total_k == 0 || s.Hq == 0) {  // no score: every gradient is 0
    return {at::zeros_like(query, at::MemoryFormat::Contiguous), at::zeros_like(key, at::MemoryFormat::Contiguous),
            at::zeros_like(value, at::MemoryFormat::Contiguous)};
  }
  std::vector<at::Tensor> keep;
  cuda::AttentionParams p = varlen_params(query, key, value, cu_seqlens_q, cu_seqlens_k, seqs, s, scale,
                                          window_left, window_right, dropout_p, dropout_seed, keep);
  at::Tensor slopes;
  set_score_options(p, query, softcap, alibi_slopes, slopes);
  // head-major, as the kernels read and write them: dO, delta = rowsum(dO * O) and lse [Hq, total_q, ...]
  const at::Tensor grad_out = contiguous_for_kernels(grad_output.to(query.scalar_type()).transpose(0, 1), p.Ev);
  const at::Tensor delta =
      at::mul(grad_output.to(lse_dtype(query)), output.to(lse_dtype(query))).sum(-1).transpose(0, 1).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor grad_q = at::empty({s.Hq, total_q, p.E}, query.options());
  at::Tensor grad_k = at::empty({s.Hkv, total_k, p.E}, query.options());
  at::Tensor grad_v = at::empty({s.Hkv, total_k, p.Ev}, query.options());
  p.lse = const_cast<void*>(lse_c.const_data_ptr());  // read only in backward
  p.delta = delta.const_data_ptr();
  p.grad_out = grad_out.const_data_ptr();
  p.grad_q = grad_q.mutable_data_ptr(), p.grad_k = grad_k.mutable_data_ptr(), p.grad_v = grad_v.mutable_data_ptr();
  launch<false>(p);
  const auto packed = [](const at::Tensor& g, int64_t dim) {
    return g.narrow(-1, 0, dim).transpose(0, 1).contiguous();  // back to [total, H, dim]
  };
  return {packed(grad_q, s.E), packed(grad_k, s.E), packed(grad_v, s.Ev)};
}

// Decoding against a KV cache [B, capacity, Hkv, D] or pages [num_pages,
// page_size, Hkv, D] (block_table): the new keys appended in place
// (PyTorch's index_put_), then the decoding kernel (few rows per key head,
// or a paged cache: the keys split over the SMs) or the forward kernels with
// per-batch key counts (AttentionParams::seqlens_k).
std::tuple<at::Tensor, at::Tensor> attention_kvcache_forward_cuda(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  AttentionShape s = check_kvcache_args(query, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                        window_left, window_right, softcap, alibi_slopes);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t Lk = k_new.has_value() ? k_new->size(1) : 0, page_size = k_cache.size(1);
  const at::Tensor lens = kvcache_lengths(cache_seqlens, s.S, Lk);  // checked on the host
  const bool paged = block_table.has_value();
  const at::Tensor table =
      paged ? kvcache_pages(*block_table, lens, page_size, k_cache.size(0)).to(query.device()) : at::Tensor();
  if (Lk > 0) {
    const at::Tensor start = cache_seqlens.to(at::kLong).unsqueeze(1);
    const at::Tensor positions = start + at::arange(Lk, start.options()).unsqueeze(0);
    const at::Tensor batch = at::arange(s.B, start.options()).unsqueeze(1);
    // (paged: key position n of batch b is row n % page_size of page table[b, n / page_size])
    const at::Tensor block = paged ? table.gather(1, positions.floor_divide(page_size)) : batch;
    const at::Tensor row = paged ? positions.remainder(page_size) : positions;
    k_cache.index_put_({block, row}, *k_new);
    v_cache.index_put_({block, row}, *v_new);
  }
  s.S = s.B > 0 ? lens.max().item<int64_t>() : 0;
  at::Tensor out = at::empty({s.B, s.Hq, s.L, s.Ev}, query.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, query.options().dtype(lse_dtype(query)));
  if (out.numel() == 0) return {out.transpose(1, 2).contiguous(), lse.fill_(-INFINITY)};
  check_cuda_args(query, s);
  const at::Tensor seqlens_k = lens.to(query.device());
  // [B, H, L|S, D] views of q and the caches
  const at::Tensor q4 = query.transpose(1, 2), k4 = k_cache.transpose(1, 2), v4 = v_cache.transpose(1, 2);
  const bool decode = paged || decoding_shape(s);
  // (the forward kernels want 16-byte rows: kernel_layout pads or copies)
  const at::Tensor q = decode ? unit_last(q4) : kernel_layout(q4), k = decode ? k4 : kernel_layout(k4);
  const at::Tensor v = decode ? v4 : kernel_layout(v4);
  cuda::AttentionParams p = make_params(s, q, k, v, at::Tensor(), scale, window_left, window_right, 0, 0.0, 0);
  p.seqlens_k = seqlens_k.const_data_ptr<int64_t>();
  if (paged) {
    p.block_table = table.const_data_ptr<int64_t>();
    p.block_table_stride = table.size(1), p.page_size = page_size;  // (k4, v4: strides page, head, row)
  }
  at::Tensor slopes;
  set_score_options(p, query, softcap, alibi_slopes, slopes);
  at::Tensor out_k = decode ? out : at::empty({s.B, s.Hq, s.L, p.Ev}, query.options());  // (padded Ev)
  p.out = out_k.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  if (!decode) {
    launch<true>(p);
    return {out_k.narrow(-1, 0, s.Ev).transpose(1, 2).contiguous(), lse};
  }
  launch_decode(p, s, query);
  return {out.transpose(1, 2).contiguous(), lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CUDA, m) {
  m.impl("attention_kvcache_forward", &attention_kvcache_forward_cuda);
  m.impl("attention_forward", &attention_forward_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
  m.impl("varlen_attention_forward", &varlen_attention_forward_cuda);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cuda);
}

}  // namespace bigkernels
