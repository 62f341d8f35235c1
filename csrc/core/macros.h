// Shared by host (.cpp) and device (.cu) translation units.
#pragma once

// Functions marked NVLM_HOST_DEVICE are compiled for both sides, so the index math a CUDA kernel
// uses is exactly the one its C++ host kernel runs (and that the CPU tests check).
#if defined(__CUDACC__)
#define NVLM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NVLM_HOST_DEVICE inline
#endif

#ifndef NVLM_WITH_CUDA
#define NVLM_WITH_CUDA 0
#endif
