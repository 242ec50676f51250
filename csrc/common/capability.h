// CPU kernels compiled once per CPU capability, as ATen compiles its own:
// setup.py builds every file in CPU_CAPABILITY_SOURCES once for each
// capability, with that instruction set's flags and CPU_CAPABILITY=<name>
// (DEFAULT, and on x86-64 also AVX2 and AVX512; there it defines
// BK_CPU_X86_CAPABILITIES). Each build defines its table of kernels under a
// suffixed name (BK_CAPABILITY_NAME), and callers pick one per call from
// at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY, so a forced
// capability applies to ATen's kernels and ours alike.
#pragma once

#define BK_CONCAT_IMPL(a, b) a##_##b
#define BK_CONCAT(a, b) BK_CONCAT_IMPL(a, b)
// Inside a capability build: `name` suffixed with this capability.
#define BK_CAPABILITY_NAME(name) BK_CONCAT(name, CPU_CAPABILITY)

#if defined(BK_CPU_X86_CAPABILITIES)
// Declares a table defined once per capability, as name_DEFAULT etc.
#define BK_DECLARE_CAPABILITY_TABLE(Type, name) \
  extern const Type name##_DEFAULT, name##_AVX2, name##_AVX512;
#define BK_PICK_CAPABILITY_TABLE(name) \
  (::bigkernels::cpu_capability_level() == 2   ? name##_AVX512 \
   : ::bigkernels::cpu_capability_level() == 1 ? name##_AVX2   \
                                               : name##_DEFAULT)
#else
#define BK_DECLARE_CAPABILITY_TABLE(Type, name) extern const Type name##_DEFAULT;
#define BK_PICK_CAPABILITY_TABLE(name) name##_DEFAULT
#endif

namespace bigkernels {

// 0 = DEFAULT, 1 = AVX2, 2 = AVX512: the capability our CPU kernels run at,
// ATen's current one (never higher than what was compiled).
int cpu_capability_level();
// Its name, as ATen spells it ("DEFAULT", "AVX2", "AVX512").
const char* cpu_capability_name();

}  // namespace bigkernels
