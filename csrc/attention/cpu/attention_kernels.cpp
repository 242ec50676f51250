// The attention family's CPU block loops on at::vec::Vectorized, compiled
// once per CPU capability (common/capability.h). Flash-style: a block of
// query rows walks the key blocks its window allows, with an online softmax;
// the L x S scores never exist beyond one block. Backward recomputes each
// block's probabilities from the saved log-sum-exp.
//
// Everything is computed in C = float (double for double inputs). The
// forward reads K and V in place, converting bf16/fp16 blocks into scratch
// block by block (or, for longer bf16/fp16 queries, runs both products on
// ATen's BLAS micro-kernel over blocks the op packs once); the backward gets
// K and V from the op converted, and transposed where a product needs it
// (or, for bf16, runs its five products on that micro-kernel too:
// backward_head_packed).
// Each block of queries is converted once into scratch; the other products
// are one small routine, gemm_acc (common/vec_gemm.h), vectorized over the
// output columns.
#include "attention/cpu/attention_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include <ATen/native/CPUBlas.h>

#include "common/counter_rng.h"
#include "common/vec_gemm.h"
#include "common/vec_math.h"

namespace bigkernels {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kBlockQ = kAttentionBlockRows, kBlockK = kAttentionKeyBlock;
// How far a block's max may exceed the running max before the packed
// forward's softmax rescales (FlashAttention-4's lazy rescaling): e^8 ~ 3000.
constexpr double kLazyShift = 8;

// Rows [0, rows) of `cols` values (`ld` apart) transposed into
// dst[c * ld_dst + r], 16 x 16 tiles in registers.
template <typename C>
void transpose_rows(const C* src, int64_t ld, int64_t rows, int64_t cols, C* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; r += 16)
    for (int64_t c = 0; c < cols; c += 16) {
      const int m = static_cast<int>(std::min<int64_t>(16, rows - r));
      const int n = static_cast<int>(std::min<int64_t>(16, cols - c));
      if (m == 16 && n == 16) {
        at::vec::transpose_mxn<C, 16, 16>(src + r * ld + c, ld, dst + c * ld_dst + r, ld_dst);
      } else {
        at::vec::transpose_mxn<C>(src + r * ld + c, ld, dst + c * ld_dst + r, ld_dst, m, n);
      }
    }
}

// a[0:n] . b[0:n] in C, each side read as C (bf16/fp16 widened in registers)
template <typename C, typename TA, typename TB>
C dot(const TA* a, const TB* b, int64_t n) {
  using V = at::vec::Vectorized<C>;
  V sum(0);
  for (int64_t e = 0; e < n; e += V::size()) {
    const int64_t c = std::min<int64_t>(V::size(), n - e);
    sum = at::vec::fmadd(load_as<C>(a + e, c), load_as<C>(b + e, c), sum);
  }
  return at::vec::vec_reduce_all<C>([](V x, V y) { return x + y; }, sum);
}

// The S rows of `dim` values (row stride ld) of one head's K or V,
// transposed by key blocks into dst [ceil(S / kBlockK)][dim][kBlockK],
// zero-padded: block j0 / kBlockK at dst + j0 * dim holds rows of kBlockK
// contiguous keys (the B operand of Q K^T and dO V^T). (A plain [dim, S]
// transpose would put a block's rows S elements apart: 4 KB for S = 1024
// floats, which map to one L1 set and evict each other.)
template <typename C>
void transpose_key_blocks(const C* rows, int64_t ld, int64_t S, int64_t dim, C* dst) {
  for (int64_t j0 = 0; j0 < S; j0 += kBlockK) {
    const int64_t jn = std::min(kBlockK, S - j0);
    C* out = dst + j0 * dim;
    transpose_rows(rows + j0 * ld, ld, jn, dim, out, kBlockK);
    for (int64_t e = 0; e < dim && jn < kBlockK; ++e) std::fill(out + e * kBlockK + jn, out + (e + 1) * kBlockK, C(0));
  }
}

// x[0:n] = exp(y - shift) with y = x[0:n] * scale (+ bias[0:n] where given)
// (0 where y is -inf); returns their sum and max(y) (-inf for n = 0). With
// `rounded`, the results go there instead, rounded to T, zeros after them up
// to `width` (bf16/fp16 probabilities for the BLAS micro-kernel), x is left
// as it was, and four vectors go per step: the exp is one long dependency
// chain, and a vector at a time left the core waiting on it.
template <typename C, typename T = C>
std::pair<C, C> exp_shifted(C* x, int64_t n, C shift, C scale = C(1), const C* bias = nullptr,
                            T* rounded = nullptr, int64_t width = 0) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  const V vscale(scale), vshift(shift);
  V sum(0), top(-std::numeric_limits<C>::infinity());
  const auto exp_at = [&](int64_t j) {  // exp(y - shift) for the vector at j; top takes y
    V y = V::loadu(x + j) * vscale;
    if (bias != nullptr) y = y + V::loadu(bias + j);
    top = at::vec::maximum(top, y);
    return MathOps<V>::exp(y - vshift);
  };
  int64_t j = 0;
  if constexpr (!std::is_same_v<T, C>) {
    if (rounded) {
      V sum2(0);
      for (; j + 4 * W <= n; j += 4 * W) {
        const V e0 = exp_at(j), e1 = exp_at(j + W), e2 = exp_at(j + 2 * W), e3 = exp_at(j + 3 * W);
        sum = sum + (e0 + e1), sum2 = sum2 + (e2 + e3);
        at::vec::convert_from_float<T>(e0, e1).store(rounded + j);
        at::vec::convert_from_float<T>(e2, e3).store(rounded + j + 2 * W);
      }
      sum = sum + sum2;
    }
  }
  for (; j + W <= n; j += W) {
    const V e = exp_at(j);
    sum = sum + e;
    if constexpr (!std::is_same_v<T, C>) {
      if (rounded) {
        at::vec::convert_from_float<T>(e, e).store(rounded + j, static_cast<int>(W));  // the low half: e
        continue;
      }
    }
    e.store(x + j);
  }
  C total = at::vec::vec_reduce_all<C>([](V a, V b) { return a + b; }, sum);
  C best = at::vec::vec_reduce_all<C>([](V a, V b) { return at::vec::maximum(a, b); }, top);
  for (; j < n; ++j) {
    const C y = x[j] * scale + (bias != nullptr ? bias[j] : C(0));
    best = std::max(best, y);
    const C e = std::exp(y - shift);
    total += e;
    if (rounded) {
      rounded[j] = static_cast<T>(e);
    } else {
      x[j] = e;
    }
  }
  if (rounded) std::fill(rounded + n, rounded + width, T(0));
  return {total, best};
}

// Batch b's number of keys: its own with per-batch lengths (a KV cache's).
inline int64_t keys_of(const AttentionCpuParams& p, int64_t b) {
  return p.seqlens_k != nullptr ? p.seqlens_k[b] : p.S;
}

// The part of the query block [i0, i1) x key range that causality, the window
// and the mask can touch, for head h of batch b: S keys, query i at key
// position i + diagonal.
struct Band {
  const AttentionCpuParams& p;
  int64_t b, h;
  int64_t S = keys_of(p, b);
  int64_t diagonal = p.seqlens_k != nullptr ? S - p.L : p.diagonal_offset;
  bool allowed(int64_t i, int64_t j) const {
    const int64_t pos = i + diagonal;
    return (p.window_left < 0 || j >= pos - p.window_left) && (p.window_right < 0 || j <= pos + p.window_right);
  }
  // The keys any row of [i0, i1) may see, [lo, hi), with lo rounded down to
  // a block boundary (the transposed key blocks'): the keys before the true lo in
  // that first block are masked by the window (such a block is never whole).
  std::pair<int64_t, int64_t> key_range(int64_t i0, int64_t i1) const {
    int64_t lo = 0, hi = S;
    if (p.window_left >= 0) lo = std::max<int64_t>(0, i0 + diagonal - p.window_left);
    if (p.window_right >= 0) hi = std::min<int64_t>(S, i1 - 1 + diagonal + p.window_right + 1);
    if (lo >= hi) return {0, 0};
    return {lo / kBlockK * kBlockK, hi};
  }
  // Whether every (i, j) of the block is allowed by the window (no per-element work).
  bool whole(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    return allowed(i1 - 1, j0) && allowed(i0, j1 - 1);
  }
  // Whether a bool mask rules out every pair of the block: then it is skipped.
  bool masked_out(int64_t i0, int64_t i1, int64_t j0, int64_t j1) const {
    if (p.mask == nullptr || !p.mask_is_bool) return false;
    const int64_t* ms = p.mask_strides;
    for (int64_t i = i0; i < i1; ++i) {
      const bool* row = static_cast<const bool*>(p.mask) + b * ms[0] + h * ms[1] + i * ms[2];
      for (int64_t j = j0; j < j1; ++j)
        if (row[j * ms[3]]) return false;
      if (ms[2] == 0) break;  // a mask broadcast over the queries: every row is this one
    }
    return true;
  }
  // Scores row i over keys [j0, j0 + n): masked entries become -inf, a float mask is added.
  template <typename T, typename C>
  void apply(C* s, int64_t i, int64_t j0, int64_t n, bool whole_block) const {
    const int64_t* ms = p.mask_strides;
    const int64_t row = b * ms[0] + h * ms[1] + i * ms[2];
    constexpr C kNegInf = -std::numeric_limits<C>::infinity();
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t j = j0 + jj;
      bool ok = whole_block || allowed(i, j);
      if (p.mask != nullptr) {
        if (p.mask_is_bool) {
          ok = ok && static_cast<const bool*>(p.mask)[row + j * ms[3]];
        } else {
          s[jj] += static_cast<C>(static_cast<const T*>(p.mask)[row + j * ms[3]]);
        }
      }
      if (!ok) s[jj] = kNegInf;
    }
  }
  // Scores row i over keys [j0, j0 + n): -inf where the window forbids a pair.
  template <typename C>
  void apply_window(C* s, int64_t i, int64_t j0, int64_t n) const {
    for (int64_t jj = 0; jj < n; ++jj)
      if (!allowed(i, j0 + jj)) s[jj] = -std::numeric_limits<C>::infinity();
  }
};

