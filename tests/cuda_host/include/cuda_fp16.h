// Host stand-in for <cuda_fp16.h>: __half is the compiler's IEEE binary16 (_Float16), whose
// conversions round to nearest even like __float2half_rn.
#pragma once

typedef _Float16 __half;

inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return static_cast<__half>(x); }
