// The CUDA backend's registered ops: schemas and implementations in the `patnet_cuda` namespace,
// the same schemas as the Triton backend's `patnet_triton` ops, so that one set of autograd
// Functions and fakes (patnet_kernels/ops) serves both. The kernels are in csrc/kernels/*.cu
// (CUDA headers only); this file is the only one that sees torch.
//
// Built with PATNET_EMULATE defined, the same ops are registered for CPU tensors and run the
// kernels through the CPU emulation of csrc/kernels/emulate.h (the test suite's way to run them
// without a GPU); otherwise for CUDA tensors, on the current stream of the tensor's device.
#include <torch/library.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/DeviceGuard.h>

#include <limits>
#include <optional>
#include <tuple>

#include "kernels/launchers.h"

#ifdef PATNET_EMULATE
#define PATNET_DISPATCH_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#define PATNET_DISPATCH_KEY CUDA
#endif
// TORCH_LIBRARY_IMPL pastes its key into a name: expand PATNET_DISPATCH_KEY first.
#define PATNET_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

namespace {

using at::Tensor;

#ifdef PATNET_EMULATE
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
cudaStream_t current_stream() { return nullptr; }
int num_sms() { return 2; }
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

patnet::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return patnet::DType::kFloat32;
    case at::kHalf: return patnet::DType::kFloat16;
    case at::kBFloat16: return patnet::DType::kBFloat16;
    default:
      TORCH_CHECK(false, "patnet_cuda: ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type(), "; use backend='torch' for other dtypes");
  }
}

// Every op checks all its inputs before it allocates, copies or launches anything, so bad input
// is a RuntimeError ("patnet_cuda: ...") and never a launch on bad memory.

// t: a defined tensor of like's device (a CUDA tensor; in the emulation build a CPU one), with
// `dim` dimensions of at most 2^31 - 1 elements each (the launchers take sizes as int).
void check_tensor(const Tensor& t, const char* name, const Tensor& like, int64_t dim) {
  TORCH_CHECK(t.defined(), "patnet_cuda: ", name, " is an undefined tensor; pass a ",
              c10::DeviceTypeName(kDevice), " tensor");
  TORCH_CHECK(t.device().type() == kDevice, "patnet_cuda: ", name, " must be a ",
              c10::DeviceTypeName(kDevice), " tensor, got one on ", t.device(),
              "; move it to the input's device");
  TORCH_CHECK(t.device() == like.device(), "patnet_cuda: ", name, " is on ", t.device(),
              " but the input is on ", like.device(), "; move them to one device");
  TORCH_CHECK(t.dim() == dim, "patnet_cuda: ", name, " must have ", dim, " dimensions, got ",
              t.sizes());
  for (const int64_t size : t.sizes())
    TORCH_CHECK(size <= std::numeric_limits<int32_t>::max(), "patnet_cuda: ", name,
                " has shape ", t.sizes(), "; the kernels take at most 2^31 - 1 elements along "
                "a dimension: split the call");
}

// An optional tensor is absent when None (nullopt) or undefined (C++ callers).
bool present(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// t on like's device, with like's shape and dtype.
void check_like(const Tensor& t, const char* name, const Tensor& like, const char* like_name) {
  check_tensor(t, name, like, like.dim());
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type(), "patnet_cuda: ",
              name, " must match ", like_name, " in shape and dtype: got ", t.sizes(), " ",
              t.scalar_type(), ", expected ", like.sizes(), " ", like.scalar_type());
}

// A written tensor must not have elements that share memory (an expand()ed view, say).
void check_writable(const Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "patnet_cuda: ", name,
              " has elements that share memory (an expand()ed view?) and cannot be written in "
              "place; pass a contiguous copy (.contiguous()) or use the out-of-place op");
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "patnet_cuda: launching ", what, " failed: ",
              cudaGetErrorString(error));
}

