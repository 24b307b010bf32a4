// Attention with a gathered relative-position bias (iRPE "bias" mode, PAT_sf), CUDA C++ (SIMT).
//
//   O = dropout(softmax(scale * q k^T + table[h, bucket[i, j]])) v,   lse = log-sum-exp per row
//
// The same semantics as the Triton kernels of patnet_kernels/triton/rpe_attention.py (the ground
// truth), dropout mask included bit for bit. Small maps of classification (N = 49 at 224 x 224,
// up to kMaxTokens), head dims up to 256 (padded to a multiple of 32 and masked), fp32 / fp16 /
// bf16 storage with fp32 arithmetic. No tensor cores: plain FMA tiles through shared memory.
//
// Thread layout of every attention kernel: 128 threads = 16 row groups g of 8 consecutive lanes
// l (g = tid / 8, l = tid % 8). A thread owns rows g + 16 * rr of a tile (rr < RPT), and
//  * in a score phase, keys l + 8 * kk (kk < KPT), so a row's 8 owners reduce it with 3 xor
//    shuffles inside their 8 lanes;
//  * in an accumulation phase, head-dim columns 32 * c + 4 * l + e (c < DC, e < 4), read from
//    shared memory as float4 (a quarter warp reads one contiguous 128-byte row segment).
// Shared-memory rows have LD = 32 * DC + 4 floats: 8 rows read at one column in a quarter warp
// fall on distinct bank groups (LD = 4 mod 32), so the float4 reads are conflict-free.
//
// Forward (rpe_fwd_kernel): grid (batch * heads, cdiv(N, 32)), one block per (b, h, 32 queries).
// Q tile staged once; K and V tiles of BN keys staged per step; flash-attention-2 online softmax
// in the log2 domain; dropout applied to the probabilities after they enter the row sum.
//
// Backward, deterministic (no atomics anywhere), four launches:
//  1. rpe_bwd_dq_kernel, grid (batch * heads, cdiv(N, 32)): per query tile, delta = rowsum(dO * O),
//     loop over key tiles recomputing P = exp(S - lse); dP = dO V^T; dropout; dS = P (dP - delta)
//     (with a single key tile, N <= its width: P recomputed as the forward's softmax and delta =
//     rowsum(P dP), so that N = 1 gives dS = 0 exactly);
//     dQ = scale dS K (registers). Writes dS and the dropped probabilities P' to the workspace,
//     (batch, heads, N, N) fp32 each, every element by exactly one thread.
//  2. rpe_bwd_dkv_kernel, grid (batch * heads, cdiv(N, BN2)): per key tile, dV = P'^T dO,
//     dK = scale dS^T Q, looping over query tiles (dS, P' read back from the workspace).
//  3. rpe_ds_batch_sum_kernel: dSsum[h, i, j] = sum over b = 0, 1, ... of dS[b, h, i, j].
//  4. rpe_table_grad_kernel, grid (num_buckets, heads): grad_table[h, t] = sum of dSsum[h, i, j]
//     over bucket[i, j] == t, each thread over a fixed stride of (i, j), then a fixed tree.
// Every sum has a fixed order: the same bits on every run.
#include <cmath>
#include <cstdint>

#include "launchers.h"

