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

// v rounded to bfloat16 as at::BFloat16(float) rounds (to nearest, ties to even; a NaN to 0x7fc0), bit for bit.
inline void store(at::BFloat16* p, Vec v) {
  typedef uint32_t Bits __attribute__((vector_size(sizeof(Vec))));
  typedef uint16_t Half __attribute__((vector_size(sizeof(Vec) / 2)));
  Bits u;
  std::memcpy(&u, &v, sizeof u);
  const Bits rounded = (u + ((u >> 16) & 1) + 0x7fff) >> 16;
  const Bits out = (u & 0x7fffffff) > 0x7f800000 ? Bits{} + 0x7fc0 : rounded;
  const Half h = __builtin_convertvector(out, Half);
  std::memcpy(p, &h, sizeof h);
}

inline float hsum(Vec v) {
  float s = 0.f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}

// The 8 horizontal sums of a[0..7], as one vector (a transpose by halves: 7 shuffle pairs and adds, not 8 hsums).
inline Vec sums8(const Vec (&a)[8]) {
  Vec b[4], c[2];
  for (int i = 0; i < 4; ++i) {  // b[i] lanes: pairwise partial sums of a[2i] and a[2i+1], interleaved
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {  // c[i] lanes: a[4i..4i+3]'s sums over each 128-bit half
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// out[j][i] = <a[i], x[j]> for 4 rows a[i] (float32 or bfloat16, widened in registers) and NX <= 4 rows x[j] of
// d floats: the sums in registers, each element loaded once for the rows it meets.
template <int NX, typename TA>
inline void dots4(const TA* const* a, const float* const* x, int64_t d, float (&out)[4][4]) {
  Vec acc[2][8] = {};  // acc[j / 2][(j % 2) * 4 + i]
  int64_t k = 0;
  for (; k + kLanes <= d; k += kLanes) {
    Vec xv[NX];
    for (int j = 0; j < NX; ++j) xv[j] = load(x[j] + k);
    for (int i = 0; i < 4; ++i) {
      const Vec av = load(a[i] + k);
      for (int j = 0; j < NX; ++j) acc[j / 2][(j % 2) * 4 + i] += av * xv[j];
    }
  }
  const Vec sums[2] = {sums8(acc[0]), sums8(acc[1])};
  for (int j = 0; j < NX; ++j) {
    for (int i = 0; i < 4; ++i) {
      float s = sums[j / 2][(j % 2) * 4 + i];
      for (int64_t c = k; c < d; ++c) s += widen(a[i][c]) * x[j][c];
      out[j][i] = s;
    }
  }
}

}  // namespace loramux
