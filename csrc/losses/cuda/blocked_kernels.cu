// linear + cross-entropy the way of Cut Cross-Entropy (Wijmans et al., 2024):
// the logits made a tile at a time, never a row's whole logits
// (launchers.h: BlockedCrossEntropy says what each pass reads and writes).
//
// A tile is kBlockedRows (64) rows of x by kBlockedCols (128) rows of the
// weight, 256 threads. Its product, the logits, is made by a Tile policy:
//  - MmaTile (fp16, bf16): mma.sync.m16n8k16 with ldmatrix, fp32 accumulate,
//    three cp.async stages of 32 along D (the dense forward's main loop,
//    dense_forward_mma.cuh); 8 warps as 2 x 4, each 32 x 32.
//  - SimtTile (fp32, fp64): FMA in the compute type, 4 x 8 per thread.
// and lands in shared memory (S, in the compute type), where one epilogue,
// 4 threads per row, turns it into the row's running statistics (the
// statistics pass) or into G = dloss/dz (the gradient pass). The gradient
// pass then multiplies G by slices of D of the weight's and x's rows (again
// the Tile's products: dX += G W, dW += G^T X) and adds them into the
// compute-type buffers with atomics, as CCE does; the bias's are G's column
// sums. Keeping one row's dX in a block instead (no atomics, deterministic)
// needs the row's logits made once per slice of D, or a [64 x D] fp32
// accumulator: 1 MB at D 4096.
//
// Distillation (BlockedDistillation) runs the same tiles, each making the
// teacher's logits and then the student's, in three passes: statistics,
// the divergence's sums, gradients (the student's products only).
//
// Never run on a GPU: tested under tests/cuda_emulation/losses/.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cuda_dtype.cuh"
#include "common/ptx_sm80.cuh"
#include "dense/cuda/dense_forward_common.cuh"  // load_chunk, aligned16
#include "losses/cuda/launchers.h"
#include "losses/cuda/loss_math.cuh"

namespace bigkernels {
namespace cuda {
namespace {

constexpr int kBM = kBlockedRows, kBN = kBlockedCols, kThreads = 256;
constexpr int kPartsPerRow = kThreads / kBM;  // the epilogue's threads per row
constexpr int kSPitch = kBN + 4;               // S's rows, in elements

constexpr int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

// One product's operands: x [N, D] and w [V, D] (rows D apart); vec: the
// 16-byte copies apply (D a multiple of 16 bytes, both 16-byte aligned). The
// gradient pass's products add into grad_x and grad_w (null: not wanted).
struct Operands {
  const void* x;
  const void* w;
  int64_t N, D, V;
  bool vec;
  void* grad_x;
  void* grad_w;
};

template <typename T>
Operands operands(const void* x, const void* w, int64_t N, int64_t D, int64_t V, void* grad_x, void* grad_w) {
  const bool vec = D % (16 / sizeof(T)) == 0 && aligned16(x) && aligned16(w);
  return {x, w, N, D, V, vec, grad_x, grad_w};
}

// Adds a warp's mma.sync accumulators (MT x NT tiles of 16 x 8, its rows
// row0.., columns col0..; fragment layout in ptx_sm80.cuh) into out
// [rows, cols] with atomics, what lies inside it.
template <int MT, int NT>
__device__ __forceinline__ void add_fragments(float* out, const float (&acc)[MT][NT][4], int64_t row0, int64_t col0,
                                              int64_t rows, int64_t cols) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = row0 + mt * 16 + g + 8 * (i / 2), col = col0 + nt * 8 + 2 * t + i % 2;
        if (row < rows && col < cols) atomicAdd(out + row * cols + col, acc[mt][nt][i]);
      }
}

// fp16 / bf16 on the tensor cores. Shared memory: G [kBM][kGPitch] in T,
// then the work area: the main loop's stages, then S [kBM][kSPitch] in fp32
// over them, then the products' slices of D.
template <typename T>
struct MmaTile {
  using Logit = float;  // S's type
  using Grad = T;       // G's type: the products' A operand
  static constexpr int kBK = 32, kStages = 3, kPitch = kBK + 8;  // 80-byte rows: conflict-free ldmatrix
  static constexpr int kStageElems = (kBM + kBN) * kPitch;
  static constexpr int kBD = 64, kSlicePitch = kBD + 8;  // the products' slices of D
  static constexpr int kGPitch = kBN + 8;
  static constexpr int kGBytes = kBM * kGPitch * 2;
  static constexpr int kWorkBytes = max3(kStages * kStageElems * 2, kBM * kSPitch * 4, (kBN + kBM) * kSlicePitch * 2);
  static constexpr int kSmemBytes = kGBytes + kWorkBytes;

  __device__ static Grad* g_tile(unsigned char* smem) { return reinterpret_cast<T*>(smem); }
  __device__ static Logit* s_tile(unsigned char* smem) { return reinterpret_cast<float*>(smem + kGBytes); }

