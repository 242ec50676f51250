// Emulation shim: nvcuda::wmma comes from emu_cuda.h.
