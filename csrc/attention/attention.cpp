// The attention family's ops (schemas) and argument checks.
#include "attention/attention.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/_to_copy.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace bigkernels {

AttentionShape check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& mask, int64_t window_left,
                                    int64_t window_right, double dropout_p) {
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "bigkernels.attention: query must be a "
                   "floating-point tensor, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "bigkernels.attention: key (", k.scalar_type(), ") and value (", v.scalar_type(),
                   ") must have query's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), "bigkernels.attention: "
                    "query, key and value must be on one device");
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "bigkernels.attention: query, key "
                    "and value must be 4-d [B, H, L, E], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
  TORCH_CHECK_VALUE(k.size(0) == s.B && v.size(0) == s.B, "bigkernels.attention: batch sizes differ");
  TORCH_CHECK_VALUE(v.size(1) == s.Hkv && s.Hkv > 0 && s.Hq % s.Hkv == 0, "bigkernels.attention: "
                    "query's heads (", s.Hq, ") must be a multiple of key's (", s.Hkv, "), which value's (",
                    v.size(1), ") must equal");
  TORCH_CHECK_VALUE(k.size(3) == s.E, "bigkernels.attention: key's head dim ", k.size(3),
                    " does not match query's ", s.E);
  TORCH_CHECK_VALUE(v.size(2) == s.S, "bigkernels.attention: value has ", v.size(2),
                    " positions but key has ", s.S);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, "bigkernels.attention: dropout_p must be in [0, 1), got ",
                    dropout_p);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, "bigkernels.attention: window sizes "
                    "must be >= -1, got (", window_left, ", ", window_right, ")");
  if (mask.has_value()) {
    TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool || mask->scalar_type() == q.scalar_type(),
                     "bigkernels.attention: attn_mask must be bool or query's dtype, got ",
                     mask->scalar_type());
    TORCH_CHECK_VALUE(mask->device() == q.device(), "bigkernels.attention: attn_mask is on ",
                      mask->device(), " but query is on ", q.device());
    TORCH_CHECK_VALUE(mask->dim() <= 4, "bigkernels.attention: attn_mask has ", mask->dim(),
                      " dimensions, at most 4");
    const int64_t full[4] = {s.B, s.Hq, s.L, s.S};
    for (int64_t d = 0; d < mask->dim(); ++d) {
      const int64_t size = mask->size(mask->dim() - 1 - d), want = full[3 - d];
      TORCH_CHECK_VALUE(size == want || size == 1, "bigkernels.attention: attn_mask of shape ",
                        mask->sizes(), " does not broadcast to [", s.B, ", ", s.Hq, ", ", s.L, ", ", s.S, "]");
    }
  }
  return s;
}

