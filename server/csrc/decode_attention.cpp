// Decode attention over the KV arena on CPU: each decode token attends to its own sequence's keys and values,
// which lie contiguously in the arena from its block's first token (server/kv_cache.py), in one call per layer.
// The keys and values are read in place in the model's dtype (float32 or bfloat16) and widened in registers;
// scores, softmax and the weighted sum run in float32, and each output is rounded once. Only a sequence's own
// `length` keys are read: nothing past them (a block's stale tail) reaches the sums.
//
// A token is a row of `rows` [n, 3] int64: (token, first, length): query and output row `token` of the step,
// keys first..first+length-1 of the arena. The Python side (server/attention.py) keeps the plain-torch path these
// are tested against (tests/test_attention.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "table.h"
#include "vec.h"

namespace {

using namespace loramux;

typedef int32_t IVec __attribute__((vector_size(sizeof(Vec))));

// exp(x) for x <= 0 (scores minus their maximum), 8 lanes: 2^n * p(r), r = x - n ln2 (Cody-Waite), p Cephes'
// degree-6 polynomial; relative error ~2e-7. Below -87.3 (exp < 2^-126, no denormals) it gives exp(-87.3).
inline Vec vexp(Vec x) {
  const Vec lo = Vec{} - 87.3f;
  x = x < lo ? lo : x;
  const Vec fx = x * 1.44269504f - 0.5f;
  const IVec n = __builtin_convertvector(fx, IVec);  // trunc(x log2 e - 0.5) for x log2 e <= 0: the nearest integer
  const Vec nf = __builtin_convertvector(n, Vec);
  const Vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const IVec bits = (n + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct Row {
  int64_t token, first, length;
};

// s[t] = scale * <q, k_t> for t < n; q [D] float32, k_t = k + t * ks.
template <typename T>
void scores_of(const float* q, const T* k, int64_t ks, int64_t n, int64_t D, float scale, float* s) {
  const int64_t chunks = D / kLanes;
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {  // 8 keys at a time: each q vector loaded once for the 8
    Vec acc[8] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const Vec qc = load(q + c * kLanes);
      for (int j = 0; j < 8; ++j) acc[j] += qc * load(k + (t + j) * ks + c * kLanes);
    }
    Vec dots = sums8(acc);
    for (int64_t c = chunks * kLanes; c < D; ++c) {
      for (int j = 0; j < 8; ++j) dots[j] += q[c] * widen(k[(t + j) * ks + c]);
    }
    store(s + t, dots * scale);
  }
  for (; t < n; ++t) {
    Vec acc = {};
    for (int64_t c = 0; c < chunks; ++c) acc += load(q + c * kLanes) * load(k + t * ks + c * kLanes);
    float dot = hsum(acc);
    for (int64_t c = chunks * kLanes; c < D; ++c) dot += q[c] * widen(k[t * ks + c]);
    s[t] = dot * scale;
  }
}

// s[t] = exp(s[t] - max_t s) for t < n; returns their sum.
inline float exp_shifted(float* s, int64_t n) {
  const float m = *std::max_element(s, s + n);
  Vec total = {};
  int64_t t = 0;
  for (; t + kLanes <= n; t += kLanes) {
    const Vec e = vexp(load(s + t) - m);
    store(s + t, e);
    total += e;
  }
  if (t < n) {  // the tail through a padded vector (its lanes past n are dropped)
    float pad[kLanes];
    for (int64_t l = 0; l < kLanes; ++l) pad[l] = t + l < n ? s[t + l] - m : -100.f;
    const Vec e = vexp(load(pad));
    for (int64_t l = 0; t + l < n; ++l) {
      s[t + l] = e[l];
      total[l] += e[l];
    }
  }
  return hsum(total);
}

// dst[c] = sum_t p[t] * v_t[c] / total for c < D; v_t = v + t * vs. Four vectors of sums stay in registers.
template <typename T>
void weighted_sum(const float* p, const T* v, int64_t vs, int64_t n, int64_t D, float total, T* dst) {
  const float inv = 1.f / total;
  int64_t c = 0;
  for (; c + 4 * kLanes <= D; c += 4 * kLanes) {
    Vec acc[4] = {};
    for (int64_t t = 0; t < n; ++t) {
      for (int u = 0; u < 4; ++u) acc[u] += p[t] * load(v + t * vs + c + u * kLanes);
    }
    for (int u = 0; u < 4; ++u) {
      for (int64_t l = 0; l < kLanes; ++l) dst[c + u * kLanes + l] = static_cast<T>(acc[u][l] * inv);
    }
  }
  for (; c + kLanes <= D; c += kLanes) {
    Vec acc = {};
    for (int64_t t = 0; t < n; ++t) acc += p[t] * load(v + t * vs + c);
    for (int64_t l = 0; l < kLanes; ++l) dst[c + l] = static_cast<T>(acc[l] * inv);
  }
  for (; c < D; ++c) {
    float acc = 0.f;
    for (int64_t t = 0; t < n; ++t) acc += p[t] * widen(v[t * vs + c]);
    dst[c] = static_cast<T>(acc * inv);
  }
}

template <typename T>
void attend_heads(const at::Tensor& query, const at::Tensor& kc, const at::Tensor& vc, const std::vector<Row>& rows,
            double scaling, at::Tensor& out) {
  const int64_t H = query.size(1), D = query.size(2), Hkv = kc.size(0), G = H / Hkv;
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), vs0 = vc.stride(0), vs1 = vc.stride(1);
  const T* qp = query.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float scale = static_cast<float>(scaling);
  int64_t longest = 0;
  for (const Row& r : rows) longest = std::max(longest, r.length);
  // one task per (token, query head): its KV head's keys and values stay in L1/L2 across the group's heads
  at::parallel_for(0, static_cast<int64_t>(rows.size()) * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(D), scores(longest);
    for (int64_t task = lo; task < hi; ++task) {
      const Row& r = rows[task / H];
      const int64_t head = task % H, kv = head / G;
      const T* src = qp + r.token * qs0 + head * qs1;
      for (int64_t c = 0; c < D; ++c) q[c] = widen(src[c]);
      scores_of(q.data(), kp + kv * ks0 + r.first * ks1, ks1, r.length, D, scale, scores.data());
      const float total = exp_shifted(scores.data(), r.length);
      weighted_sum(scores.data(), vp + kv * vs0 + r.first * vs1, vs1, r.length, D, total,
                   op + r.token * os0 + head * os1);
    }
  });
}