// A mask row shared by every row of a block, over keys [j0, j0 + n), as a
// bias to add with vector ops: 0 or -inf for a bool mask, the values of a
// float one. `row` is the row's offset in the mask. Returns whether any key
// is kept and whether every key is (nothing to add).
template <typename T, typename C>
std::pair<bool, bool> shared_mask_bias(const AttentionCpuParams& p, int64_t row, int64_t j0, int64_t n, C* bias) {
  bool any = !p.mask_is_bool, all = p.mask_is_bool;
  for (int64_t jj = 0; jj < n; ++jj) {
    const int64_t at = row + (j0 + jj) * p.mask_strides[3];
    if (p.mask_is_bool) {
      const bool keep = static_cast<const bool*>(p.mask)[at];
      bias[jj] = keep ? C(0) : -std::numeric_limits<C>::infinity();
      any = any || keep, all = all && keep;
    } else {
      bias[jj] = static_cast<C>(static_cast<const T*>(p.mask)[at]);
    }
  }
  return {any, all};
}

// Whether the mask rows at offsets row(0), ..., row(n - 1) are equal over
// keys [j0, j1) (unit key stride): Hugging Face materialises a padding mask
// as [B, 1, L, S] with every row equal, and comparing the rows costs far less
// than masking each.
template <typename T, typename RowOffset>
bool mask_rows_equal(const AttentionCpuParams& p, int64_t n, int64_t j0, int64_t j1, RowOffset row) {
  if (p.mask_strides[3] != 1 || j1 <= j0) return false;
  const int64_t size = p.mask_is_bool ? sizeof(bool) : sizeof(T);
  const char* mask = static_cast<const char*>(p.mask);
  const char* first = mask + (row(0) + j0) * size;
  for (int64_t r = 1; r < n; ++r) {
    const char* other = mask + (row(r) + j0) * size;
    if (other != first && std::memcmp(other, first, (j1 - j0) * size) != 0) return false;
  }
  return true;
}

// Multiplies row i's probabilities over keys [j0, j0 + n) by the dropout
// keep-mask scaled by 1 / (1 - p): kept ones grow, dropped ones become 0.
template <typename C>
void apply_dropout(const AttentionCpuParams& p, C* x, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n) {
  const uint64_t row = p.dropout_offset + static_cast<uint64_t>(((b * p.Hq + h) * p.L + i) * p.S + j0);
  const float drop = static_cast<float>(p.dropout_p);
  const C keep_scale = static_cast<C>(1.0 / (1.0 - p.dropout_p));
  for (int64_t jj = 0; jj < n; ++jj) {
    x[jj] *= counter_uniform(p.dropout_seed, row + jj) >= drop ? keep_scale : C(0);
  }
}

// dst[r][e] = C(src[r * stride + e]) * factor, r < rows, e < cols (dst row-major, ld cols).
template <typename T, typename C>
void load_rows(C* dst, const T* src, int64_t rows, int64_t cols, int64_t stride, C factor = C(1)) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t e = 0; e < cols; ++e) dst[r * cols + e] = static_cast<C>(src[r * stride + e]) * factor;
}
// Scratch: a buffer of max(n, size) values, the first n set to x. (Not
// std::vector: its fill constructor is a template that GCC may emit with this
// capability's vector instructions under a name shared by every build, which
// tests/test_dense.py refuses.)
template <typename C>
std::unique_ptr<C[]> filled(int64_t n, C x, int64_t size = 0) {
  std::unique_ptr<C[]> buffer(new C[std::max<int64_t>({n, size, 1})]);
  for (int64_t i = 0; i < n; ++i) buffer[i] = x;
  return buffer;
}

// Row j0 of head `head` of batch b of a [B, H, L|S, D] tensor in place (strides: batch, head, row).
template <typename T>
const T* key_row(const void* base, const int64_t* strides, int64_t b, int64_t head, int64_t j0) {
  return static_cast<const T*>(base) + b * strides[0] + head * strides[1] + j0 * strides[2];
}

// Key j of head `head` of batch b of K or V (base, strides: p.k or p.v's),
// through the page table when paged. Keys [j, j + n) are then one row
// stride apart only within one page: see page_rest.
template <typename T>
const T* cache_row(const AttentionCpuParams& p, const void* base, const int64_t* strides, int64_t b, int64_t head,
                   int64_t j) {
  if (p.block_table == nullptr) return key_row<T>(base, strides, b, head, j);
  const int64_t page = p.block_table[b * p.block_table_stride + j / p.page_size];
  return static_cast<const T*>(base) + page * strides[0] + head * strides[1] + j % p.page_size * strides[2];
}

// How many keys from key j on are one row stride apart (the rest of its page when paged), at most n.
inline int64_t page_rest(const AttentionCpuParams& p, int64_t j, int64_t n) {
  return p.block_table == nullptr ? n : std::min(n, p.page_size - j % p.page_size);
}

// n keys (rows of `dim` values, `stride` apart from `rows` on), in the
// compute type with row stride *ld: read in place when already in it, else
// converted into scratch (per block, so no per-call copy of K or V exists).
template <typename T, typename C>
const C* key_rows(const T* rows, int64_t stride, int64_t n, int64_t dim, C* scratch, int64_t* ld) {
  if constexpr (std::is_same_v<T, C>) {
    *ld = stride;
    return rows;
  } else {
    using IO = VecIO<T>;  // converted in registers, a chunk at a time
    for (int64_t j = 0; j < n; ++j) {
      const T* src = rows + j * stride;
      if (j + 8 < n) prefetch_bytes(src + 8 * stride, dim * static_cast<int64_t>(sizeof(T)));  // 8 rows ahead
      C* dst = scratch + j * dim;
      for (int64_t e = 0; e < dim; e += IO::kWidth) {
        const int64_t c = std::min<int64_t>(IO::kWidth, dim - e);
        const typename IO::Chunk x = IO::load(src + e, c);
        x[0].store(dst + e, static_cast<int>(std::min<int64_t>(c, IO::kPart)));
        if (c > IO::kPart) x[1].store(dst + e + IO::kPart, static_cast<int>(c - IO::kPart));
      }
    }
    *ld = dim;
    return scratch;
  }
}

// Prefetches n rows of `dim` values, `stride` apart from `first` on.
template <typename T>
void prefetch_rows(const T* first, int64_t stride, int64_t n, int64_t dim) {
  for (int64_t j = 0; j < n; ++j) prefetch_bytes(first + j * stride, dim * static_cast<int64_t>(sizeof(T)));
}

// max(x[0:n] * scale (+ bias[0:n] where given)), -inf for n = 0.
template <typename C>
C scaled_max(const C* x, int64_t n, C scale = C(1), const C* bias = nullptr) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  V best(-std::numeric_limits<C>::infinity());
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V y = V::loadu(x + j) * V(scale);
    if (bias != nullptr) y = y + V::loadu(bias + j);
    best = at::vec::maximum(best, y);
  }
  C total = at::vec::vec_reduce_all<C>([](V a, V b) { return at::vec::maximum(a, b); }, best);
  for (; j < n; ++j) total = std::max(total, x[j] * scale + (bias != nullptr ? bias[j] : C(0)));
  return total;
}

// The bf16/fp16 micro-kernel of ATen's BLAS (cpublas::brgemm: AMX or
// AVX512-BF16 where the CPU has them): c[M, N] (+)= a[M, K] b, float c, b
// packed as pairs of rows (k_vnni, v_vnni), N columns wide. (Templated on
// every T and C for forward_task's sake; only bf16/fp16 with float get here.)
template <typename T, typename C>
constexpr bool kHasMicroKernel = (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) &&
                                 std::is_same_v<C, float>;

template <typename T, typename C>
void brgemm_vnni(int64_t M, int64_t N, int64_t K, const T* a, int64_t lda, const T* b, C* c, int64_t ldc,
                 bool accumulate) {
  if constexpr (kHasMicroKernel<T, C>) {
    at::native::cpublas::brgemm(M, N, K, lda, N, ldc, accumulate, a, b, c, /*is_vnni=*/true);
  } else {
    TORCH_INTERNAL_ASSERT(false, "brgemm_vnni: bf16 and fp16 only");
  }
}

// dst[0:width] = src[0:n] rounded to T, then zeros.
template <typename T, typename C>
void round_row(const C* src, T* dst, int64_t n, int64_t width) {
  if constexpr (kHasMicroKernel<T, C>) {
    using IO = VecIO<T>;
    using V = typename IO::V;
    for (int64_t j = 0; j < n; j += IO::kWidth) {
      const int64_t c = std::min(IO::kWidth, n - j);
      IO::store(dst + j, {V::loadu(src + j, static_cast<int>(std::min(c, IO::kPart))),
                          c > IO::kPart ? V::loadu(src + j + IO::kPart, static_cast<int>(c - IO::kPart)) : V(0)}, c);
    }
    std::fill(dst + n, dst + width, T(0));
  } else {
    TORCH_INTERNAL_ASSERT(false, "round_row: bf16 and fp16 only");
  }
}