namespace patnet {

// ----------------------------------------------------------------------------- dropout
// Triton's tl.randint(seed, offset) (triton/language/random.py, Triton 3.x): Philox4x32-10 with
// counter (c0, c1, c2, c3) = (offset low 32 bits, offset high 32 bits, 0, 0), key (k0, k1) =
// (seed low 32 bits, seed high 32 bits), 10 rounds, the key raised after every round; randint
// returns c0, an unsigned 32-bit word.
__host__ __device__ __forceinline__ uint32_t rpe_mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint32_t rpe_philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = rpe_mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = rpe_mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Whether dropout keeps weight (i, j) of head bh = b * heads + h: offset = (bh * n + i) * n + j,
// kept when the top 31 bits of the random word are >= drop_threshold (= round(p * 2^31)).
__host__ __device__ __forceinline__ bool rpe_dropout_keep(uint64_t seed, int64_t bh, int n, int i,
                                                          int j, int32_t drop_threshold) {
  const uint64_t offset = static_cast<uint64_t>((bh * n + i) * n + j);
  return static_cast<int32_t>(rpe_philox_randint(seed, offset) >> 1) >= drop_threshold;
}

// drop_threshold as the Triton launcher's _dropout_args computes it from the Python float p:
// min(round(p * 2^31), 2^31 - 1), round half to even (p * 2^31 is exact in double).
inline int32_t rpe_dropout_threshold(double dropout_p) {
  const double t = std::nearbyint(dropout_p * 2147483648.0);
  return t >= 2147483647.0 ? 2147483647 : static_cast<int32_t>(t);
}

namespace rpe {

constexpr int kThreads = 128;  // every attention kernel: 16 row groups x 8 lanes
constexpr int kLanes = 8;
constexpr int kGroups = kThreads / kLanes;
constexpr int kRows = 2;                     // rows per thread in the forward and dQ kernels
constexpr int kBlockM = kGroups * kRows;     // 32 queries per block (forward, dQ)
constexpr int kBlockQ = 32;                  // queries per step of the dK / dV kernel
constexpr int kReduceThreads = 256;          // the table-gradient kernels
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

// Keys per thread in a score phase: 4 (32-key tiles) up to head dim 128, else 2 (16-key tiles,
// to keep shared memory near 100 KiB at head dim 256).
template <int DC> struct Cfg {
  static constexpr int kDPad = 32 * DC;            // padded head dim
  static constexpr int kLd = kDPad + 4;            // shared row stride (floats)
  static constexpr int kKpt = DC <= 4 ? 4 : 2;     // keys per thread (forward, dQ)
  static constexpr int kBlockN = kLanes * kKpt;    // keys per step (forward, dQ)
  static constexpr int kRows2 = DC <= 4 ? 2 : 1;   // keys per thread (dK / dV)
  static constexpr int kBlockN2 = kGroups * kRows2;  // keys per block (dK / dV)
  static constexpr size_t kFwdFloats = size_t(kBlockM) * kLd + 2 * size_t(kBlockN) * kLd +
                                       size_t(kBlockM) * kBlockN;
  static constexpr size_t kDqFloats = 2 * size_t(kBlockM) * kLd + 2 * size_t(kBlockN) * kLd +
                                      2 * size_t(kBlockM) * kBlockN;
  static constexpr size_t kDkvFloats = 2 * size_t(kBlockQ) * kLd + 2 * size_t(kBlockQ) * kBlockN2;
};

__device__ __forceinline__ float4 lds4(const float* p) {
#ifdef PATNET_EMULATE
  return make_float4(p[0], p[1], p[2], p[3]);
#else
  return *reinterpret_cast<const float4*>(p);
#endif
}

__device__ __forceinline__ float dot4(float acc, float4 a, float4 b) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

__device__ __forceinline__ void axpy4(float4& acc, float a, float4 x) {
  acc.x = fmaf(a, x.x, acc.x);
  acc.y = fmaf(a, x.y, acc.y);
  acc.z = fmaf(a, x.z, acc.z);
  acc.w = fmaf(a, x.w, acc.w);
}

// Max / sum over the 8 lanes of a row group (lanes 8g .. 8g + 7 of a warp). Every lane ends with
// the same bits (each butterfly step adds the same two values). Called by every thread.
__device__ __forceinline__ float group_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 1));
  x = fmaxf(x, __shfl_xor_sync(kFull, x, 2));
  return fmaxf(x, __shfl_xor_sync(kFull, x, 4));
}
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(kFull, x, 1);
  x += __shfl_xor_sync(kFull, x, 2);
  return x + __shfl_xor_sync(kFull, x, 4);
}

// dst[r, d] (row stride LD) = src[row0 + r, d] as fp32 for r < ROWS, d < DPAD; zero where
// row0 + r >= n or d >= head_dim. src: one (b, h) slice, token stride sn, dim stride sd.
template <class T, int ROWS, int DC>
__device__ __forceinline__ void load_rows(float* dst, const T* src, int64_t sn, int64_t sd,
                                          int row0, int n, int head_dim) {
  constexpr int kDPad = Cfg<DC>::kDPad, kLd = Cfg<DC>::kLd;
  for (int idx = threadIdx.x; idx < ROWS * kDPad; idx += kThreads) {
    const int r = idx / kDPad;
    const int d = idx - r * kDPad;
    const int i = row0 + r;
    float x = 0.f;
    if (i < n && d < head_dim) x = to_float<T>(src[i * sn + d * sd]);
    dst[r * kLd + d] = x;
  }
}

// Writes the thread's columns 32 c + 4 l + e of row i of one (b, h) slice, times mul.
template <class T, int DC>
__device__ __forceinline__ void store_row(T* dst, int64_t sn, int64_t sd, int i, int lane,
                                          const float4 (&acc)[DC], float mul, int head_dim) {
#pragma unroll
  for (int c = 0; c < DC; ++c) {
    const float vals[4] = {acc[c].x * mul, acc[c].y * mul, acc[c].z * mul, acc[c].w * mul};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = 32 * c + 4 * lane + e;
      if (d < head_dim) dst[i * sn + d * sd] = from_float<T>(vals[e]);
    }
  }
}

