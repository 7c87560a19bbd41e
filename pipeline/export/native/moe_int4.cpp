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

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace mobilemoe {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t kRowBlock = 16;  // output rows per work item: enough to amortize dispatch
constexpr int64_t kDirectSlots = 2;  // up to this many rows of one expert: no dequantized copy

// Per-token asymmetric INT8 of n values (the formulas of quantized_decomposed, whose scale is
// float64 after choose_qparams: the quantization is done in double to round the same way).
// Returns the scale; writes q and the zero point.
double quantize_row(const float* x, int64_t n, int8_t* q, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  float scale = (hi - lo) / 255.f;
  scale = std::max(scale, FLT_EPSILON);
  const float dmin = lo / scale, dmax = hi / scale;
  float zp = (-128.f + dmin) + (127.f + dmax) > 0.f ? -128.f - dmin : 127.f - dmax;
  zp = std::nearbyint(std::min(std::max(zp, -128.f), 127.f));
  const double inv = 1.0 / static_cast<double>(scale);
  for (int64_t i = 0; i < n; ++i) {
    const double v = std::nearbyint(static_cast<double>(x[i]) * inv + zp);
    q[i] = static_cast<int8_t>(std::min(std::max(v, -128.0), 127.0));
  }
  *zero = static_cast<int32_t>(zp);
  return scale;
}

// The hot loops use GCC/Clang vector extensions: 16 FP32 lanes, lowered to whatever
// the target has (one AVX-512 register, two AVX2 ones, four NEON ones).
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

inline f32x16 load_f32(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_f32(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

// 16 bytes of a group -> its 16 low-nibble values (columns c..c+15) and 16 high-nibble
// values (columns c+g/2..), as floats in [-8, 7].
inline void unpack16(const uint8_t* p, f32x16* lo, f32x16* hi) {
  i32x16 b;
  for (int l = 0; l < kLanes; ++l) b[l] = p[l];  // a zero-extending load
  *lo = __builtin_convertvector((b & 0xF) - 8, f32x16);
  *hi = __builtin_convertvector((b >> 4) - 8, f32x16);
}

inline float hsum(f32x16 v) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// Dequantize one row of n INT4 values (n/2 bytes, groups of g, g a multiple of 32) to
// float: value * scale.
inline void dequant_row(const uint8_t* packed, const float* scale, int64_t n, int64_t g, float* w) {
  const int64_t half = g / 2;
  for (int64_t start = 0, grp = 0; start < n; start += g, ++grp) {
    const float s = scale[grp];
    for (int64_t c = 0; c < half; c += kLanes) {
      f32x16 lo, hi;
      unpack16(packed + start / 2 + c, &lo, &hi);
      store_f32(w + start + c, lo * s);
      store_f32(w + start + half + c, hi * s);
    }
  }
}

// sum_i w[i] * x[i] for a dequantized row: four accumulators, so consecutive FMAs do not
// wait on each other. n is a multiple of 32 (the group).
inline float dot(const float* w, const float* x, int64_t n) {
  f32x16 a0 = {}, a1 = {}, a2 = {}, a3 = {};
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    a0 += load_f32(w + i) * load_f32(x + i);
    a1 += load_f32(w + i + kLanes) * load_f32(x + i + kLanes);
    a2 += load_f32(w + i + 2 * kLanes) * load_f32(x + i + 2 * kLanes);
    a3 += load_f32(w + i + 3 * kLanes) * load_f32(x + i + 3 * kLanes);
  }
  for (; i < n; i += kLanes) a0 += load_f32(w + i) * load_f32(x + i);
  return hsum((a0 + a1) + (a2 + a3));
}

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kIntegerDot = true;

// The same product straight from the packed row, in integers (what decode runs, where a
// weight row meets one or two activation rows): the nibbles u = value + 8 widened to
// int16 and multiplied by the centred INT8 activations xc with pmaddwd (16 products per
// instruction, exact in int32), per group scaled in FP32. The +8 is taken out once per
// group: sum (u - 8) xc = sum u xc - 8 sum xc, with sum xc precomputed per activation row.
inline float dot_packed(const uint8_t* packed, const float* scale, const int16_t* xc, const int32_t* xsum,
                        int64_t n, int64_t g) {
  const int64_t half = g / 2;
  const __m256i mask = _mm256_set1_epi16(0xF);
  __m256 facc0 = _mm256_setzero_ps(), facc1 = _mm256_setzero_ps();
  float correction = 0.f;  // sum over groups of scale * sum xc, overlapping the vector work
  for (int64_t start = 0, grp = 0; start < n; start += g, ++grp) {
    __m256i acc = _mm256_setzero_si256();
    for (int64_t c = 0; c < half; c += 16) {
      const __m256i b =
          _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + start / 2 + c)));
      const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + start + c));
      const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + start + half + c));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_and_si256(b, mask), x_lo));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_srli_epi16(b, 4), x_hi));
    }
    const __m256 s = _mm256_set1_ps(scale[grp]);
    if (grp & 1) {
      facc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, facc1);
    } else {
      facc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), s, facc0);
    }
    correction += scale[grp] * static_cast<float>(xsum[grp]);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(facc0, facc1));
  float sum = 0.f;
  for (float v : lanes) sum += v;
  return sum - 8.f * correction;
}
#else
// Without AVX2 (e.g. Arm), decode takes the dequantize-then-dot path that prefill takes.
constexpr bool kIntegerDot = false;

