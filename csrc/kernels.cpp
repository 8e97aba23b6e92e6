// Pooling and padded-batch kernels; see kernels.hpp for the layout and axis letters.
#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <limits>
#include <stdexcept>
#include <thread>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

// Force inlining so that the AVX2 entry point below compiles every helper it calls with AVX2.
#if defined(__GNUC__) || defined(__clang__)
#define MUP_INLINE __attribute__((always_inline)) inline
#else
#define MUP_INLINE inline
#endif

// x86-64 with GCC/Clang on ELF: the pooling loop is compiled twice, for baseline SSE2 and for
// AVX2, and picked at run time (__builtin_cpu_supports), so the wheel needs no -march.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__ELF__)
#define MUP_HAVE_AVX2_PATH 1
#endif

namespace mup {

Kind parse_kind(const std::string& name) {
  if (name == "float32") return Kind::F32;
  if (name == "float16") return Kind::F16;
  if (name == "bfloat16") return Kind::BF16;
  throw std::invalid_argument("dtype must be 'float32', 'float16' or 'bfloat16', got '" + name +
                              "'");
}

Method parse_method(const std::string& name) {
  if (name == "mean") return Method::Mean;
  if (name == "max") return Method::Max;
  if (name == "min") return Method::Min;
  if (name == "last") return Method::Last;
  if (name == "sum") return Method::Sum;
  if (name == "softmax") return Method::Softmax;
  if (name == "rolling_mean_max") return Method::RollingMeanMax;
  throw std::invalid_argument("unknown pooling method '" + name +
                              "'; expected mean, max, min, last, sum, softmax, rolling_mean_max");
}

namespace {

// ------------------------------------------------------------------ threads

// Run fn(lo, hi) over [bounds[k], bounds[k+1]) on bounds.size() - 1 threads (the caller's
// thread takes the first range) and rethrow the first exception after every thread joined.
template <class F>
void run_ranges(const std::vector<int64_t>& bounds, F&& fn) {
  const size_t parts = bounds.size() - 1;
  if (parts == 1) {
    fn(bounds[0], bounds[1]);
    return;
  }
  std::vector<std::exception_ptr> errors(parts);
  std::vector<std::thread> threads;
  threads.reserve(parts - 1);
  for (size_t k = 1; k < parts; ++k) {
    threads.emplace_back([&, k] {
      try {
        fn(bounds[k], bounds[k + 1]);
      } catch (...) {
        errors[k] = std::current_exception();
      }
    });
  }
  try {
    fn(bounds[0], bounds[1]);
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Below this many elements a thread costs more (~20 us to start) than it saves.
constexpr int64_t kMinElemsPerThread = int64_t{1} << 17;

// Static partition of items [0, n) into contiguous ranges of about equal cost, where
// cost(i) = prefix(i + 1) - prefix(i) and prefix is non-decreasing with prefix(0) == 0.
template <class Prefix>
std::vector<int64_t> balanced_bounds(int64_t n, int64_t elems_per_cost, int num_threads,
                                     Prefix prefix) {
  const int64_t total = prefix(n);
  int64_t nt = std::max(1, num_threads);
  nt = std::min<int64_t>(nt, std::max<int64_t>(1, n));
  nt = std::min<int64_t>(nt, std::max<int64_t>(1, total * elems_per_cost / kMinElemsPerThread));
  std::vector<int64_t> bounds(nt + 1, 0);
  bounds[nt] = n;
  for (int64_t k = 1; k < nt; ++k) {
    const int64_t target = total * k / nt;
    int64_t lo = bounds[k - 1], hi = n;  // smallest i with prefix(i) >= target
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (prefix(mid) >= target)
        hi = mid;
      else
        lo = mid + 1;
    }
    bounds[k] = lo;
  }
  return bounds;
}

// ------------------------------------------------------------------ conversion

#if defined(__SSE2__)
// Four float16 bit patterns (zero-extended to 32 bits) -> four float32, the same steps as
// f16_to_f32 in kernels.hpp (no F16C: the wheel targets baseline x86-64).
MUP_INLINE __m128 f16x4_to_f32(__m128i h) {
  const __m128i m_exp = _mm_set1_epi32(0x7c00);
  const __m128i em = _mm_and_si128(h, _mm_set1_epi32(0x7fff));
  __m128i bits = _mm_castps_si128(
      _mm_mul_ps(_mm_castsi128_ps(_mm_slli_epi32(em, 13)), _mm_set1_ps(0x1p112f)));
  const __m128i is_inf = _mm_cmpeq_epi32(_mm_and_si128(h, m_exp), m_exp);
  bits = _mm_or_si128(bits, _mm_and_si128(is_inf, _mm_set1_epi32(0x7f800000)));
  bits = _mm_or_si128(bits, _mm_slli_epi32(_mm_and_si128(h, _mm_set1_epi32(0x8000)), 16));
  return _mm_castsi128_ps(bits);
}

#endif

// float16 bits -> float32 for a whole token row. Measured here (EPYC, GCC 12, pooling mean):
// SSE2 intrinsics 1.7 Gelem/s vs 1.4 for GCC's 4-wide auto-vectorisation of f16_to_f32;
// kWide (inside the AVX2 entry point) the plain loop vectorises 8 wide: 2.1-2.3 Gelem/s.
template <bool kWide>
MUP_INLINE void f16_row_to_f32(float* __restrict dst, const uint16_t* __restrict src, int64_t D) {
  int64_t d = 0;
#if defined(__SSE2__)
  if (kWide) {
    for (; d < D; ++d) dst[d] = f16_to_f32(src[d]);
    return;
  }
  const __m128i zero = _mm_setzero_si128();
  for (; d + 8 <= D; d += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + d));
    _mm_storeu_ps(dst + d, f16x4_to_f32(_mm_unpacklo_epi16(h, zero)));
    _mm_storeu_ps(dst + d + 4, f16x4_to_f32(_mm_unpackhi_epi16(h, zero)));
  }
#endif
  for (; d < D; ++d) dst[d] = f16_to_f32(src[d]);
}

MUP_INLINE void bf16_row_to_f32(float* __restrict dst, const uint16_t* __restrict src, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = bf16_to_f32(src[d]);
}

// A token row as float32: the row itself for float32 input, else converted into buf [D].
template <bool kWide>
MUP_INLINE const float* row_f32(const char* src, Kind kind, float* buf, int64_t D) {
  switch (kind) {
    case Kind::F16:
      f16_row_to_f32<kWide>(buf, reinterpret_cast<const uint16_t*>(src), D);
      return buf;
    case Kind::BF16:
      bf16_row_to_f32(buf, reinterpret_cast<const uint16_t*>(src), D);
      return buf;
    default:
      return reinterpret_cast<const float*>(src);
  }
}

// ------------------------------------------------------------------ reductions over D

// How an element of a token row is read as float32. Reductions take the source type so that
// the conversion happens in registers, fused into the reduction loop (15-20% faster than
// converting the row into a buffer first, measured with AVX2).
struct F32Src {
  using T = float;
  static float get(const float* p, int64_t d) { return p[d]; }
};
struct F16Src {
  using T = uint16_t;
  static float get(const uint16_t* p, int64_t d) { return f16_to_f32(p[d]); }
};
struct BF16Src {
  using T = uint16_t;
  static float get(const uint16_t* p, int64_t d) { return bf16_to_f32(p[d]); }
};

// Written so that GCC/Clang vectorise each loop (no aliasing, no calls, selects instead of
// branches). max/min propagate NaN like numpy's maximum/minimum.
template <class S>
MUP_INLINE void acc_add(float* __restrict acc, const typename S::T* __restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += S::get(x, d);
}
template <class S>
MUP_INLINE void acc_axpy(float* __restrict acc, const typename S::T* __restrict x, float w,
                         int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += S::get(x, d) * w;
}
template <class S>
MUP_INLINE void acc_max(float* __restrict acc, const typename S::T* __restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float xv = S::get(x, d);
    acc[d] = (xv > acc[d] || xv != xv) ? xv : acc[d];
  }
}
template <class S>
MUP_INLINE void acc_min(float* __restrict acc, const typename S::T* __restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float xv = S::get(x, d);
    acc[d] = (xv < acc[d] || xv != xv) ? xv : acc[d];
  }
}

