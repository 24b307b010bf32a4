// Device code shared by the kernels that fuse a partial 3x3 convolution (partial_conv.cu: PConv,
// channel_attention.cu: PAT_ch): the register-tiled conv of one pixel tile, and the
// elementwise pass over the channels the conv does not touch (a copy, or a per-channel affine
// map). Needs only CUDA headers (or emulate.h with PATNET_EMULATE).
//
// The conv works in a *padded flattened* pixel space: pixel (h, w) of an image sits at position
// q = h * (W + 1) + w, so every image row is followed by one position that is always zero. The
// 3x3 neighbour (h + dy, w + dx) of q is then q + dy * (W + 1) + dx for every pixel, with no
// per-pixel edge test: off the left or right edge lands on a zero column, off the top or bottom
// edge outside [0, H * (W + 1)), which is staged as zero. A block takes `tile` consecutive
// positions of one image (only the zero columns are wasted, 1 / (W + 1) of the work) and stages
// the positions [q0 - W - 2, q0 + tile + W + 2) of kCiChunk input channels at a time in shared
// memory as fp32.
//
// Thread tile: kPixPerThread (4) consecutive positions x kCoPerThread (8) output channels, 32
// fp32 accumulators. For each input channel and kernel row a thread reads the 6 positions its 4
// pixels need for the 3 kernel columns, and 3 x 8 weights (two float4 each) shared by its warp,
// then does 96 FMAs: 12 shared loads per 96 FMAs.
//
// Shared staging layout ("phase" layout): the value of position l of a channel is at
// (l & 3) * pitch + (l >> 2), so that the 32 lanes of a warp, reading position 4 * lane + t,
// read 32 consecutive words (no bank conflicts), and so do threads staging consecutive
// positions (pitch = 8 mod 32).
//
// Global memory: staging and the epilogue give each thread one pixel and loop over channels,
// which is coalesced for both layouts: along W for NCHW (consecutive threads, consecutive
// pixels), and, for channels_last with 16-byte-aligned strides, 8 channels of a pixel per
// 16-byte load or store (chosen on the host from the strides; any other strides work through
// scalar accesses). The output tile goes through shared memory ([co][position], fp32) so the
// stores are pixel-major like the loads.
//
// Block shape (make_conv_geometry): co_block = C1 rounded up to 8 (C1 > 80: split into
// ceil(C1 / 80) channel blocks), np = about 256 / (co_block / 8) pixel groups, tile = 4 np
// positions, balanced over the image; threads = np * co_block / 8 rounded up to a warp (<= 256).
// Shared memory: the staged offsets (8 B a position) + max(8 channels x (tile + 2 W + 4),
// co_block x tile) fp32 + 8 x 9 x co_block fp32 weights; 34 to 74 KiB at PATNet shapes.
#pragma once

#include "common.cuh"

#ifdef PATNET_EMULATE
#include <cstring>
#endif

namespace patnet {
namespace conv3x3 {

constexpr int kPixPerThread = 4;    // consecutive padded positions per thread
constexpr int kCoPerThread = 8;     // output channels per thread
constexpr int kCiChunk = 8;         // input channels staged in shared memory per step
constexpr int kMaxCoBlock = 80;     // output channels per block at most (C1 > 80: split)
constexpr int kTargetThreads = 256; // threads per block aimed at
constexpr int kRestUnitsPerThread = 4;  // 16-byte units per thread in a rest block

// ------------------------------------------------------------------------------ small helpers
// n rounded up to a multiple of m.
__host__ __device__ __forceinline__ int round_up(int n, int m) { return (n + m - 1) / m * m; }

// Smallest pitch >= n that is 8 mod 32: the four phase rows then start 8 banks apart.
__host__ __device__ __forceinline__ int phase_pitch(int n) { return n + (40 - n % 32) % 32; }

// Index of position l in the phase layout of pitch `pitch`.
__device__ __forceinline__ int phase_index(int l, int pitch) { return (l & 3) * pitch + (l >> 2); }

// A V (float4, uint4, ...) read from / written to memory that is suitably aligned (memcpy in
// the emulation, where type punning through pointers is undefined behaviour).
template <class V, class P>
__device__ __forceinline__ V load_vec(const P* p) {
#ifdef PATNET_EMULATE
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
#else
  return *reinterpret_cast<const V*>(p);
#endif
}
template <class V, class P>
__device__ __forceinline__ void store_vec(P* p, const V& v) {
#ifdef PATNET_EMULATE
  std::memcpy(p, &v, sizeof(V));
#else
  *reinterpret_cast<V*>(p) = v;
#endif
}

// 16 bytes of T: kVec<T> elements.
template <class T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));
template <class T>
union Pack16 {
  uint4 u;
  T t[kVec<T>];
};