// ------------------------------------------------------------------------------- forward
// grid (batch * heads, cdiv(n, 32)), block 128, dynamic shared Cfg<DC>::kFwdFloats floats.
template <class T, int DC>
__global__ void __launch_bounds__(kThreads, 1) rpe_fwd_kernel(
    Heads q,                             // (batch, heads, n, head_dim) T, any strides
    Heads k,                             // (batch, heads, n, head_dim) T, any strides
    Heads v,                             // (batch, heads, n, head_dim) T, any strides
    Heads out,                           // (batch, heads, n, head_dim) T, written
    float* __restrict__ lse,             // (batch, heads, n) fp32 contiguous, written (natural log)
    const float* __restrict__ table,     // (heads, nb) fp32 contiguous
    const int32_t* __restrict__ bucket,  // (n, n) int32 contiguous, ids in [0, nb)
    int heads, int n, int head_dim, int nb,
    float scale,                         // logit scale
    uint64_t seed,                       // Philox key (dropping only)
    int dropping,                        // 1: apply dropout
    int32_t drop_threshold,              // keep when (randint >> 1) >= this
    float drop_scale) {                  // 1 / (1 - p), fp32
  using C = Cfg<DC>;
  constexpr int kLd = C::kLd, kKpt = C::kKpt, kBN = C::kBlockN;
  PATNET_DYNAMIC_SHARED(float, smem);
  float* sQ = smem;                    // (32, kLd) queries
  float* sK = sQ + kBlockM * kLd;      // (kBN, kLd) keys
  float* sV = sK + kBN * kLd;          // (kBN, kLd) values
  float* sP = sV + kBN * kLd;          // (32, kBN) dropped probabilities of this step

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads;
  const int h = static_cast<int>(bh - b * heads);
  const int i0 = blockIdx.y * kBlockM;
  const int g = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const T* qp = static_cast<const T*>(q.data) + b * q.sb + h * q.sh;
  const T* kp = static_cast<const T*>(k.data) + b * k.sb + h * k.sh;
  const T* vp = static_cast<const T*>(v.data) + b * v.sb + h * v.sh;
  const float* tab = table + static_cast<int64_t>(h) * nb;

  load_rows<T, kBlockM, DC>(sQ, qp, q.sn, q.sd, i0, n, head_dim);

  float m[kRows], l[kRows];
  float4 acc[kRows][DC];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[rr][c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const int d4n = (head_dim + 3) / 4;

  for (int j0 = 0; j0 < n; j0 += kBN) {
    __syncthreads();  // the previous step is done with sK, sV, sP (and sQ is loaded)
    load_rows<T, kBN, DC>(sK, kp, k.sn, k.sd, j0, n, head_dim);
    load_rows<T, kBN, DC>(sV, vp, v.sn, v.sd, j0, n, head_dim);
    __syncthreads();

    float s[kRows][kKpt];
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) s[rr][kk] = 0.f;
#pragma unroll 2
    for (int d4 = 0; d4 < d4n; ++d4) {
      float4 qv[kRows];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) qv[rr] = lds4(sQ + (g + kGroups * rr) * kLd + 4 * d4);
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        const float4 kv = lds4(sK + (lane + kLanes * kk) * kLd + 4 * d4);
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr) s[rr][kk] = dot4(s[rr][kk], qv[rr], kv);
      }
    }

    float alpha[kRows];
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const int r = g + kGroups * rr;
      const int i = i0 + r;
      float mx = -INFINITY;
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        const int j = j0 + lane + kLanes * kk;
        float x = -INFINITY;
        if (j < n) {  // logits in log2 units
          const float bias = i < n ? __ldg(tab + __ldg(bucket + i * n + j)) : 0.f;
          x = fmaf(s[rr][kk], scale, bias) * kLog2e;
        }
        s[rr][kk] = x;
        mx = fmaxf(mx, x);
      }
      // Every key tile holds at least one valid key: m_new is finite.
      const float m_new = fmaxf(m[rr], group_max(mx));
      alpha[rr] = exp2f(m[rr] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        const int j = j0 + lane + kLanes * kk;
        float p = exp2f(s[rr][kk] - m_new);
        sum += p;
        if (dropping && i < n && j < n)
          p = rpe_dropout_keep(seed, bh, n, i, j, drop_threshold) ? p * drop_scale : 0.f;
        sP[r * kBN + lane + kLanes * kk] = p;
      }
      l[rr] = l[rr] * alpha[rr] + group_sum(sum);
      m[rr] = m_new;
    }
    __syncthreads();  // sP complete

    const int nmax = min(kBN, n - j0);
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        acc[rr][c].x *= alpha[rr];
        acc[rr][c].y *= alpha[rr];
        acc[rr][c].z *= alpha[rr];
        acc[rr][c].w *= alpha[rr];
      }
#pragma unroll 2
    for (int jj = 0; jj < nmax; ++jj) {
      float p[kRows];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) p[rr] = sP[(g + kGroups * rr) * kBN + jj];
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const float4 vv = lds4(sV + jj * kLd + 32 * c + 4 * lane);
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr) axpy4(acc[rr][c], p[rr], vv);
      }
    }
  }

  T* op = static_cast<T*>(out.data) + b * out.sb + h * out.sh;
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int i = i0 + g + kGroups * rr;
    if (i < n) {
      float4 o[DC];
#pragma unroll
      for (int c = 0; c < DC; ++c)  // acc / l, as the Triton kernel divides
        o[c] = make_float4(acc[rr][c].x / l[rr], acc[rr][c].y / l[rr], acc[rr][c].z / l[rr],
                           acc[rr][c].w / l[rr]);
      store_row<T, DC>(op, out.sn, out.sd, i, lane, o, 1.f, head_dim);
      if (lane == 0) lse[bh * n + i] = (m[rr] + log2f(l[rr])) * kLn2;
    }
  }
}

