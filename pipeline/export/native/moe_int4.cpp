// mobilemoe::moe_experts_int4.out: the routed experts of one MoE layer in one kernel.
//
// Semantics (8da4w, the same maths as the program's Int4Linear under XNNPACK): each
// routed (token, expert) slot quantizes its input per token to asymmetric INT8
// (quantized_decomposed.choose_qparams_per_token_asymmetric / quantize_per_token),
// multiplies it by the expert's symmetric INT4 w1|w3 rows (one scale per group of input
// features), applies silu(h1) * h3, quantizes that per token again, multiplies by w2 and
// adds gate * y to the token's output. Only routed experts are touched: an idle expert
// costs one comparison while the slots are grouped.
//
// Shapes: x [T, D] f32; experts [T, K] int64; gates [T, K] f32;
//   w13 [E, 2F, D/2] uint8 and w13_scale [E, 2F, D/g1] f32;
//   w2 [E, D, F/2] uint8 and w2_scale [E, D, F/g2] f32; out [T, D] f32.
// INT4 packing, per group of g values: byte j holds value j in its low nibble and value
// j + g/2 in its high nibble, each stored as value + 8 (so [-8, 7] -> [0, 15]). Splitting
// a group into halves keeps the unpacking a pair of vector shifts and masks.
//
// Arithmetic, two paths with the same result up to FP32 rounding (summation order, and
// the integer path's +8 taken out after the sum):
// - an expert with at most kDirectSlots slots (decode), on CPUs with AVX2: the packed
//   nibbles times the centred INT8 activations in integers (pmaddwd, exact in int32),
//   scaled per group in FP32;
// - otherwise (prefill, or no AVX2): each weight row dequantized to FP32 once and dotted
//   with the centred activations (as floats) of every slot of its expert.
// Both times the activation's scale.
//
// Work split: slots are grouped by expert; one parallel_for runs over (expert, block of
// output rows) for w1|w3 and one for w2, so a weight row is unpacked once and reused for
// every slot of its expert (prefill), and decode's K GEMVs spread over all threads.

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include "int4.h"

namespace mobilemoe {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t kRowBlock = 16;  // output rows per work item: enough to amortize dispatch

struct Slots {
  std::vector<int64_t> expert_of_item, first_row_of_item;  // work items
  std::vector<int64_t> start, slot;                          // slots grouped by expert (CSR)
};

// Group the T*K slots by expert (counting sort; slots of one expert keep their order).
void group_slots(const int64_t* experts, int64_t n_slots, int64_t E, Slots& s) {
  std::vector<int64_t> count(E + 1, 0);
  for (int64_t n = 0; n < n_slots; ++n) ++count[experts[n] + 1];
  s.start.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) s.start[e + 1] = s.start[e] + count[e + 1];
  std::vector<int64_t> fill(s.start.begin(), s.start.end() - 1);
  s.slot.resize(n_slots);
  for (int64_t n = 0; n < n_slots; ++n) s.slot[fill[experts[n]]++] = n;
}

void plan_items(const Slots& s, int64_t E, int64_t rows, Slots& out) {
  out.expert_of_item.clear();
  out.first_row_of_item.clear();
  for (int64_t e = 0; e < E; ++e) {
    if (s.start[e + 1] == s.start[e]) continue;  // idle expert: no work
    for (int64_t r = 0; r < rows; r += kRowBlock) {
      out.expert_of_item.push_back(e);
      out.first_row_of_item.push_back(r);
    }
  }
}

// y[slot, r] = x_scale[slot] * dot(W[e, r], xq[slot]) for r in a block, every slot of e.
void gemm_block(const uint8_t* w_packed, const float* w_scale, int64_t rows, int64_t n, int64_t g,
                int64_t e, int64_t r0, const Slots& s, const QActs& a, int64_t a_row_of_slot_stride,
                bool by_slot_index, float* y, int64_t y_stride) {
  const int64_t groups = n / g;
  const int64_t r1 = std::min(rows, r0 + kRowBlock);
  const int64_t slots = s.start[e + 1] - s.start[e];
  const uint8_t* block = w_packed + (e * rows + r0) * (n / 2);
  const float* block_scale = w_scale + (e * rows + r0) * groups;
  auto activation_row = [&](int64_t slot) { return by_slot_index ? slot : slot / a_row_of_slot_stride; };
  if (slots <= kDirectSlots && kIntegerDot) {
    // Few rows of activations (decode): the packed rows in integers, per slot.
    float d[kRowBlock];
    for (int64_t i = s.start[e]; i < s.start[e + 1]; ++i) {
      const int64_t slot = s.slot[i], arow = activation_row(slot);
      dot_packed_block(block, block_scale, r1 - r0, n, g, a.q16.data() + arow * n, d);
      for (int64_t r = r0; r < r1; ++r) y[slot * y_stride + r] = a.scale[arow] * d[r - r0];
    }
    return;
  }
  // Many (prefill): each row dequantized once and reused for every slot of e.
  std::vector<float> w(n);
  for (int64_t r = r0; r < r1; ++r) {
    dequant_row(block + (r - r0) * (n / 2), block_scale + (r - r0) * groups, n, g, w.data());
    for (int64_t i = s.start[e]; i < s.start[e + 1]; ++i) {
      const int64_t slot = s.slot[i], arow = activation_row(slot);
      y[slot * y_stride + r] = a.scale[arow] * dot(w.data(), a.q.data() + arow * n, n);
    }
  }
}