// 8 consecutive elements of T at p (16-byte aligned) as fp32.
template <class T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  constexpr int V = kVec<T>;
#pragma unroll
  for (int i = 0; i < 8; i += V) {
    Pack16<T> pk;
    pk.u = load_vec<uint4>(p + i);
#pragma unroll
    for (int j = 0; j < V; ++j) v[i + j] = to_float<T>(pk.t[j]);
  }
}

// v[0..8) rounded to T, stored at p (16-byte aligned).
template <class T>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  constexpr int V = kVec<T>;
#pragma unroll
  for (int i = 0; i < 8; i += V) {
    Pack16<T> pk;
#pragma unroll
    for (int j = 0; j < V; ++j) pk.t[j] = from_float<T>(v[i + j]);
    store_vec<uint4>(p + i, pk.u);
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether the 8 channels [c, c + 8) of every pixel of `a` (c a multiple of 8) are one aligned
// 16-byte-multiple run: channels unit-stride, every other stride a multiple of 16 bytes.
template <class T>
inline bool channels_vectorizable(const Activation& a, int batch, int height, int width) {
  constexpr int V = kVec<T>;
  return a.sc == 1 && aligned16(a.data) && (batch == 1 || a.sb % V == 0) &&
         (height == 1 || a.sh % V == 0) && (width == 1 || a.sw % V == 0);
}

// ------------------------------------------------------------------------- the conv tile
// How a conv launch tiles the work; computed on the host (make_conv_geometry), read by every
// block.
struct ConvGeometry {
  int c1, height, width;
  int wp;         // padded row length: width + 1
  int hq;         // padded positions of one image: height * wp - 1 (the last zero column cut)
  int np;         // pixel groups per block (kPixPerThread positions each)
  int tile;       // positions per block: kPixPerThread * np
  int tiles;      // blocks along the positions of one image
  int co_block;   // output channels per block, a multiple of kCoPerThread
  int nco;        // output-channel groups per block: co_block / kCoPerThread
  int co_blocks;  // blocks along the output channels: ceil(c1 / co_block)
  int lq;         // staged input positions: tile + 2 * wp + 2
  int in_pitch;   // phase pitch of one staged input channel (4 * in_pitch floats a channel)
  int out_pitch;  // phase pitch of one output channel of the epilogue tile
  int threads;    // block size: np * nco rounded up to a warp
  int src_vec;    // stage 8 input channels of a pixel with 16-byte loads
  int dst_vec;    // store 8 output channels of a pixel with 16-byte stores
  int64_t blocks; // conv blocks: batch * tiles * co_blocks
  size_t table_bytes, buffer_bytes, weight_bytes;  // the three parts of the dynamic smem
  size_t smem_bytes;
};

template <class T>
inline ConvGeometry make_conv_geometry(const Activation& src, const Activation& dst, int batch,
                                       int c1, int height, int width) {
  ConvGeometry g{};
  g.c1 = c1;
  g.height = height;
  g.width = width;
  g.wp = width + 1;
  g.hq = height * g.wp - 1;
  g.co_blocks = static_cast<int>(ceil_div(c1, kMaxCoBlock));
  g.co_block = round_up(static_cast<int>(ceil_div(c1, g.co_blocks)), kCoPerThread);
  g.nco = g.co_block / kCoPerThread;
  const int np_target = max(8, kTargetThreads / g.nco);
  g.tiles = static_cast<int>(ceil_div(g.hq, kPixPerThread * np_target));
  g.np = static_cast<int>(ceil_div(ceil_div(g.hq, g.tiles), kPixPerThread));
  g.tile = kPixPerThread * g.np;
  g.lq = g.tile + 2 * g.wp + 2;
  g.in_pitch = phase_pitch(static_cast<int>(ceil_div(g.lq, 4)));
  g.out_pitch = phase_pitch(g.np);
  g.threads = round_up(g.np * g.nco, 32);
  g.src_vec = channels_vectorizable<T>(src, batch, height, width);
  g.dst_vec = channels_vectorizable<T>(dst, batch, height, width);
  g.blocks = static_cast<int64_t>(batch) * g.tiles * g.co_blocks;
  g.table_bytes = static_cast<size_t>(round_up(g.lq, 2)) * sizeof(int64_t);
  const size_t in_floats = static_cast<size_t>(kCiChunk) * 4 * g.in_pitch;
  const size_t out_floats = static_cast<size_t>(g.co_block) * 4 * g.out_pitch;
  g.buffer_bytes = round_up(static_cast<int>(in_floats > out_floats ? in_floats : out_floats), 4) *
                   sizeof(float);
  g.weight_bytes = static_cast<size_t>(kCiChunk) * 9 * g.co_block * sizeof(float);
  g.smem_bytes = g.table_bytes + g.buffer_bytes + g.weight_bytes;
  return g;
}

// dst[b, co0 : co0 + co_block, pixels of the tile] = conv3x3(src[b, :c1]) for conv block
// `index` (in [0, g.blocks)), in fp32, rounded once to T. Called by every thread of the block
// (it holds barriers).
//   src:  (batch, >= c1, H, W) view, any strides; channels [0, c1) read
//   dst:  (batch, >= c1, H, W) view, any strides; channels [0, c1) written
//   taps: (9, c1, c1) contiguous, [tap = 3 ky + kx, in, out], in T
//   smem: g.smem_bytes of dynamic shared memory, 16-byte aligned
template <class T>
__device__ __forceinline__ void conv_tile(const ConvGeometry& g, const Activation& src,
                                          const Activation& dst, const T* __restrict__ taps,
                                          int64_t index, unsigned char* smem) {
  const int co_index = static_cast<int>(index % g.co_blocks);
  const int64_t rest = index / g.co_blocks;
  const int tile_index = static_cast<int>(rest % g.tiles);
  const int64_t b = rest / g.tiles;
  const int q0 = tile_index * g.tile;
  const int co0 = co_index * g.co_block;
  const int c1 = g.c1, wp = g.wp, width = g.width;
  const int tid = static_cast<int>(threadIdx.x), nthreads = static_cast<int>(blockDim.x);
  const T* __restrict__ src_b = static_cast<const T*>(src.data) + b * src.sb;
  T* __restrict__ dst_b = static_cast<T*>(dst.data) + b * dst.sb;

  int64_t* pix = reinterpret_cast<int64_t*>(smem);  // (lq,): src offset of each staged position
  float* buf = reinterpret_cast<float*>(smem + g.table_bytes);  // staged input / output tile
  float* wts = reinterpret_cast<float*>(smem + g.table_bytes + g.buffer_bytes);
  const int in_stride = 4 * g.in_pitch;    // floats per staged input channel
  const int out_stride = 4 * g.out_pitch;  // floats per output channel of the epilogue tile

  // Source offset of every staged position (-1: zero padding).
  for (int l = tid; l < g.lq; l += nthreads) {
    const int q = q0 - wp - 1 + l;
    int64_t off = -1;
    if (q >= 0 && q < g.hq) {
      const int h = q / wp, w = q - h * wp;
      if (w < width) off = h * src.sh + w * src.sw;
    }
    pix[l] = off;
  }

  const int pg = tid % g.np, cg = tid / g.np;  // pixel group, output-channel group
  const bool active = cg < g.nco;
  float acc[kPixPerThread][kCoPerThread];
#pragma unroll
  for (int j = 0; j < kPixPerThread; ++j)
#pragma unroll
    for (int k = 0; k < kCoPerThread; ++k) acc[j][k] = 0.0f;

  for (int ci0 = 0; ci0 < c1; ci0 += kCiChunk) {
    __syncthreads();  // the previous chunk is consumed (and the offsets are written)
    const bool full = ci0 + kCiChunk <= c1;
    // Stage kCiChunk input channels of every position (thread per position: coalesced along W
    // for NCHW; one or two 16-byte loads per pixel for channels_last).
    for (int l = tid; l < g.lq; l += nthreads) {
      const int64_t off = pix[l];
      float v[kCiChunk];
      if (off < 0) {
#pragma unroll
        for (int c = 0; c < kCiChunk; ++c) v[c] = 0.0f;
      } else if (g.src_vec && full) {
        load8<T>(src_b + off + ci0, v);
      } else {
#pragma unroll
        for (int c = 0; c < kCiChunk; ++c)
          v[c] = ci0 + c < c1 ? to_float<T>(src_b[off + (ci0 + c) * src.sc]) : 0.0f;
      }
      const int idx = phase_index(l, g.in_pitch);
#pragma unroll
      for (int c = 0; c < kCiChunk; ++c) buf[c * in_stride + idx] = v[c];
    }
    // Stage the weights of the chunk for the block's output channels: [ci][tap][co] fp32.
    const int nw = kCiChunk * 9 * g.co_block;
    for (int i = tid; i < nw; i += nthreads) {
      const int co = i % g.co_block, r = i / g.co_block;
      const int ci = r / 9, tap = r - ci * 9;
      float v = 0.0f;
      if (ci0 + ci < c1 && co0 + co < c1)
        v = to_float<T>(taps[(static_cast<int64_t>(tap) * c1 + ci0 + ci) * c1 + co0 + co]);
      wts[i] = v;
    }
    __syncthreads();
    if (active) {
      const float* xr = buf + pg;  // position 4 pg + t of channel c: xr[c * in_stride + ...]
      const float* wr = wts + cg * kCoPerThread;
      // Offset of position 4 pg + ky * wp + j from xr: phase t & 3, row pg + (t >> 2).
      int off[3][kPixPerThread + 2];
#pragma unroll
      for (int ky = 0; ky < 3; ++ky)
#pragma unroll
        for (int j = 0; j < kPixPerThread + 2; ++j) {
          const int t = ky * wp + j;
          off[ky][j] = (t & 3) * g.in_pitch + (t >> 2);
        }
#pragma unroll 2
      for (int c = 0; c < kCiChunk; ++c) {
        const float* xc = xr + c * in_stride;
        const float* wc = wr + c * 9 * g.co_block;
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
          float v[kPixPerThread + 2];
#pragma unroll
          for (int j = 0; j < kPixPerThread + 2; ++j) v[j] = xc[off[ky][j]];
#pragma unroll
          for (int kx = 0; kx < 3; ++kx) {
            const float* wk = wc + (ky * 3 + kx) * g.co_block;
            const float4 wa = load_vec<float4>(wk), wb = load_vec<float4>(wk + 4);
            const float wv[kCoPerThread] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
#pragma unroll
            for (int j = 0; j < kPixPerThread; ++j)
#pragma unroll
              for (int k = 0; k < kCoPerThread; ++k)
                acc[j][k] = fmaf(v[j + kx], wv[k], acc[j][k]);
          }
        }
      }
    }
  }

  // Epilogue: the fp32 tile to shared memory ([co][position], phase layout), then stored by
  // pixel (coalesced along W for NCHW; 16-byte stores of 8 channels for channels_last).
  __syncthreads();
  if (active) {
#pragma unroll
    for (int j = 0; j < kPixPerThread; ++j)
#pragma unroll
      for (int k = 0; k < kCoPerThread; ++k)
        buf[(cg * kCoPerThread + k) * out_stride + j * g.out_pitch + pg] = acc[j][k];
  }
  __syncthreads();
  const int co_count = min(g.co_block, c1 - co0);
  for (int l = tid; l < g.tile; l += nthreads) {
    const int q = q0 + l;
    if (q >= g.hq) break;
    const int h = q / wp, w = q - h * wp;
    if (w >= width) continue;
    T* out = dst_b + h * dst.sh + w * dst.sw + co0 * dst.sc;
    const float* from = buf + phase_index(l, g.out_pitch);
    int co = 0;
    if (g.dst_vec) {
      for (; co + 8 <= co_count; co += 8) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = from[(co + k) * out_stride];
        store8<T>(out + co, v);
      }
    }
    for (; co < co_count; ++co) out[co * dst.sc] = from_float<T>(from[co * out_stride]);
  }
}

