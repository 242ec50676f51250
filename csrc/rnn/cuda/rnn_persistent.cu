// The RNN persistent kernels (launchers.h): one cooperative launch per layer
// and direction; block i keeps its hidden units' slice of W_hh in shared
// memory for the whole sequence, and a grid-wide barrier separates the steps.
//
// Forward step: every block reads the previous h (the previous step's output
// rows, or hx), computes W_hh h for its units and every gate (a warp per
// output, lanes along the hidden dimension, a shuffle reduction), applies the
// gates, and writes its units of the new h. Backward step: the gate
// gradients of the block's units, a barrier, then the block's units of the
// gradient reaching the previous h (its columns of W_hh). Correct for any
// grid size, including blocks that own no unit: they still meet every barrier.
#include "rnn/cuda/launchers.h"
#include "rnn/cuda/ptx_load_acquire.h"

#include <algorithm>
#include <type_traits>

#include "common/activations.h"
#include "common/cuda_dtype.cuh"
#include "common/ptx_sm80.cuh"

namespace bigkernels {
namespace cuda {
namespace {

// Every block arrives; the last one to arrive starts the next generation.
// Writes before the barrier are visible after it: each block fences before
// it arrives, the last one fences before it moves the generation on, and the
// others poll the generation with an acquire load (a load, not an atomic
// read-modify-write queued at the L2 on every spin). Reads of other blocks'
// results after it bypass L1 (__ldcg).
__device__ void grid_barrier(unsigned* barrier) {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* count = barrier;
    unsigned* generation = barrier + 1;
    // Read before arriving: once this block has arrived, the last one may move it on.
    const unsigned current = load_acquire_gpu(generation);
    __threadfence();
    if (atomicAdd(count, 1u) == gridDim.x - 1) {
      atomicExch(count, 0u);
      __threadfence();
      atomicAdd(generation, 1u);
    } else {
      while (load_acquire_gpu(generation) == current) __nanosleep(32);
    }
    __threadfence();
  }
  __syncthreads();
}

// Rows of W_hh a warp takes against one row of h (or of the gates'
// gradients), so that each value loaded from L2 feeds this many FMAs.
constexpr int kRowsPerWarp = 4;
// Rows of a step whose products the forward keeps in shared memory at once.
constexpr int kRowChunk = 64;
// Tensor cores (fp16, bf16): the depth of the slice of h staged at a time.
constexpr int kDepthChunk = 128;

template <typename T>
constexpr bool kTensorCores = !std::is_same_v<T, float>;

BK_RNN_HD inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The forward's shared memory, in elements of T (floats for z). SIMT: the
// W_hh slice [G * U][H]. Tensor cores: the slice padded to whole 16 x 16
// tiles with zeros, rows 8 elements longer so that ldmatrix's 8 rows fall in
// different banks, and a staged [kRowChunk][kDepthChunk] slice of h; when
// streamed, only kDepthChunk columns of the slice at a time. Both:
// z [kRowChunk][G * U] in float after them.
struct ForwardLayout {
  int64_t w_rows, w_ld, h_ld;  // h_ld = 0: no staged h
  int64_t depth;               // the product's depth: H, rounded up to 16 on tensor cores
  bool streamed;               // w_s holds columns [k0, k0 + kDepthChunk) of the slice, not all of them
  int64_t h_offset, z_offset;  // in elements of T, 16-byte aligned
  size_t bytes;
};
BK_RNN_HD inline ForwardLayout forward_layout(RnnMode mode, bool tensor_cores, size_t elem, int64_t H, int units,
                                              bool streamed) {
  const int64_t G = rnn_gates(mode), per16 = 16 / int64_t(elem);
  ForwardLayout l{};
  l.streamed = tensor_cores && streamed;
  l.depth = tensor_cores ? round_up(H, 16) : H;
  l.w_rows = tensor_cores ? round_up(G * units, 16) : G * units;
  l.w_ld = l.streamed ? kDepthChunk + 8 : tensor_cores ? l.depth + 8 : H;
  l.h_ld = tensor_cores ? kDepthChunk + 8 : 0;
  l.h_offset = round_up(l.w_rows * l.w_ld, per16);
  l.z_offset = l.h_offset + round_up(kRowChunk * l.h_ld, per16);
  l.bytes = size_t(l.z_offset) * elem + size_t(kRowChunk) * G * units * sizeof(float);
  return l;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  return v;
}

struct StepRows {
  int64_t rows, offset;       // this step's rows and first packed row
  int64_t from_prev, prev_offset;  // rows [0, from_prev) continue the previous step's rows
};

__device__ StepRows step_rows(const RnnStepPlan& p, int64_t s) {
  const int64_t t = p.reverse ? p.T - 1 - s : s;
  StepRows r{p.batch[t], p.offset[t], 0, 0};
  if (s > 0) {
    const int64_t tp = p.reverse ? t + 1 : t - 1;
    r.from_prev = r.rows < p.batch[tp] ? r.rows : p.batch[tp];
    r.prev_offset = p.offset[tp];
  }
  return r;
}

// Row b's previous h: the previous step's output row, or hx.
template <typename T>
__device__ __forceinline__ const T* previous_h(const StepRows& r, int64_t b, const T* out, const T* hx, int64_t H) {
  return b < r.from_prev ? out + (r.prev_offset + b) * H : hx + b * H;
}

// The block's slice of W_hh (rows g * U + u for its units u < nu), columns
// [k0, k0 + width) into w_s[r][k - k0] (leading dimension ld), zero beyond H,
// nu and G * U: the padding adds nothing to a product. Neighbouring threads
// read neighbouring columns.
template <typename T>
__device__ void load_w_slice(T* w_s, int64_t rows, int64_t ld, int64_t k0, int64_t width, const T* w_hh, int64_t H,
                             int64_t G, int U, int64_t u0, int nu) {
  for (int64_t i = threadIdx.x; i < rows * width; i += blockDim.x) {
    const int64_t r = i / width, c = i % width, k = k0 + c, g = r / U, u = r % U;
    const bool real = r < G * U && u < nu && k < H;
    w_s[r * ld + c] = real ? w_hh[(g * H + u0 + u) * H + k] : from_acc<T>(0.f);
  }
}

// Which of the block's units and W_hh's gates the forward's product covers.
struct Slice {
  const void* w_hh;  // all of W_hh, [G * H][H]: the streamed layout's source
  int64_t G;
  int U;
  int64_t u0;
  int nu;
};

// z_s[n][r] = sum_k W_s[r][k] h[b0 + n][k] for the chunk's rows n < chunk and
// the slice's rows r < GU, on tensor cores: W_s is the A operand (16 x 16
// tiles, row-major), the staged h the B operand (its rows are B's columns),
// one warp per 16 x 8 tile of z, kDepthChunk of depth at a time (and when
// streamed, the same kDepthChunk columns of W_s loaded alongside).
template <typename T>
__device__ void product_tensor_cores(const ForwardLayout& l, const Slice& slice, T* w_s, T* h_s, float* z_s,
                                     const StepRows& rows, int64_t b0, int64_t chunk, const T* out, const T* hx,
                                     int64_t H) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int64_t m_tiles = l.w_rows / 16, n_tiles = (chunk + 7) / 8, GU = slice.G * slice.U;
  for (int64_t i = threadIdx.x; i < chunk * GU; i += blockDim.x) z_s[i] = 0.f;
  for (int64_t k0 = 0; k0 < l.depth; k0 += kDepthChunk) {
    __syncthreads();  // the last slice's products are done with h_s and w_s (and z_s is zeroed)
    if (l.streamed) {
      load_w_slice(w_s, l.w_rows, l.w_ld, k0, kDepthChunk, static_cast<const T*>(slice.w_hh), H, slice.G, slice.U,
                   slice.u0, slice.nu);
    }
    for (int64_t i = threadIdx.x; i < n_tiles * 8 * kDepthChunk; i += blockDim.x) {
      const int64_t n = i / kDepthChunk, k = k0 + i % kDepthChunk;
      const bool real = n < chunk && k < H;
      h_s[n * l.h_ld + i % kDepthChunk] = real ? __ldcg(previous_h(rows, b0 + n, out, hx, H) + k) : from_acc<T>(0.f);
    }
    __syncthreads();
    const int64_t kc = l.depth - k0 < kDepthChunk ? l.depth - k0 : kDepthChunk;  // a multiple of 16
    const int64_t w_col = l.streamed ? 0 : k0;  // where column k0 of the slice lies in w_s
    for (int64_t tile = warp; tile < m_tiles * n_tiles; tile += warps) {
      const int64_t mt = tile % m_tiles, nt = tile / m_tiles;
      float c[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t k = 0; k < kc; k += 16) {
        uint32_t a[4], b[2];
        ldmatrix<4, false>(a, w_s + (mt * 16 + lane % 16) * l.w_ld + w_col + k + lane / 16 * 8);
        ldmatrix<2, false>(b, h_s + (nt * 8 + lane % 8) * l.h_ld + k + lane / 8 % 2 * 8);
        mma_m16n8k16<T>(c, a, b);
      }
      const int64_t r = mt * 16 + lane / 4, n = nt * 8 + lane % 4 * 2;
      for (int e = 0; e < 4; ++e) {  // c[e] = z[n + e % 2][r + e / 2 * 8]
        const int64_t rr = r + e / 2 * 8, nn = n + e % 2;
        if (rr < GU && nn < chunk) z_s[nn * GU + rr] += c[e];
      }
    }
  }
}

// Steps [step_begin, step_end): all of them in a persistent launch, one in a per-step launch.
// Both kernels declare one resident block per SM, all a persistent grid (at
// most a block per SM) needs: without it ptxas aims at more blocks per SM,
// keeps to 48-64 registers and spilled the fp16/bf16 forward.
template <typename T>
__global__ void __launch_bounds__(kRnnThreads, 1) rnn_forward_kernel(const RnnForwardParams p, int64_t step_begin,
                                                                     int64_t step_end) {
  using M = MathOps<float>;
  const int64_t H = p.plan.H, G = rnn_gates(p.mode), GH = G * H, W = rnn_workspace_width(p.mode, H);
  const int U = p.units;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int nu = u0 >= H ? 0 : H - u0 < U ? int(H - u0) : U;  // units this block owns
  const ForwardLayout layout = forward_layout(p.mode, kTensorCores<T>, sizeof(T), H, U, p.stream_w_hh);
  T* w_s = reinterpret_cast<T*>(dynamic_smem());  // rows g * U + u of W_hh's slice
  T* h_s = w_s + layout.h_offset;                  // tensor cores: the staged slice of h
  float* z_s = reinterpret_cast<float*>(w_s + layout.z_offset);  // [kRowChunk][G * U]
  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* hx = static_cast<const T*>(p.hx);
  T* out = static_cast<T*>(p.out);
  if (!layout.streamed) load_w_slice(w_s, layout.w_rows, layout.w_ld, 0, layout.w_ld, w_hh, H, G, U, u0, nu);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t s = step_begin; s < step_end; ++s) {
    const StepRows rows = step_rows(p.plan, s);
    for (int64_t b0 = 0; b0 < rows.rows; b0 += kRowChunk) {  // z_s holds kRowChunk rows
      const int64_t chunk = rows.rows - b0 < kRowChunk ? rows.rows - b0 : kRowChunk;
      if constexpr (kTensorCores<T>) {
        product_tensor_cores(layout, Slice{p.w_hh, G, U, u0, nu}, w_s, h_s, z_s, rows, b0, chunk, out, hx, H);
      } else {
        // z_s[b - b0][g * U + u] = (W_hh h_prev)[g * H + u0 + u], kRowsPerWarp rows
        // of this block's W_hh slice (q = g * nu + u) against one row of h at a time.
        const int64_t groups = (G * nu + kRowsPerWarp - 1) / kRowsPerWarp;
        for (int64_t o = warp; o < chunk * groups; o += warps) {
          const int64_t b = b0 + o / groups, q0 = o % groups * kRowsPerWarp;
          const T* h = previous_h(rows, b, out, hx, H);
          float acc[kRowsPerWarp] = {};
          for (int64_t k = lane; k < H; k += 32) {
            const float hk = to_acc(__ldcg(h + k));
            for (int i = 0; i < kRowsPerWarp; ++i) {
              const int64_t q = q0 + i;
              if (q < G * nu) acc[i] += hk * to_acc(w_s[(q / nu * U + q % nu) * H + k]);
            }
          }
          for (int i = 0; i < kRowsPerWarp; ++i) {
            const int64_t q = q0 + i;
            const float sum = warp_sum(acc[i]);
            if (lane == 0 && q < G * nu) z_s[(b - b0) * G * U + q / nu * U + q % nu] = sum;
          }
        }
      }
      __syncthreads();
      for (int64_t o = threadIdx.x; o < chunk * nu; o += blockDim.x) {
        const int64_t b = b0 + o / nu, u = o % nu, j = u0 + u, row = rows.offset + b;
        const float* x = p.xproj + row * GH;
        const float* z = z_s + (b - b0) * G * U;
        float* ws = p.ws ? p.ws + row * W : nullptr;
        float h_new;
        if (p.mode == RnnMode::kLSTM) {
          const float i = stable_sigmoid(x[j] + z[u]), f = stable_sigmoid(x[H + j] + z[U + u]),
                      g = M::tanh(x[2 * H + j] + z[2 * U + u]), og = stable_sigmoid(x[3 * H + j] + z[3 * U + u]);
          const float c = f * p.c[b * H + j] + i * g;
          p.c[b * H + j] = c;
          h_new = og * M::tanh(c);
          if (ws) ws[j] = i, ws[H + j] = f, ws[2 * H + j] = g, ws[3 * H + j] = og, ws[4 * H + j] = c;
        } else if (p.mode == RnnMode::kGRU) {
          const auto hh = [&](int g) { return z[g * U + u] + (p.b_hh ? p.b_hh[g * H + j] : 0.f); };
          const float r = stable_sigmoid(x[j] + hh(0)), zg = stable_sigmoid(x[H + j] + hh(1)), hn = hh(2);
          const float n = M::tanh(x[2 * H + j] + r * hn);
          const float h_prev = to_acc(__ldcg(previous_h(rows, b, out, hx, H) + j));
          h_new = n + zg * (h_prev - n);  // (1 - z) n + z h
          if (ws) ws[j] = r, ws[H + j] = zg, ws[2 * H + j] = n, ws[3 * H + j] = hn;
        } else {
          const float a = x[j] + z[u];
          h_new = p.mode == RnnMode::kTanh ? M::tanh(a) : M::relu(a);
          if (ws) ws[j] = h_new;
        }
        out[row * H + j] = from_acc<T>(h_new);
      }
      __syncthreads();  // z_s is rewritten by the next chunk
    }
    if (p.persistent) grid_barrier(p.barrier);  // the new h is every block's input to the next step
  }
}