  // S = x[m0 .. m0 + kBM) w[n0 .. n0 + kBN)^T (rows past N or V: zeros).
  __device__ static void logits(const Operands& p, int64_t m0, int64_t n0, unsigned char* smem) {
    const bool vec = p.vec;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    T* stages = reinterpret_cast<T*>(smem + kGBytes);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps, each 32 x 32
    // Each thread copies 16 bytes of one x row and of two weight rows per k-step.
    const int r = tid / 4, chunk_k = (tid % 4) * 8;
    const T* x = static_cast<const T*>(p.x);
    const T* w = static_cast<const T*>(p.w);
    const T* x_row = m0 + r < p.N ? x + (m0 + r) * p.D : nullptr;
    const T* w_rows[2] = {n0 + r < p.V ? w + (n0 + r) * p.D : nullptr,
                          n0 + r + 64 < p.V ? w + (n0 + r + 64) * p.D : nullptr};
    auto load_stage = [&](int stage, int64_t k0) {
      T* as = stages + stage * kStageElems;
      T* bs = as + kBM * kPitch;
      load_chunk(as + r * kPitch + chunk_k, x_row, k0 + chunk_k, p.D, vec);
      load_chunk(bs + r * kPitch + chunk_k, w_rows[0], k0 + chunk_k, p.D, vec);
      load_chunk(bs + (r + 64) * kPitch + chunk_k, w_rows[1], k0 + chunk_k, p.D, vec);
    };
    // ldmatrix.x4 row addresses, as the dense forward's (dense_forward_mma.cuh)
    const int a_row = lane % 8 + 8 * ((lane / 8) % 2), a_k = 8 * (lane / 16);
    const int b_row = lane % 8 + 8 * (lane / 16), b_k = 8 * ((lane / 8) % 2);
    float acc[2][4][4] = {};
    const int64_t k_tiles = (p.D + kBK - 1) / kBK;
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < k_tiles) load_stage(s, s * kBK);
      __pipeline_commit();
    }
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      __pipeline_wait_prior(kStages - 2);
      __syncthreads();  // k-tile kt has landed, and every warp is done with kt - 1
      const int64_t next = kt + kStages - 1;
      if (next < k_tiles) load_stage(next % kStages, next * kBK);
      __pipeline_commit();
      const T* as = stages + (kt % kStages) * kStageElems + (warp_m * 32) * kPitch;
      const T* bs = stages + (kt % kStages) * kStageElems + (kBM + warp_n * 32) * kPitch;
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        uint32_t a[2][4], b[4][2];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ldmatrix<4, false>(a[mt], as + (mt * 16 + a_row) * kPitch + kk + a_k);
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t q[4];
          ldmatrix<4, false>(q, bs + (np * 16 + b_row) * kPitch + kk + b_k);
          b[2 * np][0] = q[0], b[2 * np][1] = q[1], b[2 * np + 1][0] = q[2], b[2 * np + 1][1] = q[3];
        }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) mma_m16n8k16<T>(acc[mt][nt], a[mt], b[nt]);
      }
    }
    __pipeline_wait_prior(0);
    __syncthreads();  // every warp is done with the stages: S goes over them
    float* S = s_tile(smem);
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = warp_m * 32 + mt * 16 + g + 8 * (i / 2), col = warp_n * 32 + nt * 8 + 2 * t + i % 2;
          S[row * kSPitch + col] = acc[mt][nt][i];
        }
    __syncthreads();