// -------------------------------------------------------------------------- backward: dQ
// grid (batch * heads, cdiv(n, 32)), block 128, dynamic shared Cfg<DC>::kDqFloats floats.
template <class T, int DC>
__global__ void __launch_bounds__(kThreads, 1) rpe_bwd_dq_kernel(
    Heads grad_out,                      // (batch, heads, n, head_dim) T, any strides: dL/dO
    Heads q,                             // (batch, heads, n, head_dim) T, any strides
    Heads k,                             // (batch, heads, n, head_dim) T, any strides
    Heads v,                             // (batch, heads, n, head_dim) T, any strides
    Heads out,                           // (batch, heads, n, head_dim) T: the forward's O
    const float* __restrict__ lse,       // (batch, heads, n) fp32 contiguous: the forward's
    const float* __restrict__ table,     // (heads, nb) fp32 contiguous
    const int32_t* __restrict__ bucket,  // (n, n) int32 contiguous
    Heads grad_q,                        // (batch, heads, n, head_dim) T, written
    float* __restrict__ ws_ds,           // (batch, heads, n, n) fp32 contiguous, written: dS
    float* __restrict__ ws_pd,           // (batch, heads, n, n) fp32 contiguous, written: P'
    int heads, int n, int head_dim, int nb, float scale, uint64_t seed, int dropping,
    int32_t drop_threshold, float drop_scale) {  // as in the forward
  using C = Cfg<DC>;
  constexpr int kLd = C::kLd, kKpt = C::kKpt, kBN = C::kBlockN;
  PATNET_DYNAMIC_SHARED(float, smem);
  float* sQ = smem;                    // (32, kLd) queries
  float* sO = sQ + kBlockM * kLd;      // (32, kLd) dO
  float* sK = sO + kBlockM * kLd;      // (kBN, kLd) keys
  float* sV = sK + kBN * kLd;          // (kBN, kLd) values
  float* sS = sV + kBN * kLd;          // (32, kBN) dS of this step
  float* sP = sS + kBlockM * kBN;      // (32, kBN) P' (dropped, scaled) of this step

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads;
  const int h = static_cast<int>(bh - b * heads);
  const int i0 = blockIdx.y * kBlockM;
  const int g = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const T* qp = static_cast<const T*>(q.data) + b * q.sb + h * q.sh;
  const T* kp = static_cast<const T*>(k.data) + b * k.sb + h * k.sh;
  const T* vp = static_cast<const T*>(v.data) + b * v.sb + h * v.sh;
  const T* dop = static_cast<const T*>(grad_out.data) + b * grad_out.sb + h * grad_out.sh;
  const T* op = static_cast<const T*>(out.data) + b * out.sb + h * out.sh;
  const float* tab = table + static_cast<int64_t>(h) * nb;
  float* ds_bh = ws_ds + bh * n * n;
  float* pd_bh = ws_pd + bh * n * n;

  load_rows<T, kBlockM, DC>(sQ, qp, q.sn, q.sd, i0, n, head_dim);
  load_rows<T, kBlockM, DC>(sO, dop, grad_out.sn, grad_out.sd, i0, n, head_dim);
  __syncthreads();

  // Several key tiles: delta = rowsum(dO * O) and lse (log2 units) of the thread's rows, P =
  // exp(S - lse). One key tile (n <= kBN: block-uniform), as the Triton kernel's one_kblock:
  // the tile holds every key of a row, so the row's softmax is recomputed exactly as the forward
  // computes it (P = exp2(S - max) / sum) and delta = rowsum(P * dP) from the same dP values.
  // Then a softmax over one key (N = 1), which has no gradient, gets P = 1 and dS = dP - dP = 0
  // exactly; P = exp(S - lse) with delta = rowsum(dO * O) left fp32 noise (~1e-7 |dP|) in dS,
  // hence in dQ, dK and the table gradient, whose exact values are 0 (the H200 op check's
  // "relative error 1e24": noise over a zero reference).
  const bool one_tile = n <= kBN;
  float delta[kRows], lse2[kRows];
  float4 dq[kRows][DC];
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int r = g + kGroups * rr;
    const int i = i0 + r;
    float part = 0.f;
    if (i < n && !one_tile) {
#pragma unroll
      for (int c = 0; c < DC; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int d = 32 * c + 4 * lane + e;
          if (d < head_dim) part = fmaf(sO[r * kLd + d], to_float<T>(op[i * out.sn + d * out.sd]), part);
        }
    }
    delta[rr] = group_sum(part);  // (0 with one tile: set in the loop)
    lse2[rr] = i < n && !one_tile ? lse[bh * n + i] * kLog2e : 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) dq[rr][c] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  const int d4n = (head_dim + 3) / 4;

  for (int j0 = 0; j0 < n; j0 += kBN) {
    __syncthreads();  // the previous step is done with sK, sV, sS, sP
    load_rows<T, kBN, DC>(sK, kp, k.sn, k.sd, j0, n, head_dim);
    load_rows<T, kBN, DC>(sV, vp, v.sn, v.sd, j0, n, head_dim);
    __syncthreads();

    float s[kRows][kKpt], dp[kRows][kKpt];
#pragma unroll
    for (int rr = 0; rr < kRows; ++rr)
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) s[rr][kk] = dp[rr][kk] = 0.f;
#pragma unroll 2
    for (int d4 = 0; d4 < d4n; ++d4) {
      float4 qv[kRows], ov[kRows];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) {
        qv[rr] = lds4(sQ + (g + kGroups * rr) * kLd + 4 * d4);
        ov[rr] = lds4(sO + (g + kGroups * rr) * kLd + 4 * d4);
      }
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        const float4 kv = lds4(sK + (lane + kLanes * kk) * kLd + 4 * d4);
        const float4 vv = lds4(sV + (lane + kLanes * kk) * kLd + 4 * d4);
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr) {
          s[rr][kk] = dot4(s[rr][kk], qv[rr], kv);
          dp[rr][kk] = dot4(dp[rr][kk], ov[rr], vv);
        }
      }
    }