// The backward's rows of w_s: G * H elements and one 4-byte word more, so that
// the transposing writes of neighbouring units fall in different banks.
BK_RNN_HD inline int64_t backward_w_ld(int64_t GH, size_t elem) {
  return GH + int64_t(4 / elem);
}

// Steps [step_begin, step_end), from the last; a per-step launch runs one step's
// gate gradients (kGates) or its product with W_hh (kProduct), a persistent one both.
enum BackwardPhases : int { kGates = 1, kProduct = 2 };
template <typename T>
__global__ void __launch_bounds__(kRnnThreads, 1) rnn_backward_kernel(const RnnBackwardParams p, int64_t step_begin,
                                                                      int64_t step_end, int phases) {
  using M = MathOps<float>;
  const int64_t H = p.plan.H, G = rnn_gates(p.mode), GH = G * H, W = rnn_workspace_width(p.mode, H);
  const int U = p.units;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int nu = u0 >= H ? 0 : H - u0 < U ? int(H - u0) : U;  // units this block owns
  const int64_t ld = backward_w_ld(GH, sizeof(T));
  T* w_s = reinterpret_cast<T*>(dynamic_smem());  // [U][ld]: row u holds column u0 + u of W_hh
  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* hx = static_cast<const T*>(p.hx);
  const T* out = static_cast<const T*>(p.out);
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const bool gru = p.mode == RnnMode::kGRU;
  if (phases & kProduct) {
    // The transpose: neighbouring threads read neighbouring columns of a row
    // of W_hh (runs of nu elements; a stride of H between threads would cost
    // a memory transaction per element), and write them a row of w_s apart.
    for (int64_t i = threadIdx.x; i < nu * GH; i += blockDim.x) {
      const int64_t r = i / nu, u = i % nu;
      w_s[u * ld + r] = w_hh[r * H + u0 + u];
    }
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int64_t s = step_end - 1; s >= step_begin; --s) {
    const StepRows rows = step_rows(p.plan, s);
    // The gates' gradients of this block's units.
    for (int64_t o = threadIdx.x; (phases & kGates) && o < rows.rows * nu; o += blockDim.x) {
      const int64_t b = o / nu, j = u0 + o % nu, row = rows.offset + b;
      const float d = to_acc(grad_out[row * H + j]) + p.dh[b * H + j];
      const float* w = p.ws + row * W;
      float* gx = p.dgates_x + row * GH;
      if (p.mode == RnnMode::kLSTM) {
        const float i = w[j], f = w[H + j], g = w[2 * H + j], og = w[3 * H + j], tc = M::tanh(w[4 * H + j]);
        const float c_prev = b < rows.from_prev ? p.ws[(rows.prev_offset + b) * W + 4 * H + j] : p.cx[b * H + j];
        const float dct = p.dc[b * H + j] + d * og * (1.f - tc * tc);
        gx[j] = dct * g * i * (1.f - i);
        gx[H + j] = dct * c_prev * f * (1.f - f);
        gx[2 * H + j] = dct * i * (1.f - g * g);
        gx[3 * H + j] = d * tc * og * (1.f - og);
        p.dc[b * H + j] = dct * f;
      } else if (gru) {
        float* gh = p.dgates_h + row * GH;
        const float r = w[j], z = w[H + j], n = w[2 * H + j], hn = w[3 * H + j];
        const float h_prev = to_acc(previous_h(rows, b, out, hx, H)[j]);
        const float dn = d * (1.f - z) * (1.f - n * n);
        const float dr = dn * hn * r * (1.f - r), dz = d * (h_prev - n) * z * (1.f - z);
        gx[j] = gh[j] = dr;
        gx[H + j] = gh[H + j] = dz;
        gx[2 * H + j] = dn;
        gh[2 * H + j] = dn * r;
        p.dh[b * H + j] = d * z;  // the direct part; the product with W_hh is added below
      } else {
        const float y = w[j];
        gx[j] = p.mode == RnnMode::kTanh ? d * (1.f - y * y) : (y > 0.f ? d : 0.f);
      }
    }
    if (p.persistent) grid_barrier(p.barrier);  // every block's gate gradients of this step are written
    // dh[b][u0 + u] (+)= sum_r dgates_h[row][r] W_hh[r][u0 + u], kRowsPerWarp units at a time
    const int64_t groups = (nu + kRowsPerWarp - 1) / kRowsPerWarp;
    for (int64_t o = warp; (phases & kProduct) && o < rows.rows * groups; o += warps) {
      const int64_t b = o / groups, v0 = o % groups * kRowsPerWarp;
      const float* dg = p.dgates_h + (rows.offset + b) * GH;
      float acc[kRowsPerWarp] = {};
      for (int64_t r = lane; r < GH; r += 32) {
        const float d = __ldcg(dg + r);
        for (int i = 0; i < kRowsPerWarp; ++i) {
          if (v0 + i < nu) acc[i] += d * to_acc(w_s[(v0 + i) * ld + r]);
        }
      }
      for (int i = 0; i < kRowsPerWarp; ++i) {
        const float sum = warp_sum(acc[i]);
        const int64_t j = u0 + v0 + i;
        if (lane == 0 && v0 + i < nu) p.dh[b * H + j] = (gru ? p.dh[b * H + j] : 0.f) + sum;
      }
    }
    __syncthreads();  // the next step's gate gradients read these
  }
}