inline float dot_packed(const uint8_t*, const float*, const int16_t*, const int32_t*, int64_t, int64_t) {
  return 0.f;  // never called: kIntegerDot is false
}
#endif

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

// INT8 activations of every row, centred (q - zero), with their scales:
// y = scale * dot(weight row, centred row). Held as floats (exact small integers) for the
// dequantized path, as int16 with per-group sums for the integer one.
struct QActs {
  int64_t n, g;
  std::vector<float> q;
  std::vector<int16_t> q16;
  std::vector<int32_t> sums;  // per row and group of g
  std::vector<float> scale;

  QActs(int64_t rows, int64_t n_, int64_t g_)
      : n(n_), g(g_), q(rows * n_), q16(rows * n_), sums(rows * (n_ / g_)), scale(rows) {}

  void set(int64_t row, const int8_t* qrow, int32_t zero, float s) {
    scale[row] = s;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = static_cast<int32_t>(qrow[i]) - zero;
      q[row * n + i] = static_cast<float>(c);
      q16[row * n + i] = static_cast<int16_t>(c);
    }
    for (int64_t grp = 0; grp < n / g; ++grp) {
      int32_t sum = 0;
      for (int64_t i = grp * g; i < (grp + 1) * g; ++i) sum += q16[row * n + i];
      sums[row * (n / g) + grp] = sum;
    }
  }
};

// y[slot, r] = x_scale[slot] * dot(W[e, r], xq[slot]) for r in a block, every slot of e.
void gemm_block(const uint8_t* w_packed, const float* w_scale, int64_t rows, int64_t n, int64_t g,
                int64_t e, int64_t r0, const Slots& s, const QActs& a, int64_t a_row_of_slot_stride,
                bool by_slot_index, float* y, int64_t y_stride) {
  const int64_t groups = n / g;
  const int64_t r1 = std::min(rows, r0 + kRowBlock);
  const int64_t slots = s.start[e + 1] - s.start[e];
  // Few rows of activations (decode): read the packed row directly; many (prefill):
  // dequantize it once and reuse it for every activation row.
  const bool dequantize = slots > kDirectSlots || !kIntegerDot;
  std::vector<float> w(dequantize ? n : 0);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = e * rows + r;
    const uint8_t* packed = w_packed + row * (n / 2);
    const float* scale = w_scale + row * groups;
    if (dequantize) dequant_row(packed, scale, n, g, w.data());
    for (int64_t i = s.start[e]; i < s.start[e + 1]; ++i) {
      const int64_t slot = s.slot[i];
      const int64_t arow = by_slot_index ? slot : slot / a_row_of_slot_stride;
      const float d = dequantize ? dot(w.data(), a.q.data() + arow * n, n)
                          : dot_packed(packed, scale, a.q16.data() + arow * n, a.sums.data() + arow * (n / g), n, g);
      y[slot * y_stride + r] = a.scale[arow] * d;
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
  {
    std::vector<int8_t> q(D);
    for (int64_t t = 0; t < T; ++t) {
      int32_t zero = 0;
      const float scale = static_cast<float>(quantize_row(x_ptr + t * D, D, q.data(), &zero));
      xa.set(t, q.data(), zero, scale);
    }
  }
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
    std::vector<int8_t> q(F);
    for (int64_t n = 0; n < T * K; ++n) {
      const float* hn = h.data() + n * F2;
      for (int64_t j = 0; j < F; ++j) a[j] = hn[j] / (1.f + std::exp(-hn[j])) * hn[F + j];
      int32_t zero = 0;
      const float scale = static_cast<float>(quantize_row(a.data(), F, q.data(), &zero));
      aa.set(n, q.data(), zero, scale);
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
