// The RNN modes and their sizes, for host and device code alike (no ATen:
// the CUDA kernels and their host emulation include this).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define BK_RNN_HD __host__ __device__
#else
#define BK_RNN_HD
#endif

namespace bigkernels {

enum class RnnMode { kTanh, kReLU, kLSTM, kGRU };

// Gates per hidden unit: rows of w_ih / w_hh are gates * hidden_size.
BK_RNN_HD inline int64_t rnn_gates(RnnMode mode) {
  return mode == RnnMode::kLSTM ? 4 : mode == RnnMode::kGRU ? 3 : 1;
}

// Accumulator-type values kept per row for backward: LSTM i, f, g, o and the
// cell state c; GRU r, z, n and W_hn h + b_hn; the Elman cell its output.
BK_RNN_HD inline int64_t rnn_workspace_width(RnnMode mode, int64_t hidden) {
  return (mode == RnnMode::kLSTM ? 5 : mode == RnnMode::kGRU ? 4 : 1) * hidden;
}

}  // namespace bigkernels