patnet::Activation activation(const Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

patnet::Heads heads(const Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The memory format of a new activation like x: channels_last when x is laid out that way
// (or is a channel slice of such a tensor), else NCHW. As patnet_kernels/ops/_layout.py.
at::MemoryFormat memory_format_of(const Tensor& x) {
  if (x.dim() != 4 || x.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.stride(1) == 1)
    return at::MemoryFormat::ChannelsLast;
  return at::MemoryFormat::Contiguous;
}

Tensor empty_activation(const Tensor& x, at::IntArrayRef shape) {
  return at::empty(shape, x.options().memory_format(memory_format_of(x)));
}

// (C1, C1, 3, 3) weight -> (9, C1, C1) [tap, in, out] of the forward conv.
Tensor forward_taps(const Tensor& weight) {
  return weight.permute({2, 3, 1, 0}).reshape({9, weight.size(1), weight.size(0)}).contiguous();
}

// (C1, C1, 3, 3) weight -> (9, C1, C1) taps of the input-gradient conv:
// W'[i, o, ky, kx] = W[o, i, 2 - ky, 2 - kx].
Tensor transposed_taps(const Tensor& weight) {
  return weight.flip({2, 3}).permute({2, 3, 0, 1}).reshape({9, weight.size(0), weight.size(1)})
      .contiguous();
}

int64_t check_conv(const Tensor& x, const Tensor& weight, const char* x_name) {
  check_tensor(x, x_name, x, 4);
  check_tensor(weight, "weight", x, 4);
  dtype_of(x, x_name);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "patnet_cuda: weight is ",
              weight.scalar_type(), " but ", x_name, " is ", x.scalar_type());
  const int64_t c1 = weight.size(0);
  TORCH_CHECK(weight.size(1) == c1 && weight.size(2) == 3 && weight.size(3) == 3 && c1 >= 1 &&
                  c1 <= x.size(1),
              "patnet_cuda: weight must be (C1, C1, 3, 3) with 1 <= C1 <= C = ", x.size(1),
              ", got ", weight.sizes());
  return c1;
}

// dst[:, :C1] = conv3x3(src[:, :C1]) (+ dst[:, C1:] = src[:, C1:] if copy_rest).
void conv3x3(const Tensor& src, const Tensor& taps, const Tensor& dst, int64_t c1,
             bool copy_rest) {
  check_launch(patnet::conv3x3_passthrough(
                   dtype_of(src, "x"), activation(src), activation(dst), taps.data_ptr(),
                   src.size(0), src.size(1), c1, src.size(2), src.size(3), copy_rest,
                   current_stream()),
               "conv3x3_passthrough");
}

// ----------------------------------------------------------------------------------- PConv
Tensor partial_conv3x3(const Tensor& x, const Tensor& weight) {
  const int64_t c1 = check_conv(x, weight, "x");
  const c10::DeviceGuard guard(x.device());
  Tensor y = empty_activation(x, x.sizes());
  conv3x3(x, forward_taps(weight), y, c1, /*copy_rest=*/true);
  return y;
}

Tensor partial_conv3x3_(Tensor& x, const Tensor& weight) {
  const int64_t c1 = check_conv(x, weight, "x");
  check_writable(x, "x");
  const c10::DeviceGuard guard(x.device());
  Tensor x1 = empty_activation(x, {x.size(0), c1, x.size(2), x.size(3)});
  x1.copy_(x.narrow(1, 0, c1));
  // The conv reads only the copy, so no block can see a halo another has rewritten.
  conv3x3(x1, forward_taps(weight), x, c1, /*copy_rest=*/false);
  return x1;
}

Tensor partial_conv3x3_input_grad(const Tensor& grad_y, const Tensor& weight) {
  const int64_t c1 = check_conv(grad_y, weight, "grad_y");
  const c10::DeviceGuard guard(grad_y.device());
  Tensor grad_x = empty_activation(grad_y, grad_y.sizes());
  conv3x3(grad_y, transposed_taps(weight), grad_x, c1, /*copy_rest=*/true);
  return grad_x;
}

Tensor conv3x3_weight_grad(const Tensor& x1, const Tensor& grad_y, const Tensor& weight) {
  check_tensor(x1, "x1", x1, 4);
  check_tensor(grad_y, "grad_y", x1, 4);
  const patnet::DType dtype = dtype_of(x1, "x1");
  TORCH_CHECK(grad_y.scalar_type() == x1.scalar_type(), "patnet_cuda: grad_y and x1 differ in dtype");
  const int64_t c1 = x1.size(1);
  TORCH_CHECK(grad_y.size(0) == x1.size(0) && grad_y.size(1) >= c1 &&
                  grad_y.size(2) == x1.size(2) && grad_y.size(3) == x1.size(3),
              "patnet_cuda: grad_y ", grad_y.sizes(), " does not fit x1 ", x1.sizes());
  TORCH_CHECK(check_conv(x1, weight, "x1") == c1, "patnet_cuda: weight ", weight.sizes(),
              " is not (C1, C1, 3, 3) with C1 = ", c1, " (x1's channels)");
  const c10::DeviceGuard guard(x1.device());
  const int b = x1.size(0), h = x1.size(2), w = x1.size(3), sms = num_sms();
  Tensor grad_w = at::empty({c1, c1, 3, 3}, x1.options().dtype(at::kFloat));
  const size_t bytes = patnet::conv3x3_weight_grad_workspace(b, c1, h, w, sms);
  Tensor workspace = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, grad_w.options());
  check_launch(patnet::conv3x3_weight_grad(dtype, activation(x1), activation(grad_y),
                                           grad_w.data_ptr<float>(), workspace.data_ptr<float>(),
                                           b, c1, h, w, sms, current_stream()),
               "conv3x3_weight_grad");
  // shaped, typed and strided as the weight (autograd accumulates a gradient of its
  // parameter's strides without a copy): the sums cast and laid out in one pass
  if (weight.scalar_type() == at::kFloat && weight.is_contiguous()) return grad_w;
  return at::empty_like(weight).copy_(grad_w);
}