constexpr int64_t kHeads = 4;  // query heads of one KV head that read its keys and values together

// s[h][t] = scale * <q[h], k_t> for t < n and NH <= kHeads query rows q[h] [D] float32; k_t = k + t * ks. Four
// keys at a time: each key element is loaded (and widened) once for the NH queries.
template <int NH, typename T>
void group_scores(const float* const* q, const T* k, int64_t ks, int64_t n, int64_t D, float scale,
                  float* const* s) {
  const int64_t chunks = D / kLanes;
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    Vec acc[2][8] = {};  // acc[key / 2][(key % 2) * 4 + head]
    for (int64_t c = 0; c < chunks; ++c) {
      Vec qv[NH];
      for (int h = 0; h < NH; ++h) qv[h] = load(q[h] + c * kLanes);
      for (int j = 0; j < 4; ++j) {
        const Vec kv = load(k + (t + j) * ks + c * kLanes);
        for (int h = 0; h < NH; ++h) acc[j / 2][(j % 2) * 4 + h] += qv[h] * kv;
      }
    }
    const Vec dots[2] = {sums8(acc[0]), sums8(acc[1])};
    for (int j = 0; j < 4; ++j) {
      for (int h = 0; h < NH; ++h) {
        float d = dots[j / 2][(j % 2) * 4 + h];
        for (int64_t c = chunks * kLanes; c < D; ++c) d += q[h][c] * widen(k[(t + j) * ks + c]);
        s[h][t + j] = d * scale;
      }
    }
  }
  for (; t < n; ++t) {
    for (int h = 0; h < NH; ++h) {
      Vec acc = {};
      for (int64_t c = 0; c < chunks; ++c) acc += load(q[h] + c * kLanes) * load(k + t * ks + c * kLanes);
      float d = hsum(acc);
      for (int64_t c = chunks * kLanes; c < D; ++c) d += q[h][c] * widen(k[t * ks + c]);
      s[h][t] = d * scale;
    }
  }
}