#endif
  }

  // dX[m0.., :] += G w[n0.., :] and dW[n0.., :] += G^T x[m0.., :], kBD of D at a time.
  __device__ static void products(const Operands& p, int64_t m0, int64_t n0, unsigned char* smem) {
    const bool vec = p.vec;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const T* G = g_tile(smem);
    T* ws = reinterpret_cast<T*>(smem + kGBytes);  // [kBN][kSlicePitch]: w's rows n0.., columns d0..
    T* xs = ws + kBN * kSlicePitch;                 // [kBM][kSlicePitch]: x's rows m0..
    const T* x = static_cast<const T*>(p.x);
    const T* w = static_cast<const T*>(p.w);
    float* gx = static_cast<float*>(p.grad_x);
    float* gw = static_cast<float*>(p.grad_w);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    // ldmatrix.x4 row addresses: A from G [m][k] as is; A from G^T and B from a slice [k][n], .trans
    const int a_row = lane % 8 + 8 * ((lane / 8) % 2), a_k = 8 * (lane / 16);
    const int at_k = lane % 8 + 8 * (lane / 16), at_m = 8 * ((lane / 8) % 2);
    const int bt_k = lane % 8 + 8 * ((lane / 8) % 2), bt_n = 8 * (lane / 16);
    constexpr int kChunks = kBD / 8;  // 16-byte copies per row of a slice
    for (int64_t d0 = 0; d0 < p.D; d0 += kBD) {
      for (int i = tid; i < kBN * kChunks; i += kThreads) {
        const int r = i / kChunks, c = (i % kChunks) * 8;
        load_chunk(ws + r * kSlicePitch + c, n0 + r < p.V ? w + (n0 + r) * p.D : nullptr, d0 + c, p.D, vec);
      }
      for (int i = tid; i < kBM * kChunks; i += kThreads) {
        const int r = i / kChunks, c = (i % kChunks) * 8;
        load_chunk(xs + r * kSlicePitch + c, m0 + r < p.N ? x + (m0 + r) * p.D : nullptr, d0 + c, p.D, vec);
      }
      __pipeline_commit();
      __pipeline_wait_prior(0);
      __syncthreads();
      if (gx != nullptr) {  // [kBM x kBD] += G [kBM x kBN] ws [kBN x kBD]: 2 x 4 warps, each 32 x 16
        const int wm = warp / 4, wn = warp % 4;
        float acc[2][2][4] = {};
#pragma unroll
        for (int kk = 0; kk < kBN; kk += 16) {
          uint32_t a[2][4], q[4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) ldmatrix<4, false>(a[mt], G + (wm * 32 + mt * 16 + a_row) * kGPitch + kk + a_k);
          ldmatrix<4, true>(q, ws + (kk + bt_k) * kSlicePitch + wn * 16 + bt_n);
          const uint32_t b[2][2] = {{q[0], q[1]}, {q[2], q[3]}};
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) mma_m16n8k16<T>(acc[mt][nt], a[mt], b[nt]);
        }
        add_fragments(gx, acc, m0 + wm * 32, d0 + wn * 16, p.N, p.D);
      }
      if (gw != nullptr) {  // [kBN x kBD] += G^T [kBN x kBM] xs [kBM x kBD]: 4 x 2 warps, each 32 x 32
        const int wm = warp / 2, wn = warp % 2;
        float acc[2][4][4] = {};
#pragma unroll
        for (int kk = 0; kk < kBM; kk += 16) {
          uint32_t a[2][4], b[4][2];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) ldmatrix<4, true>(a[mt], G + (kk + at_k) * kGPitch + wm * 32 + mt * 16 + at_m);
#pragma unroll
          for (int np = 0; np < 2; ++np) {
            uint32_t q[4];
            ldmatrix<4, true>(q, xs + (kk + bt_k) * kSlicePitch + wn * 32 + np * 16 + bt_n);
            b[2 * np][0] = q[0], b[2 * np][1] = q[1], b[2 * np + 1][0] = q[2], b[2 * np + 1][1] = q[3];
          }
#pragma unroll
          for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) mma_m16n8k16<T>(acc[mt][nt], a[mt], b[nt]);
        }
        add_fragments(gw, acc, n0 + wm * 32, d0 + wn * 32, p.V, p.D);
      }
      __syncthreads();  // every warp is done with the slices before the next ones land
    }
#endif
  }
};

// fp32 / fp64 on the FMA units, in the compute type. Shared memory: S, which
// G then overwrites in place (same type), [kBM][kSPitch], then the work
// area: the main loop's k-major tiles, or the products' slices of D.
template <typename T>
struct SimtTile {
  using Logit = T;
  using Grad = T;
  static constexpr int kBK = 16, kXPitch = kBM + 4, kWPitch = kBN + 4;  // k-major: [kBK][m], [kBK][n]
  static constexpr int kBD = 16, kSlicePitch = kBD + 1;
  static constexpr int kGPitch = kSPitch;
  static constexpr int kSBytes = kBM * kSPitch * static_cast<int>(sizeof(T));
  static constexpr int kWorkBytes =
      max3(kBK * (kXPitch + kWPitch), (kBN + kBM) * kSlicePitch, 0) * static_cast<int>(sizeof(T));
  static constexpr int kSmemBytes = kSBytes + kWorkBytes;

  __device__ static Grad* g_tile(unsigned char* smem) { return reinterpret_cast<T*>(smem); }
  __device__ static Logit* s_tile(unsigned char* smem) { return reinterpret_cast<T*>(smem); }

