// PConv, the partial 3x3 convolution with channel passthrough (SPEC.md section 1): the CUDA
// kernels behind the launchers of launchers.h. Semantics mirror patnet_kernels/triton/
// partial_conv.py. Needs only CUDA headers (or emulate.h with PATNET_EMULATE).
//
// * conv3x3_passthrough: one launch; its conv blocks compute conv3x3 of a pixel tile of one
//   image for up to 80 output channels (conv3x3.cuh: register-tiled SIMT fp32, 4 pixels x 8
//   output channels per thread, input and weights staged in shared memory by 8 input channels),
//   and its rest blocks, interleaved with them, copy the passthrough channels with 16-byte
//   accesses where the layout allows. The input gradient is the same kernel with the
//   transposed taps; the in-place op is the same kernel reading a copy of X1.
// * conv3x3_weight_grad: a split-K GEMM over the padded pixel space of the whole batch; each
//   block owns (16 in x 16 out channels x 9 taps) of dW and a fixed set of pixel tiles, and
//   writes its fp32 partial to the workspace; a second kernel sums the partials in split order
//   into grad_w. No atomics: the result is the same bits on every run.
#include "conv3x3.cuh"
#include "launchers.h"

#include <climits>

namespace patnet {
namespace {

using conv3x3::BlockRole;
using conv3x3::ConvGeometry;
using conv3x3::RestGeometry;
using conv3x3::RestView;

// ----------------------------------------------------------------- conv3x3 with passthrough
template <class T>
__global__ void __launch_bounds__(256, 3) conv3x3_passthrough_kernel(
    Activation src,             // (batch, >= channels, H, W) T, any strides: conv input in
                                // channels [0, c1), passthrough source in [c1, channels)
    Activation dst,             // (batch, >= channels, H, W) T, any strides: conv output in
                                // [0, c1), passthrough copy in [c1, channels); must not
                                // overlap src[:, :c1]
    const T* __restrict__ taps,  // (9, c1, c1) T contiguous, [tap = 3 ky + kx, in, out]
    ConvGeometry g,             // conv tiling (g.blocks conv blocks)
    RestGeometry r,             // passthrough units (r.blocks rest blocks; 0 without copy)
    RestView rest_src,          // src[:, c1:channels] as a rest view
    RestView rest_dst) {        // dst[:, c1:channels] as a rest view
  PATNET_DYNAMIC_SHARED(unsigned char, smem);
  const BlockRole role = conv3x3::block_role(blockIdx.x, g.blocks, r.blocks);
  if (role.rest) {
    conv3x3::rest_copy<T>(r, rest_src, rest_dst, role.index);
    return;
  }
  conv3x3::conv_tile<T>(g, src, dst, taps, role.index, smem);
}

template <class T>
cudaError_t launch_passthrough(Activation src, Activation dst, const void* taps, int batch,
                               int channels, int c1, int height, int width, bool copy_rest,
                               cudaStream_t stream) {
  if (batch <= 0 || height <= 0 || width <= 0 || c1 < 0 || channels < c1)
    return batch == 0 || height == 0 || width == 0 ? cudaSuccess : cudaErrorInvalidValue;
  ConvGeometry g{};
  if (c1 > 0) {
    g = conv3x3::make_conv_geometry<T>(src, dst, batch, c1, height, width);
  } else {
    g.threads = conv3x3::kTargetThreads;
  }
  RestGeometry r{};
  if (copy_rest && channels > c1) {
    const Activation both[2] = {src, dst};
    r = conv3x3::make_rest_geometry<T>(both, 2, batch, c1, channels - c1, height, width,
                                       g.threads);
  }
  const int64_t blocks = g.blocks + r.blocks;
  if (blocks > INT_MAX || g.threads > 256) return cudaErrorInvalidConfiguration;
  return launch(conv3x3_passthrough_kernel<T>, dim3(static_cast<unsigned>(blocks)),
                dim3(g.threads), g.smem_bytes, stream, src, dst, static_cast<const T*>(taps), g,
                r, conv3x3::rest_view<T>(src, c1, height, width),
                conv3x3::rest_view<T>(dst, c1, height, width));
}

// --------------------------------------------------------------------------- weight grad
// The padded pixel space of the whole batch: position q = b * (H + 1) * (W + 1) + h * (W + 1)
// + w, with a zero row and a zero column after every image, so the 3x3 neighbours of every
// pixel are fixed offsets and tiles may span images without mixing them. A block stages a
// tile of positions of its ci_block input channels (with the halo: positions [q0 - W - 2,
// q0 + tile + W + 2)) and co_block output-gradient channels, fp32, [channel][position].
//
// Thread (pg, ig, cg): input channel ig, output channels 8 cg .. 8 cg + 7, all 9 taps (72 fp32
// accumulators), over the `sub` consecutive positions pg * sub .. of each tile, sliding a
// 3 x 3 window of X1 along them: 3 + 8 shared loads per 72 FMAs. The npg pixel groups of a
// warp are then reduced through shared memory in a fixed order.
constexpr int kWgradCiBlock = 16;  // input channels per block at most
constexpr int kWgradCoBlock = 16;  // output channels per block at most
constexpr int kWgradBlocksPerSm = 4;

struct WgradGeometry {
  int c1, height, width;
  int wp;          // width + 1
  int hq2;         // (height + 1) * wp: padded positions of one image
  int64_t total;   // batch * hq2
  int ci_block;    // input channels per block (a multiple of 4)
  int co_block;    // output channels per block (a multiple of 8)
  int n_ci, n_co;  // blocks along the input and the output channels
  int ncog;        // output-channel groups: co_block / 8
  int npg;         // pixel groups per block (8 or 16: the low lanes of a warp)
  int sub;         // positions per pixel group per tile: 32 + 32 / npg (banks apart)
  int tile;        // positions per tile: npg * sub
  int lx;          // staged X1 positions: tile + 2 * wp + 2
  int x_pitch;     // floats per staged X1 channel: >= lx, 1 mod 32
  int g_pitch;     // floats per staged dY channel: tile
  int64_t tiles;   // ceil(total / tile)
  int splits;      // pixel splits (the partials summed at the end)
  int threads;     // npg * ci_block * ncog
  size_t smem_bytes;
};

inline WgradGeometry make_wgrad_geometry(int batch, int c1, int height, int width,
                                         int num_sms) {
  using conv3x3::round_up;
  WgradGeometry g{};
  g.c1 = c1;
  g.height = height;
  g.width = width;
  g.wp = width + 1;
  g.hq2 = (height + 1) * g.wp;
  g.total = static_cast<int64_t>(batch) * g.hq2;
  g.n_ci = static_cast<int>(ceil_div(c1, kWgradCiBlock));
  g.ci_block = round_up(static_cast<int>(ceil_div(c1, g.n_ci)), 4);
  g.n_co = static_cast<int>(ceil_div(c1, kWgradCoBlock));
  g.co_block = round_up(static_cast<int>(ceil_div(c1, g.n_co)), 8);
  g.ncog = g.co_block / 8;
  const int groups = g.ci_block * g.ncog;
  g.npg = groups >= 16 ? 8 : 16;
  g.sub = 32 + 32 / g.npg;
  g.tile = g.npg * g.sub;
  g.lx = g.tile + 2 * g.wp + 2;
  g.x_pitch = g.lx + (33 - g.lx % 32) % 32;
  g.g_pitch = g.tile;
  g.tiles = ceil_div(g.total, g.tile);
  g.threads = g.npg * groups;
  const int64_t per_split = static_cast<int64_t>(g.n_ci) * g.n_co;
  int64_t splits = ceil_div(static_cast<int64_t>(kWgradBlocksPerSm) * max(num_sms, 1), per_split);
  if (splits > g.tiles) splits = g.tiles;
  if (splits < 1) splits = 1;
  g.splits = static_cast<int>(splits);
  size_t floats = static_cast<size_t>(g.ci_block) * g.x_pitch +
                  static_cast<size_t>(g.co_block) * g.g_pitch;
  const size_t reduce_floats = static_cast<size_t>(8) * g.threads;
  if (reduce_floats > floats) floats = reduce_floats;
  g.smem_bytes = floats * sizeof(float);
  return g;
}

template <class T, int NPG>
__global__ void __launch_bounds__(256) conv3x3_weight_grad_kernel(
    Activation x1,               // (batch, >= c1, H, W) T, any strides: X1, channels [0, c1)
    Activation gy,               // (batch, >= c1, H, W) T, any strides: dY1, channels [0, c1)
    float* __restrict__ partial,  // (splits, 9, c1, c1) fp32 contiguous, [split, tap, in, out]
    int batch,                   // images
    WgradGeometry g) {           // tiling; g.npg == NPG
  constexpr int SUB = 32 + 32 / NPG;
  PATNET_DYNAMIC_SHARED(float, smem);
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const int per_split = g.n_ci * g.n_co;
  const int split = static_cast<int>(blockIdx.x / per_split);
  const int cb = static_cast<int>(blockIdx.x % per_split);
  const int ci0 = (cb % g.n_ci) * g.ci_block, co0 = (cb / g.n_ci) * g.co_block;
  const int c1 = g.c1, wp = g.wp, hq2 = g.hq2, height = g.height, width = g.width;
  const int pg = tid % NPG, ig = (tid / NPG) % g.ci_block, cg = tid / NPG / g.ci_block;
  const T* __restrict__ xp = static_cast<const T*>(x1.data);
  const T* __restrict__ gp = static_cast<const T*>(gy.data);
  float* xs = smem;                                             // [ci][x_pitch]
  float* gs = smem + static_cast<size_t>(g.ci_block) * g.x_pitch;  // [co][g_pitch]

  float acc[9][8];
#pragma unroll
  for (int t = 0; t < 9; ++t)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[t][k] = 0.0f;

  for (int64_t tile = split; tile < g.tiles; tile += g.splits) {
    const int64_t q0 = tile * g.tile;
    const int64_t b0 = q0 / hq2;
    const int r0 = static_cast<int>(q0 - b0 * hq2);
    __syncthreads();  // the previous tile is consumed
    // X1 positions [q0 - wp - 1, q0 + tile + wp + 1), ci_block channels, zero off the images.
    for (int l = tid; l < g.lx; l += nthreads) {
      int r = r0 - wp - 1 + l;
      int64_t b = b0;
      if (r < 0) {
        r += hq2;
        --b;
      } else if (r >= hq2) {
        const int d = r / hq2;
        b += d;
        r -= d * hq2;
      }
      const int h = r / wp, w = r - h * wp;
      const bool ok = b >= 0 && b < batch && h < height && w < width;
      const int64_t off = ok ? b * x1.sb + h * x1.sh + w * x1.sw : 0;
      for (int c = 0; c < g.ci_block; ++c)
        xs[c * g.x_pitch + l] =
            ok && ci0 + c < c1 ? to_float<T>(xp[off + (ci0 + c) * x1.sc]) : 0.0f;
    }
    // dY positions [q0, q0 + tile), co_block channels.
    for (int l = tid; l < g.tile; l += nthreads) {
      int r = r0 + l;
      int64_t b = b0;
      if (r >= hq2) {
        const int d = r / hq2;
        b += d;
        r -= d * hq2;
      }
      const int h = r / wp, w = r - h * wp;
      const bool ok = b < batch && h < height && w < width;
      const int64_t off = ok ? b * gy.sb + h * gy.sh + w * gy.sw : 0;
      for (int c = 0; c < g.co_block; ++c)
        gs[c * g.g_pitch + l] =
            ok && co0 + c < c1 ? to_float<T>(gp[off + (co0 + c) * gy.sc]) : 0.0f;
    }
    __syncthreads();
    // Output position t of the group <-> staged X1 position t + wp + 1; tap (ky, kx) reads
    // X1 at t + ky * wp + kx.
    const float* xr = xs + ig * g.x_pitch + pg * SUB;
    const float* gr = gs + cg * 8 * g.g_pitch + pg * SUB;
    float x0[3], x1v[3];
#pragma unroll
    for (int ky = 0; ky < 3; ++ky) {
      x0[ky] = xr[ky * wp];
      x1v[ky] = xr[ky * wp + 1];
    }
#pragma unroll 4
    for (int t = 0; t < SUB; ++t) {
      float x2[3], gv[8];
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) x2[ky] = xr[t + ky * wp + 2];
#pragma unroll
      for (int k = 0; k < 8; ++k) gv[k] = gr[k * g.g_pitch + t];
#pragma unroll
      for (int ky = 0; ky < 3; ++ky)
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          acc[ky * 3 + 0][k] = fmaf(x0[ky], gv[k], acc[ky * 3 + 0][k]);
          acc[ky * 3 + 1][k] = fmaf(x1v[ky], gv[k], acc[ky * 3 + 1][k]);
          acc[ky * 3 + 2][k] = fmaf(x2[ky], gv[k], acc[ky * 3 + 2][k]);
        }
#pragma unroll
      for (int ky = 0; ky < 3; ++ky) {
        x0[ky] = x1v[ky];
        x1v[ky] = x2[ky];
      }
    }
  }

