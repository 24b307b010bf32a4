// A CPU emulation of the small part of CUDA that csrc/kernels uses, so that the test suite can
// run the real kernels on a machine without a GPU (compiled as C++ with -DPATNET_EMULATE; see
// patnet_kernels/_cuda_ext.py). Never part of a GPU build.
//
// Model: the blocks of a launch run one after another; the threads of a block are fibers
// (ucontext) on the calling thread, switched at every __syncthreads(), __syncwarp() and warp
// shuffle. `__shared__` variables become function statics, which all fibers of the running
// block share. Rules this imposes on kernels (all of them also good CUDA practice):
//  * every barrier and shuffle is reached by all threads of the block (block-uniform control
//    flow); a divergent one is detected and fails the launch;
//  * nothing relies on implicit warp-synchronous execution;
//  * 16-bit floats are only converted (__half2float, __float2half_rn, ...), never computed on.
// It checks semantics, not speed or the memory model: timings and races need a real GPU.
//
// Uninitialised memory is poisoned, not zero: a GPU's shared memory holds whatever the last
// block left there, and a kernel that reads a word it never wrote must not pass here because
// the host zero-filled it. Dynamic shared memory is filled with 0xFF bytes (NaN as a float, -1
// as an integer) before every block; host launchers may poison their outputs and workspaces
// with poison() before launching, so an element no thread writes shows as NaN.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ------------------------------------------------------------------------- runtime types
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
typedef void* cudaStream_t;

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }

// ------------------------------------------------------------------------- 16-bit floats
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline uint32_t patnet_float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float patnet_bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float __half2float(__half h) {
  const uint32_t sign = (h.x & 0x8000u) << 16, exponent = (h.x >> 10) & 0x1f, mantissa = h.x & 0x3ff;
  if (exponent == 0x1f) return patnet_bits_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float value = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -value : value;
  }
  return patnet_bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = patnet_float_bits(f), sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u)  // inf or NaN
    return {static_cast<uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u))};
  if (abs >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds past 65504
  if (abs < 0x38800000u) {  // below 2^-14: a subnormal half, rounded to nearest even
    const float scaled = patnet_bits_float(abs) * 16777216.0f;  // exact: * 2^24
    return {static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}
inline __half __float2half(float f) { return __float2half_rn(f); }

inline float __bfloat162float(__nv_bfloat16 h) { return patnet_bits_float(uint32_t(h.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = patnet_float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  return {static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ------------------------------------------------------------------------- math intrinsics
using std::max;
using std::min;
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned __float_as_uint(float f) { return patnet_float_bits(f); }
inline float __uint_as_float(unsigned u) { return patnet_bits_float(u); }
inline int __float_as_int(float f) { return static_cast<int>(patnet_float_bits(f)); }
inline float __int_as_float(int i) { return patnet_bits_float(static_cast<uint32_t>(i)); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* address, float value) { const float old = *address; *address = old + value; return old; }
inline int atomicAdd(int* address, int value) { const int old = *address; *address = old + value; return old; }

namespace patnet_emulate {

// The fibers of the block being run, and the scheduler that switches between them.
struct Block {
  std::vector<ucontext_t> contexts;
  std::vector<char> at_barrier, done;
  std::vector<uint3> thread_index;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
  std::vector<unsigned char> exchange;  // shuffle buffer: 8 bytes per thread
  std::string error;
};

inline thread_local Block* running = nullptr;
inline thread_local std::vector<unsigned char>* shared_buffer = nullptr;

inline void* dynamic_shared() { return shared_buffer->data(); }

// The byte every poisoned word is made of: 0xFFFFFFFF is a NaN float, 0xFFFF a NaN half and
// bfloat16, -1 as an integer.
constexpr unsigned char kPoison = 0xFF;
inline void poison(void* data, size_t bytes) {
  if (data != nullptr && bytes > 0) std::memset(data, kPoison, bytes);
}

// A fiber's barrier: back to the scheduler, which resumes it once every thread has arrived.
inline void barrier() {
  Block& block = *running;
  const int me = block.current;
  block.at_barrier[me] = 1;
  swapcontext(&block.contexts[me], &block.scheduler);
}

inline void fiber_entry() {
  Block& block = *running;
  block.body();
  block.done[block.current] = 1;
  // returning resumes uc_link (the scheduler)
}

// Runs one block: every fiber until it arrives at a barrier or finishes, round after round.
inline bool run_block(Block& block, int threads, size_t stack_bytes,
                      std::vector<std::unique_ptr<char[]>>& stacks) {
  block.contexts.assign(threads, ucontext_t{});
  block.at_barrier.assign(threads, 0);
  block.done.assign(threads, 0);
  for (int t = 0; t < threads; ++t) {
    getcontext(&block.contexts[t]);
    block.contexts[t].uc_stack.ss_sp = stacks[t].get();
    block.contexts[t].uc_stack.ss_size = stack_bytes;
    block.contexts[t].uc_link = &block.scheduler;
    makecontext(&block.contexts[t], fiber_entry, 0);
  }
  for (;;) {
    int finished = 0, waiting = 0;
    for (int t = 0; t < threads; ++t) {
      if (block.done[t]) continue;
      block.current = t;
      threadIdx = block.thread_index[t];
      swapcontext(&block.scheduler, &block.contexts[t]);
    }
    for (int t = 0; t < threads; ++t) {
      finished += block.done[t];
      waiting += block.at_barrier[t];
    }
    if (finished == threads) return true;
    if (finished + waiting == threads && finished > 0) {
      block.error = "a __syncthreads / __syncwarp / shuffle was not reached by every thread of "
                    "the block (divergent barrier)";
      return false;
    }
    std::fill(block.at_barrier.begin(), block.at_barrier.end(), 0);
  }
}

inline std::string& last_error() {
  static thread_local std::string message;
  return message;
}

// Runs kernel(args...) over the grid as CUDA would, one block at a time.
template <class... Params>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block_dim, size_t shared_bytes,
                   Params... args) {
  const int threads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidConfiguration;
  constexpr size_t kStack = 256 * 1024;
  std::vector<std::unique_ptr<char[]>> stacks(threads);
  for (auto& stack : stacks) stack.reset(new char[kStack]);
  std::vector<unsigned char> shared(shared_bytes + 16);
  Block block;
  block.exchange.assign(static_cast<size_t>(threads) * 8, 0);
  block.thread_index.resize(threads);
  for (unsigned z = 0, t = 0; z < block_dim.z; ++z)
    for (unsigned y = 0; y < block_dim.y; ++y)
      for (unsigned x = 0; x < block_dim.x; ++x, ++t) block.thread_index[t] = {x, y, z};
  block.body = [&] { kernel(args...); };
  Block* outer_block = running;
  std::vector<unsigned char>* outer_shared = shared_buffer;
  running = &block;
  shared_buffer = &shared;
  const dim3 outer_grid = gridDim, outer_dim = blockDim;
  const uint3 outer_index = blockIdx, outer_thread = threadIdx;
  gridDim = grid;
  blockDim = block_dim;
  cudaError_t result = cudaSuccess;
  for (unsigned z = 0; z < grid.z && result == cudaSuccess; ++z)
    for (unsigned y = 0; y < grid.y && result == cudaSuccess; ++y)
      for (unsigned x = 0; x < grid.x && result == cudaSuccess; ++x) {
        blockIdx = {x, y, z};
        std::fill(shared.begin(), shared.end(), kPoison);  // what an earlier block left there
        if (!run_block(block, threads, kStack, stacks)) {
          last_error() = block.error;
          result = cudaErrorLaunchFailure;
        }
      }
  running = outer_block;
  shared_buffer = outer_shared;
  gridDim = outer_grid;
  blockDim = outer_dim;
  blockIdx = outer_index;
  threadIdx = outer_thread;
  return result;
}

inline int linear_thread() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

// value of lane `source(lane)` in this thread's warp (lanes beyond the block read their own).
template <class T, class Source>
T shuffle(T value, Source source) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  Block& block = *running;
  const int me = linear_thread(), warp = me / warpSize * warpSize;
  const int threads = static_cast<int>(block.thread_index.size());
  std::memcpy(&block.exchange[static_cast<size_t>(me) * 8], &value, sizeof(T));
  barrier();
  int from = warp + source(me - warp);
  if (from < warp || from >= warp + warpSize || from >= threads) from = me;
  T result;
  std::memcpy(&result, &block.exchange[static_cast<size_t>(from) * 8], sizeof(T));
  barrier();
  return result;
}

}  // namespace patnet_emulate

inline void __syncthreads() { patnet_emulate::barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { patnet_emulate::barrier(); }

template <class T> inline T __shfl_xor_sync(unsigned, T value, int mask, int width = warpSize) {
  return patnet_emulate::shuffle(value, [=](int lane) {
    const int target = lane ^ mask;
    return (target / width == lane / width) ? target : lane;
  });
}
template <class T> inline T __shfl_down_sync(unsigned, T value, unsigned delta, int width = warpSize) {
  return patnet_emulate::shuffle(value, [=](int lane) {
    const int target = lane + static_cast<int>(delta);
    return (target / width == lane / width) ? target : lane;
  });
}
template <class T> inline T __shfl_up_sync(unsigned, T value, unsigned delta, int width = warpSize) {
  return patnet_emulate::shuffle(value, [=](int lane) {
    const int target = lane - static_cast<int>(delta);
    return (target >= 0 && target / width == lane / width) ? target : lane;
  });
}
template <class T> inline T __shfl_sync(unsigned, T value, int source, int width = warpSize) {
  return patnet_emulate::shuffle(value, [=](int lane) { return lane / width * width + source % width; });
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return patnet_emulate::last_error().c_str();
    default: return "unknown error";
  }
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