// --------------------------------------------------------------- the rest of the channels
// The channels [c_off, c_off + channels) of every pixel, cut into units of up to kVec<T>
// elements (16 bytes) along the unit-stride dimension:
//   mode 0: every tensor has its (c, h, w) block flat (NCHW or a channel slice of it): one run
//           of channels * H * W elements per image, element e is channel e / HW, pixel e % HW;
//   mode 1: every tensor has unit channel stride and flat (h, w) (channels_last or a channel
//           slice of it): one row of `channels` elements per pixel;
//   mode 2: anything else (mixed layouts, odd strides): element e as in mode 0, each offset
//           computed from the four strides; no vector accesses.
struct RestGeometry {
  int mode;
  int channels;         // rest channels
  int hw, width;        // H * W, W
  int row_len;          // elements per row: mode 1: channels, else channels * hw
  int units_per_row;    // ceil(row_len / kVec<T>)
  int64_t units_per_image;  // units_per_row * (mode 1 ? hw : 1)
  int64_t units;        // batch * units_per_image
  int vec;              // full units move as one 16-byte access
  int64_t blocks;       // rest blocks: ceil(units / (threads * kRestUnitsPerThread))
};

// One tensor of a rest pass: data points at channel c_off of image 0; row = the pixel pitch
// (mode 1).
struct RestView {
  void* data;
  int64_t sb, sc, sh, sw, row;
};