// One masked token of row r into every streaming pooling (softmax weight w precomputed).
template <class S>
MUP_INLINE void stream_token(const std::vector<Method>& methods, const std::vector<float*>& out,
                             int64_t r, int64_t D, const typename S::T* x, float w) {
  for (size_t j = 0; j < methods.size(); ++j) {
    float* o = out[j] + r * D;
    switch (methods[j]) {
      case Method::Mean:
      case Method::Sum:
        acc_add<S>(o, x, D);
        break;
      case Method::Max:
        acc_max<S>(o, x, D);
        break;
      case Method::Min:
        acc_min<S>(o, x, D);
        break;
      case Method::Softmax:
        acc_axpy<S>(o, x, w, D);
        break;
      default:
        break;
    }
  }
}

MUP_INLINE void acc_add_f64(double* __restrict acc, const float* __restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<double>(x[d]);
}
MUP_INLINE void slide_f64(double* __restrict acc, const float* __restrict x_in,
                      const float* __restrict x_out, int64_t D) {
  for (int64_t d = 0; d < D; ++d)
    acc[d] += static_cast<double>(x_in[d]) - static_cast<double>(x_out[d]);
}
MUP_INLINE void max_of_mean(float* __restrict best, const double* __restrict acc, double inv_w,
                        int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    const float v = static_cast<float>(acc[d] * inv_w);
    best[d] = (v > best[d] || v != v) ? v : best[d];
  }
}

