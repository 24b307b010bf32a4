// PAT_ch, the partial conv fused with Gaussian channel attention (SPEC.md section 2): the CUDA
// kernels behind the launchers of launchers.h. Semantics mirror patnet_kernels/triton/
// channel_attention.py. Needs only CUDA headers (or emulate.h with PATNET_EMULATE).
//
// * channel_stats: per (b, c) of X2 = x[:, c1:], mean and unbiased std over H * W in fp32:
//   every thread reduces chunks of 8 of its pixels exactly (chunk mean, centred M2) and merges
//   them with Chan's formula, then the threads of a channel are merged the same way in a fixed
//   order. H * W = 1 gives std = 0 / 0 = NaN, as Tensor.std.
// * conv3x3_affine: one launch writing the whole output: conv blocks (conv3x3.cuh, as PConv)
//   and, interleaved with them, rest blocks mapping X2 * scale + shift (+ (aux2 - center) *
//   slope, the input gradient through the statistics), 16 bytes per access where aligned.
// * channel_grad_sums: per (b, c) sums over H * W of dY2 * (X2 - center) and of dY2, fp32,
//   per-thread sums reduced in a fixed order (deterministic, no atomics).
//
// The two reductions pick their thread mapping from the layout: lanes along the pixels of one
// (b, c) plane (NCHW: coalesced along W), or, when channels have unit stride (channels_last),
// lanes along the channels and warps along the pixels.
#include "conv3x3.cuh"
#include "launchers.h"

#include <climits>