// ---------------------------------------------------------------------------------- PAT_ch
std::tuple<Tensor, Tensor> channel_attention_stats(const Tensor& x, int64_t c1) {
  check_tensor(x, "x", x, 4);
  const patnet::DType dtype = dtype_of(x, "x");
  TORCH_CHECK(c1 >= 0 && c1 < x.size(1), "patnet_cuda: c1 = ", c1, " must be in [0, ",
              x.size(1), ")");
  const c10::DeviceGuard guard(x.device());
  const int64_t c2 = x.size(1) - c1;
  Tensor mean = at::empty({x.size(0), c2}, x.options().dtype(at::kFloat));
  Tensor std = at::empty_like(mean);
  check_launch(patnet::channel_stats(dtype, activation(x), x.size(0), c1, c2, x.size(2),
                                     x.size(3), mean.data_ptr<float>(), std.data_ptr<float>(),
                                     current_stream()),
               "channel_stats");
  return {mean, std};
}

// A per-(b, c) coefficient: a float32 (B, C2) tensor on x's device, any strides (the kernels read
// a contiguous copy, made once every input has been checked).
void check_coefficient(const Tensor& coef, const char* name, const Tensor& x, int64_t c2) {
  check_tensor(coef, name, x, 2);
  TORCH_CHECK(coef.scalar_type() == at::kFloat, "patnet_cuda: the per-(b, c) coefficient ", name,
              " must be float32, got ", coef.scalar_type(), "; cast it with .float()");
  TORCH_CHECK(coef.size(0) == x.size(0) && coef.size(1) == c2,
              "patnet_cuda: per-(b, c) coefficients must be (B, C2) = (", x.size(0), ", ", c2,
              "), got ", coef.sizes(), " for ", name);
}

// dst = [conv3x3(src1) | src2 * scale + shift (+ (aux2 - center) * slope)]
Tensor conv3x3_affine(const Tensor& src, const Tensor& taps, int64_t c1, const Tensor& scale,
                      const Tensor& shift, const Tensor* aux, const Tensor* center,
                      const Tensor* slope, const Tensor& like) {
  const int64_t c2 = src.size(1) - c1;
  Tensor dst = empty_activation(like, src.sizes());
  patnet::Activation aux_view{nullptr, 0, 0, 0, 0};
  if (aux != nullptr) aux_view = activation(*aux);
  check_launch(patnet::conv3x3_affine(
                   dtype_of(src, "x"), activation(src), activation(dst), taps.data_ptr(),
                   scale.data_ptr<float>(), shift.data_ptr<float>(), aux_view,
                   center ? center->data_ptr<float>() : nullptr,
                   slope ? slope->data_ptr<float>() : nullptr, src.size(0), c1, c2, src.size(2),
                   src.size(3), current_stream()),
               "conv3x3_affine");
  return dst;
}

Tensor channel_attention_apply(const Tensor& x, const Tensor& conv_weight, const Tensor& scale,
                               const Tensor& shift) {
  const int64_t c1 = check_conv(x, conv_weight, "x");
  check_coefficient(scale, "scale", x, x.size(1) - c1);
  check_coefficient(shift, "shift", x, x.size(1) - c1);
  const c10::DeviceGuard guard(x.device());
  return conv3x3_affine(x, forward_taps(conv_weight), c1, scale.contiguous(), shift.contiguous(),
                        nullptr, nullptr, nullptr, x);
}

