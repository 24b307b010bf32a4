// Test fixture: ops that check the CPU emulation of csrc/kernels/emulate.h itself (16-bit float
// conversions against torch's, barriers, shuffles, a divergent barrier), built by
// tests/test_cuda_build.py through patnet_kernels._cuda_ext.jit_load (also its build-lock test).
#include <torch/library.h>
#include <ATen/ATen.h>

#define PATNET_EMULATE
#include "kernels/common.cuh"

namespace {

at::Tensor float_to_half_bits(const at::Tensor& x) {
  const at::Tensor f = x.contiguous();
  at::Tensor out = at::empty(f.sizes(), f.options().dtype(at::kShort));
  for (int64_t i = 0; i < f.numel(); ++i)
    out.data_ptr<int16_t>()[i] = static_cast<int16_t>(__float2half_rn(f.data_ptr<float>()[i]).x);
  return out;
}

at::Tensor float_to_bfloat16_bits(const at::Tensor& x) {
  const at::Tensor f = x.contiguous();
  at::Tensor out = at::empty(f.sizes(), f.options().dtype(at::kShort));
  for (int64_t i = 0; i < f.numel(); ++i)
    out.data_ptr<int16_t>()[i] =
        static_cast<int16_t>(__float2bfloat16_rn(f.data_ptr<float>()[i]).x);
  return out;
}

at::Tensor half_bits_to_float(const at::Tensor& bits) {
  const at::Tensor b = bits.contiguous();
  at::Tensor out = at::empty(b.sizes(), b.options().dtype(at::kFloat));
  for (int64_t i = 0; i < b.numel(); ++i)
    out.data_ptr<float>()[i] = __half2float(__half{static_cast<uint16_t>(b.data_ptr<int16_t>()[i])});
  return out;
}

// Per block: a shared-memory reversal across a barrier, then a warp xor-shuffle sum.
__global__ void reverse_and_warp_sum(const float* x, float* reversed, float* warp_sums, int n) {
  __shared__ float tile[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  float v = tile[blockDim.x - 1 - threadIdx.x];
  if (i < n) reversed[i] = v;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[i / 32] = v;
}

std::tuple<at::Tensor, at::Tensor> block_probe(const at::Tensor& x) {
  TORCH_CHECK(x.numel() % 256 == 0, "x: whole blocks of 256");
  const at::Tensor f = x.contiguous();
  at::Tensor reversed = at::empty_like(f), sums = at::empty({f.numel() / 32}, f.options());
  const int n = static_cast<int>(f.numel());
  const cudaError_t error = patnet::launch(reverse_and_warp_sum, dim3(n / 256), dim3(256), 0,
                                           nullptr, f.data_ptr<float>(),
                                           reversed.data_ptr<float>(), sums.data_ptr<float>(), n);
  TORCH_CHECK(error == cudaSuccess, cudaGetErrorString(error));
  return {reversed, sums};
}

__global__ void divergent(int* flag) {
  if (threadIdx.x < 7) __syncthreads();
  *flag = 1;
}

std::string divergent_barrier_error() {
  int flag = 0;
  const cudaError_t error = patnet::launch(divergent, dim3(1), dim3(64), 0, nullptr, &flag);
  return error == cudaSuccess ? std::string() : std::string(cudaGetErrorString(error));
}

at::Tensor divergent_barrier(const at::Tensor& x) {
  const std::string message = divergent_barrier_error();
  TORCH_CHECK(message.empty(), message);
  return x;
}

}  // namespace

TORCH_LIBRARY(patnet_emulator_probe, m) {
  m.def("float_to_half_bits(Tensor x) -> Tensor");
  m.def("float_to_bfloat16_bits(Tensor x) -> Tensor");
  m.def("half_bits_to_float(Tensor bits) -> Tensor");
  m.def("block_probe(Tensor x) -> (Tensor, Tensor)");
  m.def("divergent_barrier(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(patnet_emulator_probe, CPU, m) {
  m.impl("float_to_half_bits", &float_to_half_bits);
  m.impl("float_to_bfloat16_bits", &float_to_bfloat16_bits);
  m.impl("half_bits_to_float", &half_bits_to_float);
  m.impl("block_probe", &block_probe);
  m.impl("divergent_barrier", &divergent_barrier);
}