#pragma unroll
    for (int rr = 0; rr < kRows; ++rr) {
      const int r = g + kGroups * rr;
      const int i = i0 + r;
      // logits in log2 units (valid keys of a valid row), and their row max with one tile
      float x[kKpt];
      float mx = -INFINITY;
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        const int j = j0 + lane + kLanes * kk;
        x[kk] = -INFINITY;
        if (i < n && j < n) {
          const float bias = __ldg(tab + __ldg(bucket + i * n + j));
          x[kk] = fmaf(s[rr][kk], scale, bias) * kLog2e;
        }
        mx = fmaxf(mx, x[kk]);
      }
      float p[kKpt], pd[kKpt], dpv[kKpt];
      if (one_tile) {  // as the forward: exp2(x - max) summed over the 8 lanes, then divided
        mx = group_max(mx);  // -inf for a row past n (no valid key; never subtracted)
        float sum = 0.f;
#pragma unroll
        for (int kk = 0; kk < kKpt; ++kk) {
          const int j = j0 + lane + kLanes * kk;
          p[kk] = i < n && j < n ? exp2f(x[kk] - mx) : 0.f;
          sum += p[kk];
        }
        const float l = group_sum(sum);
#pragma unroll
        for (int kk = 0; kk < kKpt; ++kk) p[kk] = p[kk] > 0.f ? p[kk] / l : 0.f;
      } else {
#pragma unroll
        for (int kk = 0; kk < kKpt; ++kk) {
          const int j = j0 + lane + kLanes * kk;
          p[kk] = i < n && j < n ? exp2f(x[kk] - lse2[rr]) : 0.f;
        }
      }
      float part = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        const int j = j0 + lane + kLanes * kk;
        pd[kk] = p[kk];
        dpv[kk] = i < n && j < n ? dp[rr][kk] : 0.f;
        if (dropping && i < n && j < n) {
          const bool keep = rpe_dropout_keep(seed, bh, n, i, j, drop_threshold);
          pd[kk] = keep ? p[kk] * drop_scale : 0.f;
          dpv[kk] = keep ? dpv[kk] * drop_scale : 0.f;
        }
        part = fmaf(p[kk], dpv[kk], part);
      }
      if (one_tile) delta[rr] = group_sum(part);  // rowsum(P * dP): every key is in this tile
#pragma unroll
      for (int kk = 0; kk < kKpt; ++kk) {
        sS[r * kBN + lane + kLanes * kk] = p[kk] * (dpv[kk] - delta[rr]);
        sP[r * kBN + lane + kLanes * kk] = pd[kk];
      }
    }
    __syncthreads();  // sS, sP complete

    // dS and P' to the workspace, rows of kBN consecutive keys.
    for (int idx = threadIdx.x; idx < kBlockM * kBN; idx += kThreads) {
      const int r = idx / kBN, c = idx % kBN;
      const int i = i0 + r, j = j0 + c;
      if (i < n && j < n) {
        ds_bh[i * n + j] = sS[idx];
        pd_bh[i * n + j] = sP[idx];
      }
    }
    const int nmax = min(kBN, n - j0);
#pragma unroll 2
    for (int jj = 0; jj < nmax; ++jj) {
      float dsv[kRows];
#pragma unroll
      for (int rr = 0; rr < kRows; ++rr) dsv[rr] = sS[(g + kGroups * rr) * kBN + jj];
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const float4 kv = lds4(sK + jj * kLd + 32 * c + 4 * lane);
#pragma unroll
        for (int rr = 0; rr < kRows; ++rr) axpy4(dq[rr][c], dsv[rr], kv);
      }
    }
  }

  T* dqp = static_cast<T*>(grad_q.data) + b * grad_q.sb + h * grad_q.sh;
#pragma unroll
  for (int rr = 0; rr < kRows; ++rr) {
    const int i = i0 + g + kGroups * rr;
    if (i < n) store_row<T, DC>(dqp, grad_q.sn, grad_q.sd, i, lane, dq[rr], scale, head_dim);
  }
}