  __device__ static void logits(const Operands& p, int64_t m0, int64_t n0, unsigned char* smem) {
    T* xs = reinterpret_cast<T*>(smem + kSBytes);
    T* ws = xs + kBK * kXPitch;
    const T* x = static_cast<const T*>(p.x);
    const T* w = static_cast<const T*>(p.w);
    const int tid = threadIdx.x, tm = tid / 16, tn = tid % 16;  // rows 4 tm.., columns tn + 16 j
    T acc[4][8] = {};
    for (int64_t k0 = 0; k0 < p.D; k0 += kBK) {
      for (int i = tid; i < kBM * kBK; i += kThreads) {
        const int r = i / kBK, k = i % kBK;
        xs[k * kXPitch + r] = m0 + r < p.N && k0 + k < p.D ? x[(m0 + r) * p.D + k0 + k] : T(0);
      }
      for (int i = tid; i < kBN * kBK; i += kThreads) {
        const int r = i / kBK, k = i % kBK;
        ws[k * kWPitch + r] = n0 + r < p.V && k0 + k < p.D ? w[(n0 + r) * p.D + k0 + k] : T(0);
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        T a[4], b[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[k * kXPitch + tm * 4 + i];
#pragma unroll
        for (int j = 0; j < 8; ++j) b[j] = ws[k * kWPitch + tn + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
      }
      __syncthreads();  // every thread is done with this k-step's tiles
    }
    T* S = s_tile(smem);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) S[(tm * 4 + i) * kSPitch + tn + 16 * j] = acc[i][j];
    __syncthreads();
  }

  __device__ static void products(const Operands& p, int64_t m0, int64_t n0, unsigned char* smem) {
    const T* G = g_tile(smem);
    T* ws = reinterpret_cast<T*>(smem + kSBytes);  // [kBN][kSlicePitch]
    T* xs = ws + kBN * kSlicePitch;                 // [kBM][kSlicePitch]
    const T* x = static_cast<const T*>(p.x);
    const T* w = static_cast<const T*>(p.w);
    T* gx = static_cast<T*>(p.grad_x);
    T* gw = static_cast<T*>(p.grad_w);
    const int tid = threadIdx.x;
    for (int64_t d0 = 0; d0 < p.D; d0 += kBD) {
      for (int i = tid; i < kBN * kBD; i += kThreads) {
        const int r = i / kBD, c = i % kBD;
        ws[r * kSlicePitch + c] = n0 + r < p.V && d0 + c < p.D ? w[(n0 + r) * p.D + d0 + c] : T(0);
      }
      for (int i = tid; i < kBM * kBD; i += kThreads) {
        const int r = i / kBD, c = i % kBD;
        xs[r * kSlicePitch + c] = m0 + r < p.N && d0 + c < p.D ? x[(m0 + r) * p.D + d0 + c] : T(0);
      }
      __syncthreads();
      if (gx != nullptr) {  // row r, columns tid % 4 + 4 j
        const int r = tid / 4;
        T acc[4] = {};
        for (int k = 0; k < kBN; ++k) {
          const T gk = G[r * kGPitch + k];
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[j] += gk * ws[k * kSlicePitch + tid % 4 + 4 * j];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int64_t row = m0 + r, col = d0 + tid % 4 + 4 * j;
          if (row < p.N && col < p.D) atomicAdd(gx + row * p.D + col, acc[j]);
        }
      }
      if (gw != nullptr) {  // vocabulary row v, columns tid % 2 + 2 j
        const int v = tid / 2;
        T acc[8] = {};
        for (int k = 0; k < kBM; ++k) {
          const T gk = G[k * kGPitch + v];
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[j] += gk * xs[k * kSlicePitch + tid % 2 + 2 * j];
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int64_t row = n0 + v, col = d0 + tid % 2 + 2 * j;
          if (row < p.V && col < p.D) atomicAdd(gw + row * p.D + col, acc[j]);
        }
      }
      __syncthreads();  // every thread is done with the slices before the next ones land
    }
  }
};

template <typename T>
using TileFor = std::conditional_t<std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, MmaTile<T>,
                                   SimtTile<T>>;

// sum exp(factor (z - m)) over some z, as a sum over the same z of exp(factor (z - top)), top >= m.
template <typename C>
__device__ __forceinline__ C rescaled(C sum, C m, C top, C factor) {
  return m == -INFINITY ? C(0) : sum * acc_exp((m - top) * factor);
}

// (m, s) <- the statistics of both halves: max, and the sum of exp(factor (z - max)).
template <typename C>
__device__ __forceinline__ void merge(C& m, C& s, C m2, C s2, C factor = C(1)) {
  const C top = nan_max(m, m2);
  if (top == -INFINITY) return;  // both empty
  s = rescaled(s, m, top, factor) + rescaled(s2, m2, top, factor);
  m = top;
}

// The vocabulary tiles [first, last) of the statistics passes' split blockIdx.y.
struct SplitTiles {
  int64_t first, last;
  __device__ SplitTiles(int64_t V, int64_t splits) {
    const int64_t tiles = (V + kBN - 1) / kBN, per_split = (tiles + splits - 1) / splits;
    first = blockIdx.y * per_split;
    last = first + per_split < tiles ? first + per_split : tiles;
  }
};

// grad_b[n0 + c] += column c of G (the bias's gradient; null: not wanted).
template <typename Tile, typename C>
__device__ __forceinline__ void add_column_sums(const typename Tile::Grad* G, int64_t n0, int64_t V, C* grad_b) {
  if (grad_b == nullptr) return;
  for (int c = threadIdx.x; c < kBN && n0 + c < V; c += kThreads) {
    C sum = 0;
    for (int i = 0; i < kBM; ++i) sum += to_acc(G[i * Tile::kGPitch + c]);
    atomicAdd(grad_b + n0 + c, sum);
  }
}

template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads) blocked_statistics_kernel(BlockedCrossEntropy p, Operands o, Operands) {
  using C = acc_t<T>;
  unsigned char* smem = dynamic_smem();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const SplitTiles split(p.V, p.splits);
  const int r = threadIdx.x / kPartsPerRow, part = threadIdx.x % kPartsPerRow;
  const int64_t row = m0 + r;
  const int64_t target = row < p.N ? p.target[row] : -1;
  const T* bias = static_cast<const T*>(p.bias);
  const Softcap<C> cap(p.softcap);
  C m = -INFINITY, s = 0, z_sum = 0;  // this thread's columns': max, sum exp(z - m), sum z
  for (int64_t tile = split.first; tile < split.last; ++tile) {
    const int64_t n0 = tile * kBN;
    Tile::logits(o, m0, n0, smem);
    const auto* S = Tile::s_tile(smem);
    for (int c = part; c < kBN && n0 + c < p.V; c += kPartsPerRow) {
      const int64_t col = n0 + c;
      const C z = cap(static_cast<C>(S[r * kSPitch + c]) + (bias != nullptr ? to_acc(bias[col]) : C(0)));
      if (z > m) {
        s = (m == -INFINITY ? C(0) : s * acc_exp(m - z)) + 1;
        m = z;
      } else {
        s += acc_exp(z - m);  // NaN z: s becomes NaN, as the loss should
      }
      z_sum += z;
      if (col == target) static_cast<C*>(p.target_logit)[row] = z;  // one thread, in one block, sees it
    }
    __syncthreads();  // S is read before the next tile's product overwrites it
  }
  // the row's kPartsPerRow threads are neighbouring lanes
#pragma unroll
  for (int mask = 1; mask < kPartsPerRow; mask *= 2) {
    const C m2 = __shfl_xor_sync(0xffffffffu, m, mask), s2 = __shfl_xor_sync(0xffffffffu, s, mask);
    z_sum += __shfl_xor_sync(0xffffffffu, z_sum, mask);
    merge(m, s, m2, s2);
  }
  if (part == 0 && row < p.N) {
    const int64_t at = blockIdx.y * p.N + row;
    static_cast<C*>(p.part_max)[at] = m;
    static_cast<C*>(p.part_sum)[at] = s;
    static_cast<C*>(p.part_logit_sum)[at] = z_sum;
  }
}

