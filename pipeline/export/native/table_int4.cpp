// The tied vocabulary table stored once: mobilemoe::embedding_int4.out (the lookup) and
// mobilemoe::linear_int4.out (the head, x @ table.T) read the same packed INT4 table, so
// the program holds it once (ExecuTorch stores equal constants once) where an XNNPACK
// head would keep a second, repacked copy inside its delegate.
//
// Shapes: table [V, D/2] uint8 (the packing of int4.h), scale [V, D/g] f32;
//   embedding_int4: tokens [...] int64 -> out [..., D] f32, row v = table[v] * scale;
//   linear_int4: x [T, D] f32 -> out [T, V] f32, 8da4w: x quantized per token to
//   asymmetric INT8, times the INT4 rows (what quantized_decomposed's ops compute).
// Work split of the head: parallel_for over blocks of kHeadRows output rows; with at most
// kDirectSlots tokens (decode, or a last-position head) each packed row is dotted in
// integers, with more each row is dequantized once and dotted with every token.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <array>

#include "int4.h"

namespace mobilemoe {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t kHeadRows = 64;  // output rows per work item (a 128k vocabulary: 2k items)

// The table's group size, or 0 when the shapes do not fit [V, D/2] uint8 / [V, D/g] f32.
int64_t table_group(const Tensor& table, const Tensor& scale) {
  if (table.dim() != 2 || scale.dim() != 2 || table.scalar_type() != ScalarType::Byte ||
      scale.scalar_type() != ScalarType::Float || table.size(0) != scale.size(0) || scale.size(1) == 0) {
    return 0;
  }
  const int64_t D = table.size(1) * 2, g = D / scale.size(1);
  return (g * scale.size(1) == D && g % 32 == 0) ? g : 0;
}

Tensor& embedding_int4_out(KernelRuntimeContext& ctx, const Tensor& table, const Tensor& scale,
                           const Tensor& tokens, Tensor& out) {
  const int64_t g = table_group(table, scale);
  ET_KERNEL_CHECK_MSG(ctx, g > 0, InvalidArgument, out,
                      "table must be uint8 [V, D/2] with float32 scales [V, D/g], g a multiple of 32");
  ET_KERNEL_CHECK_MSG(ctx, tokens.scalar_type() == ScalarType::Long && tokens.dim() < 16, InvalidArgument, out,
                      "tokens must be int64 with fewer than 16 dims");
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, out, "out must be float32");
  const int64_t V = table.size(0), D = table.size(1) * 2, N = tokens.numel();
  std::array<SizesType, 16> sizes{};
  for (int64_t i = 0; i < tokens.dim(); ++i) sizes[i] = tokens.size(i);
  sizes[tokens.dim()] = static_cast<SizesType>(D);
  ET_KERNEL_CHECK_MSG(ctx,
                      executorch::runtime::resize_tensor(out, {sizes.data(), static_cast<size_t>(tokens.dim() + 1)}) ==
                          Error::Ok,
                      InvalidArgument, out, "could not resize out to [..., D]");
  const int64_t* ids = tokens.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    ET_KERNEL_CHECK_MSG(ctx, ids[n] >= 0 && ids[n] < V, InvalidArgument, out, "token id out of range");
  }
  const uint8_t* packed = table.const_data_ptr<uint8_t>();
  const float* s = scale.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) dequant_row(packed + ids[n] * (D / 2), s + ids[n] * (D / g), D, g, o + n * D);
  return out;
}

Tensor& linear_int4_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& weight, const Tensor& scale,
                        Tensor& out) {
  const int64_t g = table_group(weight, scale);
  ET_KERNEL_CHECK_MSG(ctx, g > 0, InvalidArgument, out,
                      "weight must be uint8 [O, D/2] with float32 scales [O, D/g], g a multiple of 32");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 2 && x.scalar_type() == ScalarType::Float && x.size(1) == weight.size(1) * 2,
                      InvalidArgument, out, "x must be float32 [T, D] with the weight's D");
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, out, "out must be float32");
  const int64_t T = x.size(0), D = x.size(1), O = weight.size(0), groups = D / g;
  const std::array<SizesType, 2> sizes{static_cast<SizesType>(T), static_cast<SizesType>(O)};
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, {sizes.data(), 2}) == Error::Ok, InvalidArgument,
                      out, "could not resize out to [T, O]");
  QActs a(T, D, g);
  for (int64_t t = 0; t < T; ++t) a.quantize(t, x.const_data_ptr<float>() + t * D);
  const uint8_t* w_ptr = weight.const_data_ptr<uint8_t>();
  const float* s_ptr = scale.const_data_ptr<float>();
  float* y = out.mutable_data_ptr<float>();
  const bool dequantize = T > kDirectSlots || !kIntegerDot;
  const bool ran = executorch::extension::parallel_for(0, (O + kHeadRows - 1) / kHeadRows, 1, [&](int64_t b, int64_t e) {
    std::vector<float> w(dequantize ? D : 0);
    float d[kHeadRows];
    for (int64_t r0 = b * kHeadRows; r0 < std::min(O, e * kHeadRows); r0 += kHeadRows) {
      const int64_t r1 = std::min(O, r0 + kHeadRows);
      if (!dequantize) {  // one or two tokens: the packed rows in integers
        for (int64_t t = 0; t < T; ++t) {
          dot_packed_block(w_ptr + r0 * (D / 2), s_ptr + r0 * groups, r1 - r0, D, g, a.q16.data() + t * D, d);
          for (int64_t r = r0; r < r1; ++r) y[t * O + r] = a.scale[t] * d[r - r0];
        }
        continue;
      }
      for (int64_t r = r0; r < r1; ++r) {  // more: each row dequantized once, dotted with every token
        dequant_row(w_ptr + r * (D / 2), s_ptr + r * groups, D, g, w.data());
        for (int64_t t = 0; t < T; ++t) y[t * O + r] = a.scale[t] * dot(w.data(), a.q.data() + t * D, D);
      }
    }
  });
  ET_KERNEL_CHECK_MSG(ctx, ran, Internal, out, "parallel_for refused the work split");
  return out;
}

}  // namespace
}  // namespace mobilemoe

EXECUTORCH_LIBRARY(mobilemoe, "embedding_int4.out", mobilemoe::embedding_int4_out);
EXECUTORCH_LIBRARY(mobilemoe, "linear_int4.out", mobilemoe::linear_int4_out);
