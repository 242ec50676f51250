#include "common/capability.h"

#include <ATen/Version.h>

#include <string>

namespace bigkernels {

int cpu_capability_level() {
#if defined(BK_CPU_X86_CAPABILITIES)
  // ATen decides its capability once per process (CPU features, lowered by
  // ATEN_CPU_CAPABILITY), so ours is decided once too.
  static const int level = [] {
    const std::string aten = at::get_cpu_capability();
    return aten == "AVX512" ? 2 : aten == "AVX2" ? 1 : 0;
  }();
  return level;
#else
  return 0;
#endif
}

const char* cpu_capability_name() {
  static const char* const kNames[] = {"DEFAULT", "AVX2", "AVX512"};
  return kNames[cpu_capability_level()];
}

}  // namespace bigkernels
