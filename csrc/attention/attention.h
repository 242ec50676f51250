// Host-side pieces of the attention ops shared by the devices: argument
// checks and sizes. Inputs are 4-d [B, H, L, E] (Python turns 3-d into H = 1).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace bigkernels {

struct AttentionShape {
  int64_t B, Hq, Hkv, L, S, E, Ev;
};

// Checks dtypes, devices and shapes (the messages name the argument) and
// returns the sizes. window_left/right: -1 or >= 0.
AttentionShape check_attention_args(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                    const std::optional<at::Tensor>& attn_mask, int64_t window_left,
                                    int64_t window_right);

void check_dropout(double dropout_p);

// The mask as a [B, Hq, L, S] view: broadcast dims get stride 0, nothing is copied.
at::Tensor broadcast_mask(const at::Tensor& mask, const AttentionShape& s);

}  // namespace bigkernels
