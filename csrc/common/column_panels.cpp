#include "common/column_panels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace bigkernels {

at::Tensor column_panels(const at::Tensor& b, int64_t block, at::ScalarType acc) {
  TORCH_INTERNAL_ASSERT(b.dim() >= 2 && block > 0 && (acc == at::kFloat || acc == at::kDouble));
  const int64_t lead = b.dim() - 2, K = b.size(-2), N = b.size(-1), panels = (N + block - 1) / block;
  const int64_t sk = b.stride(-2), sn = b.stride(-1);
  std::vector<int64_t> shape(b.sizes().begin(), b.sizes().end() - 2);
  int64_t outer = 1;
  for (int64_t size : shape) outer *= size;
  shape.insert(shape.end(), {panels, K, block});
  at::Tensor packed = at::empty(shape, b.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "column_panels", [&] {
    const auto pack = [&](auto* dst) {
      using acc_t = std::remove_pointer_t<decltype(dst)>;
      at::parallel_for(0, outer * panels, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          // the source of panel t: its leading index, then its first column
          int64_t offset = 0;
          for (int64_t d = lead - 1, i = t / panels; d >= 0; i /= b.size(d), --d) {
            offset += i % b.size(d) * b.stride(d);
          }
          const int64_t n0 = t % panels * block, width = std::min(block, N - n0);
          const scalar_t* src = b.const_data_ptr<scalar_t>() + offset + n0 * sn;
          acc_t* out = dst + t * K * block;
          // The inner loop runs along the smaller source stride (the rows of a
          // transposed weight, or of K); the panel (K x block) stays in cache.
          if (sn <= sk) {
            for (int64_t k = 0; k < K; ++k)
              for (int64_t j = 0; j < width; ++j) out[k * block + j] = static_cast<acc_t>(src[k * sk + j * sn]);
          } else {
            for (int64_t j = 0; j < width; ++j)
              for (int64_t k = 0; k < K; ++k) out[k * block + j] = static_cast<acc_t>(src[k * sk + j * sn]);
          }
          for (int64_t k = 0; k < K; ++k) std::fill(out + k * block + width, out + (k + 1) * block, acc_t(0));
        }
      });
    };
    if (acc == at::kDouble) {
      pack(packed.mutable_data_ptr<double>());
    } else {
      pack(packed.mutable_data_ptr<float>());
    }
  });
  return packed;
}

}  // namespace bigkernels