// Decoding's bf16 scores on AVX512-BF16's dot products of pairs (vdpbf16ps):
// half the instructions of widening K and FMAs in float, and no widening at
// all. Q then stays bf16 and unscaled (exact: the call's own values), the
// scale applied to the sums. Where the CPU has the extension
// (use_pair_dots), and compiled in the AVX-512 kernels only.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kPairDotsCompiled = true;
#else
constexpr bool kPairDotsCompiled = false;
#endif
template <typename TQ, typename TK>
constexpr bool kPairDots =
    kPairDotsCompiled && std::is_same_v<TQ, c10::BFloat16> && std::is_same_v<TK, c10::BFloat16>;

template <typename T, typename C>
bool use_pair_dots() {
  return kPairDots<T, T> && std::is_same_v<C, float> && has_avx512_bf16();
}

// s[i * lds + jj] = scale * q[i] . k[jj] for NR rows (E values each,
// contiguous) and four keys (ldk apart): each key's vector widened once for
// all NR rows (or, bf16 with bf16 Q, multiplied by pairs: kPairDots), the
// 4 * NR sums in registers (NR a constant, so that none is spilled).
template <int NR, typename C, typename TQ, typename TK>
BK_VEC_INLINE void dot_four_keys(const TQ* q, int64_t E, const TK* k, int64_t ldk, C* s, int64_t lds, C scale) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  V x[NR][4];
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i) x[i][0] = x[i][1] = x[i][2] = x[i][3] = V(0);
  if constexpr (kPairDots<TQ, TK>) {
#if defined(CPU_CAPABILITY_AVX512)
    for (int64_t e = 0; e < E; e += 2 * W) {  // 32 bf16 lanes, those past E loaded as zeros
      const __mmask32 m = E - e >= 2 * W ? ~__mmask32(0) : (__mmask32(1) << (E - e)) - 1;
      const __m512i k0 = _mm512_maskz_loadu_epi16(m, k + e), k1 = _mm512_maskz_loadu_epi16(m, k + ldk + e);
      const __m512i k2 = _mm512_maskz_loadu_epi16(m, k + 2 * ldk + e);
      const __m512i k3 = _mm512_maskz_loadu_epi16(m, k + 3 * ldk + e);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const __m512i qv = _mm512_maskz_loadu_epi16(m, q + i * E + e);
        x[i][0] = dot_bf16_pairs(x[i][0], qv, k0);
        x[i][1] = dot_bf16_pairs(x[i][1], qv, k1);
        x[i][2] = dot_bf16_pairs(x[i][2], qv, k2);
        x[i][3] = dot_bf16_pairs(x[i][3], qv, k3);
      }
    }
#endif
  } else {
    for (int64_t e = 0; e < E; e += W) {
      const int64_t c = std::min<int64_t>(W, E - e);
      const V k0 = load_as<C>(k + e, c), k1 = load_as<C>(k + ldk + e, c);
      const V k2 = load_as<C>(k + 2 * ldk + e, c), k3 = load_as<C>(k + 3 * ldk + e, c);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const V qv = load_as<C>(q + i * E + e, c);  // lanes past c are zero
        x[i][0] = at::vec::fmadd(qv, k0, x[i][0]);
        x[i][1] = at::vec::fmadd(qv, k1, x[i][1]);
        x[i][2] = at::vec::fmadd(qv, k2, x[i][2]);
        x[i][3] = at::vec::fmadd(qv, k3, x[i][3]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i) store_four_sums(x[i], s + i * lds, scale);
}

// s[r * lds + jj] = q[r] . k[jj] for rows r < rows and keys jj < n: dot
// products along the head dim, four keys at a time (four FMA chains), for
// tasks with fewer rows than vector lanes (decoding), where K Q^T would leave
// most lanes idle. K is read in place, bf16/fp16 widened in registers (a
// block converted into scratch first cost twice these products: issue 16),
// once per pass over up to kDotRows rows (a GQA group's heads share it).
// With `groups` > 1 the rows are that many groups of `rows` (rows
// g * rows + r of q and s), group g against the keys k + g * k_head: the
// heads of one key, side by side in a [B, S, H, D] cache, are then read
// together, one contiguous stream (head by head, each head's rows are one
// cache line in every few and the hardware prefetchers lose the stream).
// Such tasks stream K and V from memory at a few FMAs per byte: the loop asks
// for the K rows of the group after next and (when v_rows is given:
// `v_bytes` bytes each, `v_stride` apart, group g's at v_rows + g * v_head)
// the same keys' V rows, spread over the loop, into L2 (prefetch_bytes_to_l2).
// A block-sized burst of prefetches instead filled the core's line-fill
// buffers and left a decoding call at ~10 GB/s.
// Each score is times `scale` (1 where Q comes scaled; bf16 Q comes as it is:
// kPairDots).
template <typename C, typename TQ, typename TK>
void scores_by_dot(int64_t rows, int64_t n, int64_t E, const TQ* q, const TK* k, int64_t ldk, C* s, int64_t lds,
                   const char* v_rows = nullptr, int64_t v_stride = 0, int64_t v_bytes = 0, int64_t groups = 1,
                   int64_t k_head = 0, int64_t v_head = 0, C scale = C(1)) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  // rows per pass: 4 x 4 sums + 4 keys + a query in AVX-512's 32 registers, 2 x 4 + 5 in AVX2's 16
  constexpr int64_t kDotRows = sizeof(V) >= 64 ? 4 : 2;
  const auto sum = [](const V& x) { return at::vec::vec_reduce_all<C>([](V a, V b) { return a + b; }, x); };
  const int64_t k_bytes = E * static_cast<int64_t>(sizeof(TK));
  int64_t jj = 0;
  for (; jj + 4 <= n; jj += 4) {
    for (int64_t g = 0; g < groups; ++g) {
      const TK* kg = k + g * k_head;
      const TK* k0 = kg + jj * ldk;
      for (int64_t key = jj + 8; key < std::min(jj + 12, n); ++key) prefetch_bytes_to_l2(kg + key * ldk, k_bytes);
      for (int64_t key = jj; v_rows != nullptr && key < jj + 4; ++key)
        prefetch_bytes_to_l2(v_rows + g * v_head + key * v_stride, v_bytes);
      for (int64_t r0 = g * rows; r0 < (g + 1) * rows; r0 += kDotRows) {
        const TQ* qr = q + r0 * E;
        C* sr = s + r0 * lds + jj;
        switch (std::min<int64_t>(kDotRows, (g + 1) * rows - r0)) {
          case 4: dot_four_keys<4>(qr, E, k0, ldk, sr, lds, scale); break;
          case 3: dot_four_keys<3>(qr, E, k0, ldk, sr, lds, scale); break;
          case 2: dot_four_keys<2>(qr, E, k0, ldk, sr, lds, scale); break;
          default: dot_four_keys<1>(qr, E, k0, ldk, sr, lds, scale); break;
        }
      }
    }
  }
  for (; jj < n; ++jj) {
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t r = g * rows; r < (g + 1) * rows; ++r) {
        V x(0);
        for (int64_t e = 0; e < E; e += W) {
          const int64_t c = std::min<int64_t>(W, E - e);
          x = at::vec::fmadd(load_as<C>(q + r * E + e, c), load_as<C>(k + g * k_head + jj * ldk + e, c), x);
        }
        s[r * lds + jj] = sum(x) * scale;
      }
    }
  }
}

// ALiBi per score row r: its slope and its query's key position
// (AttentionCpuParams::alibi_slopes), padded with zeros to `width` rows.
template <typename C>
struct AlibiRows {
  std::unique_ptr<C[]> slope, position;
  template <typename HeadOf, typename PosOf>
  AlibiRows(const AttentionCpuParams& p, const Band& band, int64_t rows, int64_t width, HeadOf head_of,
            PosOf pos_of) {
    if (p.alibi_slopes == nullptr) return;
    const C* slopes = static_cast<const C*>(p.alibi_slopes) + band.b * p.alibi_batch_stride;
    slope = filled(width, C(0)), position = filled(width, C(0));
    for (int64_t r = 0; r < rows; ++r) {
      slope[r] = slopes[head_of(r)];
      position[r] = static_cast<C>(pos_of(r) + band.diagonal);
    }
  }
};

