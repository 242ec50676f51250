// CPU attention ops: checks, layouts, and the block loops of
// attention_kernels.cpp (compiled per CPU capability) spread over threads:
// forward by the tasks plan_forward picks (query rows, heads packed, keys
// split), backward by (batch, key head), so that every gradient has one
// writer (deterministic).
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/_scaled_dot_product_flash_attention_for_cpu.h>
#include <ATen/ops/_to_copy.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "attention/attention.h"
#include "attention/cpu/attention_kernels.h"

#include <algorithm>
#include <atomic>
#include <numeric>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace bigkernels {
namespace {

// Fewer query positions than this (decoding) read K and V in place rather
// than packing them for the BLAS micro-kernel: too few rows would reuse them.
constexpr int64_t kMinPackedQueries = 16;

// The kernels compute in float, or double for double inputs: lse's type.
at::ScalarType compute_dtype(const at::Tensor& q) { return lse_dtype(q); }

// The kernels need a contiguous last dim; other strides are honoured.
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// The forward's output, [B, H, L, Ev]. When query is a [B, L, H, E] tensor
// seen as [B, H, L, E] (Hugging Face's layout), the output is laid out the
// same way, so that the caller's transpose(1, 2).contiguous() back to
// [B, L, H, Ev] copies nothing. (bigkernels/ops/attention.py's fake
// implementation follows the same rule.)
at::Tensor attention_output_cpu(const at::Tensor& query, int64_t Ev) {
  const int64_t B = query.size(0), H = query.size(1), L = query.size(2);
  if (!query.is_contiguous() && query.transpose(1, 2).is_contiguous()) {
    return at::empty({B, L, H, Ev}, query.options()).transpose(1, 2);
  }
  return at::empty({B, H, L, Ev}, query.options());
}

// A gradient's buffer: laid out like its input when that is a permutation of
// a contiguous tensor (Hugging Face's [B, L, H, D] views), else contiguous.
// (bigkernels/ops/attention.py's fake implementation follows the same rule.)
at::Tensor attention_grad_like(const at::Tensor& input) {
  return at::empty_like(input, at::MemoryFormat::Preserve);
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

// The softcap and ALiBi's slopes (kept alive in `slopes`, in the compute type) into p.
void set_score_options(AttentionCpuParams& p, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                       at::Tensor& slopes) {
  p.softcap = softcap;
  if (!alibi_slopes.has_value()) return;
  slopes = alibi_slopes->to(p.dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  p.alibi_slopes = slopes.const_data_ptr();
  p.alibi_batch_stride = slopes.dim() == 2 ? p.Hq : 0;
}

// How the forward spreads over threads: tasks of up to kAttentionBlockRows
// query rows (the heads of a GQA group packed together when the sequence is
// short, so that decoding reads each key once per group), and, when those
// are too few to keep every thread busy, the keys split as flash-decoding
// does (each split's partial softmax combined afterwards).
struct ForwardPlan {
  int64_t heads_per_task, positions_per_task, splits, keys_per_split;
};

// Fewer rows than this per GQA group (decoding) compute scores by dot
// products (forward_task): a task may then take every head (heads_together).
constexpr int64_t kMaxDecodingGroupRows = 16;

int64_t forward_tasks(const AttentionShape& s, const ForwardPlan& plan);
void split_keys(ForwardPlan& plan, int64_t S, int64_t tasks);

// heads_together: one key's heads lie side by side (a [B, S, Hkv, D] cache),
// so that decoding tasks take every head and stream K and V contiguously.
ForwardPlan plan_forward(const AttentionShape& s, bool heads_together = false) {
  ForwardPlan plan{};
  plan.positions_per_task = std::max<int64_t>(1, std::min(s.L, kAttentionBlockRows));
  const int64_t group = s.Hq / s.Hkv;
  plan.heads_per_task = 1;
  for (int64_t h = group; h >= 1; --h) {
    if (group % h == 0 && h * plan.positions_per_task <= kAttentionBlockRows) {
      plan.heads_per_task = h;
      break;
    }
  }
  if (heads_together && s.Hkv > 1 && group * s.L < kMaxDecodingGroupRows) plan.heads_per_task = s.Hq;
  split_keys(plan, s.S, forward_tasks(s, plan));
  return plan;
}

// The tasks of a plan before the keys are split.
int64_t forward_tasks(const AttentionShape& s, const ForwardPlan& plan) {
  return s.B * (s.Hq / plan.heads_per_task) * ((s.L + plan.positions_per_task - 1) / plan.positions_per_task);
}

// Splits S keys when `tasks` tasks (the whole call's) are too few to keep
// every thread busy: splits of at least kMinSplitKeys keys (the combine step
// and each split's setup cost little against them) until there are 4 tasks
// per thread.
void split_keys(ForwardPlan& plan, int64_t S, int64_t tasks) {
  constexpr int64_t kMinSplitKeys = 512;
  const int64_t wanted = (4 * at::get_num_threads() + tasks - 1) / std::max<int64_t>(tasks, 1);
  plan.splits = std::max<int64_t>(1, std::min(wanted, S / kMinSplitKeys));
  const int64_t key_blocks = (S + kAttentionKeyBlock - 1) / kAttentionKeyBlock;
  plan.keys_per_split = (key_blocks + plan.splits - 1) / plan.splits * kAttentionKeyBlock;
  plan.splits = std::max<int64_t>(1, (S + plan.keys_per_split - 1) / std::max<int64_t>(plan.keys_per_split, 1));
}

// The splits' rows, each normalised with its own lse, merged into out and lse:
// weights exp(lse_s - lse) with lse = log(sum_s exp(lse_s)).
template <typename T, typename C>
void combine_splits(const AttentionCpuParams& p) {
  const int64_t rows = p.B * p.Hq * p.L, Ev = p.Ev;
  const C* split_out = static_cast<const C*>(p.split_out);
  const C* split_lse = static_cast<const C*>(p.split_lse);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    std::vector<C> acc(Ev);
    for (int64_t row = r0; row < r1; ++row) {
      C top = -std::numeric_limits<C>::infinity();
      for (int64_t sp = 0; sp < p.splits; ++sp) top = std::max(top, split_lse[sp * rows + row]);
      C sum = 0;
      std::fill(acc.begin(), acc.end(), C(0));
      if (top != -std::numeric_limits<C>::infinity()) {
        for (int64_t sp = 0; sp < p.splits; ++sp) {
          const C w = std::exp(split_lse[sp * rows + row] - top);
          sum += w;
          const C* o = split_out + (sp * rows + row) * Ev;
          for (int64_t e = 0; e < Ev; ++e) acc[e] += w * o[e];
        }
      }
      const int64_t b = row / (p.Hq * p.L), h = row / p.L % p.Hq, i = row % p.L;
      T* out = static_cast<T*>(p.out) + b * p.out_strides[0] + h * p.out_strides[1] + i * p.out_strides[2];
      const C inv = sum > C(0) ? C(1) / sum : C(0);
      for (int64_t e = 0; e < Ev; ++e) out[e] = static_cast<T>(acc[e] * inv);
      static_cast<C*>(p.lse)[row] = sum > C(0) ? top + std::log(sum) : top;
    }
  });
}

// Whether ATen's BLAS runs products of this dtype on operands packed in
// pairs of rows ("VNNI") here (cpublas::brgemm, oneDNN's micro-kernel):
// bf16 with AMX or AVX512-BF16, fp16 with AMX-FP16. (cpublas::could_pack
// asks for AMX; but with AVX512-BF16 alone our packed bf16 paths are
// 1.2-1.7x our float ones too: docs/PERFORMANCE.md. Without either, oneDNN
// emulates bf16 or refuses, as under ONEDNN_MAX_CPU_ISA=AVX2: asked once,
// with a 2 x 2 product.)
bool packed_micro_kernel(at::ScalarType dtype) {
  if (dtype == at::kHalf) return at::native::cpublas::could_pack(dtype);
  if (dtype != at::kBFloat16 || !at::globalContext().userEnabledMkldnn()) return false;  // (oneDNN's)
  static const bool available = [] {
    const auto caps = at::cpu::get_cpu_capabilities();
    const auto has = [&](const char* name) {
      const auto it = caps.find(name);
      return it != caps.end() && it->second.isBool() && it->second.toBool();
    };
    if (!has("avx512_bf16") && !has("amx_bf16")) return false;
    const c10::BFloat16 a[4] = {1, 2, 3, 4}, b[4] = {1, 0, 0, 1};  // b: the identity, as pairs of rows
    float c[4] = {};
    try {
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, /*is_vnni=*/true);
      at::native::cpublas::brgemm_release();
    } catch (const c10::Error&) {
      return false;
    }
    return c[0] == 1 && c[1] == 2 && c[2] == 3 && c[3] == 4;
  }();
  return available;
}