// ------------------------------------------------------------------ pooling

template <bool kWide>
MUP_INLINE void pool_rows(const RaggedView& v, const std::vector<Method>& methods,
                          const PoolParams& p, const std::vector<float*>& out, int64_t r0,
                          int64_t r1) {
  const int64_t D = v.D;
  const size_t nm = methods.size();
  bool streaming = false, has_softmax = false, has_last = false, has_rolling = false;
  for (Method m : methods) {
    has_softmax |= m == Method::Softmax;
    has_last |= m == Method::Last;
    has_rolling |= m == Method::RollingMeanMax;
    streaming |= m != Method::Last && m != Method::RollingMeanMax;
  }
  const float inf = std::numeric_limits<float>::infinity();
  const float temperature = p.temperature;  // z = score / temperature
  std::vector<float> buf(D), ring;  // ring: the last `window` masked tokens, as float32
  std::vector<double> win(has_rolling ? D : 0);
  std::vector<int64_t> kept;
#define token(t, b) row_f32<kWide>(v.data + (t) * v.row_stride, v.kind, (b), D)
#define masked(t) (v.mask == nullptr || v.mask[(t)] != 0)

  for (int64_t r = r0; r < r1; ++r) {
    const int64_t s = v.offsets[r], e = v.offsets[r + 1];
    float zmax = -inf, denom = 0.0f;
    if (has_softmax) {
      // Same float32 steps as the numpy reference: z = s / T, exp(z - max z), normalise.
      for (int64_t t = s; t < e; ++t)
        if (masked(t)) zmax = std::max(zmax, p.scores[t] / temperature);
      for (int64_t t = s; t < e; ++t)
        if (masked(t)) denom += std::exp(p.scores[t] / temperature - zmax);
    }
    if (streaming) {
      for (size_t j = 0; j < nm; ++j) {
        float* o = out[j] + r * D;
        const Method m = methods[j];
        const float init = m == Method::Max ? -inf : (m == Method::Min ? inf : 0.0f);
        if (m != Method::Last && m != Method::RollingMeanMax) std::fill(o, o + D, init);
      }
      int64_t count = 0;
      for (int64_t t = s; t < e; ++t) {
        if (!masked(t)) continue;
        ++count;
        const float w = has_softmax ? std::exp(p.scores[t] / temperature - zmax) / denom : 0.0f;
        const char* row = v.data + t * v.row_stride;
        const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
        if (v.kind == Kind::F32)
          stream_token<F32Src>(methods, out, r, D, reinterpret_cast<const float*>(row), w);
        else if (v.kind == Kind::BF16)
          stream_token<BF16Src>(methods, out, r, D, bits, w);
        else if (kWide)
          stream_token<F16Src>(methods, out, r, D, bits, w);
        else  // baseline: the SSE2 intrinsics beat the 4-wide fused loop
          stream_token<F32Src>(methods, out, r, D, token(t, buf.data()), w);
      }
      for (size_t j = 0; j < nm; ++j) {
        if (methods[j] != Method::Mean) continue;
        float* o = out[j] + r * D;
        const float c = static_cast<float>(count);
        for (int64_t d = 0; d < D; ++d) o[d] /= c;
      }
    }
    if (has_last) {
      int64_t t = e - 1;
      while (t >= s && !masked(t)) --t;
      const float* x = token(t, buf.data());
      for (size_t j = 0; j < nm; ++j)
        if (methods[j] == Method::Last) std::copy(x, x + D, out[j] + r * D);
    }
    if (has_rolling) {
      kept.clear();
      for (int64_t t = s; t < e; ++t)
        if (masked(t)) kept.push_back(t);
      const int64_t n = static_cast<int64_t>(kept.size());
      const int64_t w = p.window;
      const int64_t first = std::min(n, w);
      // Each token is converted once into a ring of `first` rows; it leaves the window
      // w steps later from there instead of being read and converted again.
      if (static_cast<int64_t>(ring.size()) < first * D) ring.resize(first * D);
      std::fill(win.begin(), win.end(), 0.0);
      for (int64_t k = 0; k < first; ++k) {
        const float* x = token(kept[k], buf.data());
        acc_add_f64(win.data(), x, D);
        std::copy(x, x + D, ring.data() + k * D);
      }
      float* o = nullptr;
      for (size_t j = 0; j < nm; ++j)
        if (methods[j] == Method::RollingMeanMax) o = out[j] + r * D;
      // Fewer masked tokens than the window: the full mean (one "window").
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(win[d] / first);
      const double inv_w = 1.0 / static_cast<double>(w);
      for (int64_t k = w; k < n; ++k) {
        const float* x_in = token(kept[k], buf.data());
        float* slot = ring.data() + (k % w) * D;  // holds token k - w
        slide_f64(win.data(), x_in, slot, D);
        std::copy(x_in, x_in + D, slot);
        max_of_mean(o, win.data(), inv_w, D);
      }
      for (size_t j = 0; j < nm; ++j)  // the same method listed twice
        if (methods[j] == Method::RollingMeanMax && out[j] + r * D != o)
          std::copy(o, o + D, out[j] + r * D);
    }
  }
}