  // Sum the NPG pixel groups (lanes pg = 0 .. NPG - 1 of the same ig, cg: consecutive
  // threads) in a fixed order, one tap at a time, and write the block's partial.
  float* red = smem;  // [k][thread]
  const int ci = ci0 + ig;
#pragma unroll
  for (int tap = 0; tap < 9; ++tap) {
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 8; ++k) red[k * nthreads + tid] = acc[tap][k];
    __syncthreads();
    if (pg == 0 && ci < c1) {
      float* out = partial + ((static_cast<int64_t>(split) * 9 + tap) * c1 + ci) * c1;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int co = co0 + cg * 8 + k;
        float s = 0.0f;
        for (int p = 0; p < NPG; ++p) s += red[k * nthreads + tid + p];
        if (co < c1) out[co] = s;
      }
    }
  }
}

// grad_w[o, i, ky, kx] = sum over splits, in order, of partial[split, 3 ky + kx, i, o].
__global__ void __launch_bounds__(256) conv3x3_weight_grad_sum_kernel(
    const float* __restrict__ partial,  // (splits, 9, c1, c1) fp32 contiguous
    float* __restrict__ grad_w,         // (c1, c1, 3, 3) fp32 contiguous, [out, in, ky, kx]
    int splits,                         // partials to sum
    int c1) {                           // conv channels
  const int64_t n = static_cast<int64_t>(9) * c1 * c1;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  const int64_t cc = static_cast<int64_t>(c1) * c1;
  const int tap = static_cast<int>(e / cc);
  const int64_t rem = e - tap * cc;
  const int64_t i = rem / c1, o = rem - i * c1;
  float s = 0.0f;
  for (int sp = 0; sp < splits; ++sp) s += partial[sp * n + e];
  grad_w[(o * c1 + i) * 9 + tap] = s;
}