template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads) blocked_gradients_kernel(BlockedCrossEntropy p, Operands o, Operands) {
  using C = acc_t<T>;
  using Grad = typename Tile::Grad;
  unsigned char* smem = dynamic_smem();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  Tile::logits(o, m0, n0, smem);
  const auto* S = Tile::s_tile(smem);
  Grad* G = Tile::g_tile(smem);
  const int r = threadIdx.x / kPartsPerRow, part = threadIdx.x % kPartsPerRow;
  const int64_t row = m0 + r;
  const bool in_rows = row < p.N;
  const T* bias = static_cast<const T*>(p.bias);
  const Softcap<C> cap(p.softcap);
  const C smoothing = static_cast<C>(p.label_smoothing), z_loss = static_cast<C>(p.z_loss);
  const C lse = in_rows ? static_cast<const C*>(p.lse)[row] : C(0);
  const C scale = !in_rows ? C(0) : p.row_scale != nullptr ? static_cast<const C*>(p.row_scale)[row] : static_cast<C>(p.scale);
  const int64_t target = in_rows ? p.target[row] : -1;
  const C p_factor = scale * (1 + 2 * z_loss * lse), offset = scale * smoothing / static_cast<C>(p.V);
  const C skip_below = static_cast<C>(p.skip_below);
  bool keep = false;  // whether this thread's part of the tile must be multiplied out
  for (int c = part; c < kBN; c += kPartsPerRow) {
    const int64_t col = n0 + c;
    C g = 0;
    if (in_rows && col < p.V) {
      const C raw = static_cast<C>(S[r * kSPitch + c]) + (bias != nullptr ? to_acc(bias[col]) : C(0));
      const C prob = acc_exp(cap(raw) - lse);
      keep = keep || !(prob < skip_below);  // NaN keeps
      g = prob * p_factor - offset;
      if (col == target) {
        g -= scale * (1 - smoothing);
        keep = true;
      }
      if (cap.on) g *= cap.derivative(raw);
    }
    G[r * Tile::kGPitch + c] = from_acc<Grad>(g);  // (SimtTile: over S's element, by the thread that read it)
  }
  if (p.skip_below > 0 && p.label_smoothing == 0) {
    if (!__syncthreads_or(keep)) return;  // the whole block agrees
  } else {
    __syncthreads();
  }
  add_column_sums<Tile>(G, n0, p.V, static_cast<C*>(p.grad_b));
  Tile::products(o, m0, n0, smem);
}


// ---- distillation (launchers.h: BlockedDistillation) ----

// The epilogue's columns per thread: part + 4 j. Its teacher logits wait in
// an array while the student's product takes S: in local memory (L1), its
// loops not unrolled; unrolled, in registers, the kernels spilled (fp16/bf16
// gradients) or ran out of registers (fp64).
constexpr int kColsPerThread = kBN / kPartsPerRow;