namespace patnet {
namespace {

using conv3x3::BlockRole;
using conv3x3::ConvGeometry;
using conv3x3::RestGeometry;
using conv3x3::RestView;

// ------------------------------------------------------------------------- conv3x3_affine
template <class T, bool HAS_AUX>
__global__ void __launch_bounds__(256, 3) conv3x3_affine_kernel(
    Activation src,              // (batch, c1 + c2, H, W) T, any strides: X (or dY)
    Activation dst,              // (batch, c1 + c2, H, W) T, any strides; no overlap with
                                 // src or aux
    const T* __restrict__ taps,  // (9, c1, c1) T contiguous, [tap = 3 ky + kx, in, out]
    ConvGeometry g,              // conv tiling (g.blocks conv blocks)
    RestGeometry r,              // affine units over channels [c1, c1 + c2) (r.blocks blocks)
    RestView rest_src,           // src[:, c1:] as a rest view
    RestView rest_dst,           // dst[:, c1:] as a rest view
    RestView rest_aux,           // aux[:, c1:] as a rest view (read only if HAS_AUX)
    const float* __restrict__ scale,   // (batch, c2) fp32 contiguous
    const float* __restrict__ shift,   // (batch, c2) fp32 contiguous
    const float* __restrict__ center,  // (batch, c2) fp32 contiguous (HAS_AUX)
    const float* __restrict__ slope) { // (batch, c2) fp32 contiguous (HAS_AUX)
  PATNET_DYNAMIC_SHARED(unsigned char, smem);
  const BlockRole role = conv3x3::block_role(blockIdx.x, g.blocks, r.blocks);
  if (role.rest) {
    conv3x3::rest_affine<T, HAS_AUX>(r, rest_src, rest_dst, rest_aux, scale, shift, center,
                                     slope, role.index);
    return;
  }
  conv3x3::conv_tile<T>(g, src, dst, taps, role.index, smem);
}

template <class T>
cudaError_t launch_affine(Activation src, Activation dst, const void* taps, const float* scale,
                          const float* shift, Activation aux, const float* center,
                          const float* slope, int batch, int c1, int c2, int height, int width,
                          cudaStream_t stream) {
  if (batch < 0 || height < 0 || width < 0 || c1 < 0 || c2 < 0) return cudaErrorInvalidValue;
  if (batch == 0 || height == 0 || width == 0) return cudaSuccess;
  const bool has_aux = aux.data != nullptr;
  ConvGeometry g{};
  if (c1 > 0) {
    g = conv3x3::make_conv_geometry<T>(src, dst, batch, c1, height, width);
  } else {
    g.threads = conv3x3::kTargetThreads;
  }
  RestGeometry r{};
  if (c2 > 0) {
    const Activation all[3] = {src, dst, aux};
    r = conv3x3::make_rest_geometry<T>(all, has_aux ? 3 : 2, batch, c1, c2, height, width,
                                       g.threads);
  }
  const int64_t blocks = g.blocks + r.blocks;
  if (blocks > INT_MAX || g.threads > 256) return cudaErrorInvalidConfiguration;
  const RestView rs = conv3x3::rest_view<T>(src, c1, height, width);
  const RestView rd = conv3x3::rest_view<T>(dst, c1, height, width);
  const RestView ra = has_aux ? conv3x3::rest_view<T>(aux, c1, height, width) : rs;
  const T* w = static_cast<const T*>(taps);
  if (has_aux) {
    return launch(conv3x3_affine_kernel<T, true>, dim3(static_cast<unsigned>(blocks)),
                  dim3(g.threads), g.smem_bytes, stream, src, dst, w, g, r, rs, rd, ra, scale,
                  shift, center, slope);
  }
  return launch(conv3x3_affine_kernel<T, false>, dim3(static_cast<unsigned>(blocks)),
                dim3(g.threads), g.smem_bytes, stream, src, dst, w, g, r, rs, rd, ra, scale,
                shift, scale, scale);
}

// ------------------------------------------------------------------------ the reductions
constexpr int kReduceThreads = 256;
constexpr int kChunk = 8;  // pixels a thread loads and reduces at once

// How a reduction over the pixels of every (b, c) of X2 maps onto threads.
struct ReduceGeometry {
  int mode;      // 0: `group` lanes along the pixels of one (b, c) plane; 1: `group` channels
                 // of one image per block, lanes along channels, the block's
                 // kReduceThreads / group rows of threads along the pixels
  int group;     // mode 0: lanes per plane (a power of two <= 32); mode 1: 8, 16 or 32
  int64_t blocks;
};

inline int next_pow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

inline ReduceGeometry make_reduce_geometry(bool channels_unit, int batch, int c2, int hw) {
  ReduceGeometry r{};
  if (channels_unit && c2 > 1) {
    r.mode = 1;
    int best = 32;
    for (int gsize = 32; gsize >= 8; gsize /= 2)
      if (ceil_div(c2, gsize) * gsize < ceil_div(c2, best) * best) best = gsize;
    r.group = best;
    r.blocks = static_cast<int64_t>(batch) * ceil_div(c2, best);
  } else {
    r.mode = 0;
    r.group = min(32, next_pow2(static_cast<int>(ceil_div(hw, 4))));
    r.blocks = ceil_div(static_cast<int64_t>(batch) * c2, kReduceThreads / r.group);
  }
  return r;
}

// Offset of pixel p (flattened h * W + w) in a view: p * sw when the pixels are flat.
__device__ __forceinline__ int64_t pixel_offset(const Activation& a, bool flat, int p,
                                                int width) {
  if (flat) return p * a.sw;
  const int h = p / width;
  return h * a.sh + (p - h * width) * a.sw;
}

inline bool pixels_flat(const Activation& a, int height, int width) {
  return height == 1 || a.sh == width * a.sw;
}

// Running (count, mean, M2) of some values; merge: Chan et al.'s pairwise formula.
struct Moments {
  float n, mean, m2;
};

__device__ __forceinline__ void merge(Moments& a, const Moments& b) {
  if (b.n == 0.0f) return;
  const float total = a.n + b.n;
  const float delta = b.mean - a.mean;
  const float f = b.n / total;
  a.mean = fmaf(delta, f, a.mean);
  a.m2 = a.m2 + b.m2 + delta * delta * (a.n * f);
  a.n = total;
}

// Exact moments of the valid ones of v[0..8) (valid: i < count).
__device__ __forceinline__ Moments chunk_moments(const float (&v)[kChunk], int count) {
  Moments m;
  m.n = static_cast<float>(count);
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) s += i < count ? v[i] : 0.0f;
  m.mean = count > 0 ? s / m.n : 0.0f;
  float q = 0.0f;
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float d = v[i] - m.mean;
    q += i < count ? d * d : 0.0f;
  }
  m.m2 = q;
  return m;
}