// Whether the forward is ATen's own CPU flash kernel's: bf16/fp16 at the
// AVX-512 capability on a host where ATen packs the dtype for its BLAS
// micro-kernel (cpublas::could_pack: AMX; without AMX that kernel computes
// bf16 in float, 1.7-2.7x slower than ours), for prefill, where it runs the same
// micro-kernel as our packed path and its softmax passes are faster (ours
// runs at ~0.75x of it on the real-model shapes); docs/PERFORMANCE.md.
// (Decoding stays ours: its dot products widen bf16 keys in registers and
// split long caches over the threads, 1.0-2.8x that kernel.)
// Only what it computes as we do: no dropout (its random numbers differ),
// no window, top-left causality without a mask, equal head dims, 4-d inputs.
// The backward stays ours: it needs only the output and the lse.
bool runs_aten_flash_forward(const AttentionShape& s, const at::Tensor& q, const at::Tensor& k,
                             const std::optional<at::Tensor>& mask, int64_t window_left, int64_t window_right,
                             int64_t diagonal_offset, double dropout_p) {
  const at::ScalarType dtype = q.scalar_type();
  const bool causal = window_right == 0 && diagonal_offset == 0;
  const bool shape = q.dim() == 4 && k.dim() == 4 && s.E == s.Ev && s.E > 0 && s.S > 0 && s.B * s.Hq > 0 &&
                     s.L >= kMinPackedQueries;
  const bool options = dropout_p == 0 && window_left < 0 && (window_right < 0 || (causal && !mask.has_value()));
  return (dtype == at::kBFloat16 || dtype == at::kHalf) && shape && options && cpu_capability_level() == 2 &&
         at::native::cpublas::could_pack(dtype);
}