// A block's scaled scores, score (r, jj) at st[r * row_step + jj * key_step]
// (rows [0, rows), ld columns apart when transposed; keys j0 + jj, jj < jn):
// Gemma-2's softcap, then ALiBi's distance bias (AttentionCpuParams::softcap;
// `alibi`'s rows, ld of them), before any mask: a masked score must stay
// -inf. With cap_slope (laid out as st), the softcap's derivative there,
// 1 - tanh², for the backward. `scale`: what the scores are multiplied by
// first (1: they come scaled; the packed products' come unscaled, and this
// pass scales them instead of one of its own).
template <typename C>
void shape_scores(const AttentionCpuParams& p, const AlibiRows<C>& alibi, C* st, int64_t rows, int64_t ld,
                  int64_t row_step, int64_t key_step, int64_t j0, int64_t jn, C* cap_slope = nullptr,
                  C scale = C(1)) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  // transposed (key_step > 1): the block is jn lines of ld contiguous rows' scores; else rows lines of jn keys
  const bool by_rows = key_step == 1;
  const int64_t lines = by_rows ? rows : 1, width = by_rows ? jn : jn * ld;
  if (p.softcap > 0) {
    const C cap = static_cast<C>(p.softcap), inv = scale / cap;
    scale = C(1);  // applied here
    for (int64_t r = 0; r < lines; ++r) {
      C* x = st + r * row_step;
      for (int64_t j = 0; j < width; j += W) {
        const int n = static_cast<int>(std::min<int64_t>(W, width - j));
        const V t = MathOps<V>::tanh(V::loadu(x + j, n) * V(inv));
        (t * V(cap)).store(x + j, n);
        if (cap_slope != nullptr) (V(1) - t * t).store(cap_slope + r * row_step + j, n);
      }
    }
  }
  if (p.alibi_slopes == nullptr) return;
  if (by_rows) {  // -slope * |position - j| along each row's keys
    for (int64_t r = 0; r < rows; ++r) {
      const V slope(alibi.slope[r]), position(alibi.position[r]);
      C* x = st + r * row_step;
      for (int64_t jj = 0; jj < jn; jj += W) {
        const int n = static_cast<int>(std::min<int64_t>(W, jn - jj));
        const V key = V::arange(static_cast<C>(j0 + jj), C(1));
        (V::loadu(x + jj, n) * V(scale) - slope * (position - key).abs()).store(x + jj, n);
      }
    }
    return;
  }
  for (int64_t jj = 0; jj < jn; ++jj) {  // down the rows of each key
    const V key(static_cast<C>(j0 + jj));
    C* x = st + jj * key_step;
    for (int64_t c = 0; c < ld; c += W) {
      const int n = static_cast<int>(std::min<int64_t>(W, ld - c));
      const V d = V::loadu(alibi.slope.get() + c, n) * (V::loadu(alibi.position.get() + c, n) - key).abs();
      (V::loadu(x + c, n) * V(scale) - d).store(x + c, n);
    }
  }
}