// Moments merged over the `group` lanes (xor butterfly: every lane ends with the total).
// Called by every thread of the block (shuffles).
__device__ __forceinline__ Moments group_moments(Moments m, int group) {
  for (int mask = 1; mask < 32; mask <<= 1) {
    if (mask >= group) break;  // block-uniform
    Moments o;
    o.n = __shfl_xor_sync(0xffffffffu, m.n, mask);
    o.mean = __shfl_xor_sync(0xffffffffu, m.mean, mask);
    o.m2 = __shfl_xor_sync(0xffffffffu, m.m2, mask);
    // The lower lane of the pair takes its own as the left operand: both lanes compute the
    // same merge in the same order, so all lanes agree bit for bit.
    if (threadIdx.x & mask) {
      Moments left = o;
      merge(left, m);
      m = left;
    } else {
      merge(m, o);
    }
  }
  return m;
}

// mean[b, c], std[b, c] of x[b, c1 + c] over the H * W pixels.
template <class T>
__global__ void __launch_bounds__(kReduceThreads) channel_stats_kernel(
    Activation x,                // (batch, c1 + c2, H, W) T, any strides; [c1, c1 + c2) read
    float* __restrict__ mean,    // (batch, c2) fp32 contiguous
    float* __restrict__ stdev,   // (batch, c2) fp32 contiguous (NaN where H * W = 1)
    int batch, int c1, int c2,   // images; X1 channels (skipped); X2 channels (reduced)
    int height, int width,       // H, W
    ReduceGeometry r,            // thread mapping
    int flat) {                  // x's pixels are flat: pixel p at p * x.sw
  PATNET_DYNAMIC_SHARED(float, smem);
  const T* __restrict__ xp = static_cast<const T*>(x.data);
  const int hw = height * width;
  const int tid = static_cast<int>(threadIdx.x);
  if (r.mode == 0) {
    const int lane = tid % r.group;
    const int64_t plane = static_cast<int64_t>(blockIdx.x) * (kReduceThreads / r.group) +
                          tid / r.group;
    const bool live = plane < static_cast<int64_t>(batch) * c2;
    Moments m{0.0f, 0.0f, 0.0f};
    if (live) {
      const int64_t b = plane / c2;
      const int c = static_cast<int>(plane - b * c2);
      const T* base = xp + b * x.sb + (c1 + c) * x.sc;
      for (int start = 0; start < hw; start += kChunk * r.group) {
        float v[kChunk];
        int count = 0;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
          const int p = start + i * r.group + lane;
          v[i] = 0.0f;
          if (p < hw) {
            v[i] = to_float<T>(base[pixel_offset(x, flat, p, width)]);
            ++count;
          }
        }
        // The valid ones are a prefix of v (p grows with i).
        merge(m, chunk_moments(v, count));
      }
    }
    m = group_moments(m, r.group);
    if (live && lane == 0) {
      mean[plane] = m.mean;
      stdev[plane] = sqrtf(m.m2 / (m.n - 1.0f));  // 0 / 0 = NaN for one pixel
    }
    return;
  }
  // Mode 1: block = (image b, channels cg0 .. cg0 + group), thread = (channel, pixel row).
  const int groups = static_cast<int>(ceil_div(c2, r.group));
  const int64_t b = blockIdx.x / groups;
  const int c = static_cast<int>(blockIdx.x % groups) * r.group + tid % r.group;
  const int row = tid / r.group, rows = kReduceThreads / r.group;
  Moments m{0.0f, 0.0f, 0.0f};
  if (c < c2) {
    const T* base = xp + b * x.sb + (c1 + c) * x.sc;
    for (int start = row; start < hw; start += kChunk * rows) {
      float v[kChunk];
      int count = 0;
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int p = start + i * rows;
        v[i] = 0.0f;
        if (p < hw) {
          v[i] = to_float<T>(base[pixel_offset(x, flat, p, width)]);
          ++count;
        }
      }
      merge(m, chunk_moments(v, count));
    }
  }
  smem[tid] = m.n;
  smem[kReduceThreads + tid] = m.mean;
  smem[2 * kReduceThreads + tid] = m.m2;
  __syncthreads();
  if (row == 0 && c < c2) {
    for (int k = 1; k < rows; ++k) {
      const int o = tid + k * r.group;
      merge(m, Moments{smem[o], smem[kReduceThreads + o], smem[2 * kReduceThreads + o]});
    }
    const int64_t out = b * c2 + c;
    mean[out] = m.mean;
    stdev[out] = sqrtf(m.m2 / (m.n - 1.0f));
  }
}