// The tile's teacher logits (with their bias) into t, this thread's columns
// (0 past V), then the student's product into S.
template <typename T, typename Tile>
__device__ __forceinline__ void distillation_logits(const BlockedDistillation& p, const Operands& student,
                                                    const Operands& teacher, int64_t m0, int64_t n0,
                                                    unsigned char* smem, acc_t<T> (&t)[kColsPerThread]) {
  using C = acc_t<T>;
  const int r = threadIdx.x / kPartsPerRow, part = threadIdx.x % kPartsPerRow;
  const T* bias = static_cast<const T*>(p.bt);
  Tile::logits(teacher, m0, n0, smem);
  const auto* S = Tile::s_tile(smem);
#pragma unroll 1
  for (int j = 0; j < kColsPerThread; ++j) {
    const int c = part + kPartsPerRow * j;
    const int64_t col = n0 + c;
    t[j] = col < p.V ? static_cast<C>(S[r * kSPitch + c]) + (bias != nullptr ? to_acc(bias[col]) : C(0)) : C(0);
  }
  __syncthreads();  // every thread has its teacher logits before the student's product overwrites S
  Tile::logits(student, m0, n0, smem);
}

// The student's logit (with its bias) at column c of S.
template <typename T, typename S_t>
__device__ __forceinline__ acc_t<T> student_logit(const BlockedDistillation& p, const S_t* S, int r, int c,
                                                   int64_t col) {
  const T* bias = static_cast<const T*>(p.bs);
  return static_cast<acc_t<T>>(S[r * kSPitch + c]) + (bias != nullptr ? to_acc(bias[col]) : acc_t<T>(0));
}

// A row's statistics from the passes before (row_stats), and the soft loss's pieces.
template <typename C>
struct DistillationRow {
  C s_max, log_sum_q, log_sum_s, t_max, log_sum_p, q_dot_g;
  C inv_t, beta, log_beta, log_1m_beta;
  __device__ DistillationRow(const BlockedDistillation& p, int64_t row) {
    const C* stats = static_cast<const C*>(p.row_stats);
    const bool in = row < p.N;
    s_max = in ? stats[row] : C(0), log_sum_q = in ? stats[p.N + row] : C(0);
    log_sum_s = in ? stats[2 * p.N + row] : C(0), t_max = in ? stats[3 * p.N + row] : C(0);
    log_sum_p = in ? stats[4 * p.N + row] : C(0), q_dot_g = in ? stats[5 * p.N + row] : C(0);
    inv_t = static_cast<C>(1 / p.temperature), beta = static_cast<C>(p.beta);
    log_beta = acc_log(beta), log_1m_beta = acc_log1p(-beta);
  }
  __device__ C log_q(C s) const { return (s - s_max) * inv_t - log_sum_q; }
  __device__ C log_p(C t) const { return (t - t_max) * inv_t - log_sum_p; }
  // log M, M = beta P + (1 - beta) Q, at least its larger term's log (the row passes' way)
  __device__ C log_m(C lp, C lq, C pv, C qv) const {
    const C larger = fmax(lp + log_beta, lq + log_1m_beta);
    const C m = acc_log(beta * pv + (1 - beta) * qv);
    return m > larger ? m : larger;
  }
};

template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads)
    blocked_distillation_statistics_kernel(BlockedDistillation p, Operands student, Operands teacher) {
  using C = acc_t<T>;
  unsigned char* smem = dynamic_smem();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const SplitTiles split(p.V, p.splits);
  const int r = threadIdx.x / kPartsPerRow, part = threadIdx.x % kPartsPerRow;
  const int64_t row = m0 + r;
  const bool hard = p.target != nullptr;
  const int64_t target = hard && row < p.N ? p.target[row] : -1;
  const C inv_t = static_cast<C>(1 / p.temperature);
  // this thread's columns': the student's max, sum exp((s - max) / T) and sum exp(s - max); the teacher's
  C s_max = -INFINITY, sum_q = 0, sum_s = 0, t_max = -INFINITY, sum_p = 0;
  for (int64_t tile = split.first; tile < split.last; ++tile) {
    const int64_t n0 = tile * kBN;
    C t[kColsPerThread];
    distillation_logits<T, Tile>(p, student, teacher, m0, n0, smem, t);
    const auto* S = Tile::s_tile(smem);
#pragma unroll 1
    for (int j = 0; j < kColsPerThread; ++j) {
      const int c = part + kPartsPerRow * j;
      const int64_t col = n0 + c;
      if (col >= p.V) continue;
      const C s = student_logit<T>(p, S, r, c, col);
      if (s > s_max) {
        sum_q = rescaled(sum_q, s_max, s, inv_t) + 1;
        sum_s = hard ? rescaled(sum_s, s_max, s, C(1)) + 1 : C(0);
        s_max = s;
      } else {
        sum_q += acc_exp((s - s_max) * inv_t);  // NaN s: the sums become NaN, as the loss should
        if (hard) sum_s += acc_exp(s - s_max);
      }
      if (t[j] > t_max) {
        sum_p = rescaled(sum_p, t_max, t[j], inv_t) + 1;
        t_max = t[j];
      } else {
        sum_p += acc_exp((t[j] - t_max) * inv_t);
      }
      if (col == target) static_cast<C*>(p.target_logit)[row] = s;  // one thread, in one block, sees it
    }
    __syncthreads();  // S is read before the next tile's products overwrite it
  }
#pragma unroll
  for (int mask = 1; mask < kPartsPerRow; mask *= 2) {
    const C s_max2 = __shfl_xor_sync(0xffffffffu, s_max, mask), sum_q2 = __shfl_xor_sync(0xffffffffu, sum_q, mask);
    const C sum_s2 = __shfl_xor_sync(0xffffffffu, sum_s, mask);
    const C t_max2 = __shfl_xor_sync(0xffffffffu, t_max, mask), sum_p2 = __shfl_xor_sync(0xffffffffu, sum_p, mask);
    const C top = nan_max(s_max, s_max2);
    if (top != -INFINITY) {
      sum_q = rescaled(sum_q, s_max, top, inv_t) + rescaled(sum_q2, s_max2, top, inv_t);
      sum_s = rescaled(sum_s, s_max, top, C(1)) + rescaled(sum_s2, s_max2, top, C(1));
      s_max = top;
    }
    merge(t_max, sum_p, t_max2, sum_p2, inv_t);
  }
  if (part == 0 && row < p.N) {
    C* out = static_cast<C*>(p.part) + blockIdx.y * p.N + row;
    const int64_t stride = p.splits * p.N;
    out[0] = s_max, out[stride] = sum_q, out[2 * stride] = sum_s, out[3 * stride] = t_max, out[4 * stride] = sum_p;
  }
}