// dst[h][c] = sum_t p[h][t] * v_t[c] / total[h] for NH rows h, c < D; v_t = v + t * vs. Each value element is
// loaded (and widened) once for the NH heads; two vectors of columns per head stay in registers.
template <int NH, typename T>
void group_weighted_sum(const float* const* p, const T* v, int64_t vs, int64_t n, int64_t D, const float* total,
                        T* const* dst) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= D; c += 2 * kLanes) {
    Vec acc[NH][2] = {};
    for (int64_t t = 0; t < n; ++t) {
      const Vec v0 = load(v + t * vs + c), v1 = load(v + t * vs + c + kLanes);
      for (int h = 0; h < NH; ++h) {
        acc[h][0] += p[h][t] * v0;
        acc[h][1] += p[h][t] * v1;
      }
    }
    for (int h = 0; h < NH; ++h) {
      const float inv = 1.f / total[h];
      store(dst[h] + c, acc[h][0] * inv);
      store(dst[h] + c + kLanes, acc[h][1] * inv);
    }
  }
  for (; c < D; ++c) {
    for (int h = 0; h < NH; ++h) {
      float acc = 0.f;
      for (int64_t t = 0; t < n; ++t) acc += p[h][t] * widen(v[t * vs + c]);
      dst[h][c] = static_cast<T>(acc * (1.f / total[h]));
    }
  }
}

template <typename T>
void attend_grouped(const at::Tensor& query, const at::Tensor& kc, const at::Tensor& vc, const std::vector<Row>& rows,
            double scaling, at::Tensor& out) {
  const int64_t H = query.size(1), D = query.size(2), Hkv = kc.size(0), G = H / Hkv;
  const int64_t qs0 = query.stride(0), qs1 = query.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t ks0 = kc.stride(0), ks1 = kc.stride(1), vs0 = vc.stride(0), vs1 = vc.stride(1);
  const T* qp = query.data_ptr<T>();
  const T* kp = kc.data_ptr<T>();
  const T* vp = vc.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float scale = static_cast<float>(scaling);
  int64_t longest = 0;
  for (const Row& r : rows) longest = std::max(longest, r.length);
  const int64_t parts = (G + kHeads - 1) / kHeads;  // groups of up to kHeads query heads per KV head
  // one task per (token, KV head, group of its query heads): each key and value read once for the group
  at::parallel_for(0, static_cast<int64_t>(rows.size()) * Hkv * parts, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(kHeads * D), scores(kHeads * longest);
    for (int64_t task = lo; task < hi; ++task) {
      const Row& r = rows[task / (Hkv * parts)];
      const int64_t kv = task / parts % Hkv, h0 = kv * G + task % parts * kHeads;
      const int64_t hn = std::min(kHeads, kv * G + G - h0);
      const float* qr[kHeads];
      float* sr[kHeads];
      T* dr[kHeads];
      for (int64_t h = 0; h < hn; ++h) {
        const T* src = qp + r.token * qs0 + (h0 + h) * qs1;
        for (int64_t c = 0; c < D; ++c) q[h * D + c] = widen(src[c]);
        qr[h] = q.data() + h * D;
        sr[h] = scores.data() + h * longest;
        dr[h] = op + r.token * os0 + (h0 + h) * os1;
      }
      const T* k = kp + kv * ks0 + r.first * ks1;
      const T* v = vp + kv * vs0 + r.first * vs1;
      const auto group = [&](auto heads) {
        constexpr int NH = decltype(heads)::value;
        group_scores<NH>(qr, k, ks1, r.length, D, scale, sr);
        float total[NH];
        for (int h = 0; h < NH; ++h) total[h] = exp_shifted(sr[h], r.length);
        group_weighted_sum<NH>(sr, v, vs1, r.length, D, total, dr);
      };
      switch (hn) {
        case 4: group(std::integral_constant<int, 4>{}); break;
        case 3: group(std::integral_constant<int, 3>{}); break;
        case 2: group(std::integral_constant<int, 2>{}); break;
        default: group(std::integral_constant<int, 1>{});
      }
    }
  });
}