// The forward of one task (AttentionForwardTask), flash-style: the task's
// query rows walk the key blocks with an online softmax; the L x S scores
// never exist beyond one block. Two layouts of a block's scores:
// - with at least a vector's worth of rows, transposed, st[key][row]
//   (queries across the vector lanes, rows padded to whole vectors): st =
//   K Q^T reads K in place (no per-call transposed copy), and the softmax's
//   max and sum run down the keys as plain vector ops, with no horizontal
//   reduction per row;
// - with fewer (decoding: one position, a GQA group's heads), by rows,
//   s[row][key], from dot products along the head dim.
// P V then reads the scores as A (a transposed view for the first) and V in place.
template <typename T, typename C>
void forward_task(const AttentionCpuParams& p, const AttentionForwardTask& t) {
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  constexpr C kNegInf = -std::numeric_limits<C>::infinity();
  const int64_t E = p.E, Ev = p.Ev, len = t.i1 - t.i0, rows = (t.h1 - t.h0) * len;
  const int64_t group = p.Hq / p.Hkv, hk = t.h0 / group;
  // A task past one GQA group (AttentionForwardTask) takes `groups` whole
  // groups of group_rows rows, key heads hk, hk + 1, ..., scores by rows.
  const int64_t groups = (t.h1 - t.h0 + group - 1) / group, group_rows = rows / groups;
  const bool packed = p.k_vnni != nullptr;  // both products on the BLAS micro-kernel, scores by rows
  const bool transposed = !packed && rows >= W && groups == 1;
  const bool pair_dots = !packed && !transposed && use_pair_dots<T, C>();  // bf16 Q as it is (kPairDots)
  // keys per block: more when packed, so fewer per-block softmax steps per key
  const int64_t block = packed ? p.vnni_keys : kBlockK;
  const int64_t ld = transposed ? (rows + W - 1) / W * W : rows;  // columns of qt and of the scores' rows
  // Score (r, jj) is st[r * row_step + jj * key_step].
  const int64_t row_step = transposed ? 1 : block, key_step = transposed ? ld : 1;
  // Scratch: only the output sums, the running max and sum, and Q's padding
  // columns need initial values; everything else is written before it is read.
  const auto q_scaled = filled(!packed && rows < ld ? E * ld : 0, C(0), packed || pair_dots ? 0 : E * ld);
  const auto st = filled(0, C(0), block * ld);
  const auto acc = filled(rows * Ev, C(0)), m = filled(ld, kNegInf), l = filled(ld, C(0));
  const auto alpha = filled(0, C(0), ld);
  // K and V blocks converted into scratch for K Q^T (scores by dot products
  // and their P V read bf16/fp16 K and V in place, widened in registers)
  const bool convert = transposed && !std::is_same_v<T, C>;
  const auto k_scratch = filled(0, C(0), convert ? kBlockK * E : 0);
  const auto v_scratch = filled(0, C(0), convert ? kBlockK * Ev : 0);
  // packed (and pair_dots): Q's rows as they are ([rows, E]; the scale is
  // applied to the scores); packed: a block's probabilities rounded to T ([rows, block])
  const auto q_rows = filled(0, T(0), packed || pair_dots ? rows * E : 0);
  const auto p_rows = filled(0, T(0), packed ? rows * block : 0);
  const auto mask_bias = filled(0, C(0), block);  // a shared mask row over one block's keys
  const int64_t key_blocks = (p.S + block - 1) / block;
  const T* k_vnni = packed ? static_cast<const T*>(p.k_vnni) + (t.b * p.Hkv + hk) * key_blocks * E * block : nullptr;
  const T* v_vnni = packed ? static_cast<const T*>(p.v_vnni) + (t.b * p.Hkv + hk) * key_blocks * block * Ev : nullptr;
  // Row r is head h0 + r / len at position i0 + r % len.
  const auto head_of = [&](int64_t r) { return t.h0 + r / len; };
  const auto pos_of = [&](int64_t r) { return t.i0 + r % len; };
  const C scale = static_cast<C>(p.scale);
  const auto q_row = [&](int64_t r) {
    return static_cast<const T*>(p.q) + t.b * p.q_strides[0] + head_of(r) * p.q_strides[1] + pos_of(r) * p.q_strides[2];
  };
  // Every row of Q requested at once (strided rows: the copy below would
  // otherwise wait for them a few at a time).
  for (int64_t r = 0; r < rows; ++r) prefetch_bytes(q_row(r), E * static_cast<int64_t>(sizeof(T)));
  if (transposed && std::is_same_v<T, C>) {  // Q^T scaled [E, ld]: each head's rows transposed in register tiles
    for (int64_t r0 = 0; r0 < rows; r0 += len)
      transpose_rows(reinterpret_cast<const C*>(q_row(r0)), p.q_strides[2], len, E, q_scaled.get() + r0, ld);
    for (int64_t i = 0; i < E * ld; i += W) (V::loadu(q_scaled.get() + i) * V(scale)).store(q_scaled.get() + i);
  } else {
    for (int64_t r = 0; r < rows; ++r) {  // Q scaled: [E, ld] when transposed, else [rows, E]
      const T* qr = q_row(r);
      if (packed || pair_dots) {
        std::copy(qr, qr + E, q_rows.get() + r * E);
        continue;
      }
      for (int64_t e = 0; e < E; ++e) q_scaled[transposed ? e * ld + r : r * E + e] = static_cast<C>(qr[e]) * scale;
    }
  }
  const int64_t* ms = p.mask_strides;
  const auto mask_row = [&](int64_t r) { return t.b * ms[0] + head_of(r) * ms[1] + pos_of(r) * ms[2]; };
  const Band band{p, t.b, t.h0};
  const AlibiRows<C> alibi(p, band, rows, ld, head_of, pos_of);
  auto [jlo, jhi] = band.key_range(t.i0, t.i1);
  jlo = std::max(jlo, t.j_begin), jhi = std::min(jhi, t.j_end);
  if (packed) jlo = jlo / block * block;  // whole packed blocks (the keys are never split then)
  // One shared mask row, read once per key, when the task's rows all see the
  // same one: broadcast over its heads and positions (a key-padding mask), or
  // materialised with equal rows.
  const bool shared_mask_row =
      p.mask != nullptr && (((ms[1] == 0 || t.h1 - t.h0 == 1) && (ms[2] == 0 || len == 1)) ||
                            mask_rows_equal<T>(p, rows, jlo, jhi, mask_row));
  // packed: the probabilities are rounded to T in the softmax's pass (unless
  // dropout must see them first), which also adds a shared mask row and
  // applies the scale, if positive (scores already set to -inf must stay
  // -inf), unless another float mask must be added to scaled scores first,
  // or the softcap or ALiBi must shape them (shape_scores)
  const bool round_in_softmax = packed && p.dropout_p == 0;
  const bool bias_in_softmax = round_in_softmax && shared_mask_row;
  const bool shaped = p.softcap > 0 || p.alibi_slopes != nullptr;
  const bool scale_in_softmax = packed && scale > C(0) && (p.mask == nullptr || p.mask_is_bool || bias_in_softmax) &&
                                !shaped;
  const C softmax_scale = scale_in_softmax ? scale : C(1);
  // Keys per step from key j on: a block, or less at the end of the range or of a page.
  const auto keys_from = [&](int64_t j) { return page_rest(p, j, std::min(block, jhi - j)); };
  const auto k_at = [&](int64_t j) { return cache_row<T>(p, p.k, p.k_strides, t.b, hk, j); };
  const auto v_at = [&](int64_t j) { return cache_row<T>(p, p.v, p.v_strides, t.b, hk, j); };
  for (int64_t j0 = jlo, jn = 0; j0 < jhi; j0 += jn) {
    jn = keys_from(j0);
    const bool whole = band.whole(t.i0, t.i1, j0, j0 + jn);
    // Ask for this block's V and the next block's K now: they arrive while
    // the scores and the softmax are computed (their rows are strided, e.g.
    // in Hugging Face's layout, which the hardware prefetcher follows poorly).
    // (Packed blocks are contiguous: the hardware prefetcher follows them.
    // Tasks with scores by dot products ask for K and V inside their loops:
    // see scores_by_dot.)
    const bool burst = transposed;
    if (burst) prefetch_rows<T>(v_at(j0), p.v_strides[2], jn, Ev);
    if (j0 + jn < jhi) {
      if (burst) prefetch_rows<T>(k_at(j0 + jn), p.k_strides[2], keys_from(j0 + jn), E);
    } else if (p.splits == 1) {  // the last block: the output rows, for writing
      for (int64_t r = 0; r < rows; ++r)
        prefetch_bytes<true>(static_cast<T*>(p.out) + t.b * p.out_strides[0] + head_of(r) * p.out_strides[1] +
                                 pos_of(r) * p.out_strides[2],
                             Ev * static_cast<int64_t>(sizeof(T)));
    }
    int64_t k_ld = 0, v_ld = 0;
    if (packed) {  // s = Q K^T (K^T's block is zero-padded to `block` keys), scaled below
      brgemm_vnni(rows, block, E, q_rows.get(), E, k_vnni + j0 / block * E * block, st.get(), block, false);
      for (int64_t r = 0; r < rows && !scale_in_softmax && !shaped; ++r) {  // (shape_scores scales)
        C* sr = st.get() + r * block;
        for (int64_t jj = 0; jj < jn; jj += W) {
          const int n = static_cast<int>(std::min(W, jn - jj));
          (V::loadu(sr + jj, n) * V(scale)).store(sr + jj, n);
        }
      }
    } else if (transposed) {  // st = K Q^T
      const C* kb = key_rows<T, C>(k_at(j0), p.k_strides[2], jn, E, k_scratch.get(), &k_ld);
      gemm_acc(jn, ld, E, kb, k_ld, 1, q_scaled.get(), ld, st.get(), ld, false);
    } else {  // K and V read in place: the V rows' prefetches ride along
      const char* v_rows = reinterpret_cast<const char*>(v_at(j0));
      const auto scores = [&](const auto* q_rows_in, C q_scale) {
        scores_by_dot(group_rows, jn, E, q_rows_in, k_at(j0), p.k_strides[2], st.get(), block, v_rows,
                      p.v_strides[2] * static_cast<int64_t>(sizeof(T)), Ev * static_cast<int64_t>(sizeof(T)), groups,
                      p.k_strides[1], p.v_strides[1] * static_cast<int64_t>(sizeof(T)), q_scale);
      };
      if (pair_dots) {
        scores(q_rows.get(), scale);
      } else {
        scores(q_scaled.get(), C(1));
      }
    }
    if (shaped) {  // (the packed product's scores come unscaled: scaled there)
      shape_scores(p, alibi, st.get(), rows, ld, row_step, key_step, j0, jn, static_cast<C*>(nullptr),
                   packed ? scale : C(1));
    }
    // Masks and windows: -inf where a pair may not attend, a float mask added.
    const C* softmax_bias = nullptr;  // the shared row, when the softmax's pass adds it
    if (shared_mask_row) {  // the shared row as a bias over this block's keys, added with vector ops
      const auto [any, all] = shared_mask_bias<T>(p, mask_row(0), j0, jn, mask_bias.get());
      if (!any) continue;  // the whole block is masked: it contributes nothing
      if (all) {
        // every key kept: nothing to add
      } else if (bias_in_softmax) {
        softmax_bias = mask_bias.get();
      } else if (transposed) {  // st[key][:] += bias[key]
        for (int64_t jj = 0; jj < jn; ++jj) {
          if (mask_bias[jj] == C(0)) continue;
          const V add(mask_bias[jj]);
          for (int64_t c = 0; c < ld; c += W) (V::loadu(st.get() + jj * ld + c) + add).store(st.get() + jj * ld + c);
        }
      } else {  // st[row][:] += bias
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t jj = 0; jj < jn; jj += W) {
            const int n = static_cast<int>(std::min(W, jn - jj));
            C* x = st.get() + r * row_step + jj;
            (V::loadu(x, n) + V::loadu(mask_bias.get() + jj, n)).store(x, n);
          }
      }
    } else if (p.mask != nullptr) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t jj = 0; jj < jn; ++jj) {
          const int64_t at = mask_row(r) + (j0 + jj) * ms[3];
          C& x = st[r * row_step + jj * key_step];
          if (p.mask_is_bool) {
            if (!static_cast<const bool*>(p.mask)[at]) x = kNegInf;
          } else {
            x += static_cast<C>(static_cast<const T*>(p.mask)[at]);
          }
        }
    }
    if (!whole) {
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t jj = 0; jj < jn; ++jj)
          if (!band.allowed(pos_of(r), j0 + jj)) st[r * row_step + jj * key_step] = kNegInf;
    }
    // Online softmax: the new max, the old sum and output rescaled by alpha =
    // exp(old max - new max), the scores turned into exp(score - max). A row
    // with nothing to attend to yet shifts by 0: its exp(-inf) are 0.
    if (transposed) {  // a vector of rows at a time, down the keys
      for (int64_t c = 0; c < ld; c += W) {
        V block_max(kNegInf);
        for (int64_t jj = 0; jj < jn; ++jj) block_max = at::vec::maximum(block_max, V::loadu(st.get() + jj * ld + c));
        const V m_old = V::loadu(m.get() + c), m_new = at::vec::maximum(m_old, block_max);
        const V shift = V::blendv(m_new, V(0), m_new == V(kNegInf));
        V sum(0);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const V e = MathOps<V>::exp(V::loadu(st.get() + jj * ld + c) - shift);
          e.store(st.get() + jj * ld + c);
          sum = sum + e;
        }
        const V a = MathOps<V>::exp(m_old - shift);
        (V::loadu(l.get() + c) * a + sum).store(l.get() + c);
        m_new.store(m.get() + c);
        a.store(alpha.get() + c);
      }
    } else {  // a row at a time, along its keys
      for (int64_t r = 0; r < rows; ++r) {
        C* sr = st.get() + r * block;
        T* rounded = round_in_softmax ? p_rows.get() + r * block : nullptr;
        if (rounded != nullptr) {
          // Past a row's first block: one pass shifted by the running max m[r],
          // which also finds the block's max, kept (no rescale, no max pass)
          // unless that max exceeds m[r] by more than kLazyShift; the
          // probabilities are then at most e^kLazyShift, far from overflow,
          // rounded to T with the same relative error, and the lse is still
          // m + log(l). At the first block, the max first: the largest
          // probability is then exactly 1 (one key gives exactly V).
          const C shift = m[r] != kNegInf ? m[r] : scaled_max(sr, jn, softmax_scale, softmax_bias);
          // (every key masked so far: shifted by 0, so that exp(-inf) is 0)
          const auto [sum, top] =
              exp_shifted(sr, jn, shift == kNegInf ? C(0) : shift, softmax_scale, softmax_bias, rounded, block);
          if (top <= shift + C(kLazyShift) || top != top) {  // (NaN: as it is)
            alpha[r] = shift == kNegInf ? C(1) : std::exp(m[r] - shift);
            l[r] = l[r] * alpha[r] + sum;
            if (shift != kNegInf) m[r] = shift;
            continue;
          }
          alpha[r] = std::exp(m[r] - top);  // a larger max: one more pass, shifted by it
          l[r] = l[r] * alpha[r] + exp_shifted(sr, jn, top, softmax_scale, softmax_bias, rounded, block).first;
          m[r] = top;
          continue;
        }
        const C m_new = std::max(m[r], scaled_max(sr, jn, softmax_scale)), shift = m_new == kNegInf ? C(0) : m_new;
        alpha[r] = std::exp(m[r] - shift);
        l[r] = l[r] * alpha[r] + exp_shifted(sr, jn, shift, softmax_scale).first;
        m[r] = m_new;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      if (alpha[r] == C(1)) continue;
      C* ar = acc.get() + r * Ev;
      for (int64_t e = 0; e < Ev; ++e) ar[e] *= alpha[r];
    }
    if (p.dropout_p > 0) {  // the values see only the kept probabilities; the sum counted every key
      const float drop = static_cast<float>(p.dropout_p);
      const C keep_scale = static_cast<C>(1.0 / (1.0 - p.dropout_p));
      for (int64_t r = 0; r < rows; ++r) {
        const uint64_t first =
            p.dropout_offset + static_cast<uint64_t>(((t.b * p.Hq + head_of(r)) * p.L + pos_of(r)) * p.S + j0);
        for (int64_t jj = 0; jj < jn; ++jj)
          st[r * row_step + jj * key_step] *= counter_uniform(p.dropout_seed, first + jj) >= drop ? keep_scale : C(0);
      }
    }
    if (packed) {  // acc += P V with P rounded to T, as SDPA's and flash-attention's bf16 kernels do
      for (int64_t r = 0; r < rows && !round_in_softmax; ++r)
        round_row(st.get() + r * block, p_rows.get() + r * block, jn, block);
      brgemm_vnni(rows, Ev, block, p_rows.get(), block, v_vnni + j0 / block * block * Ev, acc.get(), Ev, true);
    } else if (transposed) {  // acc += P V
      const C* vb = key_rows<T, C>(v_at(j0), p.v_strides[2], jn, Ev, v_scratch.get(), &v_ld);
      gemm_acc(rows, Ev, jn, st.get(), row_step, key_step, vb, v_ld, acc.get(), Ev, true);
    } else {
      for (int64_t g = 0; g < groups; ++g) {
        gemm_acc(group_rows, Ev, jn, st.get() + g * group_rows * row_step, row_step, key_step,
                 v_at(j0) + g * p.v_strides[1], p.v_strides[2], acc.get() + g * group_rows * Ev, Ev, true);
      }
    }
  }
  if (packed) at::native::cpublas::brgemm_release();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = head_of(r), i = pos_of(r), row = (t.b * p.Hq + h) * p.L + i;
    const C inv = l[r] > C(0) ? C(1) / l[r] : C(0);  // a row that attends to nothing gives 0
    const C lse = l[r] > C(0) ? m[r] + std::log(l[r]) : kNegInf;
    const C* ar = acc.get() + r * Ev;
    if (p.splits > 1) {
      const int64_t rows_total = p.B * p.Hq * p.L;
      C* so = static_cast<C*>(p.split_out) + (t.split * rows_total + row) * Ev;
      for (int64_t e = 0; e < Ev; ++e) so[e] = ar[e] * inv;
      static_cast<C*>(p.split_lse)[t.split * rows_total + row] = lse;
    } else {
      T* out = static_cast<T*>(p.out) + t.b * p.out_strides[0] + h * p.out_strides[1] + i * p.out_strides[2];
      for (int64_t e = 0; e < Ev; ++e) out[e] = static_cast<T>(ar[e] * inv);
      static_cast<C*>(p.lse)[row] = lse;
    }
  }
}