template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads)
    blocked_distillation_terms_kernel(BlockedDistillation p, Operands student, Operands teacher) {
  using C = acc_t<T>;
  unsigned char* smem = dynamic_smem();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const SplitTiles split(p.V, p.splits);
  const int r = threadIdx.x / kPartsPerRow, part = threadIdx.x % kPartsPerRow;
  const int64_t row = m0 + r;
  const DistillationRow<C> d(p, row);
  const bool forward_kl = p.beta == 0, reverse_kl = p.beta == 1;
  C terms[2] = {0, 0};
  for (int64_t tile = split.first; tile < split.last; ++tile) {
    const int64_t n0 = tile * kBN;
    C t[kColsPerThread];
    distillation_logits<T, Tile>(p, student, teacher, m0, n0, smem, t);
    const auto* S = Tile::s_tile(smem);
#pragma unroll 1
    for (int j = 0; j < kColsPerThread; ++j) {
      const int c = part + kPartsPerRow * j;
      const int64_t col = n0 + c;
      if (col >= p.V) continue;
      const C lq = d.log_q(student_logit<T>(p, S, r, c, col)), lp = d.log_p(t[j]);
      if (forward_kl) {
        terms[0] += acc_exp(lp) * (lp - lq);
      } else if (reverse_kl) {
        terms[0] += acc_exp(lq) * (lq - lp);
      } else {
        const C pv = acc_exp(lp), qv = acc_exp(lq), lm = d.log_m(lp, lq, pv, qv);
        terms[0] += pv * (lp - lm);
        terms[1] += qv * (lq - lm);
      }
    }
    __syncthreads();  // S is read before the next tile's products overwrite it
  }
#pragma unroll
  for (int mask = 1; mask < kPartsPerRow; mask *= 2) {
    terms[0] += __shfl_xor_sync(0xffffffffu, terms[0], mask);
    terms[1] += __shfl_xor_sync(0xffffffffu, terms[1], mask);
  }
  if (part == 0 && row < p.N) {
    C* out = static_cast<C*>(p.part) + blockIdx.y * p.N + row;
    out[0] = terms[0], out[p.splits * p.N] = terms[1];
  }
}

template <typename T, typename Tile>
__global__ void __launch_bounds__(kThreads)
    blocked_distillation_gradients_kernel(BlockedDistillation p, Operands student, Operands teacher) {
  using C = acc_t<T>;
  using Grad = typename Tile::Grad;
  unsigned char* smem = dynamic_smem();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM, n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  C t[kColsPerThread];
  distillation_logits<T, Tile>(p, student, teacher, m0, n0, smem, t);
  const auto* S = Tile::s_tile(smem);
  Grad* G = Tile::g_tile(smem);
  const int r = threadIdx.x / kPartsPerRow, part = threadIdx.x % kPartsPerRow;
  const int64_t row = m0 + r;
  const bool in_rows = row < p.N, hard = p.target != nullptr;
  const DistillationRow<C> d(p, row);
  const C scale = !in_rows ? C(0) : p.row_scale != nullptr ? static_cast<const C*>(p.row_scale)[row] : static_cast<C>(p.scale);
  // d loss / d s = T * d soft / d u (u = s / T, the loss being T^2 soft) + the hard term's
  const C soft_factor = scale * static_cast<C>(p.temperature);
  const C hard_factor = hard ? scale * static_cast<C>(p.hard_weight) : C(0);
  const int64_t target = hard && in_rows ? p.target[row] : -1;
  const bool forward_kl = p.beta == 0, reverse_kl = p.beta == 1;
#pragma unroll 1
  for (int j = 0; j < kColsPerThread; ++j) {
    const int c = part + kPartsPerRow * j;
    const int64_t col = n0 + c;
    C g = 0;
    if (in_rows && col < p.V) {
      const C s = student_logit<T>(p, S, r, c, col);
      const C lq = d.log_q(s), lp = d.log_p(t[j]), q = acc_exp(lq);
      const C du = forward_kl   ? q - acc_exp(lp)
                   : reverse_kl ? q * (lq - lp - d.q_dot_g)
                                : q * ((1 - d.beta) * (lq - d.log_m(lp, lq, acc_exp(lp), q)) - d.q_dot_g);
      g = du * soft_factor;
      if (hard) g += acc_exp(s - d.s_max - d.log_sum_s) * hard_factor - (col == target ? hard_factor : C(0));
    }
    G[r * Tile::kGPitch + c] = from_acc<Grad>(g);  // (SimtTile: over S's element, by the thread that read it)
  }
  __syncthreads();
  add_column_sums<Tile>(G, n0, p.V, static_cast<C*>(p.grad_b));
  Tile::products(student, m0, n0, smem);
}