size_t dtype_size(RnnDType dtype) { return dtype == RnnDType::kFloat32 ? 4 : 2; }

template <typename F>
cudaError_t dispatch_dtype(RnnDType dtype, F&& f) {
  switch (dtype) {
    case RnnDType::kFloat16: return f(__half{});
    case RnnDType::kBFloat16: return f(__nv_bfloat16{});
    case RnnDType::kFloat32: return f(float{});
  }
  return cudaErrorInvalidValue;
}

// grid = ceil(H / units) blocks; cooperative when p.persistent.
template <typename Kernel, typename Params, typename... Args>
cudaError_t launch(Kernel kernel, const Params& p, size_t smem, cudaStream_t stream, Args... args) {
  cudaLaunchAttribute cooperative[1];
  cooperative[0].id = cudaLaunchAttributeCooperative;
  cooperative[0].val.cooperative = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned((p.plan.H + p.units - 1) / p.units));
  config.blockDim = dim3(kRnnThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = cooperative;
  config.numAttrs = p.persistent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, p, args...);
}

template <typename Kernel>
cudaError_t blocks_per_sm(Kernel kernel, size_t smem, int* blocks) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kRnnThreads, smem);
}

// Whether a cooperative launch was refused for want of room (MPS, a
// partitioned GPU): the runtime also records the refusal as the last error,
// which would surface at the next launch check anywhere; cleared here.
bool cooperative_launch_refused(cudaError_t e) {
  if (e != cudaErrorCooperativeLaunchTooLarge) return false;
  (void)cudaGetLastError();
  return true;
}

}  // namespace