// Whether every query row of m [B, H, L, S] equals the first of its head (a
// unit key stride; byte comparison, so a float mask's NaN or -0 counts as
// different: the slow path, never a wrong one).
bool query_rows_equal(const at::Tensor& m) {
  if (m.size(2) <= 1 || m.stride(2) == 0) return true;
  if (m.stride(3) != 1) return false;
  const int64_t es = m.element_size(), bytes = m.size(3) * es;
  const char* base = static_cast<const char*>(m.const_data_ptr());
  for (int64_t b = 0; b < m.size(0); ++b)
    for (int64_t h = 0; h < m.size(1); ++h) {
      const char* first = base + (b * m.stride(0) + h * m.stride(1)) * es;
      for (int64_t i = 1; i < m.size(2); ++i)
        if (std::memcmp(first, first + i * m.stride(2) * es, bytes) != 0) return false;
    }
  return true;
}

// The mask as ATen's kernel takes it: a float bias in q's dtype (a bool mask
// becomes 0 / -inf), with the dims it is broadcast over kept at size 1, and
// the query dim too when its rows are equal, so that a Hugging Face padding
// mask ([B, 1, 1, S], or materialised as [B, 1, L, S]) is converted at
// [B, 1, 1, S] (BERT at L 64: 0.12 ms a call at full size, against a 1.8 ms
// attention).
at::Tensor aten_flash_mask(const at::Tensor& mask4, at::ScalarType dtype) {
  at::Tensor m = mask4;
  for (int64_t d = 0; d < 3; ++d)
    if (m.stride(d) == 0 && m.size(d) > 1) m = m.narrow(d, 0, 1);
  if (query_rows_equal(m)) m = m.narrow(2, 0, std::min<int64_t>(1, m.size(2)));
  if (m.scalar_type() != at::kBool) return m.to(dtype);
  return at::zeros(m.sizes(), m.options().dtype(dtype)).masked_fill_(m.logical_not(), -INFINITY);
}

// Runs fn(0), ..., fn(n - 1) over the threads, each thread taking the next
// index when it is free: for tasks of unequal cost (a varlen call's
// sequences), ordered largest first. (A static split of the range left one
// thread with the long sequences.)
template <typename F>
void parallel_largest_first(int64_t n, const F& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t t = next++; t < n; t = next++) fn(t);
  });
}

// A share of a forward with its own plan: the whole call, or one sequence of
// a varlen call (sequence_params) whose inputs, out and lse are set.
struct ForwardPart {
  AttentionCpuParams p;
  AttentionShape s;
  ForwardPlan plan;
};

// The parts' tasks over the threads; parts whose keys are split write into
// scratch, then combine into their out and lse.
void run_forward_parts(std::vector<ForwardPart>& parts, const at::TensorOptions& compute) {
  int64_t split_rows = 0;
  for (const ForwardPart& part : parts)
    if (part.plan.splits > 1) split_rows += part.plan.splits * part.s.B * part.s.Hq * part.s.L;
  at::Tensor split_out, split_lse;
  if (split_rows > 0) {
    const int64_t Ev = parts.front().s.Ev, size = at::elementSize(compute.dtype().toScalarType());
    split_out = at::empty({split_rows, Ev}, compute), split_lse = at::empty({split_rows}, compute);
    int64_t row = 0;
    for (ForwardPart& part : parts) {
      if (part.plan.splits == 1) continue;
      part.p.split_out = static_cast<char*>(split_out.mutable_data_ptr()) + row * Ev * size;
      part.p.split_lse = static_cast<char*>(split_lse.mutable_data_ptr()) + row * size;
      row += part.plan.splits * part.s.B * part.s.Hq * part.s.L;
    }
  }
  // tasks numbered part by part, the costliest parts first
  std::vector<size_t> order(parts.size());
  std::iota(order.begin(), order.end(), 0);
  const auto cost = [&](size_t k) {
    const AttentionShape& s = parts[k].s;
    return s.B * s.Hq * s.L * std::max<int64_t>(1, s.S);
  };
  if (parts.size() > 1) {
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return cost(a) > cost(b); });
  }
  std::vector<int64_t> first(parts.size() + 1, 0);
  for (size_t k = 0; k < parts.size(); ++k) {
    ForwardPart& part = parts[order[k]];
    part.p.splits = part.plan.splits, part.p.heads_per_task = part.plan.heads_per_task;
    first[k + 1] = first[k] + forward_tasks(part.s, part.plan) * part.plan.splits;
  }
  const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
  const auto run = [&](int64_t t) {
    const size_t k = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const ForwardPart& part = parts[order[k]];
    const AttentionShape& s = part.s;
    const ForwardPlan& plan = part.plan;
    const int64_t head_tasks = s.Hq / plan.heads_per_task;
    const int64_t position_tasks = (s.L + plan.positions_per_task - 1) / plan.positions_per_task;
    AttentionForwardTask task{};
    const int64_t local = t - first[k];
    task.split = local % plan.splits;
    const int64_t rest = local / plan.splits, i_task = rest % position_tasks, bh = rest / position_tasks;
    task.b = bh / head_tasks;
    task.h0 = bh % head_tasks * plan.heads_per_task, task.h1 = task.h0 + plan.heads_per_task;
    task.i0 = i_task * plan.positions_per_task, task.i1 = std::min(s.L, task.i0 + plan.positions_per_task);
    task.j_begin = task.split * plan.keys_per_split;
    task.j_end = plan.splits > 1 ? std::min(s.S, task.j_begin + plan.keys_per_split) : s.S;
    kernels.forward_task(part.p, task);
  };
  if (parts.size() == 1) {
    at::parallel_for(0, first.back(), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) run(t);
    });
  } else {
    parallel_largest_first(first.back(), run);
  }
  for (const ForwardPart& part : parts) {
    if (part.plan.splits == 1) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, part.p.dtype, "attention_combine_splits", [&] {
      combine_splits<scalar_t, std::conditional_t<std::is_same_v<scalar_t, double>, double, float>>(part.p);
    });
  }
}

