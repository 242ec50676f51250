// CPU attention ops: checks, layouts, and the block loops of
// attention_kernels.cpp (compiled per CPU capability) spread over threads:
// forward by (batch, head, block of query rows), backward by (batch, key
// head), so that every gradient has one writer (deterministic).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/_to_copy.h>
#include <torch/library.h>

#include "attention/attention.h"
#include "attention/cpu/attention_kernels.h"
#include "common/column_panels.h"

namespace bigkernels {
namespace {

// The kernels compute in float, or double for double inputs: lse's type.
at::ScalarType compute_dtype(const at::Tensor& q) { return lse_dtype(q); }

// x [B, H, S, D] as [B, H, ceil(S / block), D, block] in the compute type,
// zero-padded: each key block transposed and contiguous. (A plain [D, S]
// transpose would put a block's rows S elements apart: 4 KB for S = 1024
// floats, which map to one L1 set and evict each other.)
at::Tensor blocked_transpose(const at::Tensor& x) {
  return column_panels(x.transpose(-1, -2), kAttentionKeyBlock, compute_dtype(x));
}

// The kernels need a contiguous last dim; other strides are honoured.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

AttentionCpuParams make_params(const AttentionShape& s, const at::Tensor& q,
                               const std::optional<at::Tensor>& mask, at::Tensor& mask4,
                               double scale, int64_t window_left, int64_t window_right,
                               int64_t diagonal_offset, double dropout_p, int64_t dropout_seed) {
  AttentionCpuParams p{};
  p.dropout_p = dropout_p;
  p.dropout_seed = static_cast<uint64_t>(dropout_seed);
  p.dtype = q.scalar_type();
  p.q = q.const_data_ptr();
  for (int d = 0; d < 3; ++d) p.q_strides[d] = q.stride(d);
  if (mask.has_value()) {
    mask4 = broadcast_mask(*mask, s);
    p.mask = mask4.const_data_ptr();
    p.mask_is_bool = mask4.scalar_type() == at::kBool;
    for (int d = 0; d < 4; ++d) p.mask_strides[d] = mask4.stride(d);
  }
  p.B = s.B, p.Hq = s.Hq, p.Hkv = s.Hkv, p.L = s.L, p.S = s.S, p.E = s.E, p.Ev = s.Ev;
  p.scale = scale;
  p.window_left = window_left, p.window_right = window_right, p.diagonal_offset = diagonal_offset;
  return p;
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                         const at::Tensor& value,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         double scale, int64_t window_left,
                                                         int64_t window_right, int64_t diagonal_offset,
                                                         double dropout_p, int64_t dropout_seed) {
  const AttentionShape s = check_attention_args(query, key, value, attn_mask, window_left, window_right, dropout_p);
  const at::Tensor q = unit_last_stride(query), &k = key, &v = value;
  at::Tensor mask4;
  AttentionCpuParams p = make_params(s, q, attn_mask, mask4, scale, window_left, window_right, diagonal_offset,
                                     dropout_p, dropout_seed);
  // K^T and V in the compute type, once per call (parallel copies):
  // no block of the loops converts or transposes them again.
  const at::Tensor k_t = blocked_transpose(k);
  const at::Tensor v_c = v.to(compute_dtype(q)).contiguous();
  p.k_t = k_t.const_data_ptr(), p.v_c = v_c.const_data_ptr();
  at::Tensor out = at::empty({s.B, s.Hq, s.L, s.Ev}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, q.options().dtype(lse_dtype(q)));
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr();
  const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
  const int64_t blocks = (s.L + kAttentionBlockRows - 1) / kAttentionBlockRows;
  at::parallel_for(0, s.B * s.Hq * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / blocks, i0 = (t % blocks) * kAttentionBlockRows;
      kernels.forward_block(p, bh / s.Hq, bh % s.Hq, i0, std::min(s.L, i0 + kAttentionBlockRows));
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& output, const at::Tensor& lse, double scale,
    int64_t window_left, int64_t window_right, int64_t diagonal_offset, double dropout_p, int64_t dropout_seed,
    bool grad_mask) {
  const AttentionShape s = check_attention_args(query, key, value, attn_mask, window_left, window_right, dropout_p);
  check_attention_backward_args(grad_output, output, lse, query, s);
  const at::Tensor q = unit_last_stride(query), &k = key, &v = value;
  const at::Tensor g = grad_output.contiguous().to(q.scalar_type()), o = output.contiguous(), l = lse.contiguous();
  at::Tensor mask4;
  AttentionCpuParams p = make_params(s, q, attn_mask, mask4, scale, window_left, window_right, diagonal_offset,
                                     dropout_p, dropout_seed);
  const at::Tensor k_c = k.to(compute_dtype(q)).contiguous();
  const at::Tensor k_t = blocked_transpose(k_c);
  const at::Tensor v_t = blocked_transpose(v);
  p.k_c = k_c.const_data_ptr(), p.k_t = k_t.const_data_ptr(), p.v_t = v_t.const_data_ptr();
  at::Tensor grad_q = at::empty({s.B, s.Hq, s.L, s.E}, q.options());
  at::Tensor grad_k = at::empty({s.B, s.Hkv, s.S, s.E}, q.options());
  at::Tensor grad_v = at::empty({s.B, s.Hkv, s.S, s.Ev}, q.options());
  p.out = const_cast<void*>(o.const_data_ptr());  // read only in backward
  p.lse = const_cast<void*>(l.const_data_ptr());
  p.grad_out = g.const_data_ptr();
  p.grad_q = grad_q.mutable_data_ptr(), p.grad_k = grad_k.mutable_data_ptr(), p.grad_v = grad_v.mutable_data_ptr();
  at::Tensor grad_mask_full = grad_mask_buffer(attn_mask, grad_mask, s, compute_dtype(q));
  p.grad_mask = grad_mask_full.defined() ? grad_mask_full.mutable_data_ptr() : nullptr;
  const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) kernels.backward_head(p, t / s.Hkv, t % s.Hkv);
  });
  return {grad_q, grad_k, grad_v, reduce_grad_mask(grad_mask_full, attn_mask, query)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace bigkernels