AttentionShape check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                  const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& block_table,
                                  int64_t window_left, int64_t window_right, double softcap,
                                  const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "bigkernels.attention_with_kvcache";
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), op, ": q must be a floating-point tensor, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
                   ": k_cache (", k_cache.scalar_type(), ") and v_cache (", v_cache.scalar_type(),
                   ") must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k_cache.device() == q.device() && v_cache.device() == q.device(), op,
                    ": q, k_cache and v_cache must be on one device");
  TORCH_CHECK_VALUE(q.dim() == 4 && k_cache.dim() == 4 && v_cache.dim() == 4, op, ": q must be [B, Lq, H, D] and "
                    "the caches [B, S, Hkv, D] (or pages [num_pages, page_size, Hkv, D]), got ", q.sizes(), ", ",
                    k_cache.sizes(), ", ", v_cache.sizes());
  const bool paged = block_table.has_value();
  AttentionShape s{q.size(0), q.size(2), k_cache.size(2), q.size(1), k_cache.size(1), q.size(3), v_cache.size(3)};
  TORCH_CHECK_VALUE(k_cache.sizes().slice(0, 3) == v_cache.sizes().slice(0, 3), op, ": k_cache ",
                    k_cache.sizes(), " and v_cache ", v_cache.sizes(), " must agree but in the head dim");
  TORCH_CHECK_VALUE(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": q's heads (", s.Hq,
                    ") must be a multiple of the caches' (", s.Hkv, ")");
  TORCH_CHECK_VALUE(k_cache.size(3) == s.E, op, ": k_cache's head dim ", k_cache.size(3),
                    " does not match q's ", s.E);
  const auto unit_last = [](const at::Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1; };
  TORCH_CHECK_VALUE(unit_last(k_cache) && unit_last(v_cache), op, ": k_cache and v_cache need a contiguous last "
                    "dim (stride 1): they are read and written in place");
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), op, ": k and v come together");
  if (k_new.has_value()) {
    for (const at::Tensor* t : {&*k_new, &*v_new}) {
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type() && t->device() == q.device(), op,
                       ": k and v must have q's dtype and device");
    }
    const at::Tensor &k = *k_new, &v = *v_new;
    TORCH_CHECK_VALUE(k.dim() == 4 && k.size(0) == s.B && k.size(2) == s.Hkv && k.size(3) == s.E, op,
                      ": k must be [B, Lk, Hkv, D] = [", s.B, ", Lk, ", s.Hkv, ", ", s.E, "], got ", k.sizes());
    TORCH_CHECK_VALUE(v.dim() == 4 && v.size(0) == s.B && v.size(1) == k.size(1) && v.size(2) == s.Hkv &&
                          v.size(3) == s.Ev,
                      op, ": v must be [B, Lk, Hkv, Dv] = [", s.B, ", ", k.size(1), ", ", s.Hkv, ", ", s.Ev,
                      "], got ", v.sizes());
  }
  TORCH_CHECK_TYPE(cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong, op,
                   ": cache_seqlens must be int32 or int64, got ", cache_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == s.B && cache_seqlens.device() == q.device(),
                    op, ": cache_seqlens must be [B] = [", s.B, "] on q's device, got ", cache_seqlens.sizes(), " on ",
                    cache_seqlens.device());
  if (paged) {
    const at::Tensor& table = *block_table;
    TORCH_CHECK_TYPE(table.scalar_type() == at::kInt || table.scalar_type() == at::kLong, op,
                     ": block_table must be int32 or int64, got ", table.scalar_type());
    TORCH_CHECK_VALUE(table.dim() == 2 && table.size(0) == s.B && table.device() == q.device(), op,
                      ": block_table must be [B, max_pages] with B = ", s.B, " on q's device, got ", table.sizes(),
                      " on ", table.device());
    TORCH_CHECK_VALUE(k_cache.size(1) > 0, op, ": the paged caches' page_size (dim 1) must be positive");
    s.S = table.size(1) * k_cache.size(1);  // each batch's capacity: its pages
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == s.B, op, ": k_cache has batch ", k_cache.size(0), " but q has ", s.B,
                      " (a paged cache needs block_table)");
  }
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= -1, got (",
                    window_left, ", ", window_right, ")");
  check_score_options(op, q, s, softcap, alibi_slopes);
  return s;
}

AttentionShape check_varlen_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                 int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t window_left,
                                 int64_t window_right, double dropout_p, double softcap,
                                 const std::optional<at::Tensor>& alibi_slopes) {
  const char* op = "bigkernels.varlen_attention";
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), op, ": q must be a floating-point tensor, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op, ": k (",
                   k.scalar_type(), ") and v (", v.scalar_type(), ") must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device");
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op, ": q must be [total_q, H, D] and k, v "
                    "[total_k, Hkv, D], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = cu_seqlens_q.numel() - 1;
  const AttentionShape s{B, q.size(1), k.size(1), max_seqlen_q, max_seqlen_k, q.size(2), v.size(2)};
  TORCH_CHECK_VALUE(v.size(0) == k.size(0) && v.size(1) == s.Hkv, op, ": v ", v.sizes(), " must have k's ",
                    k.sizes(), " positions and heads");
  TORCH_CHECK_VALUE(s.Hkv > 0 && s.Hq % s.Hkv == 0, op, ": q's heads (", s.Hq, ") must be a multiple of k's (",
                    s.Hkv, ")");
  TORCH_CHECK_VALUE(k.size(2) == s.E, op, ": k's head dim ", k.size(2), " does not match q's ", s.E);
  for (const auto& [name, cu] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &cu_seqlens_q},
                                 {"cu_seqlens_k", &cu_seqlens_k}}) {
    TORCH_CHECK_TYPE(cu->scalar_type() == at::kInt || cu->scalar_type() == at::kLong, op, ": ", name,
                     " must be int32 or int64, got ", cu->scalar_type());
    TORCH_CHECK_VALUE(cu->dim() == 1 && cu->numel() >= 1 && cu->device() == q.device(), op, ": ", name,
                      " must be 1-d [sequences + 1] on q's device, got ", cu->sizes(), " on ", cu->device());
  }
  TORCH_CHECK_VALUE(cu_seqlens_k.numel() == cu_seqlens_q.numel(), op, ": cu_seqlens_q (", cu_seqlens_q.numel(),
                    ") and cu_seqlens_k (", cu_seqlens_k.numel(), ") must have one entry per sequence, plus one");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
                    max_seqlen_q, " and ", max_seqlen_k);
  TORCH_CHECK_VALUE(dropout_p >= 0 && dropout_p < 1, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op, ": window sizes must be >= -1, got (",
                    window_left, ", ", window_right, ")");
  check_score_options(op, q, s, softcap, alibi_slopes);
  return s;
}

