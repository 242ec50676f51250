// Grain of the CPU row-wise passes (dense activations, norms) for at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace bigkernels {

// Rows per task of an element-wise pass over rows `width` wide: about 32k
// elements, so that a task is worth scheduling even for narrow layers.
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

}  // namespace bigkernels