template <class T>
inline RestView rest_view(const Activation& a, int c_off, int height, int width) {
  RestView v;
  v.data = static_cast<T*>(a.data) + c_off * a.sc;
  v.sb = a.sb;
  v.sc = a.sc;
  v.sh = a.sh;
  v.sw = a.sw;
  v.row = width > 1 ? a.sw : (height > 1 ? a.sh : 0);
  return v;
}

// Whether the (c, h, w) block of `a` is flat (mode 0), dims of size 1 matching anything.
inline bool planes_flat(const Activation& a, int channels, int height, int width) {
  return (width == 1 || a.sw == 1) && (height == 1 || a.sh == width) &&
         (channels == 1 || a.sc == static_cast<int64_t>(height) * width);
}
// Whether `a` has unit channel stride and flat pixels (mode 1).
inline bool pixels_flat(const Activation& a, int channels, int height, int width) {
  const int64_t row = width > 1 ? a.sw : (height > 1 ? a.sh : 0);
  return (channels == 1 || a.sc == 1) && (height == 1 || width == 1 || a.sh == width * row);
}

// Geometry of a rest pass over tensors[0..n) (channels [c_off, c_off + channels)), whose
// blocks have `threads` threads.
template <class T>
inline RestGeometry make_rest_geometry(const Activation* tensors, int n, int batch, int c_off,
                                       int channels, int height, int width, int threads) {
  constexpr int V = kVec<T>;
  RestGeometry r{};
  r.channels = channels;
  r.hw = height * width;
  r.width = width;
  bool planes = true, pixels = true;
  for (int i = 0; i < n; ++i) {
    planes = planes && planes_flat(tensors[i], channels, height, width);
    pixels = pixels && pixels_flat(tensors[i], channels, height, width);
  }
  // channels_last with one channel and flat planes: both hold; prefer the long runs of mode 0.
  r.mode = planes ? 0 : (pixels ? 1 : 2);
  r.row_len = r.mode == 1 ? channels : channels * r.hw;
  r.units_per_row = static_cast<int>(ceil_div(r.row_len, V));
  r.units_per_image = static_cast<int64_t>(r.units_per_row) * (r.mode == 1 ? r.hw : 1);
  r.units = static_cast<int64_t>(batch) * r.units_per_image;
  bool vec = r.mode != 2;
  for (int i = 0; i < n && vec; ++i) {
    const Activation& a = tensors[i];
    const T* base = static_cast<const T*>(a.data) + c_off * a.sc;
    vec = aligned16(base) && (batch == 1 || a.sb % V == 0);
    if (r.mode == 1 && r.hw > 1) vec = vec && (width > 1 ? a.sw : a.sh) % V == 0;
  }
  r.vec = vec;
  r.blocks = r.units == 0 ? 0 : ceil_div(r.units, static_cast<int64_t>(threads) *
                                                      kRestUnitsPerThread);
  return r;
}