// ---------------------------------------------------------------------- backward: dK, dV
// grid (batch * heads, cdiv(n, Cfg<DC>::kBlockN2)), block 128, dynamic shared
// Cfg<DC>::kDkvFloats floats.
template <class T, int DC>
__global__ void __launch_bounds__(kThreads, 1) rpe_bwd_dkv_kernel(
    Heads grad_out,                      // (batch, heads, n, head_dim) T, any strides: dL/dO
    Heads q,                             // (batch, heads, n, head_dim) T, any strides
    const float* __restrict__ ws_ds,     // (batch, heads, n, n) fp32 contiguous: dS
    const float* __restrict__ ws_pd,     // (batch, heads, n, n) fp32 contiguous: P'
    Heads grad_k,                        // (batch, heads, n, head_dim) T, written
    Heads grad_v,                        // (batch, heads, n, head_dim) T, written
    int heads, int n, int head_dim, float scale) {
  using C = Cfg<DC>;
  constexpr int kLd = C::kLd, kR = C::kRows2, kBN = C::kBlockN2;
  PATNET_DYNAMIC_SHARED(float, smem);
  float* sQ = smem;                    // (32, kLd) queries
  float* sO = sQ + kBlockQ * kLd;      // (32, kLd) dO
  float* sS = sO + kBlockQ * kLd;      // (32, kBN) dS[i, this block's keys]
  float* sP = sS + kBlockQ * kBN;      // (32, kBN) P'[i, this block's keys]

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / heads;
  const int h = static_cast<int>(bh - b * heads);
  const int j0 = blockIdx.y * kBN;
  const int g = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  const T* qp = static_cast<const T*>(q.data) + b * q.sb + h * q.sh;
  const T* dop = static_cast<const T*>(grad_out.data) + b * grad_out.sb + h * grad_out.sh;
  const float* ds_bh = ws_ds + bh * n * n;
  const float* pd_bh = ws_pd + bh * n * n;

  float4 dk[kR][DC], dv[kR][DC];
#pragma unroll
  for (int rr = 0; rr < kR; ++rr)
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      dk[rr][c] = make_float4(0.f, 0.f, 0.f, 0.f);
      dv[rr][c] = make_float4(0.f, 0.f, 0.f, 0.f);
    }

  for (int i0 = 0; i0 < n; i0 += kBlockQ) {
    __syncthreads();  // the previous step is done with the tiles
    load_rows<T, kBlockQ, DC>(sQ, qp, q.sn, q.sd, i0, n, head_dim);
    load_rows<T, kBlockQ, DC>(sO, dop, grad_out.sn, grad_out.sd, i0, n, head_dim);
    for (int idx = threadIdx.x; idx < kBlockQ * kBN; idx += kThreads) {
      const int r = idx / kBN, c = idx % kBN;
      const int i = i0 + r, j = j0 + c;
      const bool ok = i < n && j < n;
      sS[idx] = ok ? ds_bh[i * n + j] : 0.f;
      sP[idx] = ok ? pd_bh[i * n + j] : 0.f;
    }
    __syncthreads();

    const int imax = min(kBlockQ, n - i0);
#pragma unroll 2
    for (int ii = 0; ii < imax; ++ii) {
      float dsv[kR], pdv[kR];
#pragma unroll
      for (int rr = 0; rr < kR; ++rr) {
        dsv[rr] = sS[ii * kBN + g + kGroups * rr];
        pdv[rr] = sP[ii * kBN + g + kGroups * rr];
      }
#pragma unroll
      for (int c = 0; c < DC; ++c) {
        const float4 qv = lds4(sQ + ii * kLd + 32 * c + 4 * lane);
        const float4 ov = lds4(sO + ii * kLd + 32 * c + 4 * lane);
#pragma unroll
        for (int rr = 0; rr < kR; ++rr) {
          axpy4(dk[rr][c], dsv[rr], qv);
          axpy4(dv[rr][c], pdv[rr], ov);
        }
      }
    }
  }

  T* dkp = static_cast<T*>(grad_k.data) + b * grad_k.sb + h * grad_k.sh;
  T* dvp = static_cast<T*>(grad_v.data) + b * grad_v.sb + h * grad_v.sh;
#pragma unroll
  for (int rr = 0; rr < kR; ++rr) {
    const int j = j0 + g + kGroups * rr;
    if (j < n) {
      store_row<T, DC>(dkp, grad_k.sn, grad_k.sd, j, lane, dk[rr], scale, head_dim);
      store_row<T, DC>(dvp, grad_v.sn, grad_v.sd, j, lane, dv[rr], 1.f, head_dim);
    }
  }
}

// ------------------------------------------------------------ backward: the table gradient
// grid (cdiv(per_batch, 256)), block 256: dssum[e] = sum over b = 0, 1, ..., batch - 1 (in that
// order) of ws_ds[b * per_batch + e].
__global__ void __launch_bounds__(kReduceThreads) rpe_ds_batch_sum_kernel(
    const float* __restrict__ ws_ds,  // (batch, heads * n * n) fp32 contiguous: dS
    float* __restrict__ dssum,        // (heads * n * n) fp32 contiguous, written
    int batch, int64_t per_batch) {   // per_batch = heads * n * n
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (e < per_batch) {
    float acc = 0.f;
    for (int b = 0; b < batch; ++b) acc += ws_ds[b * per_batch + e];
    dssum[e] = acc;
  }
}

// grid (nb, heads), block 256, dynamic shared 256 floats: grad_table[h, t] = sum of
// dssum[h, e] over e with bucket[e] == t; thread x sums e = x, x + 256, ... in order, then a
// fixed tree over the 256 partial sums. Every bucket is written (0 where none occurs).
__global__ void __launch_bounds__(kReduceThreads) rpe_table_grad_kernel(
    const float* __restrict__ dssum,     // (heads, nn) fp32 contiguous
    const int32_t* __restrict__ bucket,  // (nn,) int32: the (n, n) map flattened
    float* __restrict__ grad_table,      // (heads, nb) fp32 contiguous, written
    int nn, int nb) {                    // nn = n * n
  PATNET_DYNAMIC_SHARED(float, red);     // (256,) partial sums
  const int t = blockIdx.x, h = blockIdx.y;
  const float* src = dssum + static_cast<int64_t>(h) * nn;
  float acc = 0.f;
  for (int e = threadIdx.x; e < nn; e += kReduceThreads)
    if (__ldg(bucket + e) == t) acc += src[e];
  red[threadIdx.x] = acc;
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < width) red[threadIdx.x] += red[threadIdx.x + width];
  }
  if (threadIdx.x == 0) grad_table[static_cast<int64_t>(h) * nb + t] = red[0];
}