#undef token
#undef masked

void pool_rows_base(const RaggedView& v, const std::vector<Method>& methods, const PoolParams& p,
                    const std::vector<float*>& out, int64_t r0, int64_t r1) {
  pool_rows<false>(v, methods, p, out, r0, r1);
}

#if defined(MUP_HAVE_AVX2_PATH)
__attribute__((target("avx2"))) void pool_rows_avx2(const RaggedView& v,
                                                    const std::vector<Method>& methods,
                                                    const PoolParams& p,
                                                    const std::vector<float*>& out, int64_t r0,
                                                    int64_t r1) {
  pool_rows<true>(v, methods, p, out, r0, r1);
}
#endif

using PoolRowsFn = void (*)(const RaggedView&, const std::vector<Method>&, const PoolParams&,
                            const std::vector<float*>&, int64_t, int64_t);

PoolRowsFn select_pool_rows() {
#if defined(MUP_HAVE_AVX2_PATH)
  if (std::getenv("MUP_NATIVE_NO_AVX2") == nullptr && __builtin_cpu_supports("avx2"))
    return pool_rows_avx2;
#endif
  return pool_rows_base;
}

// ------------------------------------------------------------------ copies with conversion

// Copy one token row of D elements from src_kind to dst_kind (equal, or dst is float32).
inline void copy_row(char* dst, Kind dst_kind, const char* src, Kind src_kind, int64_t D) {
  if (dst_kind == src_kind) {
    std::memcpy(dst, src, static_cast<size_t>(D * kind_size(src_kind)));
    return;
  }
  float* d = reinterpret_cast<float*>(dst);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(src);
  if (src_kind == Kind::F16)
    f16_row_to_f32<false>(d, h, D);
  else
    bf16_row_to_f32(d, h, D);
}

}  // namespace