// Where element i of unit u lies: image b, and (for modes 0 and 1) the element offset of the
// unit's first element relative to a view's image base is `row * view.row + e0`.
struct RestUnit {
  int64_t b;
  int row;  // mode 1: the pixel; else 0
  int e0;   // first element of the unit within its row
  int count;  // elements in the unit (kVec<T>, less at the end of a row)
};

template <int V>
__device__ __forceinline__ RestUnit rest_unit(const RestGeometry& r, int64_t u) {
  RestUnit x;
  int64_t in_image;
  if (r.units <= 0x7fffffff) {  // 32-bit division (block-uniform choice; always in practice)
    const unsigned uu = static_cast<unsigned>(u), upi = static_cast<unsigned>(r.units_per_image);
    const unsigned b = uu / upi;
    x.b = b;
    in_image = uu - b * upi;
  } else {
    x.b = u / r.units_per_image;
    in_image = u - x.b * r.units_per_image;
  }
  const unsigned ii = static_cast<unsigned>(in_image), upr = static_cast<unsigned>(r.units_per_row);
  const unsigned row = ii / upr;
  x.row = static_cast<int>(row);
  x.e0 = static_cast<int>(ii - row * upr) * V;
  x.count = min(V, r.row_len - x.e0);
  return x;
}

// Offset (elements, from the view's channel-c_off image-0 base) of element e (mode 0 / 2
// indexing: channel e / hw, pixel e % hw) of image b.
__device__ __forceinline__ int64_t rest_offset_generic(const RestGeometry& r, const RestView& v,
                                                       int64_t b, int e) {
  const int c = e / r.hw, p = e - c * r.hw;
  const int h = p / r.width, w = p - h * r.width;
  return b * v.sb + c * v.sc + h * v.sh + w * v.sw;
}