// ------------------------------------------------------------------------------ launchers
struct Dropout {
  int dropping;
  int32_t threshold;
  float scale;
};

// As the Triton launcher's _dropout_args: p <= 0: no dropout; else threshold round(p * 2^31)
// and scale 1 / (1 - p) computed in double, rounded to fp32. p >= 1 or NaN: invalid.
inline bool dropout_args(double dropout_p, Dropout* out) {
  if (dropout_p != dropout_p || dropout_p >= 1.0) return false;
  if (dropout_p <= 0.0) {
    *out = Dropout{0, 0, 1.f};
  } else {
    *out = Dropout{1, rpe_dropout_threshold(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p))};
  }
  return true;
}

inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

#ifdef PATNET_EMULATE
// The CPU emulation poisons what the kernels must write (outputs, workspace) with NaN bytes
// before launching, as a GPU's fresh allocation holds garbage: an element no thread writes, or a
// workspace word read before it is written, shows in the results instead of reading as 0.
inline void poison_heads(DType dtype, Heads t, int batch, int heads, int n, int head_dim) {
  const int64_t elem = dtype == DType::kFloat32 ? 4 : 2;
  unsigned char* base = static_cast<unsigned char*>(t.data);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < n; ++i)
        for (int64_t d = 0; d < head_dim; ++d)
          ::patnet_emulate::poison(base + (b * t.sb + h * t.sh + i * t.sn + d * t.sd) * elem,
                                   static_cast<size_t>(elem));
}
#endif

inline bool shapes_ok(int batch, int heads, int n, int head_dim) {
  return batch >= 0 && heads >= 0 && n >= 0 && n <= kMaxTokens && head_dim >= 1 &&
         head_dim <= kMaxHeadDim && static_cast<int64_t>(batch) * heads <= 0x7fffffff;
}

template <class T, int DC>
cudaError_t forward_dc(Heads q, Heads k, Heads v, Heads out, float* lse, const float* table,
                       const int32_t* bucket, int batch, int heads, int n, int head_dim,
                       int num_buckets, float scale, uint64_t seed, Dropout drop,
                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch * heads), static_cast<unsigned>(ceil_div(n, kBlockM)));
  return launch(rpe_fwd_kernel<T, DC>, grid, dim3(kThreads), Cfg<DC>::kFwdFloats * sizeof(float),
                stream, q, k, v, out, lse, table, bucket, heads, n, head_dim, num_buckets, scale,
                seed, drop.dropping, drop.threshold, drop.scale);
}

template <class T, int DC>
cudaError_t backward_dc(Heads grad_out, Heads q, Heads k, Heads v, Heads out, const float* lse,
                        const float* table, const int32_t* bucket, Heads grad_q, Heads grad_k,
                        Heads grad_v, float* ws_ds, float* ws_pd, int batch, int heads, int n,
                        int head_dim, int num_buckets, float scale, uint64_t seed, Dropout drop,
                        cudaStream_t stream) {
  const unsigned bhs = static_cast<unsigned>(batch * heads);
  cudaError_t err = launch(rpe_bwd_dq_kernel<T, DC>, dim3(bhs, static_cast<unsigned>(ceil_div(n, kBlockM))),
                           dim3(kThreads), Cfg<DC>::kDqFloats * sizeof(float), stream, grad_out, q,
                           k, v, out, lse, table, bucket, grad_q, ws_ds, ws_pd, heads, n, head_dim,
                           num_buckets, scale, seed, drop.dropping, drop.threshold, drop.scale);
  if (err != cudaSuccess) return err;
  return launch(rpe_bwd_dkv_kernel<T, DC>,
                dim3(bhs, static_cast<unsigned>(ceil_div(n, Cfg<DC>::kBlockN2))), dim3(kThreads),
                Cfg<DC>::kDkvFloats * sizeof(float), stream, grad_out, q,
                static_cast<const float*>(ws_ds), static_cast<const float*>(ws_pd), grad_k, grad_v,
                heads, n, head_dim, scale);
}

#define PATNET_RPE_DC_SWITCH(DC_VALUE, CALL) \
  switch (DC_VALUE) {                        \
    case 1: { constexpr int DC = 1; return CALL; } \
    case 2: { constexpr int DC = 2; return CALL; } \
    case 3: { constexpr int DC = 3; return CALL; } \
    case 4: { constexpr int DC = 4; return CALL; } \
    case 5: { constexpr int DC = 5; return CALL; } \
    case 6: { constexpr int DC = 6; return CALL; } \
    case 7: { constexpr int DC = 7; return CALL; } \
    case 8: { constexpr int DC = 8; return CALL; } \
  }                                          \
  return cudaErrorInvalidValue

template <class T>
cudaError_t forward_t(Heads q, Heads k, Heads v, Heads out, float* lse, const float* table,
                      const int32_t* bucket, int batch, int heads, int n, int head_dim,
                      int num_buckets, float scale, uint64_t seed, Dropout drop,
                      cudaStream_t stream) {
  PATNET_RPE_DC_SWITCH((head_dim + 31) / 32,
                       (forward_dc<T, DC>(q, k, v, out, lse, table, bucket, batch, heads, n,
                                          head_dim, num_buckets, scale, seed, drop, stream)));
}

