// What every kernel family of csrc/kernels shares: dtypes, activation views, fp32 conversion,
// checked launches. Needs only CUDA headers (or, with PATNET_EMULATE defined, none: the CPU
// emulation of emulate.h, which runs these same kernels on the CPU for the test suite).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef PATNET_EMULATE
#include "emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

namespace patnet {

// Element type of the activations and weights of one call (the bindings map torch dtypes).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A (B, C, H, W) activation: pointer to element [0, 0, 0, 0] and strides in elements (NCHW,
// channels_last, or any strided view such as a channel slice).
struct Activation {
  void* data;
  int64_t sb, sc, sh, sw;
};

// fp32 view of a stored element, and back (round to nearest even).
template <class T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Runs BODY with T the element type of DTYPE: PATNET_DISPATCH(dtype, T, return f<T>(...););
#define PATNET_DISPATCH(DTYPE, T, ...)                                   \
  switch (DTYPE) {                                                       \
    case ::patnet::DType::kFloat32: { using T = float; __VA_ARGS__ }     \
    case ::patnet::DType::kFloat16: { using T = __half; __VA_ARGS__ }    \
    case ::patnet::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__ } \
  }                                                                      \
  return cudaErrorInvalidValue

// Dynamic shared memory of a kernel, as a T*: PATNET_DYNAMIC_SHARED(float, smem);
#ifdef PATNET_EMULATE
#define PATNET_DYNAMIC_SHARED(T, NAME) T* NAME = reinterpret_cast<T*>(::patnet_emulate::dynamic_shared())
#else
#define PATNET_DYNAMIC_SHARED(T, NAME)                                   \
  extern __shared__ __align__(16) unsigned char patnet_dynamic_shared_[]; \
  T* NAME = reinterpret_cast<T*>(patnet_dynamic_shared_)
#endif

// Launches KERNEL<<<grid, block, shared_bytes, stream>>>(args...) and returns the launch's
// error (cudaSuccess when it was queued). A kernel that asks for more than the default 48 KiB
// of dynamic shared memory first gets its limit raised to the device's opt-in maximum (the
// same value from every thread, so concurrent launches of one kernel cannot undo each other).
// Every launcher returns what this returns. Only in .cu files (nvcc) or the CPU emulation:
// the host compiler that builds bindings.cpp sees the declarations of launchers.h alone.
#if defined(__CUDACC__) || defined(PATNET_EMULATE)
template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                   cudaStream_t stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;  // nothing to do
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
#ifdef PATNET_EMULATE
  (void)stream;
  return ::patnet_emulate::launch(kernel, grid, block, shared_bytes, static_cast<Params>(args)...);
#else
  if (shared_bytes > 48 * 1024) {
    int device = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    if (shared_bytes > static_cast<size_t>(optin)) return cudaErrorInvalidConfiguration;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
#endif
}
#endif

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace patnet
