// The output dtypes of the preprocessing kernels: float32, float16, bfloat16 (no float64 copy).
#pragma once

#include <ATen/Dispatch.h>

#define NVLM_DISPATCH_TILE_DTYPES(TYPE, NAME, ...)               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