template <class T>
cudaError_t backward_t(Heads grad_out, Heads q, Heads k, Heads v, Heads out, const float* lse,
                       const float* table, const int32_t* bucket, Heads grad_q, Heads grad_k,
                       Heads grad_v, float* ws_ds, float* ws_pd, int batch, int heads, int n,
                       int head_dim, int num_buckets, float scale, uint64_t seed, Dropout drop,
                       cudaStream_t stream) {
  PATNET_RPE_DC_SWITCH((head_dim + 31) / 32,
                       (backward_dc<T, DC>(grad_out, q, k, v, out, lse, table, bucket, grad_q,
                                           grad_k, grad_v, ws_ds, ws_pd, batch, heads, n,
                                           head_dim, num_buckets, scale, seed, drop, stream)));
}

#undef PATNET_RPE_DC_SWITCH

}  // namespace rpe

cudaError_t rpe_attention_forward(DType dtype, Heads q, Heads k, Heads v, Heads out, float* lse,
                                  const float* table, const int32_t* bucket, int batch,
                                  int heads, int n, int head_dim, int num_buckets, float scale,
                                  double dropout_p, uint64_t seed, cudaStream_t stream) {
  rpe::Dropout drop;
  if (!rpe::shapes_ok(batch, heads, n, head_dim) || num_buckets < 1 ||
      !rpe::dropout_args(dropout_p, &drop))
    return cudaErrorInvalidValue;
#ifdef PATNET_EMULATE
  rpe::poison_heads(dtype, out, batch, heads, n, head_dim);
  ::patnet_emulate::poison(lse, static_cast<size_t>(batch) * heads * n * sizeof(float));
#endif
  PATNET_DISPATCH(dtype, T,
                  return rpe::forward_t<T>(q, k, v, out, lse, table, bucket, batch, heads, n,
                                           head_dim, num_buckets, scale, seed, drop, stream););
}

// Layout: dS (batch, heads, n, n) fp32 | P' (batch, heads, n, n) fp32 | dSsum (heads, n, n) fp32,
// each region starting at a multiple of 256 bytes.
size_t rpe_attention_backward_workspace(int batch, int heads, int n, int head_dim,
                                        int num_buckets) {
  (void)head_dim;
  (void)num_buckets;
  if (batch < 0 || heads < 0 || n < 0) return 0;
  const size_t per_head = static_cast<size_t>(n) * n * sizeof(float);
  const size_t full = rpe::align_up(static_cast<size_t>(batch) * heads * per_head);
  return 2 * full + rpe::align_up(static_cast<size_t>(heads) * per_head);
}

cudaError_t rpe_attention_backward(DType dtype, Heads grad_out, Heads q, Heads k, Heads v,
                                   Heads out, const float* lse, const float* table,
                                   const int32_t* bucket, Heads grad_q, Heads grad_k,
                                   Heads grad_v, float* grad_table, void* workspace, int batch,
                                   int heads, int n, int head_dim, int num_buckets, float scale,
                                   double dropout_p, uint64_t seed, cudaStream_t stream) {
  rpe::Dropout drop;
  if (!rpe::shapes_ok(batch, heads, n, head_dim) || num_buckets < 1 ||
      !rpe::dropout_args(dropout_p, &drop))
    return cudaErrorInvalidValue;
  const size_t per_head = static_cast<size_t>(n) * n * sizeof(float);
  const size_t full = rpe::align_up(static_cast<size_t>(batch) * heads * per_head);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* ws_ds = reinterpret_cast<float*>(ws);
  float* ws_pd = reinterpret_cast<float*>(ws + full);
  float* dssum = reinterpret_cast<float*>(ws + 2 * full);
#ifdef PATNET_EMULATE
  ::patnet_emulate::poison(workspace, rpe_attention_backward_workspace(batch, heads, n, head_dim,
                                                                       num_buckets));
  for (Heads g : {grad_q, grad_k, grad_v}) rpe::poison_heads(dtype, g, batch, heads, n, head_dim);
  ::patnet_emulate::poison(grad_table, static_cast<size_t>(heads) * num_buckets * sizeof(float));
#endif

  cudaError_t err = cudaSuccess;
  if (batch > 0 && heads > 0 && n > 0) {
    err = [&]() -> cudaError_t {
      PATNET_DISPATCH(dtype, T,
                      return rpe::backward_t<T>(grad_out, q, k, v, out, lse, table, bucket, grad_q,
                                                grad_k, grad_v, ws_ds, ws_pd, batch, heads, n,
                                                head_dim, num_buckets, scale, seed, drop,
                                                stream););
    }();
    if (err != cudaSuccess) return err;
  }
  const int64_t per_batch = static_cast<int64_t>(heads) * n * n;
  err = launch(rpe::rpe_ds_batch_sum_kernel,
               dim3(static_cast<unsigned>(ceil_div(per_batch, rpe::kReduceThreads))),
               dim3(rpe::kReduceThreads), 0, stream, static_cast<const float*>(ws_ds), dssum,
               batch, per_batch);
  if (err != cudaSuccess) return err;
  return launch(rpe::rpe_table_grad_kernel,
                dim3(static_cast<unsigned>(num_buckets), static_cast<unsigned>(heads)),
                dim3(rpe::kReduceThreads), rpe::kReduceThreads * sizeof(float), stream,
                static_cast<const float*>(dssum), bucket, grad_table, n * n, num_buckets);
}

}  // namespace patnet