std::tuple<Tensor, Tensor> channel_attention_grad_sums(const Tensor& x, const Tensor& grad_y,
                                                       const Tensor& mean) {
  check_tensor(x, "x", x, 4);
  const patnet::DType dtype = dtype_of(x, "x");
  check_like(grad_y, "grad_y", x, "x");
  check_tensor(mean, "mean", x, 2);
  const int64_t c2 = mean.size(1), c1 = x.size(1) - c2;
  TORCH_CHECK(c2 >= 1 && c1 >= 0, "patnet_cuda: mean must be (B, C2) with 1 <= C2 <= C = ",
              x.size(1), " (the forward's statistics of X2), got ", mean.sizes());
  check_coefficient(mean, "mean", x, c2);
  const c10::DeviceGuard guard(x.device());
  const Tensor center = mean.contiguous();
  Tensor sum_xg = at::empty_like(center), sum_g = at::empty_like(center);
  check_launch(patnet::channel_grad_sums(dtype, activation(x), activation(grad_y),
                                         center.data_ptr<float>(), sum_xg.data_ptr<float>(),
                                         sum_g.data_ptr<float>(), x.size(0), c1, c2, x.size(2),
                                         x.size(3), current_stream()),
               "channel_grad_sums");
  return {sum_xg, sum_g};
}

Tensor channel_attention_input_grad(const Tensor& grad_y, const Tensor& x,
                                    const Tensor& conv_weight, const Tensor& scale,
                                    const Tensor& center, const Tensor& slope,
                                    const Tensor& offset) {
  const int64_t c1 = check_conv(grad_y, conv_weight, "grad_y");
  check_like(x, "x", grad_y, "grad_y");
  const int64_t c2 = x.size(1) - c1;
  check_coefficient(scale, "scale", x, c2);
  check_coefficient(center, "center", x, c2);
  check_coefficient(slope, "slope", x, c2);
  check_coefficient(offset, "offset", x, c2);
  const c10::DeviceGuard guard(x.device());
  const Tensor center_c = center.contiguous(), slope_c = slope.contiguous();
  return conv3x3_affine(grad_y, transposed_taps(conv_weight), c1, scale.contiguous(),
                        offset.contiguous(), &x, &center_c, &slope_c, x);
}

// ---------------------------------------------------------------------------------- PAT_sf
constexpr int64_t kSeedLow = int64_t(1) << 32, kSeedHigh = int64_t(1) << 62;

uint64_t seed_value(const std::optional<Tensor>& seed, double dropout_p) {
  if (dropout_p <= 0.0) return static_cast<uint64_t>(kSeedLow);
  TORCH_CHECK(present(seed), "patnet_cuda: rpe_attention with dropout_p > 0 needs a seed");
  TORCH_CHECK(seed->device().is_cpu() && seed->numel() == 1 && seed->scalar_type() == at::kLong,
              "patnet_cuda: the dropout seed must be an int64 CPU tensor of shape ()");
  const int64_t value = seed->item<int64_t>();
  TORCH_CHECK(value >= kSeedLow && value < kSeedHigh, "patnet_cuda: dropout seed must be in "
              "[2^32, 2^62), got ", value);
  return static_cast<uint64_t>(value);
}

struct AttentionShape {
  int64_t batch, heads, n, head_dim, num_buckets;
};