void check_score_options(const char* op, const at::Tensor& q, const AttentionShape& s, double softcap,
                         const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK_VALUE(softcap >= 0 && std::isfinite(softcap), op, ": softcap must be >= 0 (0: none), got ", softcap);
  if (!alibi_slopes.has_value()) return;
  const at::Tensor& a = *alibi_slopes;
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
                   ": alibi_slopes must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == q.device() && (a.dim() == 1 || (a.dim() == 2 && a.size(0) == s.B)) &&
                        a.size(-1) == s.Hq,
                    op, ": alibi_slopes must be [H] or [B, H] = [", s.B, ", ", s.Hq, "] on the query's device, got ",
                    a.sizes(), " on ", a.device());
}

VarlenSequences read_sequences(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total_q,
                               int64_t total_k, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  VarlenSequences seqs;
  const struct {
    const char *name, *max_name;
    const at::Tensor& cu;
    int64_t total, max_len;
    std::vector<int64_t>& start;
  } sides[2] = {{"cu_seqlens_q", "max_seqlen_q", cu_seqlens_q, total_q, max_seqlen_q, seqs.q_start},
                {"cu_seqlens_k", "max_seqlen_k", cu_seqlens_k, total_k, max_seqlen_k, seqs.k_start}};
  for (const auto& side : sides) {
    const at::Tensor cu = side.cu.to(at::kCPU, at::kLong).contiguous();  // (a copy from the GPU waits for it)
    const int64_t* c = cu.const_data_ptr<int64_t>();
    side.start.assign(c, c + cu.numel());
    TORCH_CHECK_VALUE(side.start.front() == 0 && side.start.back() == side.total, "bigkernels.varlen_attention: ",
                      side.name, " must run from 0 to the packed rows (", side.total, "), got ", side.start.front(),
                      " to ", side.start.back());
    for (size_t b = 0; b + 1 < side.start.size(); ++b) {
      const int64_t len = side.start[b + 1] - side.start[b];
      TORCH_CHECK_VALUE(len >= 0, "bigkernels.varlen_attention: ", side.name, " must not decrease, but ", side.name,
                        "[", b + 1, "] = ", side.start[b + 1], " < ", side.name, "[", b, "] = ", side.start[b]);
      TORCH_CHECK_VALUE(len <= side.max_len, "bigkernels.varlen_attention: sequence ", b, " has ", len, " rows but ",
                        side.max_name, " is ", side.max_len);
    }
  }
  return seqs;
}

void check_varlen_backward_args(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
                                const at::Tensor& query, const AttentionShape& s) {
  const int64_t total_q = query.size(0);
  const std::vector<int64_t> out_shape{total_q, s.Hq, s.Ev};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape) && output.sizes() == grad_output.sizes(),
                    "bigkernels.varlen_attention backward: grad_output ", grad_output.sizes(), " and output ",
                    output.sizes(), " must be [total_q, H, Dv] = ", at::IntArrayRef(out_shape));
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype(query) && lse.sizes() == at::IntArrayRef({s.Hq, total_q}),
                    "bigkernels.varlen_attention backward: lse must be ", lse_dtype(query), " [H, total_q], got ",
                    lse.scalar_type(), " ", lse.sizes());
}

at::Tensor kvcache_lengths(const at::Tensor& cache_seqlens, int64_t capacity, int64_t Lk) {
  at::Tensor lens = cache_seqlens.to(at::kCPU, at::kLong, /*non_blocking=*/false, /*copy=*/true).contiguous();
  int64_t* len = lens.mutable_data_ptr<int64_t>();
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK_VALUE(len[b] >= 0 && len[b] + Lk <= capacity, "bigkernels.attention_with_kvcache: cache_seqlens[",
                      b, "] is ", len[b], ": it must lie in [0, capacity - Lk] = [0, ", capacity - Lk, "] (the cache "
                      "holds ", capacity, " keys per batch, ", Lk, " new ones come)");
    len[b] += Lk;
  }
  return lens;
}