// Whether key block [j0, j0 + jn) can carry gradient to the query rows
// [i0, i1) (false: the backward skips it). With a shared mask row (its
// offset mask_row0 >= 0), that row as a bias over the block in `bias`, and
// *every_key_kept when it keeps every key (nothing to add; also without one).
template <typename T, typename C>
bool block_carries_gradient(const AttentionCpuParams& p, const Band& band, int64_t mask_row0, int64_t i0, int64_t i1,
                            int64_t j0, int64_t jn, C* bias, bool* every_key_kept) {
  *every_key_kept = true;
  if (mask_row0 < 0) return !band.masked_out(i0, i1, j0, j0 + jn);
  const auto [any, all] = shared_mask_bias<T>(p, mask_row0, j0, jn, bias);
  *every_key_kept = all;
  return any;
}

// Rows [i0, i0 + n) of head `head` of batch b of dst (strides: batch, head,
// row) = factor * src [n, dim] (row-major).
template <typename T, typename C>
void store_rows(T* dst, const int64_t* strides, int64_t b, int64_t head, int64_t i0, int64_t n, int64_t dim,
                const C* src, C factor) {
  for (int64_t r = 0; r < n; ++r) {
    T* row = dst + b * strides[0] + head * strides[1] + (i0 + r) * strides[2];
    for (int64_t e = 0; e < dim; ++e) row[e] = static_cast<T>(src[r * dim + e] * factor);
  }
}

template <typename T, typename C>
void backward_head(const AttentionCpuParams& p, int64_t b, int64_t hk) {
  const int64_t group = p.Hq / p.Hkv, E = p.E, Ev = p.Ev, S = p.S;
  const C* kc = static_cast<const C*>(p.k_c) + b * p.k_c_strides[0] + hk * p.k_c_strides[1];  // rows of E
  const C* vc = static_cast<const C*>(p.v_c) + b * p.v_c_strides[0] + hk * p.v_c_strides[1];  // rows of Ev
  const int64_t kc_ld = p.k_c_strides[2];
  // Row i of head h of Q, dO and O (strided: Hugging Face's layout), and
  // their first query block asked for while the scratch below is cleared.
  const auto q_row = [&](int64_t h, int64_t i) { return key_row<T>(p.q, p.q_strides, b, h, i); };
  const auto go_row = [&](int64_t h, int64_t i) { return key_row<T>(p.grad_out, p.grad_out_strides, b, h, i); };
  const auto o_row = [&](int64_t h, int64_t i) { return key_row<T>(p.out, p.out_strides, b, h, i); };
  const auto prefetch_query_row = [&](int64_t h, int64_t i) {
    prefetch_bytes(q_row(h, i), E * static_cast<int64_t>(sizeof(T)));
    prefetch_bytes(go_row(h, i), Ev * static_cast<int64_t>(sizeof(T)));
    prefetch_bytes(o_row(h, i), Ev * static_cast<int64_t>(sizeof(T)));
  };
  for (int64_t i = 0; i < std::min(kBlockQ, p.L); ++i) prefetch_query_row(hk * group, i);
  const int64_t key_blocks = (S + kBlockK - 1) / kBlockK;
  const auto kt = filled(0, C(0), key_blocks * kBlockK * E), vt = filled(0, C(0), key_blocks * kBlockK * Ev);
  transpose_key_blocks(kc, kc_ld, S, E, kt.get());
  transpose_key_blocks(vc, p.v_c_strides[2], S, Ev, vt.get());
  const auto dk = filled(S * E, C(0)), dv = filled(S * Ev, C(0));
  const auto qf = filled(kBlockQ * E, C(0)), dof = filled(kBlockQ * Ev, C(0)), d = filled(kBlockQ, C(0));
  const auto lse = filled(kBlockQ, C(0)), dq = filled(kBlockQ * E, C(0));
  const auto s = filled(kBlockQ * kBlockK, C(0)), dp = filled(kBlockQ * kBlockK, C(0));
  const auto cap_slope = filled(0, C(0), p.softcap > 0 ? kBlockQ * kBlockK : 0);  // shape_scores's
  const auto mask_bias = filled(0, C(0), kBlockK);  // a shared mask row over one block's keys
  const int64_t* ms = p.mask_strides;
  using V = at::vec::Vectorized<C>;
  const int64_t h_end = (hk + 1) * group;
  for (int64_t h = hk * group; h < h_end; ++h) {
    const int64_t row0 = (b * p.Hq + h) * p.L;  // first row of this head in lse
    const Band band{p, b, h};
    for (int64_t i0 = 0; i0 < p.L; i0 += kBlockQ) {
      const int64_t i1 = std::min(p.L, i0 + kBlockQ), bq = i1 - i0;
      const AlibiRows<C> alibi(p, band, bq, bq, [&](int64_t) { return h; }, [&](int64_t r) { return i0 + r; });
      load_rows(qf.get(), q_row(h, i0), bq, E, p.q_strides[2], static_cast<C>(p.scale));
      load_rows(dof.get(), go_row(h, i0), bq, Ev, p.grad_out_strides[2]);
      for (int64_t r = 0; r < bq; ++r) {  // D = rowsum(dO * O)
        d[r] = dot<C>(dof.get() + r * Ev, o_row(h, i0 + r), Ev);
        lse[r] = static_cast<const C*>(p.lse)[row0 + i0 + r];
      }
      // The next query block's rows of Q, dO and O, asked for a row at a time
      // in the first computed key block's softmax loop below: their strided rows
      // otherwise arrive one miss at a time (the loads above and D were ~25 %
      // of this function's own time on a MiniLM batch).
      const bool next_here = i1 < p.L;
      const int64_t next_h = next_here ? h : h + 1, next_i = next_here ? i1 : 0;
      const int64_t next_bq = next_h < h_end ? std::min(kBlockQ, p.L - next_i) : 0;
      const auto prefetch_next_row = [&](int64_t r) {
        if (r < next_bq) prefetch_query_row(next_h, next_i + r);
      };
      std::fill(dq.get(), dq.get() + bq * E, C(0));
      const auto [jlo, jhi] = band.key_range(i0, i1);
      // the forward's task over these positions: its rows (forward_task's `transposed`)
      const bool dot_scores = p.heads_per_task * bq < V::size();
      // One mask row for the whole query block, as in the forward: a bias
      // added with vector ops instead of a mask read per score (that read was
      // ~45 % of this function's own time on a padded MiniLM batch).
      const auto mask_row = [&](int64_t r) { return b * ms[0] + h * ms[1] + (i0 + r) * ms[2]; };
      const bool shared_mask_row =
          p.mask != nullptr && (ms[2] == 0 || bq == 1 || mask_rows_equal<T>(p, bq, jlo, jhi, mask_row));
      bool next_asked = false;
      for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockK) {
        const int64_t jn = std::min(kBlockK, jhi - j0);
        bool every_key_kept;  // by the shared mask row: nothing to add
        if (!block_carries_gradient<T>(p, band, shared_mask_row ? mask_row(0) : -1, i0, i1, j0, jn, mask_bias.get(),
                                       &every_key_kept))
          continue;
        const bool whole = band.whole(i0, i1, j0, j0 + jn);
        // P = exp(scores - lse), recomputed with the scores rounded as the
        // forward's were (so that P is the forward's: one key's exactly 1): by
        // dot products where its task had fewer rows than a vector, else by
        // gemm_acc, whose sums run in the order of the forward's K Q^T.
        if (dot_scores) {
          scores_by_dot(bq, jn, E, qf.get(), kc + j0 * kc_ld, kc_ld, s.get(), kBlockK);
        } else {
          gemm_acc(bq, jn, E, qf.get(), E, 1, kt.get() + j0 * E, kBlockK, s.get(), kBlockK,
                   false);
        }
        if (p.softcap > 0 || p.alibi_slopes != nullptr) {
          shape_scores(p, alibi, s.get(), bq, kBlockK, kBlockK, 1, j0, jn, cap_slope.get());
        }
        for (int64_t r = 0; r < bq; ++r) {
          if (!next_asked) prefetch_next_row(r);
          C* sr = s.get() + r * kBlockK;
          if (shared_mask_row) {
            for (int64_t jj = 0; jj < jn && !every_key_kept; jj += V::size()) {
              const int n = static_cast<int>(std::min<int64_t>(V::size(), jn - jj));
              (V::loadu(sr + jj, n) + V::loadu(mask_bias.get() + jj, n)).store(sr + jj, n);
            }
            if (!whole) band.apply_window(sr, i0 + r, j0, jn);
          } else if (!whole || p.mask != nullptr) {
            band.apply<T>(sr, i0 + r, j0, jn, whole);
          }
          if (std::isinf(lse[r])) {  // attends to nothing: no gradient
            std::fill(sr, sr + jn, C(0));
          } else {
            exp_shifted(sr, jn, lse[r]);
          }
        }
        next_asked = true;
        // With the dropout mask M (scaled by 1 / (1 - p); all ones without dropout):
        // dP = dO V^T;  dS = P * (dP * M - D);  dV += (P * M)^T dO;  dK += dS^T (Q scale);  dQ += dS K
        gemm_acc(bq, jn, Ev, dof.get(), Ev, 1, vt.get() + j0 * Ev, kBlockK, dp.get(), kBlockK,
                 false);
        if (p.dropout_p > 0) {
          for (int64_t r = 0; r < bq; ++r) {
            apply_dropout(p, dp.get() + r * kBlockK, b, h, i0 + r, j0, jn);  // dP * M
          }
        }
        for (int64_t r = 0; r < bq; ++r)
          for (int64_t jj = 0; jj < jn; ++jj) {
            C& x = dp[r * kBlockK + jj];
            x = s[r * kBlockK + jj] * (x - d[r]);
          }
        if (p.grad_mask != nullptr) {  // a float mask adds to the scores: its gradient is dS
          C* gm = static_cast<C*>(p.grad_mask) + (row0 + i0) * S + j0;
          for (int64_t r = 0; r < bq; ++r) {
            std::copy(dp.get() + r * kBlockK, dp.get() + r * kBlockK + jn, gm + r * S);
          }
        }
        if (p.softcap > 0) {  // through the softcap: dS * (1 - tanh²), the scaled scores' gradient
          for (int64_t r = 0; r < bq; ++r)
            for (int64_t jj = 0; jj < jn; ++jj) dp[r * kBlockK + jj] *= cap_slope[r * kBlockK + jj];
        }
        if (p.dropout_p > 0) {
          for (int64_t r = 0; r < bq; ++r) apply_dropout(p, s.get() + r * kBlockK, b, h, i0 + r, j0, jn);  // P * M
        }
        gemm_acc(jn, Ev, bq, s.get(), 1, kBlockK, dof.get(), Ev, dv.get() + j0 * Ev, Ev, true);
        gemm_acc(jn, E, bq, dp.get(), 1, kBlockK, qf.get(), E, dk.get() + j0 * E, E, true);
        gemm_acc(bq, E, jn, dp.get(), kBlockK, 1, kc + j0 * kc_ld, kc_ld, dq.get(), E, true);
      }
      store_rows(static_cast<T*>(p.grad_q), p.grad_q_strides, b, h, i0, bq, E, dq.get(), static_cast<C>(p.scale));
    }
  }
  store_rows(static_cast<T*>(p.grad_k), p.grad_k_strides, b, hk, 0, S, E, dk.get(), C(1));
  store_rows(static_cast<T*>(p.grad_v), p.grad_v_strides, b, hk, 0, S, Ev, dv.get(), C(1));
}