// Everything of an attention call but the range of the bucket ids, which must lie in
// [0, num_buckets): checking that would read them back from the device (a sync on every call),
// so it is the caller's contract (patnet_kernels.rpe_attention checks it, or takes bucket_range).
AttentionShape check_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& table, const Tensor& bucket, double dropout_p) {
  check_tensor(q, "q", q, 4);
  dtype_of(q, "q");
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  check_tensor(table, "table", q, 2);
  check_tensor(bucket, "bucket", q, 2);
  TORCH_CHECK(at::isIntegralType(bucket.scalar_type(), /*includeBool=*/false),
              "patnet_cuda: bucket must be an integer tensor of bucket ids, got ",
              bucket.scalar_type());
  TORCH_CHECK(at::isFloatingType(table.scalar_type()), "patnet_cuda: table must be a floating "
              "point tensor of biases, got ", table.scalar_type());
  const AttentionShape s{q.size(0), q.size(1), q.size(2), q.size(3), table.size(1)};
  TORCH_CHECK(table.size(0) == s.heads && s.num_buckets >= 1,
              "patnet_cuda: table must be (heads, num_buckets) = (", s.heads,
              ", >= 1), got ", table.sizes());
  TORCH_CHECK(bucket.size(0) == s.n && bucket.size(1) == s.n, "patnet_cuda: bucket must be (N, N) "
              "= (", s.n, ", ", s.n, "), got ", bucket.sizes());
  TORCH_CHECK(s.n <= patnet::kMaxTokens, "patnet_cuda: rpe_attention runs N <= ",
              patnet::kMaxTokens, " tokens, got ", s.n, "; use backend='triton'");
  TORCH_CHECK(s.head_dim <= patnet::kMaxHeadDim, "patnet_cuda: rpe_attention runs head dims <= ",
              patnet::kMaxHeadDim, ", got ", s.head_dim, "; use backend='torch'");
  TORCH_CHECK(s.head_dim >= 1, "patnet_cuda: q, k and v must have a head dim >= 1, got ",
              q.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "patnet_cuda: dropout_p must be in [0, 1)");
  return s;
}

std::tuple<Tensor, Tensor> rpe_attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& table, const Tensor& bucket,
                                             double scale, double dropout_p,
                                             const std::optional<Tensor>& seed) {
  const AttentionShape s = check_attention(q, k, v, table, bucket, dropout_p);
  const uint64_t seed_bits = seed_value(seed, dropout_p);
  const c10::DeviceGuard guard(q.device());
  const Tensor table_f = table.to(at::kFloat).contiguous();
  const Tensor ids = bucket.to(at::kInt).contiguous();
  // O laid out as (batch, n, heads, head_dim) contiguous: merging its heads is a view
  Tensor out = at::empty({s.batch, s.n, s.heads, s.head_dim}, q.options()).transpose(1, 2);
  Tensor lse = at::empty({s.batch, s.heads, s.n}, q.options().dtype(at::kFloat));
  check_launch(patnet::rpe_attention_forward(
                   dtype_of(q, "q"), heads(q), heads(k), heads(v), heads(out),
                   lse.data_ptr<float>(), table_f.data_ptr<float>(), ids.data_ptr<int32_t>(),
                   s.batch, s.heads, s.n, s.head_dim, s.num_buckets, static_cast<float>(scale),
                   dropout_p, seed_bits, current_stream()),
               "rpe_attention_forward");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rpe_attention_bwd(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& table, const Tensor& bucket, double scale, double dropout_p,
    const std::optional<Tensor>& seed, bool deterministic) {
  (void)deterministic;  // this backend's backward is always deterministic
  const AttentionShape s = check_attention(q, k, v, table, bucket, dropout_p);
  check_like(grad_out, "grad_out", q, "q");
  check_like(out, "out (the forward's output)", q, "q");
  check_tensor(lse, "lse", q, 3);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.size(0) == s.batch &&
                  lse.size(1) == s.heads && lse.size(2) == s.n,
              "patnet_cuda: lse must be the forward's float32 (B, heads, N) log-sum-exp");
  const uint64_t seed_bits = seed_value(seed, dropout_p);
  const c10::DeviceGuard guard(q.device());
  const Tensor table_f = table.to(at::kFloat).contiguous();
  const Tensor ids = bucket.to(at::kInt).contiguous();
  const Tensor lse_c = lse.contiguous();  // (out: read through its strides)
  Tensor grad_q = at::empty(q.sizes(), q.options()), grad_k = at::empty_like(grad_q),
         grad_v = at::empty_like(grad_q);
  Tensor grad_table = at::empty({s.heads, s.num_buckets}, table_f.options());
  const size_t bytes = patnet::rpe_attention_backward_workspace(s.batch, s.heads, s.n,
                                                                 s.head_dim, s.num_buckets);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  check_launch(patnet::rpe_attention_backward(
                   dtype_of(q, "q"), heads(grad_out), heads(q), heads(k), heads(v), heads(out),
                   lse_c.data_ptr<float>(), table_f.data_ptr<float>(), ids.data_ptr<int32_t>(),
                   heads(grad_q), heads(grad_k), heads(grad_v), grad_table.data_ptr<float>(),
                   workspace.data_ptr(), s.batch, s.heads, s.n, s.head_dim, s.num_buckets,
                   static_cast<float>(scale), dropout_p, seed_bits,
                   current_stream()),
               "rpe_attention_backward");
  return {grad_q, grad_k, grad_v, grad_table.to(table.scalar_type())};
}

