// Raw-pointer entry points of the RNN CUDA kernels (the .cu files see only this
// header and CUDA's own; tensors, checks and the GEMMs live in rnn_cuda.cpp).
//
// The persistent kernels run a whole layer-direction in one cooperative
// launch: block i owns hidden units [i * U, (i + 1) * U) and keeps their
// slice of W_hh in shared memory for the whole sequence; the steps are
// separated by a grid-wide barrier. Where the grid that needs cannot be
// resident at once (a large hidden size), the same kernels run one launch per
// step (per phase of a step, in backward) instead: the kernel boundary is the
// barrier, and each launch loads its slice of W_hh again. A cooperative
// launch the GPU refuses at run time (cudaErrorCooperativeLaunchTooLarge:
// under MPS, or on a partitioned GPU, fewer SMs than the device reports) runs
// per step instead, with the same units. Where even one unit's slice does not
// fit (fp16/bf16 forward above a hidden size of about 6.7k on an H100, 4.6k
// on an A100), the forward stages W_hh a slice of its depth at a time, every
// step (stream_w_hh). Rows, gates and the workspace follow csrc/rnn/rnn.h
// (packed time-major rows; the workspace in float).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "rnn/rnn_mode.h"

namespace bigkernels {
namespace cuda {

enum class RnnDType : int { kFloat16, kBFloat16, kFloat32 };

struct RnnStepPlan {
  const int64_t* batch;   // device [T]: rows of each time index
  const int64_t* offset;  // device [T]: first packed row of each time index
  int64_t T, B, H, N;
  bool reverse;
};

struct RnnForwardParams {
  RnnMode mode;
  RnnDType dtype;
  RnnStepPlan plan;
  const float* xproj;  // [N, G*H]: W_ih x + b_ih (+ b_hh except for GRU)
  const void* w_hh;    // [G*H, H], the dtype
  const float* b_hh;   // GRU's [G*H] or null
  const void* hx;      // [B, H], the dtype
  float* c;            // LSTM: [B, H], cx in, cy out; else null
  void* out;           // [N, H], the dtype
  float* ws;           // [N, rnn_workspace_width] or null (inference)
  unsigned* barrier;   // 2 zeroed words: the grid barrier's count and generation
  int units;           // U, hidden units per block
  bool persistent;     // one cooperative launch; else one launch per step
  bool stream_w_hh;    // fp16/bf16 only: W_hh's slice staged kDepthChunk columns at a time, every step
};

struct RnnBackwardParams {
  RnnMode mode;
  RnnDType dtype;
  RnnStepPlan plan;
  const void* w_hh;      // [G*H, H], the dtype
  const void* hx;        // [B, H], the dtype
  const float* cx;       // LSTM: [B, H]; else null
  const void* out;       // [N, H], the forward's output
  const float* ws;       // [N, rnn_workspace_width], the forward's workspace
  const void* grad_out;  // [N, H], the dtype
  float* dh;             // [B, H]: grad_hy in, grad_hx out
  float* dc;             // LSTM: [B, H]: grad_cy in, grad_cx out; else null
  float* dgates_x;       // [N, G*H] out: gradients of the gates through W_ih, b_ih
  float* dgates_h;       // GRU: [N, G*H] out, through W_hh, b_hh; else equal to dgates_x
  unsigned* barrier;
  int units;
  bool persistent;
};

constexpr int kRnnThreads = 256;

// Shared memory the kernels need per block for U units (any batch: the
// forward takes a step's rows in chunks).
size_t rnn_forward_smem(RnnMode mode, RnnDType dtype, int64_t H, int units, bool stream_w_hh);
size_t rnn_backward_smem(RnnMode mode, RnnDType dtype, int64_t H, int units);

// How many blocks of the kernel can be resident on one SM with `smem` bytes
// of dynamic shared memory (after raising its limit to that): a cooperative
// launch needs every block resident at once.
cudaError_t rnn_blocks_per_sm(bool backward, RnnDType dtype, size_t smem, int* blocks);

// ceil(H / units) blocks of kRnnThreads threads: one cooperative launch when
// p.persistent, else one launch per step (two per step in backward); a
// refused cooperative launch falls back to the launches per step, and clears
// the error it left for cudaGetLastError.
cudaError_t launch_rnn_forward(const RnnForwardParams& p, cudaStream_t stream);
cudaError_t launch_rnn_backward(const RnnBackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace bigkernels
