// Pooling and padded-batch kernels over ragged activations (no Python in here).
//
// Axis letters: T tokens (all sequences concatenated), N sequences, D model width,
// B rows of a padded batch, P padded length, K buckets, M batches.
// Sequence i is tokens [offsets[i], offsets[i+1]) of acts [T, D]; acts rows may have any
// byte stride, elements inside a row are contiguous. Every kernel accumulates in float32
// (rolling sums in float64) and expects inputs validated by the caller (module.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace mup {

enum class Kind : int { F32 = 0, F16 = 1, BF16 = 2 };

Kind parse_kind(const std::string& name);  // "float32" | "float16" | "bfloat16"
inline int64_t kind_size(Kind k) { return k == Kind::F32 ? 4 : 2; }

enum class Method : int { Mean, Max, Min, Last, Sum, Softmax, RollingMeanMax };
Method parse_method(const std::string& name);

// Half -> float without F16C (the wheel targets baseline x86-64): shift exponent and
// mantissa into float position and rescale by 2^(127-15), exact for normal and subnormal
// halves alike; only the all-ones exponent (inf / NaN) needs its float exponent forced to all
// ones. Plain selects, so compilers vectorise it.
inline float f16_to_f32(uint16_t h) {
  const uint32_t shifted = static_cast<uint32_t>(h & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &shifted, 4);
  f *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits |= (h & 0x7c00u) == 0x7c00u ? 0x7f800000u : 0u;
  bits |= static_cast<uint32_t>(h & 0x8000u) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// What the pooling kernel reads.
struct RaggedView {
  const char* data = nullptr;  // acts [T, D]
  int64_t row_stride = 0;      // bytes between tokens
  Kind kind = Kind::F32;
  int64_t T = 0, D = 0;
  const int64_t* offsets = nullptr;  // [N+1]
  int64_t N = 0;
  const uint8_t* mask = nullptr;  // [T] or nullptr = every token
};

struct PoolParams {
  const float* scores = nullptr;  // [T], softmax only
  float temperature = 1.0f;
  int64_t window = 40;
};

// out[m] is [N, D] float32 for methods[m]. Every selected sequence must have >= 1 masked token.
void pool_many(const RaggedView& v, const std::vector<Method>& methods, const PoolParams& p,
               const std::vector<float*>& out, int num_threads);

// block [B, P, D] of out_kind (== v.kind or F32), block_mask [B, P]; zero padding.
void gather_padded(const RaggedView& v, const int64_t* rows, int64_t B, int64_t P,
                   Kind out_kind, char* block, uint8_t* block_mask, int num_threads);

// out[offsets[r] : offsets[r+1]] = block[i, :len] for r = rows[i]; out is C-contiguous [T, D]
// of out_kind (== block kind or F32).
void scatter_padded(const char* block, Kind block_kind, int64_t B, int64_t P, int64_t D,
                    const int64_t* offsets, const int64_t* rows, char* out, Kind out_kind,
                    int num_threads);

// Rows visited in `order`, grouped by the smallest bucket >= length, cut into batches of
// max(1, min(max_rows, token_budget / bucket)). Fills rows_out [N], starts [M+1], padded [M].
void plan_batches(const int64_t* lengths, const int64_t* order, int64_t N, const int64_t* buckets,
                  int64_t K, int64_t token_budget, int64_t max_rows, std::vector<int64_t>& rows_out,
                  std::vector<int64_t>& starts, std::vector<int64_t>& padded);

}  // namespace mup