// The two layouts of a bf16/fp16 B operand for ATen's BLAS micro-kernel
// ("VNNI": the two elements of one 32-bit word are adjacent along K), from
// `rows` rows of `cols` elements, `ld` apart:
// - the rows themselves as B [K = rows][N = cols]: rows 2k and 2k + 1
//   interleaved, element (r, c) at dst[r / 2][c][r % 2]; rows past `rows` up
//   to rows_pad (even) are zeros;
template <typename T>
void interleave_row_pairs(const T* src, int64_t ld, int64_t rows, int64_t rows_pad, int64_t cols, T* dst) {
  static_assert(sizeof(T) == sizeof(uint16_t));
  for (int64_t r = 0; r < rows_pad; r += 2) {
    const uint16_t* r0 = r < rows ? reinterpret_cast<const uint16_t*>(src + r * ld) : nullptr;
    const uint16_t* r1 = r + 1 < rows ? reinterpret_cast<const uint16_t*>(src + (r + 1) * ld) : nullptr;
    uint32_t* out = reinterpret_cast<uint32_t*>(dst) + (r / 2) * cols;
    if (r0 && r1) {
      for (int64_t c = 0; c < cols; ++c) out[c] = uint32_t{r0[c]} | uint32_t{r1[c]} << 16;
    } else {
      for (int64_t c = 0; c < cols; ++c) out[c] = r0 ? uint32_t{r0[c]} : 0u;
    }
  }
}

// - their transpose as B [K = cols][N = rows_pad] (cols even): word w of row
//   r (its elements 2w, 2w + 1) at dst word [w][r], a transpose of 32-bit
//   words (moved as floats by at::vec, never computed on), 16 x 16 at a time
//   where the rows are whole words apart; columns past `rows` are zeros.
template <typename T>
void transpose_row_words(const T* src, int64_t ld, int64_t rows, int64_t rows_pad, int64_t cols, T* dst) {
  static_assert(sizeof(T) == sizeof(uint16_t));
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);  // [cols / 2][rows_pad] words
  const int64_t words = cols / 2, ld_words = ld / 2;
  int64_t r_done = 0;
  if (ld % 2 == 0) {
    for (; r_done + 16 <= rows; r_done += 16)
      for (int64_t w = 0; w + 16 <= words; w += 16)
        at::vec::transpose_mxn<float, 16, 16>(reinterpret_cast<const float*>(src + r_done * ld) + w, ld_words,
                                              reinterpret_cast<float*>(out + w * rows_pad + r_done), rows_pad);
  }
  const int64_t w_done = r_done > 0 ? words / 16 * 16 : 0;  // words [0, w_done) of rows [0, r_done) are in
  for (int64_t w = 0; w < words; ++w) {
    uint32_t* dst_w = out + w * rows_pad;
    for (int64_t r = w < w_done ? r_done : 0; r < rows; ++r) std::memcpy(dst_w + r, src + r * ld + 2 * w, 4);
    std::fill(dst_w + rows, dst_w + rows_pad, 0u);
  }
}

// Key block `block` of key head hk of batch b into k_vnni (K^T) and v_vnni
// (V), as the forward's B operands; keys past S are zeros.
template <typename T>
void pack_key_block(const AttentionCpuParams& p, int64_t b, int64_t hk, int64_t block) {
  const int64_t kKeys = p.vnni_keys;
  const int64_t E = p.E, Ev = p.Ev, j0 = block * kKeys, jn = std::min(kKeys, p.S - j0);
  const int64_t first = (b * p.Hkv + hk) * ((p.S + kKeys - 1) / kKeys) + block;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1] + j0 * p.k_strides[2];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1] + j0 * p.v_strides[2];
  transpose_row_words(k, p.k_strides[2], jn, kKeys, E, static_cast<T*>(p.k_vnni) + first * E * kKeys);
  interleave_row_pairs(v, p.v_strides[2], jn, kKeys, Ev, static_cast<T*>(p.v_vnni) + first * kKeys * Ev);
}