// Offset of the first element of a unit (modes 0 and 1).
__device__ __forceinline__ int64_t rest_offset(const RestGeometry& r, const RestView& v,
                                               const RestUnit& x) {
  return x.b * v.sb + (r.mode == 1 ? x.row * v.row : 0) + x.e0;
}

// dst[:, c_off + c] = src[:, c_off + c] for the units of rest block `index`. The views'
// data point at channel c_off of image 0.
//   src, dst: (batch, channels, H, W) rest views of the same dtype T
template <class T>
__device__ __forceinline__ void rest_copy(const RestGeometry& r, const RestView& src,
                                          const RestView& dst, int64_t index) {
  constexpr int V = kVec<T>, U = kRestUnitsPerThread;
  const T* __restrict__ s = static_cast<const T*>(src.data);
  T* __restrict__ d = static_cast<T*>(dst.data);
  const int64_t first = index * blockDim.x * U + threadIdx.x;
  if (r.mode == 2) {
    for (int k = 0; k < U; ++k) {
      const int64_t u = first + static_cast<int64_t>(k) * blockDim.x;
      if (u >= r.units) break;
      const RestUnit x = rest_unit<V>(r, u);
      for (int i = 0; i < x.count; ++i)
        d[rest_offset_generic(r, dst, x.b, x.e0 + i)] = s[rest_offset_generic(r, src, x.b, x.e0 + i)];
    }
    return;
  }
  RestUnit x[U];
  uint4 data[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t u = first + static_cast<int64_t>(k) * blockDim.x;
    x[k].count = 0;
    if (u < r.units) x[k] = rest_unit<V>(r, u);
  }
#pragma unroll
  for (int k = 0; k < U; ++k)
    if (r.vec && x[k].count == V) data[k] = load_vec<uint4>(s + rest_offset(r, src, x[k]));
#pragma unroll
  for (int k = 0; k < U; ++k) {
    if (x[k].count == 0) continue;
    T* to = d + rest_offset(r, dst, x[k]);
    if (r.vec && x[k].count == V) {
      store_vec<uint4>(to, data[k]);
    } else {
      const T* from = s + rest_offset(r, src, x[k]);
      for (int i = 0; i < x[k].count; ++i) to[i] = from[i];
    }
  }
}

