// Emulation shim: the __pipeline_* primitives come from emu_cuda.h.