// The forward's tasks (`plan`'s) over p, whose inputs, out and lse are set.
void run_forward_tasks(const AttentionCpuParams& p, const AttentionShape& s, const ForwardPlan& plan,
                       const at::Tensor& lse) {
  std::vector<ForwardPart> parts{{p, s, plan}};
  run_forward_parts(parts, lse.options());
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                         const at::Tensor& value,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         double scale, int64_t window_left,
                                                         int64_t window_right, int64_t diagonal_offset,
                                                         double dropout_p, int64_t dropout_seed, double softcap,
                                                         const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_attention_args(query, key, value, attn_mask, window_left, window_right, dropout_p);
  check_score_options("bigkernels.attention", query, s, softcap, alibi_slopes);
  const at::Tensor q = unit_last_stride(query), k = unit_last_stride(key), v = unit_last_stride(value);
  at::Tensor out = attention_output_cpu(query, s.Ev);
  if (softcap == 0 && !alibi_slopes.has_value() &&
      runs_aten_flash_forward(s, q, k, attn_mask, window_left, window_right, diagonal_offset, dropout_p)) {
    const at::Tensor bias =
        attn_mask.has_value() ? aten_flash_mask(broadcast_mask(*attn_mask, s), q.scalar_type()) : at::Tensor();
    auto [flash_out, flash_lse] = at::_scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, /*is_causal=*/window_right == 0, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
        scale);
    // A row that attends to nothing gets lse 0 there (and output 0, as ours):
    // -inf here, as ours. (Only rows with lse 0 can be such rows: the mask is
    // scanned only when there are some, a pass over it costing ~15 % of a
    // BERT-sized call.)
    if (bias.defined() && flash_lse.eq(0).any().item<bool>())
      flash_lse.masked_fill_(bias.isneginf().all(-1).expand({s.B, s.Hq, s.L}), -INFINITY);
    if (flash_out.strides() != out.strides()) flash_out = out.copy_(flash_out);
    return {flash_out, flash_lse.to(lse_dtype(q))};
  }
  at::Tensor mask4, slopes;
  AttentionCpuParams p = make_params(s, q, attn_mask, mask4, scale, window_left, window_right, diagonal_offset,
                                     dropout_p, dropout_seed);
  set_score_options(p, softcap, alibi_slopes, slopes);
  p.k = k.const_data_ptr(), p.v = v.const_data_ptr();
  for (int d = 0; d < 3; ++d) p.k_strides[d] = k.stride(d), p.v_strides[d] = v.stride(d);
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, q.options().dtype(lse_dtype(q)));
  p.out = out.mutable_data_ptr();
  for (int d = 0; d < 3; ++d) p.out_strides[d] = out.stride(d);
  p.lse = lse.mutable_data_ptr();
  const ForwardPlan plan = plan_forward(s);
  const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
  // bf16/fp16 where ATen's BLAS has a micro-kernel for them (packed_micro_kernel):
  // K and V packed once for it (AttentionCpuParams::k_vnni), when enough query
  // rows reuse each key block to repay that (not when decoding).
  at::Tensor k_vnni, v_vnni;
  const at::ScalarType dtype = q.scalar_type();
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) && s.E % 2 == 0 && s.L >= kMinPackedQueries && s.S > 0 &&
      plan.splits == 1 && packed_micro_kernel(dtype)) {
    // blocks of up to kAttentionPackedKeyBlock keys, a multiple of 64 (no more padding than that)
    p.vnni_keys = std::min(kAttentionPackedKeyBlock, (s.S + 63) / 64 * 64);
    const int64_t blocks = (s.S + p.vnni_keys - 1) / p.vnni_keys;
    k_vnni = at::empty({s.B, s.Hkv, blocks, s.E * p.vnni_keys}, q.options());
    v_vnni = at::empty({s.B, s.Hkv, blocks, p.vnni_keys * s.Ev}, q.options());
    p.k_vnni = k_vnni.mutable_data_ptr(), p.v_vnni = v_vnni.mutable_data_ptr();
    at::parallel_for(0, s.B * s.Hkv * blocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) kernels.pack_key_block(p, t / blocks / s.Hkv, t / blocks % s.Hkv, t % blocks);
    });
  }
  run_forward_tasks(p, s, plan, lse);
  return {out, lse};
}