// dst2 = src2 * scale + shift (+ (aux2 - center) * slope) for the units of rest block `index`,
// in fp32, rounded once to T.
//   src, dst, aux: (batch, c2, H, W) rest views (channel c_off = c1 of the full tensors)
//   scale, shift, center, slope: (batch, c2) fp32 contiguous (center, slope read if HAS_AUX)
template <class T, bool HAS_AUX>
__device__ __forceinline__ void rest_affine(const RestGeometry& r, const RestView& src,
                                            const RestView& dst, const RestView& aux,
                                            const float* __restrict__ scale,
                                            const float* __restrict__ shift,
                                            const float* __restrict__ center,
                                            const float* __restrict__ slope, int64_t index) {
  constexpr int V = kVec<T>, U = kRestUnitsPerThread;
  const T* __restrict__ s = static_cast<const T*>(src.data);
  const T* __restrict__ a = static_cast<const T*>(aux.data);
  T* __restrict__ d = static_cast<T*>(dst.data);
  const int c2 = r.channels;
  const int64_t first = index * blockDim.x * U + threadIdx.x;
  RestUnit x[U];
  Pack16<T> sv[U], av[U];
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const int64_t u = first + static_cast<int64_t>(k) * blockDim.x;
    x[k].count = 0;
    if (u < r.units) x[k] = rest_unit<V>(r, u);
  }
  if (r.vec) {  // vector loads of every full unit first (memory-level parallelism)
#pragma unroll
    for (int k = 0; k < U; ++k) {
      if (x[k].count != V) continue;
      sv[k].u = load_vec<uint4>(s + rest_offset(r, src, x[k]));
      if (HAS_AUX) av[k].u = load_vec<uint4>(a + rest_offset(r, aux, x[k]));
    }
  }
#pragma unroll
  for (int k = 0; k < U; ++k) {
    const RestUnit& xk = x[k];
    if (xk.count == 0) continue;
    const float* __restrict__ sc_b = scale + xk.b * c2;
    const float* __restrict__ sh_b = shift + xk.b * c2;
    const float* __restrict__ ce_b = center + (HAS_AUX ? xk.b * c2 : 0);
    const float* __restrict__ sl_b = slope + (HAS_AUX ? xk.b * c2 : 0);
    // Channel of the unit's first element, and (modes 0 and 2) its pixel.
    int c = r.mode == 1 ? xk.e0 : xk.e0 / r.hw;
    int p = r.mode == 1 ? 0 : xk.e0 - c * r.hw;
    if (r.vec && xk.count == V) {
      Pack16<T> pk;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        float o = fmaf(to_float<T>(sv[k].t[i]), __ldg(sc_b + c), __ldg(sh_b + c));
        if (HAS_AUX) o = fmaf(to_float<T>(av[k].t[i]) - __ldg(ce_b + c), __ldg(sl_b + c), o);
        pk.t[i] = from_float<T>(o);
        if (r.mode == 1) {
          ++c;
        } else if (++p == r.hw) {
          p = 0;
          ++c;
        }
      }
      store_vec<uint4>(d + rest_offset(r, dst, xk), pk.u);
      continue;
    }
    for (int i = 0; i < xk.count; ++i) {
      int64_t so, ao = 0, dof;
      if (r.mode == 2) {
        so = rest_offset_generic(r, src, xk.b, xk.e0 + i);
        if (HAS_AUX) ao = rest_offset_generic(r, aux, xk.b, xk.e0 + i);
        dof = rest_offset_generic(r, dst, xk.b, xk.e0 + i);
      } else {
        so = rest_offset(r, src, xk) + i;
        if (HAS_AUX) ao = rest_offset(r, aux, xk) + i;
        dof = rest_offset(r, dst, xk) + i;
      }
      float o = fmaf(to_float<T>(s[so]), __ldg(sc_b + c), __ldg(sh_b + c));
      if (HAS_AUX) o = fmaf(to_float<T>(a[ao]) - __ldg(ce_b + c), __ldg(sl_b + c), o);
      d[dof] = from_float<T>(o);
      if (r.mode == 1) {
        ++c;
      } else if (++p == r.hw) {
        p = 0;
        ++c;
      }
    }
  }
}

// ------------------------------------------------------------------ fused launch layout
// A fused launch runs `conv` conv blocks and `rest` rest blocks, interleaved (conv, rest, conv,
// rest, ... then the surplus of either) so the memory-bound rest blocks overlap the conv.
struct BlockRole {
  bool rest;
  int64_t index;  // within its kind
};

__device__ __forceinline__ BlockRole block_role(int64_t block, int64_t conv, int64_t rest) {
  const int64_t both = conv < rest ? conv : rest;
  BlockRole role;
  if (block < 2 * both) {
    role.rest = (block & 1) != 0;
    role.index = block >> 1;
  } else {
    role.rest = rest > conv;
    role.index = block - both;
  }
  return role;
}

}  // namespace conv3x3
}  // namespace patnet