at::Tensor kvcache_pages(const at::Tensor& block_table, const at::Tensor& lengths, int64_t page_size,
                         int64_t num_pages) {
  const at::Tensor table = block_table.to(at::kCPU, at::kLong).contiguous();
  const int64_t* entry = table.const_data_ptr<int64_t>();
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < table.size(0); ++b)
    for (int64_t j = 0; j < (len[b] + page_size - 1) / page_size; ++j) {
      const int64_t page = entry[b * table.size(1) + j];
      TORCH_CHECK_VALUE(page >= 0 && page < num_pages, "bigkernels.attention_with_kvcache: block_table[", b, ", ", j,
                        "] is ", page, ", not a page of the caches' ", num_pages);
    }
  return table;
}

int64_t VarlenSequences::longest_L() const {
  int64_t n = 0;
  for (int64_t b = 0; b < count(); ++b) n = std::max(n, L(b));
  return n;
}

int64_t VarlenSequences::longest_S() const {
  int64_t n = 0;
  for (int64_t b = 0; b < count(); ++b) n = std::max(n, S(b));
  return n;
}

std::vector<int64_t> VarlenSequences::dropout_offsets(int64_t H) const {
  std::vector<int64_t> offsets(count());
  for (int64_t b = 0, counters = 0; b < count(); counters += H * L(b) * S(b), ++b) offsets[b] = counters;
  return offsets;
}

at::ScalarType lse_dtype(const at::Tensor& query) {
  return query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_attention_backward_args(const at::Tensor& grad_output, const at::Tensor& output, const at::Tensor& lse,
                                   const at::Tensor& query, const AttentionShape& s) {
  const std::vector<int64_t> out_shape{s.B, s.Hq, s.L, s.Ev};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(out_shape) && output.sizes() == grad_output.sizes(),
                    "bigkernels.attention_backward: grad_output ", grad_output.sizes(), " and output ",
                    output.sizes(), " must have the output's shape ", at::IntArrayRef(out_shape));
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype(query) && lse.sizes() == at::IntArrayRef({s.B, s.Hq, s.L}),
                    "bigkernels.attention_backward: lse must be ", lse_dtype(query), " [B, H, L], got ",
                    lse.scalar_type(), " ", lse.sizes());
}

at::Tensor grad_mask_buffer(const std::optional<at::Tensor>& mask, bool grad_mask, const AttentionShape& s,
                            at::ScalarType dtype) {
  if (!grad_mask) return at::Tensor();
  TORCH_CHECK_VALUE(mask.has_value() && mask->is_floating_point(), "bigkernels.attention_backward: grad_mask "
                    "needs a float attn_mask");
  return at::zeros({s.B, s.Hq, s.L, s.S}, mask->options().dtype(dtype));
}

at::Tensor reduce_grad_mask(const at::Tensor& buffer, const std::optional<at::Tensor>& mask,
                            const at::Tensor& query) {
  if (!buffer.defined()) return at::empty({0}, query.options());
  at::Tensor g = buffer.sum_to_size(mask->sizes());
  return g.to(mask->scalar_type()).contiguous();
}

at::Tensor broadcast_mask(const at::Tensor& mask, const AttentionShape& s) {
  at::Tensor m = mask;
  while (m.dim() < 4) m = m.unsqueeze(0);
  return m.expand({s.B, s.Hq, s.L, s.S});
}

}  // namespace bigkernels

