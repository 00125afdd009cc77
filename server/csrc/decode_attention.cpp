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
    for (int u = 0; u < 4; ++u) store(dst + c + u * kLanes, acc[u] * inv);
  }
  for (; c + kLanes <= D; c += kLanes) {
    Vec acc = {};
    for (int64_t t = 0; t < n; ++t) acc += p[t] * load(v + t * vs + c);
    store(dst + c, acc * inv);
  }
  for (; c < D; ++c) {
    float acc = 0.f;
    for (int64_t t = 0; t < n; ++t) acc += p[t] * widen(v[t * vs + c]);
    dst[c] = static_cast<T>(acc * inv);
  }
}

// The op's tensors as pointers and strides (query, out [N, H, D]; keys, values [Hkv, T, D]).
template <typename T>
struct Arena {
  const T *q, *k, *v;
  T* out;
  int64_t qs0, qs1, ks0, ks1, vs0, vs1, os0, os1, H, D, Hkv, G, longest;
  float scale;

  Arena(const at::Tensor& query, const at::Tensor& kc, const at::Tensor& vc, const std::vector<Row>& rows,
        double scaling, at::Tensor& o)
      : q(query.data_ptr<T>()), k(kc.data_ptr<T>()), v(vc.data_ptr<T>()), out(o.data_ptr<T>()),
        qs0(query.stride(0)), qs1(query.stride(1)), ks0(kc.stride(0)), ks1(kc.stride(1)), vs0(vc.stride(0)),
        vs1(vc.stride(1)), os0(o.stride(0)), os1(o.stride(1)), H(query.size(1)), D(query.size(2)),
        Hkv(kc.size(0)), G(H / Hkv), longest(0), scale(static_cast<float>(scaling)) {
    for (const Row& r : rows) longest = std::max(longest, r.length);
  }
  const T* query(const Row& r, int64_t head) const { return q + r.token * qs0 + head * qs1; }
  T* output(const Row& r, int64_t head) const { return out + r.token * os0 + head * os1; }
  const T* keys(const Row& r, int64_t kv) const { return k + kv * ks0 + r.first * ks1; }
  const T* values(const Row& r, int64_t kv) const { return v + kv * vs0 + r.first * vs1; }
};

template <typename T>
void attend_heads(const Arena<T>& a, const std::vector<Row>& rows) {
  const int64_t H = a.H, D = a.D;
  // one task per (token, query head): its KV head's keys and values stay in L1/L2 across the group's heads
  at::parallel_for(0, static_cast<int64_t>(rows.size()) * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(D), scores(a.longest);
    for (int64_t task = lo; task < hi; ++task) {
      const Row& r = rows[task / H];
      const int64_t head = task % H, kv = head / a.G;
      const T* src = a.query(r, head);
      for (int64_t c = 0; c < D; ++c) q[c] = widen(src[c]);
      scores_of(q.data(), a.keys(r, kv), a.ks1, r.length, D, a.scale, scores.data());
      const float total = exp_shifted(scores.data(), r.length);
      weighted_sum(scores.data(), a.values(r, kv), a.vs1, r.length, D, total, a.output(r, head));
    }
  });
}

constexpr int64_t kHeads = 4;  // query heads of one KV head that read its keys and values together

// s[h][t] = scale * <q[h], k_t> for t < n and NH <= kHeads query rows q[h] [D] float32; k_t = k + t * ks. Four
// keys at a time: each key element is loaded (and widened) once for the NH queries.
template <int NH, typename T>
void group_scores(const float* const* q, const T* k, int64_t ks, int64_t n, int64_t D, float scale,
                  float* const* s) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const T* keys[4] = {k + t * ks, k + (t + 1) * ks, k + (t + 2) * ks, k + (t + 3) * ks};
    float dots[4][4];
    dots4<NH>(keys, q, D, dots);
    for (int h = 0; h < NH; ++h) {
      for (int j = 0; j < 4; ++j) s[h][t + j] = dots[h][j] * scale;
    }
  }
  const int64_t chunks = D / kLanes;
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
void attend_grouped(const Arena<T>& a, const std::vector<Row>& rows) {
  const int64_t Hkv = a.Hkv, G = a.G, D = a.D;
  const int64_t parts = (G + kHeads - 1) / kHeads;  // groups of up to kHeads query heads per KV head
  // one task per (token, KV head, group of its query heads): each key and value read once for the group
  at::parallel_for(0, static_cast<int64_t>(rows.size()) * Hkv * parts, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> q(kHeads * D), scores(kHeads * a.longest);
    for (int64_t task = lo; task < hi; ++task) {
      const Row& r = rows[task / (Hkv * parts)];
      const int64_t kv = task / parts % Hkv, h0 = kv * G + task % parts * kHeads;
      const int64_t hn = std::min(kHeads, kv * G + G - h0);
      const float* qr[kHeads];
      float* sr[kHeads];
      T* dr[kHeads];
      for (int64_t h = 0; h < hn; ++h) {
        const T* src = a.query(r, h0 + h);
        for (int64_t c = 0; c < D; ++c) q[h * D + c] = widen(src[c]);
        qr[h] = q.data() + h * D;
        sr[h] = scores.data() + h * a.longest;
        dr[h] = a.output(r, h0 + h);
      }
      const auto group = [&](auto heads) {
        constexpr int NH = decltype(heads)::value;
        group_scores<NH>(qr, a.keys(r, kv), a.ks1, r.length, D, a.scale, sr);
        float total[NH];
        for (int h = 0; h < NH; ++h) total[h] = exp_shifted(sr[h], r.length);
        group_weighted_sum<NH>(sr, a.values(r, kv), a.vs1, r.length, D, total, dr);
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
  const Arena<T> arena(query, kc, vc, rows, scaling, out);
  if (std::is_same_v<T, at::BFloat16> && arena.G >= 2)
    attend_grouped(arena, rows);
  else
    attend_heads(arena, rows);
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