template <typename T>
struct LaunchBlocked {
  using Tile = TileFor<T>;

  // One pass: grid (row tiles, columns): the statistics passes' splits, or
  // the gradient passes' vocabulary tiles.
  template <typename Params>
  static cudaError_t launch(void (*kernel)(Params, Operands, Operands), const Params& p, const Operands& a,
                            const Operands& b, int64_t columns, cudaStream_t stream) {
    const int64_t row_tiles = (p.N + kBM - 1) / kBM;
    if (p.V <= 0 || row_tiles > 0x7fffffff || (p.V + kBN - 1) / kBN > 65535 || columns < 1 || columns > 65535) {
      return cudaErrorInvalidValue;
    }
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
    if (e != cudaSuccess) return e;
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(columns));
    kernel<<<grid, kThreads, Tile::kSmemBytes, stream>>>(p, a, b);
    return cudaGetLastError();
  }
  static int64_t vocabulary_tiles(int64_t V) { return (V + kBN - 1) / kBN; }

  static Operands of(const BlockedCrossEntropy& p) { return operands<T>(p.x, p.w, p.N, p.D, p.V, p.grad_x, p.grad_w); }
  static cudaError_t statistics(const BlockedCrossEntropy& p, cudaStream_t stream) {
    return launch(blocked_statistics_kernel<T, Tile>, p, of(p), of(p), p.splits, stream);
  }
  static cudaError_t gradients(const BlockedCrossEntropy& p, cudaStream_t stream) {
    return launch(blocked_gradients_kernel<T, Tile>, p, of(p), of(p), vocabulary_tiles(p.V), stream);
  }

  // Distillation: the student's operands (with its gradients) and the teacher's.
  static Operands student(const BlockedDistillation& p) {
    return operands<T>(p.xs, p.ws, p.N, p.Ds, p.V, p.grad_x, p.grad_w);
  }
  static Operands teacher(const BlockedDistillation& p) {
    return operands<T>(p.xt, p.wt, p.N, p.Dt, p.V, nullptr, nullptr);
  }
  static cudaError_t distillation_statistics(const BlockedDistillation& p, cudaStream_t stream) {
    return launch(blocked_distillation_statistics_kernel<T, Tile>, p, student(p), teacher(p), p.splits, stream);
  }
  static cudaError_t distillation_terms(const BlockedDistillation& p, cudaStream_t stream) {
    return launch(blocked_distillation_terms_kernel<T, Tile>, p, student(p), teacher(p), p.splits, stream);
  }
  static cudaError_t distillation_gradients(const BlockedDistillation& p, cudaStream_t stream) {
    return launch(blocked_distillation_gradients_kernel<T, Tile>, p, student(p), teacher(p), vocabulary_tiles(p.V),
                  stream);
  }
};

template <typename F>
cudaError_t by_dtype(LossDType dtype, F&& f) {
  switch (dtype) {
    case LossDType::kFloat16: return f(LaunchBlocked<__half>());
    case LossDType::kBFloat16: return f(LaunchBlocked<__nv_bfloat16>());
    case LossDType::kFloat32: return f(LaunchBlocked<float>());
    case LossDType::kFloat64: return f(LaunchBlocked<double>());
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// A pass for the dtype; nothing to do without rows.
#define BK_BLOCKED_PASS(name, Params, pass)                                               \
  cudaError_t name(const Params& p, LossDType dtype, cudaStream_t stream) {               \
    if (p.N == 0) return cudaSuccess;                                                      \
    return by_dtype(dtype, [&](auto launch) { return launch.pass(p, stream); });          \
  }
BK_BLOCKED_PASS(launch_blocked_statistics, BlockedCrossEntropy, statistics)
BK_BLOCKED_PASS(launch_blocked_gradients, BlockedCrossEntropy, gradients)
BK_BLOCKED_PASS(launch_blocked_distillation_statistics, BlockedDistillation, distillation_statistics)
BK_BLOCKED_PASS(launch_blocked_distillation_terms, BlockedDistillation, distillation_terms)
BK_BLOCKED_PASS(launch_blocked_distillation_gradients, BlockedDistillation, distillation_gradients)
#undef BK_BLOCKED_PASS

}  // namespace cuda
}  // namespace bigkernels