TORCH_LIBRARY_FRAGMENT(bigkernels, m) {
  // softmax(query @ key^T * scale + mask) @ value over [B, H, L, E] inputs,
  // never materialising the L x S scores. Query i may attend key j when
  // j - (i + diagonal_offset) lies in [-window_left, window_right] (-1: no
  // bound) and the mask allows it (bool: True = attend; float: added). Key
  // heads are shared by groups of Hq / Hkv query heads. `lse` is each row's
  // log-sum-exp ([B, H, L], float32, float64 for float64 inputs; -inf for a
  // row that attends to nothing, whose output is 0). dropout_p > 0 drops
  // probabilities after the softmax with common/counter_rng.h under
  // dropout_seed, so the backward regenerates the same mask. softcap > 0
  // caps the scaled scores x at softcap * tanh(x / softcap) (Gemma 2), then
  // alibi_slopes ([H] or [B, H], float32/float64) adds
  // -slope * |i + diagonal_offset - j|, both before the mask, as
  // flash-attention orders them.
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, "
      "int window_left, int window_right, int diagonal_offset, float dropout_p, int dropout_seed, "
      "float softcap=0., Tensor? alibi_slopes=None) -> (Tensor output, Tensor lse)");
  // Gradients of attention_forward from its output and lse (the scores are
  // recomputed block by block). With grad_mask (a float attn_mask that
  // requires grad), grad_attn_mask is the gradient of the scores summed to
  // the mask's shape (it costs a [B, H, L, S] buffer, as the mask's
  // broadcast does); else it is empty.
  m.def(
      "attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor output, Tensor lse, float scale, int window_left, int window_right, int diagonal_offset, "
      "float dropout_p, int dropout_seed, bool grad_mask=False, float softcap=0., Tensor? alibi_slopes=None) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_attn_mask)");
  // Attention of query [B, Lq, H, D] against a KV cache: k_cache and v_cache
  // [B, capacity, Hkv, D|Dv], or pages [num_pages, page_size, Hkv, D|Dv] read
  // through block_table [B, max_pages] (key j of batch b: row j % page_size
  // of page block_table[b, j / page_size]). New keys k and values v
  // [B, Lk, Hkv, D|Dv] (or neither) are first written into the caches in
  // place at positions cache_seqlens[b] + i; batch b then attends to its
  // first seqlens_k[b] = cache_seqlens[b] + Lk keys. Query i sits at key
  // position i + seqlens_k[b] - Lq (bottom-right, flash-attention's); the window is
  // attention_forward's around it (causal: window_right 0). softcap > 0
  // caps the scaled scores at softcap * tanh(x / softcap), then ALiBi adds
  // -slope * |position - j| with alibi_slopes [H] or [B, H]. Forward only:
  // output [B, Lq, H, Dv], lse [B, H, Lq] (lse_dtype; -inf for a row that
  // attends to nothing, whose output is 0).
  m.def(
      "attention_kvcache_forward(Tensor query, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? block_table, float scale, int window_left, int window_right, float softcap, "
      "Tensor? alibi_slopes) -> (Tensor output, Tensor lse)");
  // Attention over sequences packed end to end (flash-attention's
  // flash_attn_varlen_func): query [total_q, H, D], key [total_k, Hkv, D],
  // value [total_k, Hkv, Dv]; sequence b holds query rows
  // [cu_seqlens_q[b], cu_seqlens_q[b + 1]) and key rows likewise from
  // cu_seqlens_k (int32/int64, from 0, non-decreasing, ending at the totals),
  // at most max_seqlen_q and max_seqlen_k of them. Nothing attends across
  // sequences. Each sequence is attention_forward's single-batch call with
  // its own bottom-right diagonal (query i at key position i + S_b - L_b; the
  // window, causal: window_right 0, around it). Dropout keeps (b, h, i, j)
  // when counter_uniform(dropout_seed, n_b + (h * L_b + i) * S_b + j) >=
  // dropout_p, n_b the sequences before b's H * L * S. Returns output
  // [total_q, H, Dv] and lse [H, total_q] (lse_dtype; -inf for a row that
  // attends to nothing, whose output is 0).
  m.def(
      "varlen_attention_forward(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int window_left, int window_right, float dropout_p, "
      "int dropout_seed, float softcap, Tensor? alibi_slopes) -> (Tensor output, Tensor lse)");
  // Its gradients from the output and lse (deterministic: every gradient row has one writer).
  m.def(
      "varlen_attention_backward(Tensor grad_output, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor output, Tensor lse, float scale, "
      "int window_left, int window_right, float dropout_p, int dropout_seed, float softcap, Tensor? alibi_slopes) "
      "-> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // The same gradients through reference.py's differentiable PyTorch ops, for
  // double backward (create_graph=True; without dropout); implemented in
  // bigkernels/ops/attention.py. Those not asked for in output_mask are empty.
  m.def(
      "attention_backward_reference(Tensor grad_output, Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask, float scale, int window_left, int window_right, int diagonal_offset, "
      "bool[4] output_mask, float softcap=0., Tensor? alibi_slopes=None) -> (Tensor grad_query, Tensor grad_key, "
      "Tensor grad_value, Tensor grad_attn_mask)");
}