// The bf16 backward on ATen's BLAS micro-kernel (AMX or AVX512-BF16;
// AttentionCpuParams::packed_backward): the five products with bf16 operands and float sums, P
// and dS rounded to bf16 for theirs, as SDPA's kernel does. A block is laid
// out keys by queries (S^T = K Q^T), so that K and V are read in place as A
// operands, the softmax needs no reduction (lse and D are per column), and
// P^T and dS^T are the A operands of dV and dK as they are; dQ^T = K^T dS^T
// takes dS^T's rows in pairs. The same arithmetic as backward_head, with
// neither dropout nor a mask gradient (the op sends those there).
template <typename T>
void backward_head_packed(const AttentionCpuParams& p, int64_t b, int64_t hk) {
  using C = float;
  using V = at::vec::Vectorized<C>;
  constexpr int64_t W = V::size();
  constexpr C kNegInf = -std::numeric_limits<C>::infinity();
  const int64_t group = p.Hq / p.Hkv, E = p.E, Ev = p.Ev, S = p.S;
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + hk * p.k_strides[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_strides[0] + hk * p.v_strides[1];
  const int64_t k_ld = p.k_strides[2], v_ld = p.v_strides[2];
  // K^T [E][s_pad] (the A operand of dQ^T), zeros past S
  const int64_t s_pad = (S + 1) / 2 * 2;
  const auto kt = filled(0, T(0), E * s_pad);
  transpose_rows(k, k_ld, S, E, kt.get(), s_pad);
  for (int64_t e = 0; e < E && s_pad > S; ++e) kt[e * s_pad + S] = T(0);
  const auto dk = filled(S * E, C(0)), dv = filled(S * Ev, C(0));
  // Per query block (bq rows, ld = bq rounded up to even): Q and dO as the
  // B operands of S^T and dP^T (transposed) and of dK and dV (row pairs).
  const int64_t ld_max = (kBlockQ + 1) / 2 * 2;
  const auto qt_vnni = filled(0, T(0), E * ld_max), q_vnni = filled(0, T(0), ld_max * E);
  const auto dot_vnni = filled(0, T(0), Ev * ld_max), do_vnni = filled(0, T(0), ld_max * Ev);
  const auto d = filled(0, C(0), ld_max), neg_lse = filled(0, C(0), ld_max);
  const auto dqt = filled(0, C(0), E * ld_max);
  // Per key block (keys by queries): the scores, then P (float, and bf16
  // for dV), dP, and dS (bf16, as rows for dK and row pairs for dQ^T).
  const int64_t jn_max = (kBlockK + 1) / 2 * 2;
  const auto st = filled(0, C(0), kBlockK * ld_max), dpt = filled(0, C(0), kBlockK * ld_max);
  const auto pt = filled(0, T(0), kBlockK * ld_max), ds_rows = filled(0, T(0), jn_max * ld_max);
  const auto ds_vnni = filled(0, T(0), jn_max * ld_max);
  const auto mask_bias = filled(0, C(0), kBlockK);
  const int64_t* ms = p.mask_strides;
  const C scale = static_cast<C>(p.scale);
  // softcap or ALiBi: the scores scaled and shaped (shape_scores) before the mask
  const bool shaped = p.softcap > 0 || p.alibi_slopes != nullptr;
  const auto cap_slope = filled(0, C(0), p.softcap > 0 ? kBlockK * ld_max : 0);
  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t row0 = (b * p.Hq + h) * p.L;  // first row of this head in lse
    const Band band{p, b, h};
    for (int64_t i0 = 0; i0 < p.L; i0 += kBlockQ) {
      const int64_t i1 = std::min(p.L, i0 + kBlockQ), bq = i1 - i0, ld = (bq + 1) / 2 * 2;
      const AlibiRows<C> alibi(p, band, bq, ld, [&](int64_t) { return h; }, [&](int64_t r) { return i0 + r; });
      const T* q = key_row<T>(p.q, p.q_strides, b, h, i0);
      const T* go = key_row<T>(p.grad_out, p.grad_out_strides, b, h, i0);
      transpose_row_words(q, p.q_strides[2], bq, ld, E, qt_vnni.get());
      interleave_row_pairs(q, p.q_strides[2], bq, ld, E, q_vnni.get());
      transpose_row_words(go, p.grad_out_strides[2], bq, ld, Ev, dot_vnni.get());
      interleave_row_pairs(go, p.grad_out_strides[2], bq, ld, Ev, do_vnni.get());
      for (int64_t r = 0; r < ld; ++r) {  // D = rowsum(dO * O); -lse, -inf where no gradient flows
        const C lse = r < bq ? static_cast<const C*>(p.lse)[row0 + i0 + r] : kNegInf;
        neg_lse[r] = std::isinf(lse) ? kNegInf : -lse;
        d[r] = 0;
        if (r < bq) d[r] = dot<C>(go + r * p.grad_out_strides[2], key_row<T>(p.out, p.out_strides, b, h, i0 + r), Ev);
      }
      std::fill(dqt.get(), dqt.get() + E * ld, C(0));
      const auto [jlo, jhi] = band.key_range(i0, i1);
      const auto mask_row = [&](int64_t r) { return b * ms[0] + h * ms[1] + (i0 + r) * ms[2]; };
      const bool shared_mask_row =
          p.mask != nullptr && (ms[2] == 0 || bq == 1 || mask_rows_equal<T>(p, bq, jlo, jhi, mask_row));
      for (int64_t j0 = jlo; j0 < jhi; j0 += kBlockK) {
        const int64_t jn = std::min(kBlockK, jhi - j0), jn_pad = (jn + 1) / 2 * 2;
        bool every_key_kept;  // by the shared mask row (or without one)
        if (!block_carries_gradient<T>(p, band, shared_mask_row ? mask_row(0) : -1, i0, i1, j0, jn, mask_bias.get(),
                                       &every_key_kept))
          continue;
        // Scores, each element's mask and window applied to it where they
        // vary within the block (then scaled here, not in the exp's pass).
        brgemm_vnni(jn, ld, E, k + j0 * k_ld, k_ld, qt_vnni.get(), st.get(), ld, false);
        if (shaped) shape_scores(p, alibi, st.get(), bq, ld, 1, ld, j0, jn, cap_slope.get(), scale);
        const C score_scale = shaped ? C(1) : scale;  // what the scores still need
        const bool per_element = !band.whole(i0, i1, j0, j0 + jn) || (p.mask != nullptr && !shared_mask_row);
        for (int64_t jj = 0; jj < jn && per_element; ++jj) {
          C* row = st.get() + jj * ld;
          for (int64_t r = 0; r < bq; ++r) {
            C x = row[r] * score_scale;
            if (!band.allowed(i0 + r, j0 + jj)) {
              x = kNegInf;
            } else if (shared_mask_row) {
              x += mask_bias[jj];
            } else if (p.mask != nullptr) {
              const int64_t at = mask_row(r) + (j0 + jj) * ms[3];
              if (p.mask_is_bool) {
                if (!static_cast<const bool*>(p.mask)[at]) x = kNegInf;
              } else {
                x += static_cast<C>(static_cast<const T*>(p.mask)[at]);
              }
            }
            row[r] = x;
          }
        }
        // P = exp(scores - lse), float in st and rounded in pt.
        const V row_scale(per_element ? C(1) : score_scale);
        for (int64_t jj = 0; jj < jn; ++jj) {
          C* row = st.get() + jj * ld;
          const V bias(per_element || every_key_kept ? C(0) : mask_bias[jj]);
          for (int64_t r = 0; r < ld; r += W) {
            const int n = static_cast<int>(std::min(W, ld - r));
            const V e = MathOps<V>::exp(at::vec::fmadd(V::loadu(row + r, n), row_scale, bias) +
                                        V::loadu(neg_lse.get() + r, n));
            e.store(row + r, n);
            at::vec::convert_from_float<T>(e, e).store(pt.get() + jj * ld + r, n);
          }
        }
        // dP^T = V dO^T;  dS = P * (dP - D), rounded
        brgemm_vnni(jn, ld, Ev, v + j0 * v_ld, v_ld, dot_vnni.get(), dpt.get(), ld, false);
        for (int64_t jj = 0; jj < jn; ++jj) {
          const C* pr = st.get() + jj * ld;
          const C* dpr = dpt.get() + jj * ld;
          for (int64_t r = 0; r < ld; r += W) {
            const int n = static_cast<int>(std::min(W, ld - r));
            V ds = V::loadu(pr + r, n) * (V::loadu(dpr + r, n) - V::loadu(d.get() + r, n));
            if (p.softcap > 0) ds = ds * V::loadu(cap_slope.get() + jj * ld + r, n);  // through the softcap
            at::vec::convert_from_float<T>(ds, ds).store(ds_rows.get() + jj * ld + r, n);
          }
        }
        interleave_row_pairs(ds_rows.get(), ld, jn, jn_pad, ld, ds_vnni.get());
        // dV += P^T dO;  dK += dS^T Q (scaled at the end);  dQ^T += K^T dS^T
        brgemm_vnni(jn, Ev, ld, pt.get(), ld, do_vnni.get(), dv.get() + j0 * Ev, Ev, true);
        brgemm_vnni(jn, E, ld, ds_rows.get(), ld, q_vnni.get(), dk.get() + j0 * E, E, true);
        brgemm_vnni(E, ld, jn_pad, kt.get() + j0, s_pad, ds_vnni.get(), dqt.get(), ld, true);
      }
      for (int64_t r = 0; r < bq; ++r) {
        T* out = static_cast<T*>(p.grad_q) + b * p.grad_q_strides[0] + h * p.grad_q_strides[1] +
                 (i0 + r) * p.grad_q_strides[2];
        for (int64_t e = 0; e < E; ++e) out[e] = static_cast<T>(dqt[e * ld + r] * scale);
      }
    }
  }
  at::native::cpublas::brgemm_release();
  store_rows(static_cast<T*>(p.grad_k), p.grad_k_strides, b, hk, 0, S, E, dk.get(), scale);
  store_rows(static_cast<T*>(p.grad_v), p.grad_v_strides, b, hk, 0, S, Ev, dv.get(), C(1));
}

void forward_task_any(const AttentionCpuParams& p, const AttentionForwardTask& task) {
  dispatch_storage_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    forward_task<T, typename VecIO<T>::C>(p, task);
  });
}

void pack_key_block_any(const AttentionCpuParams& p, int64_t b, int64_t hk, int64_t block) {
  TORCH_INTERNAL_ASSERT(p.dtype == at::kBFloat16 || p.dtype == at::kHalf, "pack_key_block: bf16 and fp16 only");
  if (p.dtype == at::kBFloat16) return pack_key_block<c10::BFloat16>(p, b, hk, block);
  pack_key_block<c10::Half>(p, b, hk, block);
}

void backward_head_any(const AttentionCpuParams& p, int64_t b, int64_t hk) {
  if (p.packed_backward) {
    TORCH_INTERNAL_ASSERT(p.dtype == at::kBFloat16, "backward_head_packed: bf16 only");
    return backward_head_packed<c10::BFloat16>(p, b, hk);
  }
  dispatch_storage_type(p.dtype, [&](auto t) {
    using T = decltype(t);
    backward_head<T, typename VecIO<T>::C>(p, b, hk);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

extern const AttentionCpuKernels BK_CAPABILITY_NAME(attention_cpu_kernels) = {
    &CPU_CAPABILITY::forward_task_any,
    &CPU_CAPABILITY::pack_key_block_any,
    &CPU_CAPABILITY::backward_head_any,
};

}  // namespace bigkernels
