// 8-float vectors for loramux's CPU kernels: GCC and Clang lower them to the registers -march allows (AVX2 or
// AVX-512; two SSE or NEON registers), with no intrinsics.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace loramux {

typedef float Vec __attribute__((vector_size(32)));
constexpr int64_t kLanes = sizeof(Vec) / sizeof(float);

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline Vec load(const at::BFloat16* p) {  // a bfloat16 is a float32's upper half
  typedef uint16_t Half __attribute__((vector_size(sizeof(Vec) / 2)));
  typedef uint32_t Bits __attribute__((vector_size(sizeof(Vec))));
  Half h;
  std::memcpy(&h, p, sizeof h);
  const Bits u = __builtin_convertvector(h, Bits) << 16;
  Vec v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }

inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

inline float hsum(Vec v) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

}  // namespace loramux