template <class T>
cudaError_t launch_stats(Activation x, int batch, int c1, int c2, int height, int width,
                         float* mean, float* stdev, cudaStream_t stream) {
  if (batch < 0 || c1 < 0 || c2 < 0 || height <= 0 || width <= 0) return cudaErrorInvalidValue;
  const ReduceGeometry r = make_reduce_geometry(x.sc == 1, batch, c2, height * width);
  if (r.blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  return launch(channel_stats_kernel<T>, dim3(static_cast<unsigned>(r.blocks)),
                dim3(kReduceThreads), 3 * kReduceThreads * sizeof(float), stream, x, mean, stdev,
                batch, c1, c2, height, width, r, static_cast<int>(pixels_flat(x, height, width)));
}

// sum_xg[b, c] = sum_p dY2 (X2 - center[b, c]), sum_g[b, c] = sum_p dY2.
template <class T>
__global__ void __launch_bounds__(kReduceThreads) channel_grad_sums_kernel(
    Activation x,                      // (batch, c1 + c2, H, W) T, any strides: X
    Activation gy,                     // (batch, c1 + c2, H, W) T, any strides: dY
    const float* __restrict__ center,  // (batch, c2) fp32 contiguous
    float* __restrict__ sum_xg,        // (batch, c2) fp32 contiguous
    float* __restrict__ sum_g,         // (batch, c2) fp32 contiguous
    int batch, int c1, int c2,         // images; X1 channels (skipped); X2 channels (reduced)
    int height, int width,             // H, W
    ReduceGeometry r,                  // thread mapping
    int x_flat, int g_flat) {          // pixels flat in x, in gy
  PATNET_DYNAMIC_SHARED(float, smem);
  const T* __restrict__ xp = static_cast<const T*>(x.data);
  const T* __restrict__ gp = static_cast<const T*>(gy.data);
  const int hw = height * width;
  const int tid = static_cast<int>(threadIdx.x);
  int64_t b;
  int c, first, step;
  bool live;
  if (r.mode == 0) {
    const int64_t plane = static_cast<int64_t>(blockIdx.x) * (kReduceThreads / r.group) +
                          tid / r.group;
    live = plane < static_cast<int64_t>(batch) * c2;
    b = live ? plane / c2 : 0;
    c = live ? static_cast<int>(plane - b * c2) : 0;
    first = tid % r.group;
    step = r.group;
  } else {
    const int groups = static_cast<int>(ceil_div(c2, r.group));
    b = blockIdx.x / groups;
    c = static_cast<int>(blockIdx.x % groups) * r.group + tid % r.group;
    live = c < c2;
    first = tid / r.group;
    step = kReduceThreads / r.group;
  }
  float sxg = 0.0f, sg = 0.0f;
  if (live) {
    const T* xb = xp + b * x.sb + (c1 + c) * x.sc;
    const T* gb = gp + b * gy.sb + (c1 + c) * gy.sc;
    const float mu = center[b * c2 + c];
    for (int start = first; start < hw; start += kChunk * step) {
      float xv[kChunk], gv[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int p = start + i * step;
        xv[i] = 0.0f;
        gv[i] = 0.0f;
        if (p < hw) {
          xv[i] = to_float<T>(xb[pixel_offset(x, x_flat, p, width)]) - mu;
          gv[i] = to_float<T>(gb[pixel_offset(gy, g_flat, p, width)]);
        }
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        sxg = fmaf(gv[i], xv[i], sxg);
        sg += gv[i];
      }
    }
  }
  if (r.mode == 0) {
    for (int mask = 1; mask < 32; mask <<= 1) {
      if (mask >= r.group) break;  // block-uniform
      const float oxg = __shfl_xor_sync(0xffffffffu, sxg, mask);
      const float og = __shfl_xor_sync(0xffffffffu, sg, mask);
      // Lower lane's value first on both lanes: every lane gets the same bits.
      if (tid & mask) {
        sxg = oxg + sxg;
        sg = og + sg;
      } else {
        sxg = sxg + oxg;
        sg = sg + og;
      }
    }
    if (live && first == 0) {
      sum_xg[b * c2 + c] = sxg;
      sum_g[b * c2 + c] = sg;
    }
    return;
  }
  smem[tid] = sxg;
  smem[kReduceThreads + tid] = sg;
  __syncthreads();
  if (first == 0 && live) {
    for (int k = 1; k < step; ++k) {
      sxg += smem[tid + k * r.group];
      sg += smem[kReduceThreads + tid + k * r.group];
    }
    sum_xg[b * c2 + c] = sxg;
    sum_g[b * c2 + c] = sg;
  }
}

template <class T>
cudaError_t launch_grad_sums(Activation x, Activation grad_y, const float* center,
                             float* sum_xg, float* sum_g, int batch, int c1, int c2, int height,
                             int width, cudaStream_t stream) {
  if (batch < 0 || c1 < 0 || c2 < 0 || height < 0 || width < 0) return cudaErrorInvalidValue;
  const ReduceGeometry r =
      make_reduce_geometry(x.sc == 1 && grad_y.sc == 1, batch, c2, height * width);
  if (r.blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  return launch(channel_grad_sums_kernel<T>, dim3(static_cast<unsigned>(r.blocks)),
                dim3(kReduceThreads), 2 * kReduceThreads * sizeof(float), stream, x, grad_y,
                center, sum_xg, sum_g, batch, c1, c2, height, width, r,
                static_cast<int>(pixels_flat(x, height, width)),
                static_cast<int>(pixels_flat(grad_y, height, width)));
}

}  // namespace

cudaError_t channel_stats(DType dtype, Activation x, int batch, int c1, int c2, int height,
                          int width, float* mean, float* std, cudaStream_t stream) {
  PATNET_DISPATCH(dtype, T, return launch_stats<T>(x, batch, c1, c2, height, width, mean, std,
                                                   stream););
}

cudaError_t conv3x3_affine(DType dtype, Activation src, Activation dst, const void* taps,
                           const float* scale, const float* shift, Activation aux,
                           const float* center, const float* slope, int batch, int c1, int c2,
                           int height, int width, cudaStream_t stream) {
  PATNET_DISPATCH(dtype, T, return launch_affine<T>(src, dst, taps, scale, shift, aux, center,
                                                    slope, batch, c1, c2, height, width,
                                                    stream););
}

cudaError_t channel_grad_sums(DType dtype, Activation x, Activation grad_y, const float* center,
                              float* sum_xg, float* sum_g, int batch, int c1, int c2,
                              int height, int width, cudaStream_t stream) {
  PATNET_DISPATCH(dtype, T, return launch_grad_sums<T>(x, grad_y, center, sum_xg, sum_g, batch,
                                                       c1, c2, height, width, stream););
}

}  // namespace patnet