// y[:, C1:] of a (B, C, H, W) tensor as (B, N, C2), token n = h * W + w: a view, no copy.
Tensor tokens_view(const Tensor& y, int64_t c1) {
  return y.narrow(1, c1, y.size(1) - c1).flatten(2).transpose(1, 2);
}

// tokens (B, H*W, C2), proj_weight (C2, C2), proj_bias (C2,), keep (B, H*W, C2), all x's dtype.
void check_mixer_inputs(const Tensor& x, int64_t c1, const Tensor& tokens,
                        const Tensor& proj_weight, const std::optional<Tensor>& proj_bias,
                        const std::optional<Tensor>& keep) {
  const int64_t b = x.size(0), n = x.size(2) * x.size(3), c2 = x.size(1) - c1;
  const auto expect = [&](const Tensor& t, const char* name, at::IntArrayRef shape,
                          const char* meaning) {
    check_tensor(t, name, x, static_cast<int64_t>(shape.size()));
    TORCH_CHECK(t.sizes() == shape, "patnet_cuda: ", name, " must be ", meaning, " = ", shape,
                " (C2 = C - C1), got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "patnet_cuda: ", name, " is ",
                t.scalar_type(), " but x is ", x.scalar_type());
  };
  expect(tokens, "tokens", {b, n, c2}, "(B, H*W, C2)");
  expect(proj_weight, "proj_weight", {c2, c2}, "(C2, C2)");
  if (present(proj_bias)) expect(*proj_bias, "proj_bias", {c2}, "(C2,)");
  if (present(keep)) expect(*keep, "keep", {b, n, c2}, "(B, H*W, C2)");
}

// [conv3x3(X1) | proj(tokens)] (* keep on the second half), both written into one buffer.
Tensor self_mixer_output(const Tensor& x, const Tensor& conv_weight, const Tensor& tokens,
                         const Tensor& proj_weight, const std::optional<Tensor>& proj_bias,
                         const std::optional<Tensor>& keep, bool residual) {
  const int64_t c1 = check_conv(x, conv_weight, "x");
  check_mixer_inputs(x, c1, tokens, proj_weight, proj_bias, keep);
  const c10::DeviceGuard guard(x.device());
  Tensor y = empty_activation(x, x.sizes());
  conv3x3(x, forward_taps(conv_weight), y, c1, /*copy_rest=*/false);
  Tensor y2 = tokens_view(y, c1);
  const int64_t b = y2.size(0), n = y2.size(1), c2 = y2.size(2);
  const Tensor weight_t = proj_weight.t().expand({b, c2, c2});
  if (present(proj_bias)) {
    at::baddbmm_out(y2, proj_bias->expand({b, n, c2}), tokens, weight_t);
  } else {
    at::bmm_out(y2, tokens, weight_t);
  }
  if (present(keep)) y2.mul_(*keep);
  if (residual) y.add_(x);  // (PAT_sf's first residual sum)
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> self_mixer_output_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& conv_weight, const Tensor& tokens,
    const Tensor& proj_weight, const std::optional<Tensor>& keep) {
  const int64_t c1 = check_conv(grad_y, conv_weight, "grad_y");
  check_like(x, "x", grad_y, "grad_y");
  check_mixer_inputs(x, c1, tokens, proj_weight, std::nullopt, keep);
  const c10::DeviceGuard guard(x.device());
  Tensor grad_x = empty_activation(x, x.sizes());
  conv3x3(grad_y, transposed_taps(conv_weight), grad_x, c1, /*copy_rest=*/false);
  grad_x.narrow(1, c1, x.size(1) - c1).zero_();
  Tensor grad_conv_weight = conv3x3_weight_grad(x.narrow(1, 0, c1), grad_y, conv_weight);
  Tensor grad_proj_out = tokens_view(grad_y, c1);
  if (present(keep)) grad_proj_out = grad_proj_out * *keep;
  // GEMMs over all B * N tokens (no per-sample (C2, C2) products to sum): views of the tokens,
  // and of dY in channels_last (one copy of it in NCHW).
  const int64_t b = grad_proj_out.size(0), n = grad_proj_out.size(1), c2 = grad_proj_out.size(2);
  Tensor grad_rows = grad_proj_out.reshape({b * n, c2});
  Tensor grad_tokens = at::mm(grad_rows, proj_weight).view({b, n, c2});
  Tensor grad_proj_weight = at::mm(grad_rows.t(), tokens.reshape({b * n, c2}));
  Tensor grad_proj_bias = grad_rows.sum(0);
  return {grad_x, grad_conv_weight, grad_tokens, grad_proj_weight, grad_proj_bias};
}

}  // namespace