size_t rnn_forward_smem(RnnMode mode, RnnDType dtype, int64_t H, int units, bool stream_w_hh) {
  return forward_layout(mode, dtype != RnnDType::kFloat32, dtype_size(dtype), H, units, stream_w_hh).bytes;
}

size_t rnn_backward_smem(RnnMode mode, RnnDType dtype, int64_t H, int units) {
  const int64_t GH = rnn_gates(mode) * H;
  return size_t(units) * size_t(backward_w_ld(GH, dtype_size(dtype))) * dtype_size(dtype);
}

cudaError_t rnn_blocks_per_sm(bool backward, RnnDType dtype, size_t smem, int* blocks) {
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return backward ? blocks_per_sm(rnn_backward_kernel<T>, smem, blocks)
                    : blocks_per_sm(rnn_forward_kernel<T>, smem, blocks);
  });
}

cudaError_t launch_rnn_forward(const RnnForwardParams& p, cudaStream_t stream) {
  if (p.stream_w_hh && p.dtype == RnnDType::kFloat32) return cudaErrorInvalidValue;  // tensor cores only
  const size_t smem = rnn_forward_smem(p.mode, p.dtype, p.plan.H, p.units, p.stream_w_hh);
  return dispatch_dtype(p.dtype, [&](auto t) {
    const auto kernel = rnn_forward_kernel<decltype(t)>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    if (p.persistent) {
      const cudaError_t cooperative = launch(kernel, p, smem, stream, int64_t(0), p.plan.T);
      if (!cooperative_launch_refused(cooperative)) return cooperative;
    }
    RnnForwardParams per_step = p;
    per_step.persistent = false;
    for (int64_t s = 0; s < p.plan.T && e == cudaSuccess; ++s) e = launch(kernel, per_step, smem, stream, s, s + 1);
    return e;
  });
}

cudaError_t launch_rnn_backward(const RnnBackwardParams& p, cudaStream_t stream) {
  const size_t smem = rnn_backward_smem(p.mode, p.dtype, p.plan.H, p.units);
  return dispatch_dtype(p.dtype, [&](auto t) {
    const auto kernel = rnn_backward_kernel<decltype(t)>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
    if (p.persistent) {
      const cudaError_t cooperative = launch(kernel, p, smem, stream, int64_t(0), p.plan.T, int(kGates | kProduct));
      if (!cooperative_launch_refused(cooperative)) return cooperative;
    }
    RnnBackwardParams per_step = p;
    per_step.persistent = false;
    for (int64_t s = p.plan.T - 1; s >= 0 && e == cudaSuccess; --s) {
      e = launch(kernel, per_step, size_t(0), stream, s, s + 1, int(kGates));
      if (e == cudaSuccess) e = launch(kernel, per_step, smem, stream, s, s + 1, int(kProduct));
    }
    return e;
  });
}

}  // namespace cuda
}  // namespace bigkernels
