// The host-side launchers of every kernel family in csrc/kernels: what bindings.cpp calls.
// Each enqueues its kernels on `stream` and returns the first launch error (cudaSuccess when
// everything was queued). Pointers are device pointers; shapes are validated by the caller
// (bindings.cpp), so launchers only check what they must (grid limits). No torch here.
#pragma once

#include "common.cuh"

namespace patnet {

// ------------------------------------------------------------------ partial_conv.cu (PConv)
// dst[:, :c1] = conv3x3(src[:, :c1]) with zero padding 1, taps (9, c1, c1) [tap = 3 ky + kx,
// in, out] contiguous in the activation dtype; and, if copy_rest, dst[:, c1:channels] =
// src[:, c1:channels]. src and dst: (batch, channels, height, width) views, any strides; dst must
// not overlap src[:, :c1] (the in-place op convolves a copy of X1). Accumulates in fp32.
cudaError_t conv3x3_passthrough(DType dtype, Activation src, Activation dst, const void* taps,
                                int batch, int channels, int c1, int height, int width,
                                bool copy_rest, cudaStream_t stream);

// Bytes of fp32 workspace conv3x3_weight_grad needs for these sizes.
size_t conv3x3_weight_grad_workspace(int batch, int c1, int height, int width, int num_sms);

// grad_w (c1, c1, 3, 3) fp32 contiguous, [out, in, ky, kx] = sum over b, pixels of
// grad_y[b, out, p] * x1[b, in, p + (ky - 1, kx - 1)] (zero outside the image). x1, grad_y:
// (batch, >= c1, height, width) views; only their first c1 channels are read. Deterministic
// (no float atomics): per-split partial sums in `workspace`, then summed in a fixed order.
cudaError_t conv3x3_weight_grad(DType dtype, Activation x1, Activation grad_y, float* grad_w,
                                float* workspace, int batch, int c1, int height, int width,
                                int num_sms, cudaStream_t stream);

// ------------------------------------------------------------ channel_attention.cu (PAT_ch)
// mean, std: (batch, c2) fp32 contiguous: per (b, c) mean and unbiased std over height * width
// of x[:, c1 + c] (x: (batch, c1 + c2, height, width) view). height * width = 1 gives std = NaN
// (0 / 0, as Tensor.std). Numerically stable (per-chunk mean and M2 merged with Chan's formula).
cudaError_t channel_stats(DType dtype, Activation x, int batch, int c1, int c2, int height,
                          int width, float* mean, float* std, cudaStream_t stream);

// dst = [conv3x3(src[:, :c1]) | src[:, c1:] * scale + shift (+ (aux[:, c1:] - center) * slope)]
// scale, shift, center, slope: (batch, c2) fp32 contiguous, broadcast over height and width;
// aux.data == nullptr: no aux term (center, slope unused). One launch writes both halves.
// src, dst, aux: (batch, c1 + c2, height, width) views; dst must not overlap src or aux.
cudaError_t conv3x3_affine(DType dtype, Activation src, Activation dst, const void* taps,
                           const float* scale, const float* shift, Activation aux,
                           const float* center, const float* slope, int batch, int c1, int c2,
                           int height, int width, cudaStream_t stream);

// sum_xg[b, c] = sum_p grad_y[b, c1 + c, p] * (x[b, c1 + c, p] - center[b, c]),
// sum_g[b, c] = sum_p grad_y[b, c1 + c, p]; all (batch, c2) fp32 contiguous. Deterministic.
cudaError_t channel_grad_sums(DType dtype, Activation x, Activation grad_y, const float* center,
                              float* sum_xg, float* sum_g, int batch, int c1, int c2,
                              int height, int width, cudaStream_t stream);

// ------------------------------------------------------------- rpe_attention.cu (PAT_sf)
// q, k, v, out, grad_*: (batch, heads, n, head_dim) with the strides given (element strides
// of b, h, token, d; the last may be anything but is 1 in practice).
struct Heads {
  void* data;
  int64_t sb, sh, sn, sd;
};

// out = dropout(softmax(scale * q k^T + table[h, bucket])) v, and lse (batch, heads, n) fp32
// contiguous, the natural log-sum-exp of each softmax row (for the backward). table: (heads,
// num_buckets) fp32 contiguous; bucket: (n, n) int32 contiguous, ids in [0, num_buckets).
// Dropout (dropout_p > 0; 0 or less: none; NaN or >= 1: cudaErrorInvalidValue) is the Triton
// kernel's mask bit for bit: r = tl.randint(seed, offset), i.e. Philox4x32-10 with counter
// (offset & 0xffffffff, offset >> 32, 0, 0), key (seed & 0xffffffff, seed >> 32), output word 0,
// at offset ((b * heads + h) * n + i) * n + j; weight (i, j) is kept when (r >> 1) >=
// drop_threshold = min(round_half_even(dropout_p * 2^31), 2^31 - 1), computed from the double
// dropout_p exactly as the Triton launcher's _dropout_args (pass the Python float unrounded);
// kept weights are scaled by (float)(1 / (1 - dropout_p)). The row sum (lse) is taken before
// dropout. n <= kMaxTokens, 1 <= head_dim <= kMaxHeadDim, else cudaErrorInvalidValue.
constexpr int kMaxTokens = 1024;
constexpr int kMaxHeadDim = 256;
cudaError_t rpe_attention_forward(DType dtype, Heads q, Heads k, Heads v, Heads out, float* lse,
                                  const float* table, const int32_t* bucket, int batch,
                                  int heads, int n, int head_dim, int num_buckets, float scale,
                                  double dropout_p, uint64_t seed, cudaStream_t stream);

// Bytes of workspace rpe_attention_backward needs:
// (2 * batch * heads + heads) * n * n floats (each part 256-byte aligned): dS and the dropped
// probabilities per (b, h, i, j), and dS summed over the batch.
size_t rpe_attention_backward_workspace(int batch, int heads, int n, int head_dim,
                                        int num_buckets);

// grad_q, grad_k, grad_v (batch, heads, n, head_dim) in the activation dtype (strides given),
// grad_table (heads, num_buckets) fp32 contiguous (overwritten). Deterministic: the same bits on
// every run (no float atomics). `out` and `lse` are the forward's.
// workspace: rpe_attention_backward_workspace bytes, 256-byte aligned, contents don't matter.
// dropout_p, seed: the forward's.
cudaError_t rpe_attention_backward(DType dtype, Heads grad_out, Heads q, Heads k, Heads v,
                                   Heads out, const float* lse, const float* table,
                                   const int32_t* bucket, Heads grad_q, Heads grad_k,
                                   Heads grad_v, float* grad_table, void* workspace, int batch,
                                   int heads, int n, int head_dim, int num_buckets, float scale,
                                   double dropout_p, uint64_t seed, cudaStream_t stream);

}  // namespace patnet