template <class T>
cudaError_t launch_weight_grad(Activation x1, Activation grad_y, float* grad_w,
                               float* workspace, int batch, int c1, int height, int width,
                               int num_sms, cudaStream_t stream) {
  if (c1 <= 0) return c1 == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (batch < 0 || height < 0 || width < 0) return cudaErrorInvalidValue;
  // An empty batch or image sums nothing: one split of no tiles writes the zeros.
  const WgradGeometry g = make_wgrad_geometry(max(batch, 0), c1, max(height, 1),
                                              max(width, 1), num_sms);
  const int eff_batch = height == 0 || width == 0 ? 0 : batch;
  const int64_t blocks = static_cast<int64_t>(g.splits) * g.n_ci * g.n_co;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  cudaError_t err;
  if (g.npg == 8) {
    err = launch(conv3x3_weight_grad_kernel<T, 8>, dim3(static_cast<unsigned>(blocks)),
                 dim3(g.threads), g.smem_bytes, stream, x1, grad_y, workspace, eff_batch, g);
  } else {
    err = launch(conv3x3_weight_grad_kernel<T, 16>, dim3(static_cast<unsigned>(blocks)),
                 dim3(g.threads), g.smem_bytes, stream, x1, grad_y, workspace, eff_batch, g);
  }
  if (err != cudaSuccess) return err;
  const int64_t n = static_cast<int64_t>(9) * c1 * c1;
  return launch(conv3x3_weight_grad_sum_kernel, dim3(static_cast<unsigned>(ceil_div(n, 256))),
                dim3(256), 0, stream, static_cast<const float*>(workspace), grad_w, g.splits, c1);
}

}  // namespace

cudaError_t conv3x3_passthrough(DType dtype, Activation src, Activation dst, const void* taps,
                                int batch, int channels, int c1, int height, int width,
                                bool copy_rest, cudaStream_t stream) {
  PATNET_DISPATCH(dtype, T, return launch_passthrough<T>(src, dst, taps, batch, channels, c1,
                                                         height, width, copy_rest, stream););
}

size_t conv3x3_weight_grad_workspace(int batch, int c1, int height, int width, int num_sms) {
  if (c1 <= 0) return 0;
  const WgradGeometry g = make_wgrad_geometry(max(batch, 0), c1, max(height, 1), max(width, 1),
                                              num_sms);
  return static_cast<size_t>(g.splits) * 9 * c1 * c1 * sizeof(float);
}

cudaError_t conv3x3_weight_grad(DType dtype, Activation x1, Activation grad_y, float* grad_w,
                                float* workspace, int batch, int c1, int height, int width,
                                int num_sms, cudaStream_t stream) {
  PATNET_DISPATCH(dtype, T, return launch_weight_grad<T>(x1, grad_y, grad_w, workspace, batch,
                                                         c1, height, width, num_sms, stream););
}

}  // namespace patnet