TORCH_LIBRARY(patnet_cuda, m) {
  m.def("partial_conv3x3(Tensor x, Tensor weight) -> Tensor");
  m.def("partial_conv3x3_(Tensor(a!) x, Tensor weight) -> Tensor");
  m.def("partial_conv3x3_input_grad(Tensor grad_y, Tensor weight) -> Tensor");
  m.def("conv3x3_weight_grad(Tensor x1, Tensor grad_y, Tensor weight) -> Tensor");
  m.def("channel_attention_stats(Tensor x, SymInt c1) -> (Tensor, Tensor)");
  m.def("channel_attention_apply(Tensor x, Tensor conv_weight, Tensor scale, Tensor shift) -> Tensor");
  m.def("channel_attention_grad_sums(Tensor x, Tensor grad_y, Tensor mean) -> (Tensor, Tensor)");
  m.def("channel_attention_input_grad(Tensor grad_y, Tensor x, Tensor conv_weight, Tensor scale, "
        "Tensor center, Tensor slope, Tensor offset) -> Tensor");
  m.def("rpe_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor table, Tensor bucket, "
        "float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("rpe_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor table, Tensor bucket, float scale, float dropout_p, Tensor? seed, "
        "bool deterministic) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("self_mixer_output(Tensor x, Tensor conv_weight, Tensor tokens, Tensor proj_weight, "
        "Tensor? proj_bias, Tensor? keep, bool residual) -> Tensor");
  m.def("self_mixer_output_backward(Tensor grad_y, Tensor x, Tensor conv_weight, Tensor tokens, "
        "Tensor proj_weight, Tensor? keep) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

PATNET_LIBRARY_IMPL(patnet_cuda, PATNET_DISPATCH_KEY, m) {
  m.impl("partial_conv3x3", &partial_conv3x3);
  m.impl("partial_conv3x3_", &partial_conv3x3_);
  m.impl("partial_conv3x3_input_grad", &partial_conv3x3_input_grad);
  m.impl("conv3x3_weight_grad", &conv3x3_weight_grad);
  m.impl("channel_attention_stats", &channel_attention_stats);
  m.impl("channel_attention_apply", &channel_attention_apply);
  m.impl("channel_attention_grad_sums", &channel_attention_grad_sums);
  m.impl("channel_attention_input_grad", &channel_attention_input_grad);
  m.impl("rpe_attention_fwd", &rpe_attention_fwd);
  m.impl("rpe_attention_bwd", &rpe_attention_bwd);
  m.impl("self_mixer_output", &self_mixer_output);
  m.impl("self_mixer_output_backward", &self_mixer_output_backward);
}

// No op has a derivative of its own: the autograd Functions of patnet_kernels/ops call them
// with autograd off. Called where autograd records (a backward with create_graph=True, a direct
// call on inputs that require grad), an op gets PyTorch's not-implemented node, which raises
// if a gradient is taken through it (as the Triton backend's Python ops do) instead of silently
// contributing none; and a mutated argument's version counter is bumped (autograd's check of
// saved tensors).
namespace {
constexpr const char* kOps[] = {
    "partial_conv3x3", "partial_conv3x3_", "partial_conv3x3_input_grad", "conv3x3_weight_grad",
    "channel_attention_stats", "channel_attention_apply", "channel_attention_grad_sums",
    "channel_attention_input_grad", "rpe_attention_fwd", "rpe_attention_bwd",
    "self_mixer_output", "self_mixer_output_backward"};
}  // namespace

TORCH_LIBRARY_IMPL(patnet_cuda, Autograd, m) {
  for (const char* op : kOps) m.impl(op, torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(patnet_cuda, ADInplaceOrView, m) {
  for (const char* op : kOps) {
    m.impl(op, torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  }
}