// Writes fresh [B, Lk, Hkv, D] into cache as the last Lk of batch b's
// p.seqlens_k[b] keys (through the page table when paged), row by row.
void append_to_cache(const at::Tensor& cache, const at::Tensor& fresh, const AttentionCpuParams& p) {
  const int64_t B = fresh.size(0), Lk = fresh.size(1), H = fresh.size(2), es = cache.element_size();
  const int64_t bytes = fresh.size(3) * es;
  char* base = static_cast<char*>(cache.mutable_data_ptr());
  const char* src = static_cast<const char*>(fresh.const_data_ptr());
  at::parallel_for(0, B * Lk, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / Lk, i = r % Lk, pos = p.seqlens_k[b] - Lk + i;
      const int64_t row = p.block_table != nullptr
                              ? p.block_table[b * p.block_table_stride + pos / p.page_size] * cache.stride(0) +
                                    pos % p.page_size * cache.stride(1)
                              : b * cache.stride(0) + pos * cache.stride(1);
      for (int64_t h = 0; h < H; ++h) {
        std::memcpy(base + (row + h * cache.stride(2)) * es,
                    src + (b * fresh.stride(0) + i * fresh.stride(1) + h * fresh.stride(2)) * es, bytes);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache_forward_cpu(
    const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& block_table, double scale, int64_t window_left, int64_t window_right,
    double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  AttentionShape s = check_kvcache_args(query, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                        window_left, window_right, softcap, alibi_slopes);
  const int64_t capacity = s.S, Lk = k_new.has_value() ? k_new->size(1) : 0;
  at::Tensor lens = kvcache_lengths(cache_seqlens, capacity, Lk);  // each batch's keys after the append
  int64_t* len = lens.mutable_data_ptr<int64_t>();
  s.S = s.B > 0 ? *std::max_element(len, len + s.B) : 0;
  const int64_t page_size = k_cache.size(1);
  const at::Tensor table =
      block_table.has_value() ? kvcache_pages(*block_table, lens, page_size, k_cache.size(0)) : at::Tensor();
  at::Tensor mask4, slopes;
  // [B, H, L, D] views of q and the output in flash-attention's [B, L, H, D];
  // the caches' strides taken as (batch or page, head, row)
  const at::Tensor q = unit_last_stride(query).transpose(1, 2);
  AttentionCpuParams p = make_params(s, q, std::nullopt, mask4, scale, window_left, window_right, 0, 0.0, 0);
  p.seqlens_k = len;
  if (table.defined()) {
    p.block_table = table.const_data_ptr<int64_t>();
    p.block_table_stride = table.size(1), p.page_size = page_size;
  }
  if (Lk > 0) {
    append_to_cache(k_cache, unit_last_stride(*k_new), p);
    append_to_cache(v_cache, unit_last_stride(*v_new), p);
  }
  at::Tensor out = at::empty({s.B, s.L, s.Hq, s.Ev}, query.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.L}, query.options().dtype(lse_dtype(query)));
  if (out.numel() == 0) return {out, lse.fill_(-INFINITY)};
  p.k = k_cache.const_data_ptr(), p.v = v_cache.const_data_ptr();
  const int64_t order[3] = {0, 2, 1};
  for (int d = 0; d < 3; ++d) p.k_strides[d] = k_cache.stride(order[d]), p.v_strides[d] = v_cache.stride(order[d]);
  set_score_options(p, softcap, alibi_slopes, slopes);
  const at::Tensor out4 = out.transpose(1, 2);
  p.out = out.mutable_data_ptr();
  for (int d = 0; d < 3; ++d) p.out_strides[d] = out4.stride(d);
  p.lse = lse.mutable_data_ptr();
  const bool heads_together = k_cache.stride(2) < k_cache.stride(1) && v_cache.stride(2) < v_cache.stride(1);
  run_forward_tasks(p, s, plan_forward(s, heads_together), lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const std::optional<at::Tensor>& attn_mask, const at::Tensor& output, const at::Tensor& lse, double scale,
    int64_t window_left, int64_t window_right, int64_t diagonal_offset, double dropout_p, int64_t dropout_seed,
    bool grad_mask, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_attention_args(query, key, value, attn_mask, window_left, window_right, dropout_p);
  check_attention_backward_args(grad_output, output, lse, query, s);
  check_score_options("bigkernels.attention_backward", query, s, softcap, alibi_slopes);
  // Everything read in place where it can be (the forward's [B, L, H, D]-laid
  // output and Hugging Face's grad_output included); K and V in the compute type.
  const at::Tensor q = unit_last_stride(query), &k = key, &v = value;
  const at::Tensor g = unit_last_stride(grad_output.to(q.scalar_type())), o = unit_last_stride(output);
  const at::Tensor l = lse.contiguous();
  at::Tensor mask4, slopes;
  AttentionCpuParams p = make_params(s, q, attn_mask, mask4, scale, window_left, window_right, diagonal_offset,
                                     dropout_p, dropout_seed);
  set_score_options(p, softcap, alibi_slopes, slopes);
  // bf16 where ATen's BLAS has a micro-kernel for it (packed_micro_kernel)
  // and the forward's products ran there (16+ queries): all five products
  // there too, K and V read in place (1.6-1.75x our float backward with
  // AVX512-BF16 alone; docs/PERFORMANCE.md). Otherwise K and V in the
  // compute type.
  p.packed_backward = q.scalar_type() == at::kBFloat16 && s.E % 2 == 0 && s.Ev % 2 == 0 &&
                      s.L >= kMinPackedQueries && dropout_p == 0 && !grad_mask &&
                      packed_micro_kernel(at::kBFloat16);
  at::Tensor k_in, v_in, k_c, v_c;  // what the kernels read K and V from, kept alive
  if (p.packed_backward) {
    k_in = unit_last_stride(k), v_in = unit_last_stride(v);
    p.k = k_in.const_data_ptr(), p.v = v_in.const_data_ptr();
    for (int d = 0; d < 3; ++d) p.k_strides[d] = k_in.stride(d), p.v_strides[d] = v_in.stride(d);
  } else {
    k_c = unit_last_stride(k.to(compute_dtype(q))), v_c = unit_last_stride(v.to(compute_dtype(q)));
    p.k_c = k_c.const_data_ptr(), p.v_c = v_c.const_data_ptr();
    for (int d = 0; d < 3; ++d) p.k_c_strides[d] = k_c.stride(d), p.v_c_strides[d] = v_c.stride(d);
  }
  p.heads_per_task = plan_forward(s).heads_per_task;
  // The gradients laid out like the inputs (attention_grad_like; the fake
  // implementation agrees), so that autograd's views back to the caller's
  // [B, L, H, D] projections copy nothing.
  at::Tensor grad_q = attention_grad_like(query), grad_k = attention_grad_like(key);
  at::Tensor grad_v = attention_grad_like(value);
  p.out = const_cast<void*>(o.const_data_ptr());  // read only in backward
  p.lse = const_cast<void*>(l.const_data_ptr());
  p.grad_out = g.const_data_ptr();
  p.grad_q = grad_q.mutable_data_ptr(), p.grad_k = grad_k.mutable_data_ptr(), p.grad_v = grad_v.mutable_data_ptr();
  for (int d = 0; d < 3; ++d) {
    p.out_strides[d] = o.stride(d), p.grad_out_strides[d] = g.stride(d);
    p.grad_q_strides[d] = grad_q.stride(d), p.grad_k_strides[d] = grad_k.stride(d);
    p.grad_v_strides[d] = grad_v.stride(d);
  }
  at::Tensor grad_mask_full = grad_mask_buffer(attn_mask, grad_mask, s, compute_dtype(q));
  p.grad_mask = grad_mask_full.defined() ? grad_mask_full.mutable_data_ptr() : nullptr;
  const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
  at::parallel_for(0, s.B * s.Hkv, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) kernels.backward_head(p, t / s.Hkv, t % s.Hkv);
  });
  return {grad_q, grad_k, grad_v, reduce_grad_mask(grad_mask_full, attn_mask, query)};
}

// Moves a data pointer of p by n elements of `size` bytes (null stays null).
template <typename P>
P* advance(P* ptr, int64_t n, int64_t size) {
  using Byte = std::conditional_t<std::is_const_v<P>, const char, char>;
  return ptr == nullptr ? ptr : static_cast<P*>(static_cast<Byte*>(ptr) + n * size);
}

// Sequence b of a varlen call as a single-batch call of its own: `all`
// describes the packed rows as one [1, H, total, D] call (q, k, v, out,
// their gradients, k_c and v_c), lse sequence by sequence ([H, L_b] each, at
// H * q_start[b]). The block loops then run unchanged over the sequence's
// rows and lengths, with its own bottom-right diagonal, its ALiBi slopes and
// its share of the dropout counters (from dropout_offset: the sequences'
// dropout_offsets).
AttentionCpuParams sequence_params(const AttentionCpuParams& all, const VarlenSequences& seqs, int64_t b,
                                   int64_t dropout_offset) {
  AttentionCpuParams p = all;
  const int64_t q0 = seqs.q_start[b], k0 = seqs.k_start[b];
  const int64_t size = c10::elementSize(all.dtype), c_size = all.dtype == at::kDouble ? 8 : 4;
  p.B = 1, p.L = seqs.L(b), p.S = seqs.S(b);
  p.diagonal_offset = p.S - p.L;
  p.q = advance(all.q, q0 * all.q_strides[2], size);
  p.k = advance(all.k, k0 * all.k_strides[2], size);
  p.v = advance(all.v, k0 * all.v_strides[2], size);
  p.k_c = advance(all.k_c, k0 * all.k_c_strides[2], c_size);
  p.v_c = advance(all.v_c, k0 * all.v_c_strides[2], c_size);
  p.out = advance(all.out, q0 * all.out_strides[2], size);
  p.lse = advance(all.lse, all.Hq * q0, c_size);
  p.grad_out = advance(all.grad_out, q0 * all.grad_out_strides[2], size);
  p.grad_q = advance(all.grad_q, q0 * all.grad_q_strides[2], size);
  p.grad_k = advance(all.grad_k, k0 * all.grad_k_strides[2], size);
  p.grad_v = advance(all.grad_v, k0 * all.grad_v_strides[2], size);
  p.alibi_slopes = advance(all.alibi_slopes, b * all.alibi_batch_stride, c_size);
  p.dropout_offset = static_cast<uint64_t>(dropout_offset);
  return p;
}

// A varlen call's own shape for sequence b.
AttentionShape sequence_shape(const AttentionShape& s, const VarlenSequences& seqs, int64_t b) {
  return {1, s.Hq, s.Hkv, seqs.L(b), seqs.S(b), s.E, s.Ev};
}

// [total, H, D] as the single-batch [1, H, total, D] view the params read.
at::Tensor as_one_batch(const at::Tensor& t) { return unit_last_stride(t).unsqueeze(0).transpose(1, 2); }

// Copies lse between flash-attention's [H, total_q] (`flat`) and the kernels'
// sequence-by-sequence [H, L_b] blocks (`blocks`), either way.
template <typename C>
void lse_layout(const VarlenSequences& seqs, int64_t H, C* flat, C* blocks, bool to_flat) {
  const int64_t total = seqs.q_start.back();
  for (int64_t b = 0; b < seqs.count(); ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < seqs.L(b); ++i) {
        C& f = flat[h * total + seqs.q_start[b] + i];
        C& k = blocks[H * seqs.q_start[b] + h * seqs.L(b) + i];
        if (to_flat) f = k; else k = f;
      }
}

void convert_lse(const VarlenSequences& seqs, int64_t H, const at::Tensor& flat, const at::Tensor& blocks,
                 bool to_flat) {
  if (flat.scalar_type() == at::kDouble) {
    lse_layout(seqs, H, flat.data_ptr<double>(), blocks.data_ptr<double>(), to_flat);
  } else {
    lse_layout(seqs, H, flat.data_ptr<float>(), blocks.data_ptr<float>(), to_flat);
  }
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t window_left,
    int64_t window_right, double dropout_p, int64_t dropout_seed, double softcap,
    const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_varlen_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, window_left, window_right, dropout_p, softcap, alibi_slopes);
  const VarlenSequences seqs =
      read_sequences(cu_seqlens_q, cu_seqlens_k, query.size(0), key.size(0), max_seqlen_q, max_seqlen_k);
  const int64_t total_q = query.size(0);
  at::Tensor out = at::empty({total_q, s.Hq, s.Ev}, query.options());
  at::Tensor lse = at::empty({s.Hq, total_q}, query.options().dtype(lse_dtype(query)));
  if (total_q == 0 || s.Hq == 0) return {out, lse};
  const at::Tensor q = as_one_batch(query), k = as_one_batch(key), v = as_one_batch(value), out4 = as_one_batch(out);
  at::Tensor mask4, slopes;
  AttentionCpuParams all = make_params({1, s.Hq, s.Hkv, total_q, key.size(0), s.E, s.Ev}, q, std::nullopt, mask4,
                                       scale, window_left, window_right, 0, dropout_p, dropout_seed);
  set_score_options(all, softcap, alibi_slopes, slopes);
  all.k = k.const_data_ptr(), all.v = v.const_data_ptr(), all.out = out.mutable_data_ptr();
  for (int d = 0; d < 3; ++d)
    all.k_strides[d] = k.stride(d), all.v_strides[d] = v.stride(d), all.out_strides[d] = out4.stride(d);
  const at::Tensor lse_blocks = at::empty({s.Hq * total_q}, lse.options());
  all.lse = lse_blocks.mutable_data_ptr();
  std::vector<ForwardPart> parts;
  int64_t tasks = 0;
  const std::vector<int64_t> dropout_offsets = seqs.dropout_offsets(s.Hq);
  for (int64_t b = 0; b < s.B; ++b) {
    if (seqs.L(b) == 0) continue;
    const AttentionShape sb = sequence_shape(s, seqs, b);
    parts.push_back({sequence_params(all, seqs, b, dropout_offsets[b]), sb, plan_forward(sb)});
    tasks += forward_tasks(sb, parts.back().plan);
  }
  for (ForwardPart& part : parts) split_keys(part.plan, part.s.S, tasks);  // by the whole call's tasks
  // bf16/fp16 with the BLAS micro-kernel: each long enough sequence's K and V
  // packed for it, as attention_forward_cpu does, into one buffer
  at::Tensor k_vnni, v_vnni;
  const at::ScalarType dtype = q.scalar_type();
  std::vector<std::pair<ForwardPart*, int64_t>> packed;  // (part, its first block in the buffers)
  if ((dtype == at::kBFloat16 || dtype == at::kHalf) && s.E % 2 == 0 && packed_micro_kernel(dtype)) {
    // blocks of up to kAttentionPackedKeyBlock keys, a multiple of 64 (no
    // more padding than that); each part's in slots of the largest size
    const auto blocks_per_head = [](const ForwardPart& part) {
      return (part.s.S + part.p.vnni_keys - 1) / part.p.vnni_keys;
    };
    int64_t slots = 0;
    for (ForwardPart& part : parts) {
      if (part.s.L < kMinPackedQueries || part.s.S == 0 || part.plan.splits > 1) continue;
      part.p.vnni_keys = std::min(kAttentionPackedKeyBlock, (part.s.S + 63) / 64 * 64);
      packed.push_back({&part, slots});
      slots += s.Hkv * blocks_per_head(part);
    }
    if (!packed.empty()) {
      k_vnni = at::empty({slots, s.E * kAttentionPackedKeyBlock}, q.options());
      v_vnni = at::empty({slots, kAttentionPackedKeyBlock * s.Ev}, q.options());
      const int64_t size = k_vnni.element_size();
      for (auto& [part, first] : packed) {
        part->p.k_vnni = advance(k_vnni.mutable_data_ptr(), first * s.E * kAttentionPackedKeyBlock, size);
        part->p.v_vnni = advance(v_vnni.mutable_data_ptr(), first * kAttentionPackedKeyBlock * s.Ev, size);
      }
      const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
      at::parallel_for(0, slots, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          // the part whose slots hold t: the last one starting at or before it
          const auto it = std::upper_bound(packed.begin(), packed.end(), t,
                                           [](int64_t x, const auto& entry) { return x < entry.second; }) - 1;
          const int64_t local = t - it->second, per_head = blocks_per_head(*it->first);
          kernels.pack_key_block(it->first->p, 0, local / per_head, local % per_head);
        }
      });
    }
  }
  run_forward_parts(parts, lse.options());
  convert_lse(seqs, s.Hq, lse, lse_blocks, /*to_flat=*/true);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const at::Tensor& output, const at::Tensor& lse, double scale, int64_t window_left, int64_t window_right,
    double dropout_p, int64_t dropout_seed, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  const AttentionShape s = check_varlen_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, window_left, window_right, dropout_p, softcap, alibi_slopes);
  check_varlen_backward_args(grad_output, output, lse, query, s);
  const int64_t total_q = query.size(0), total_k = key.size(0);
  const VarlenSequences seqs =
      read_sequences(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k);
  at::Tensor grad_q = attention_grad_like(query), grad_k = attention_grad_like(key);
  at::Tensor grad_v = attention_grad_like(value);
  if (total_q == 0 || s.Hq == 0) return {grad_q, grad_k.zero_(), grad_v.zero_()};
  const at::Tensor q = as_one_batch(query), k = as_one_batch(key), v = as_one_batch(value);
  const at::Tensor g = as_one_batch(grad_output.to(query.scalar_type())), o = as_one_batch(output);
  const at::Tensor gq = grad_q.unsqueeze(0).transpose(1, 2), gk = grad_k.unsqueeze(0).transpose(1, 2);
  const at::Tensor gv = grad_v.unsqueeze(0).transpose(1, 2);
  at::Tensor mask4, slopes;
  AttentionCpuParams all = make_params({1, s.Hq, s.Hkv, total_q, total_k, s.E, s.Ev}, q, std::nullopt, mask4, scale,
                                       window_left, window_right, 0, dropout_p, dropout_seed);
  set_score_options(all, softcap, alibi_slopes, slopes);
  const at::Tensor lse_blocks = at::empty({s.Hq * total_q}, lse.options());
  convert_lse(seqs, s.Hq, lse.contiguous(), lse_blocks, /*to_flat=*/false);
  all.lse = lse_blocks.mutable_data_ptr();
  all.out = const_cast<void*>(o.const_data_ptr());  // read only in backward
  all.grad_out = g.const_data_ptr();
  all.k = k.const_data_ptr(), all.v = v.const_data_ptr();
  all.grad_q = gq.mutable_data_ptr(), all.grad_k = gk.mutable_data_ptr(), all.grad_v = gv.mutable_data_ptr();
  for (int d = 0; d < 3; ++d) {
    all.k_strides[d] = k.stride(d), all.v_strides[d] = v.stride(d);
    all.out_strides[d] = o.stride(d), all.grad_out_strides[d] = g.stride(d);
    all.grad_q_strides[d] = gq.stride(d), all.grad_k_strides[d] = gk.stride(d), all.grad_v_strides[d] = gv.stride(d);
  }
  // Per sequence, as attention_backward_cpu decides: bf16 on the BLAS
  // micro-kernel when its forward's products ran there (16+ queries), else
  // K and V in the compute type (converted once for all such sequences).
  const bool can_pack = q.scalar_type() == at::kBFloat16 && s.E % 2 == 0 && s.Ev % 2 == 0 && dropout_p == 0 &&
                        packed_micro_kernel(at::kBFloat16);
  const auto packed = [&](int64_t b) { return can_pack && seqs.L(b) >= kMinPackedQueries; };
  bool any_unpacked = false;
  for (int64_t b = 0; b < s.B; ++b) any_unpacked = any_unpacked || !packed(b);
  at::Tensor k_c, v_c;
  if (any_unpacked) {
    k_c = unit_last_stride(k.to(compute_dtype(query))), v_c = unit_last_stride(v.to(compute_dtype(query)));
    all.k_c = k_c.const_data_ptr(), all.v_c = v_c.const_data_ptr();
    for (int d = 0; d < 3; ++d) all.k_c_strides[d] = k_c.stride(d), all.v_c_strides[d] = v_c.stride(d);
  }
  std::vector<AttentionCpuParams> parts(s.B);
  const std::vector<int64_t> dropout_offsets = seqs.dropout_offsets(s.Hq);
  for (int64_t b = 0; b < s.B; ++b) {
    parts[b] = sequence_params(all, seqs, b, dropout_offsets[b]);
    parts[b].packed_backward = packed(b);
    parts[b].heads_per_task = plan_forward(sequence_shape(s, seqs, b)).heads_per_task;
  }
  // tasks (sequence, key head), the costliest sequences first
  std::vector<int64_t> order(s.B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return seqs.L(a) * std::max<int64_t>(1, seqs.S(a)) > seqs.L(b) * std::max<int64_t>(1, seqs.S(b));
  });
  const AttentionCpuKernels& kernels = BK_PICK_CAPABILITY_TABLE(attention_cpu_kernels);
  parallel_largest_first(s.B * s.Hkv, [&](int64_t t) {
    const int64_t b = order[t / s.Hkv];
    kernels.backward_head(parts[b], 0, t % s.Hkv);  // (a sequence without queries: zero dK, dV)
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(bigkernels, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_kvcache_forward", &attention_kvcache_forward_cpu);
  m.impl("varlen_attention_forward", &varlen_attention_forward_cpu);
  m.impl("varlen_attention_backward", &varlen_attention_backward_cpu);
}

}  // namespace bigkernels