void pool_many(const RaggedView& v, const std::vector<Method>& methods, const PoolParams& p,
               const std::vector<float*>& out, int num_threads) {
  const int64_t* off = v.offsets;
  const auto bounds = balanced_bounds(v.N, std::max<int64_t>(v.D, 1), num_threads,
                                      [&](int64_t i) { return off[i] + i; });
  static const PoolRowsFn pool_rows_fn = select_pool_rows();
  run_ranges(bounds, [&](int64_t r0, int64_t r1) { pool_rows_fn(v, methods, p, out, r0, r1); });
}

void gather_padded(const RaggedView& v, const int64_t* rows, int64_t B, int64_t P,
                   Kind out_kind, char* block, uint8_t* block_mask, int num_threads) {
  const int64_t D = v.D, osz = kind_size(out_kind);
  const auto bounds = balanced_bounds(B, std::max<int64_t>(P * D, 1), num_threads,
                                      [](int64_t i) { return i; });
  run_ranges(bounds, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = v.offsets[rows[i]], len = v.offsets[rows[i] + 1] - s;
      char* dst = block + i * P * D * osz;
      uint8_t* bm = block_mask + i * P;
      for (int64_t j = 0; j < len; ++j) {
        copy_row(dst + j * D * osz, out_kind, v.data + (s + j) * v.row_stride, v.kind, D);
        bm[j] = v.mask == nullptr ? 1 : (v.mask[s + j] != 0);
      }
      std::memset(dst + len * D * osz, 0, static_cast<size_t>((P - len) * D * osz));
      std::memset(bm + len, 0, static_cast<size_t>(P - len));
    }
  });
}

void scatter_padded(const char* block, Kind block_kind, int64_t B, int64_t P, int64_t D,
                    const int64_t* offsets, const int64_t* rows, char* out, Kind out_kind,
                    int num_threads) {
  const int64_t bsz = kind_size(block_kind), osz = kind_size(out_kind);
  const auto bounds = balanced_bounds(B, std::max<int64_t>(P * D, 1), num_threads,
                                      [](int64_t i) { return i; });
  run_ranges(bounds, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t s = offsets[rows[i]], len = offsets[rows[i] + 1] - s;
      for (int64_t j = 0; j < len; ++j)
        copy_row(out + (s + j) * D * osz, out_kind, block + (i * P + j) * D * bsz, block_kind, D);
    }
  });
}

void plan_batches(const int64_t* lengths, const int64_t* order, int64_t N, const int64_t* buckets,
                  int64_t K, int64_t token_budget, int64_t max_rows, std::vector<int64_t>& rows_out,
                  std::vector<int64_t>& starts, std::vector<int64_t>& padded) {
  // Counting sort of the visited rows by bucket keeps the visiting order inside a bucket.
  std::vector<int64_t> which(N), fill(K + 1, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t len = lengths[order[i]];
    which[i] = std::lower_bound(buckets, buckets + K, len) - buckets;
    if (which[i] >= K) throw std::invalid_argument("a row is longer than the largest bucket");
    ++fill[which[i] + 1];
  }
  for (int64_t k = 0; k < K; ++k) fill[k + 1] += fill[k];
  const std::vector<int64_t> first(fill.begin(), fill.end());
  rows_out.assign(N, 0);
  for (int64_t i = 0; i < N; ++i) rows_out[fill[which[i]]++] = order[i];
  starts.assign(1, 0);
  padded.clear();
  for (int64_t k = 0; k < K; ++k) {
    const int64_t per = std::max<int64_t>(1, std::min(max_rows, token_budget / buckets[k]));
    for (int64_t b = first[k]; b < first[k + 1]; b += per) {
      starts.push_back(std::min(b + per, first[k + 1]));
      padded.push_back(buckets[k]);
    }
  }
}

}  // namespace mup
