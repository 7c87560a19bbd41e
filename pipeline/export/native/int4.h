// Shared INT4 x INT8 arithmetic of the project's kernels (moe_int4.cpp, table_int4.cpp):
// per-token asymmetric INT8 activations, INT4 weights packed two per byte (per group of g
// values, byte j holds value j in its low nibble and value j + g/2 in its high nibble,
// each + 8), and the two dot products over a packed row (integer for one or two
// activation rows, dequantize-then-FP32 for more).
#pragma once

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

constexpr int64_t kDirectSlots = 2;  // up to this many activation rows: no dequantized copy

// Per-token asymmetric INT8 of n values (the formulas of quantized_decomposed, whose scale is
// float64 after choose_qparams: the quantization is done in double to round the same way).
// Returns the scale; writes q and the zero point.
inline double quantize_row(const float* x, int64_t n, int8_t* q, int32_t* zero) {
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

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// The product straight from R consecutive packed rows, in integers (what decode runs,
// where a weight row meets one or two activation rows): per group, the nibbles less 8
// (the values, in [-8, 7]) widened to int16 times the centred INT8 activations xc with
// pmaddwd (16 products per instruction, exact in int32: |sum| <= 32 * 8 * 255), then
// scaled in FP32. R rows at once share the activation loads and give the core R
// independent dependency chains: one row alone was latency-bound (4.6x slower than
// XNNPACK's GEMV on a 128k-row head, bench_export.py head).
// G > 0 fixes the group size at compile time (the common 32: the inner loop unrolls, where
// a runtime trip count left it 1.4x slower); G = 0 takes g at run time.
template <int R, int G>
inline void dot_packed_rows(const uint8_t* packed, const float* scale, int64_t n, int64_t g_runtime,
                            const int16_t* xc, float* out) {
  const int64_t g = G > 0 ? G : g_runtime;
  const int64_t half = g / 2, row_bytes = n / 2, groups = n / g;
  const __m256i mask = _mm256_set1_epi16(0xF), eight = _mm256_set1_epi16(8);
  __m256 facc[R];
  for (int r = 0; r < R; ++r) facc[r] = _mm256_setzero_ps();
  for (int64_t start = 0, grp = 0; start < n; start += g, ++grp) {
    __m256i acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
    // Software prefetch of the next R rows (and their scales): the hardware prefetcher
    // alone left one core at 12 GB/s on a 128k-row head, with it 17 (measured, Zen 4).
    // A prefetch past the end of the tensor is a no-op on x86, never a fault.
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(packed + (R + r) * row_bytes + start / 2), _MM_HINT_T0);
    }
    if (grp % 16 == 0) _mm_prefetch(reinterpret_cast<const char*>(scale + R * groups + grp), _MM_HINT_T0);
    for (int64_t c = 0; c < half; c += 16) {
      const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + start + c));
      const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + start + half + c));
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_cvtepu8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + r * row_bytes + start / 2 + c)));
        const __m256i lo = _mm256_sub_epi16(_mm256_and_si256(b, mask), eight);
        const __m256i hi = _mm256_sub_epi16(_mm256_srli_epi16(b, 4), eight);
        acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(lo, x_lo), _mm256_madd_epi16(hi, x_hi)));
      }
    }
    for (int r = 0; r < R; ++r) {
      facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_set1_ps(scale[r * groups + grp]), facc[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum8(facc[r]);
}

// out[r] = dot(packed row r, xc) for `rows` consecutive rows: four at a time, then singly.
template <int G>
inline void dot_packed_block_g(const uint8_t* packed, const float* scale, int64_t rows, int64_t n, int64_t g,
                               const int16_t* xc, float* out) {
  const int64_t row_bytes = n / 2, groups = n / g;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_packed_rows<4, G>(packed + r * row_bytes, scale + r * groups, n, g, xc, out + r);
  for (; r < rows; ++r) dot_packed_rows<1, G>(packed + r * row_bytes, scale + r * groups, n, g, xc, out + r);
}

inline void dot_packed_block(const uint8_t* packed, const float* scale, int64_t rows, int64_t n, int64_t g,
                             const int16_t* xc, float* out) {
  if (g == 32) {
    dot_packed_block_g<32>(packed, scale, rows, n, g, xc, out);
  } else {
    dot_packed_block_g<0>(packed, scale, rows, n, g, xc, out);
  }
}
#else
// Without AVX2 (e.g. Arm), decode takes the dequantize-then-dot path that prefill takes.
constexpr bool kIntegerDot = false;

inline void dot_packed_block(const uint8_t*, const float*, int64_t, int64_t, int64_t, const int16_t*, float*) {
  // never called: kIntegerDot is false
}
#endif

// INT8 activations of every row, centred (q - zero), with their scales:
// y = scale * dot(weight row, centred row). Held as floats (exact small integers) for the
// dequantized path, as int16 for the integer one.
struct QActs {
  int64_t n, g;
  std::vector<float> q;
  std::vector<int16_t> q16;
  std::vector<float> scale;

  QActs(int64_t rows, int64_t n_, int64_t g_)
      : n(n_), g(g_), q(rows * n_), q16(rows * n_), scale(rows) {}

  // Quantize row `row` of the activations from n floats (per token, asymmetric INT8).
  void quantize(int64_t row, const float* x) {
    std::vector<int8_t> qrow(n);
    int32_t zero = 0;
    const float s = static_cast<float>(quantize_row(x, n, qrow.data(), &zero));
    set(row, qrow.data(), zero, s);
  }

  void set(int64_t row, const int8_t* qrow, int32_t zero, float s) {
    scale[row] = s;
    for (int64_t i = 0; i < n; ++i) {
      const int32_t c = static_cast<int32_t>(qrow[i]) - zero;
      q[row * n + i] = static_cast<float>(c);
      q16[row * n + i] = static_cast<int16_t>(c);
    }
  }
};

}  // namespace mobilemoe