Tensor& moe_experts_int4_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& experts,
                             const Tensor& gates, const Tensor& w13, const Tensor& w13_scale,
                             const Tensor& w2, const Tensor& w2_scale, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 2 && x.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "x must be [T, D] float32");
  ET_KERNEL_CHECK_MSG(ctx, experts.dim() == 2 && experts.scalar_type() == ScalarType::Long, InvalidArgument, out,
                      "experts must be [T, K] int64");
  ET_KERNEL_CHECK_MSG(ctx, gates.dim() == 2 && gates.scalar_type() == ScalarType::Float, InvalidArgument, out,
                      "gates must be [T, K] float32");
  const int64_t T = x.size(0), D = x.size(1), K = experts.size(1);
  ET_KERNEL_CHECK_MSG(ctx, experts.size(0) == T && gates.size(0) == T && gates.size(1) == K, InvalidArgument, out,
                      "experts and gates must be [T, K] with x's T");
  ET_KERNEL_CHECK_MSG(ctx, w13.dim() == 3 && w2.dim() == 3 && w13_scale.dim() == 3 && w2_scale.dim() == 3 &&
                          w13.scalar_type() == ScalarType::Byte && w2.scalar_type() == ScalarType::Byte &&
                          w13_scale.scalar_type() == ScalarType::Float && w2_scale.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "weights must be uint8 [E, rows, cols/2] with float32 [E, rows, groups]");
  ET_KERNEL_CHECK_MSG(ctx, out.scalar_type() == ScalarType::Float, InvalidArgument, out, "out must be float32");
  const int64_t E = w13.size(0), F2 = w13.size(1), F = F2 / 2;
  ET_KERNEL_CHECK_MSG(ctx, D > 0 && E > 0 && F > 0 && F2 == 2 * F && w13_scale.size(2) > 0 && w2_scale.size(2) > 0,
                      InvalidArgument, out, "D, E, F and the scale groups must be positive, w13's rows even (w1|w3)");
  ET_KERNEL_CHECK_MSG(ctx, w13.size(2) * 2 == D && w2.size(0) == E && w2.size(1) == D && w2.size(2) * 2 == F &&
                          w13_scale.size(0) == E && w13_scale.size(1) == F2 && w2_scale.size(0) == E &&
                          w2_scale.size(1) == D,
                      InvalidArgument, out, "weight shapes do not match x [T, D] and w13 [E, 2F, D/2]");
  const int64_t g1 = D / w13_scale.size(2), g2 = F / w2_scale.size(2);
  ET_KERNEL_CHECK_MSG(ctx, g1 * w13_scale.size(2) == D && g2 * w2_scale.size(2) == F && g1 % 32 == 0 && g2 % 32 == 0,
                      InvalidArgument, out, "group sizes must be multiples of 32 dividing D and F");
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok, InvalidArgument, out,
                      "could not resize out to [T, D]");

  const float* x_ptr = x.const_data_ptr<float>();
  const int64_t* e_ptr = experts.const_data_ptr<int64_t>();
  const float* g_ptr = gates.const_data_ptr<float>();
  for (int64_t n = 0; n < T * K; ++n) {
    ET_KERNEL_CHECK_MSG(ctx, e_ptr[n] >= 0 && e_ptr[n] < E, InvalidArgument, out, "expert id out of range");
  }

  // 1. Per-token INT8 of x (shared by the token's K slots).
  QActs xa(T, D, g1);
  for (int64_t t = 0; t < T; ++t) xa.quantize(t, x_ptr + t * D);
  Slots s, items;
  group_slots(e_ptr, T * K, E, s);

  // 2. h = x @ w13[e].T per slot: [T*K, 2F].
  std::vector<float> h(T * K * F2);
  plan_items(s, E, F2, items);
  bool ran = executorch::extension::parallel_for(0, static_cast<int64_t>(items.expert_of_item.size()), 1, [&](int64_t b, int64_t end) {
    for (int64_t it = b; it < end; ++it) {
      gemm_block(w13.const_data_ptr<uint8_t>(), w13_scale.const_data_ptr<float>(), F2, D, g1,
                 items.expert_of_item[it], items.first_row_of_item[it], s, xa, K, false, h.data(), F2);
    }
  });

  // 3. a = silu(h1) * h3, quantized per slot.
  QActs aa(T * K, F, g2);
  {
    std::vector<float> a(F);
    for (int64_t n = 0; n < T * K; ++n) {
      const float* hn = h.data() + n * F2;
      for (int64_t j = 0; j < F; ++j) a[j] = hn[j] / (1.f + std::exp(-hn[j])) * hn[F + j];
      aa.quantize(n, a.data());
    }
  }

  // 4. y = a @ w2[e].T per slot: [T*K, D].
  std::vector<float> y(T * K * D);
  plan_items(s, E, D, items);
  ran = ran && executorch::extension::parallel_for(0, static_cast<int64_t>(items.expert_of_item.size()), 1, [&](int64_t b, int64_t end) {
    for (int64_t it = b; it < end; ++it) {
      gemm_block(w2.const_data_ptr<uint8_t>(), w2_scale.const_data_ptr<float>(), D, F, g2,
                 items.expert_of_item[it], items.first_row_of_item[it], s, aa, 1, true, y.data(), D);
    }
  });

  ET_KERNEL_CHECK_MSG(ctx, ran, Internal, out, "parallel_for refused the work split");

  // 5. out[t] = sum_k gate[t, k] * y[t, k] (k in order: deterministic).
  float* o_ptr = out.mutable_data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    float* o = o_ptr + t * D;
    std::fill(o, o + D, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float gate = g_ptr[t * K + k];
      const float* yk = y.data() + (t * K + k) * D;
      for (int64_t d = 0; d < D; ++d) o[d] += gate * yk[d];
    }
  }
  return out;
}

}  // namespace
}  // namespace mobilemoe

EXECUTORCH_LIBRARY(mobilemoe, "moe_experts_int4.out", mobilemoe::moe_experts_int4_out);