// bfloat16 with grouped-query heads: a task per KV head's group of query heads (0.72-0.76x the time of a task
// per head on this project's 2-core machine); otherwise a task per head (the grouped tasks measured 1.0-1.27x in
// float32, 1.28-1.55x without GQA).
template <typename T>
void attend(const at::Tensor& query, const at::Tensor& kc, const at::Tensor& vc, const std::vector<Row>& rows,
            double scaling, at::Tensor& out) {
  if (std::is_same_v<T, at::BFloat16> && query.size(1) / kc.size(0) >= 2)
    attend_grouped<T>(query, kc, vc, rows, scaling, out);
  else
    attend_heads<T>(query, kc, vc, rows, scaling, out);
}

// out[token] = softmax(scaling * q[token] K^T) V over K, V = kc, vc[kv head, first:first+length] for each row of
// `rows`; query head h reads KV head h / (H / Hkv). query, out [N, H, D]; kc, vc [Hkv, T, D]; one dtype.
void decode_attention(const at::Tensor& query, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& rows,
                      double scaling, at::Tensor& out) {
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode attention takes float32 or bfloat16, not ",
              dtype);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&query, &kc, &vc, &out}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == dtype && t->dim() == 3 && t->stride(2) == 1,
                "query, keys, values and out must be 3-d CPU tensors of one dtype with unit stride in the last "
                "dimension");
  }
  const int64_t N = query.size(0), H = query.size(1), D = query.size(2), Hkv = kc.size(0), T = kc.size(1);
  TORCH_CHECK(out.sizes() == query.sizes(), "out ", out.sizes(), " is not query's shape ", query.sizes());
  TORCH_CHECK(vc.sizes() == kc.sizes() && kc.size(2) == D, "keys ", kc.sizes(), " and values ", vc.sizes(),
              " must be [kv_heads, tokens, ", D, "]");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, H, " query heads do not share ", Hkv, " KV heads evenly");
  const int64_t* p = int64_table(rows, "rows", -1, 3);
  std::vector<Row> rs(rows.size(0));
  for (size_t i = 0; i < rs.size(); ++i) {
    const Row r{p[3 * i], p[3 * i + 1], p[3 * i + 2]};
    TORCH_CHECK(0 <= r.token && r.token < N, "row ", i, ": token ", r.token, " outside 0..", N);
    TORCH_CHECK(r.length >= 1 && 0 <= r.first && r.first + r.length <= T, "row ", i, ": keys ", r.first, "+",
                r.length, " outside the arena's ", T);
    rs[i] = r;
  }
  if (dtype == at::kFloat) {
    attend<float>(query, kc, vc, rs, scaling, out);
  } else {
    attend<at::BFloat16>(query, kc, vc, rs, scaling, out);
  }
}

}  // namespace

TORCH_LIBRARY(loramux_attention, m) {
  m.def("decode_attention(Tensor query, Tensor kc, Tensor vc, Tensor rows, float scaling, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(loramux_attention, CPU, m) { m.impl("decode_attention", &decode_attention); }
