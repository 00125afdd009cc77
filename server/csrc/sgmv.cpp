// LoRA side paths of a step on CPU in two calls per projection group: segmented x·A and (x·A)·B over runs
// of tokens, each run reading its own slot's weights once (the SGMV shape of punica and S-LoRA): float32 or
// bfloat16 weights, widened in registers; float32 sums and x·A; a float32 or bfloat16 input and output.
//
// A run is a row of `runs` [n, 5] int64: (start, end, slot, rank, off): tokens start..end-1 of x use slot
// `slot` at rank `rank`, and their x·A rows sit at off..off+(end-start)-1 of xa. `member_ranks` [S, M] int64,
// where given, is the rank each slot holds for each member (0: the adapter leaves that projection alone): a
// run then reads member m's rows of A and B only up to min(rank, member_ranks[slot, m]), so an adapter of some
// of a group's projections reads none of the others' (zero) rows. `weights` [n] float32 scales
// each run's product (1 for a token's own adapter, -1 to remove a merged one, w for a composed one). Runs may
// share tokens; they never share xa rows. The Python side (server/lora/kernels.py) builds the runs and keeps
// the plain-torch path these are tested against (tests/test_lora_kernels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "table.h"
#include "vec.h"

namespace {

using namespace loramux;

constexpr int64_t kRows = 16;     // A rows (rank x member) of one shrink work item
constexpr int64_t kMinCols = 64;  // fewest output columns of one expand work item
constexpr int64_t kRanks = 8;     // ranks (rows of B) of one expand tile
constexpr int64_t kTokens = 4;    // tokens of one expand tile
// Every call splits over the intra-op threads, however small: in the model's decode step that measured
// 0.97x the step time of running small calls on the calling thread, although an isolated small call is faster there.

struct Run {
  int64_t start, end, slot, rank, off;
};

std::vector<Run> read_runs(const at::Tensor& runs, int64_t n_tokens, int64_t n_slots, int64_t max_rank,
                           int64_t rows) {
  const int64_t* p = int64_table(runs, "runs", -1, 5);
  std::vector<Run> out(runs.size(0));
  for (size_t i = 0; i < out.size(); ++i) {
    Run r{p[5 * i], p[5 * i + 1], p[5 * i + 2], p[5 * i + 3], p[5 * i + 4]};
    TORCH_CHECK(0 <= r.start && r.start <= r.end && r.end <= n_tokens, "run ", i, ": tokens ", r.start, "..", r.end,
                " outside 0..", n_tokens);
    TORCH_CHECK(0 <= r.slot && r.slot < n_slots, "run ", i, ": slot ", r.slot, " outside 0..", n_slots);
    TORCH_CHECK(0 <= r.rank && r.rank <= max_rank, "run ", i, ": rank ", r.rank, " outside 0..", max_rank);
    TORCH_CHECK(0 <= r.off && r.off + (r.end - r.start) <= rows, "run ", i, ": rows ", r.off, "+", r.end - r.start,
                " outside 0..", rows);
    out[i] = r;
  }
  return out;
}

// member_ranks, if given: a [S, M] int64 CPU tensor of ranks 0..R (its contents, contiguous), else every
// member at the run's rank.
std::vector<int64_t> read_member_ranks(const std::optional<at::Tensor>& t, int64_t S, int64_t M, int64_t R) {
  if (!t.has_value()) return {};
  const int64_t* p = int64_table(*t, "member_ranks", S, M);
  std::vector<int64_t> out(p, p + S * M);
  for (int64_t i = 0; i < S * M; ++i)
    TORCH_CHECK(0 <= out[i] && out[i] <= R, "member_ranks[", i / M, ", ", i % M, "] = ", out[i], " outside 0..", R);
  return out;
}

// The rank run r reads of member m.
inline int64_t member_rank(const Run& r, const std::vector<int64_t>& ranks, int64_t m, int64_t M) {
  return ranks.empty() ? r.rank : std::min(r.rank, ranks[r.slot * M + m]);
}

// A `dim`-d CPU tensor of float32 (or, with `bf16`, bfloat16) with unit stride in its last dimension.
void check_float(const at::Tensor& t, const char* name, int64_t dim, bool bf16 = false) {
  const bool dtype = t.scalar_type() == at::kFloat || (bf16 && t.scalar_type() == at::kBFloat16);
  TORCH_CHECK(t.device().is_cpu() && dtype && t.dim() == dim, name, " must be a ", dim, "-d float32",
              bf16 ? " or bfloat16" : "", " CPU tensor");
  TORCH_CHECK(t.stride(dim - 1) == 1, name, " must have unit stride in its last dimension");
}

// out[t] = <a, x_t> for N rows x_t of length d, each element of a read once (two partial sums per row).
template <int N, typename T>
inline void dots(const T* __restrict a, const float* const* x, int64_t d, float* out) {
  Vec acc[N][2] = {};
  int64_t k = 0;
  for (; k + 2 * kLanes <= d; k += 2 * kLanes) {
    const Vec a0 = load(a + k), a1 = load(a + k + kLanes);
    for (int t = 0; t < N; ++t) {
      acc[t][0] += a0 * load(x[t] + k);
      acc[t][1] += a1 * load(x[t] + k + kLanes);
    }
  }
  for (int t = 0; t < N; ++t) {
    float s = hsum(acc[t][0] + acc[t][1]);
    for (int64_t j = k; j < d; ++j) s += widen(a[j]) * x[t][j];
    out[t] = s;
  }
}

template <typename T>
inline void dots_n(const T* a, const float* const* x, int64_t n, int64_t d, float* out) {
  switch (n) {
    case 4: return dots<4>(a, x, d, out);
    case 3: return dots<3>(a, x, d, out);
    case 2: return dots<2>(a, x, d, out);
    default: return dots<1>(a, x, d, out);
  }
}

// x [N, d_in] float32, A [S, R, M, d_in] (contiguous) -> xa [rows, R*M] float32:
// xa[off + i, q] = <A[slot, q / M, q % M], x[start + i]> for q / M < the run's rank of member q % M (the rest
// of a row is left unset and never read).
template <typename T>
void shrink_runs(const float* xp, int64_t xs, const T* ap, const std::vector<Run>& rs, const std::vector<int64_t>& ranks,
                 int64_t R, int64_t M, int64_t D, float* op) {
  std::vector<int64_t> first(rs.size() + 1, 0);  // first work item of each run
  std::vector<int64_t> deepest(rs.size(), 0);    // each run's largest member rank
  for (size_t i = 0; i < rs.size(); ++i) {
    for (int64_t m = 0; m < M; ++m) deepest[i] = std::max(deepest[i], member_rank(rs[i], ranks, m, M));
    first[i + 1] = first[i] + (deepest[i] * M + kRows - 1) / kRows;
  }
  const int64_t width = R * M, items = first.back();
  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const size_t i = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
      const Run& r = rs[i];
      const int64_t q0 = (item - first[i]) * kRows, q1 = std::min(q0 + kRows, deepest[i] * M);
      int64_t limit[kRows];  // rank of each row's member
      for (int64_t q = q0; q < q1; ++q) limit[q - q0] = member_rank(r, ranks, q % M, M);
      const T* a = ap + r.slot * R * M * D;
      for (int64_t t = r.start; t < r.end; t += 4) {
        const int64_t n = std::min<int64_t>(4, r.end - t);
        const float* xr[4];
        for (int64_t j = 0; j < n; ++j) xr[j] = xp + (t + j) * xs;
        float out[4];
        for (int64_t q = q0; q < q1; ++q) {
          if (q / M >= limit[q - q0]) continue;
          dots_n(a + q * D, xr, n, D, out);
          for (int64_t j = 0; j < n; ++j) op[(r.off + t - r.start + j) * width + q] = out[j];
        }
      }
    }
  });
}

at::Tensor sgmv_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& runs, int64_t rows,
                       const std::optional<at::Tensor>& member_ranks) {
  check_float(x, "x", 2, true);
  check_float(A, "A", 4, true);
  TORCH_CHECK(A.is_contiguous(), "A must be contiguous");
  const int64_t S = A.size(0), R = A.size(1), M = A.size(2), D = A.size(3);
  TORCH_CHECK(x.size(1) == D, "x has ", x.size(1), " features, A ", D);
  const std::vector<Run> rs = read_runs(runs, x.size(0), S, R, rows);
  const std::vector<int64_t> ranks = read_member_ranks(member_ranks, S, M, R);
  at::Tensor xa = at::empty({rows, R * M}, x.options().dtype(at::kFloat));
  // a bfloat16 x is widened once here, not once per row of A that reads it
  const at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  if (A.scalar_type() == at::kBFloat16)
    shrink_runs(xp, xf.stride(0), A.data_ptr<at::BFloat16>(), rs, ranks, R, M, D, xa.data_ptr<float>());
  else
    shrink_runs(xp, xf.stride(0), A.data_ptr<float>(), rs, ranks, R, M, D, xa.data_ptr<float>());
  return xa;
}

// out[j, :nc] += sum_k v[j][k] * b[k, :nc] for TN rows j (out row stride os, b row stride bs), kn <= kRanks:
// the rows' sums stay in registers over the kn ranks, each B element is loaded once for all TN rows.
template <int TN, typename W>
inline void expand_tile(float* out, int64_t os, const W* b, int64_t bs, const float (&v)[kTokens][kRanks],
                        int64_t kn, int64_t nc) {
  int64_t c = 0;
  for (; c + 2 * kLanes <= nc; c += 2 * kLanes) {
    Vec acc[TN][2];
    for (int j = 0; j < TN; ++j) {
      acc[j][0] = load(out + j * os + c);
      acc[j][1] = load(out + j * os + c + kLanes);
    }
    for (int64_t k = 0; k < kn; ++k) {
      const Vec b0 = load(b + k * bs + c), b1 = load(b + k * bs + c + kLanes);
      for (int j = 0; j < TN; ++j) {
        acc[j][0] += v[j][k] * b0;
        acc[j][1] += v[j][k] * b1;
      }
    }
    for (int j = 0; j < TN; ++j) {
      store(out + j * os + c, acc[j][0]);
      store(out + j * os + c + kLanes, acc[j][1]);
    }
  }
  for (; c < nc; ++c) {
    for (int j = 0; j < TN; ++j) {
      float s = out[j * os + c];
      for (int64_t k = 0; k < kn; ++k) s += v[j][k] * widen(b[k * bs + c]);
      out[j * os + c] = s;
    }
  }
}

// y [N, d_out] += weight * xa[run rows, member::M at the run's rank] @ B[slot, :rank]; B [S, R, d_out] contiguous,
// float32 or bfloat16; y float32 or bfloat16. A bfloat16 y takes each run's sum (float32, over all its ranks)
// rounded once: y = bf16(float(y) + sum), what adding a float32 buffer of the runs' sums into y does when the
// runs are disjoint.
void sgmv_expand(at::Tensor& y, const at::Tensor& xa, const at::Tensor& B, const at::Tensor& runs,
                 const at::Tensor& weights, const std::optional<at::Tensor>& member_ranks, int64_t member,
                 int64_t members) {
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  TORCH_CHECK(y.device().is_cpu() && (bf16 || y.scalar_type() == at::kFloat) && y.dim() == 2 && y.stride(1) == 1,
              "y must be a 2-d float32 or bfloat16 CPU tensor with unit stride in its last dimension");
  check_float(xa, "xa", 2);
  check_float(B, "B", 3, true);
  TORCH_CHECK(B.is_contiguous() && xa.is_contiguous(), "B and xa must be contiguous");
  const int64_t S = B.size(0), R = B.size(1), D = B.size(2);
  TORCH_CHECK(y.size(1) == D, "y has ", y.size(1), " columns, B ", D);
  TORCH_CHECK(0 <= member && member < members && xa.size(1) == R * members, "xa [", xa.size(0), ", ", xa.size(1),
              "] is not the shrink of ", members, " members at rank ", R);
  const std::vector<Run> rs = read_runs(runs, y.size(0), S, R, xa.size(0));
  const std::vector<int64_t> ranks = read_member_ranks(member_ranks, S, members, R);
  TORCH_CHECK(weights.device().is_cpu() && weights.scalar_type() == at::kFloat && weights.is_contiguous() &&
                  weights.numel() == static_cast<int64_t>(rs.size()),
              "weights must be a contiguous float32 CPU tensor of one weight per run");
  const float* wp = weights.data_ptr<float>();
  const float* xp = xa.data_ptr<float>();
  float* yp = bf16 ? nullptr : y.data_ptr<float>();
  at::BFloat16* yb = bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  int64_t longest = 0;
  for (const Run& r : rs) longest = std::max(longest, r.end - r.start);
  // one column block per thread, of whole tiles: longer stretches of each B row than two blocks a thread
  // (0.84x the expand time of a 16-adapter decode step)
  const int64_t split = at::get_num_threads();
  const int64_t cols = std::max(kMinCols, ((D + split - 1) / split + 2 * kLanes - 1) / (2 * kLanes) * (2 * kLanes));
  const int64_t ys = y.stride(0), width = xa.size(1), blocks = (D + cols - 1) / cols;
  const auto run_blocks = [&](const auto* bp) {  // B's elements, float or at::BFloat16
    at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> sums(bf16 ? longest * cols : 0);  // bf16 y: one run's float32 sums [tokens, cols]
      for (int64_t blk = lo; blk < hi; ++blk) {
        const int64_t c0 = blk * cols, nc = std::min(cols, D - c0);
        for (size_t i = 0; i < rs.size(); ++i) {
          const Run& r = rs[i];
          const int64_t rank = member_rank(r, ranks, member, members);
          if (rank == 0) continue;
          const int64_t os = bf16 ? nc : ys;
          float* base = bf16 ? sums.data() - r.start * nc : yp + c0;  // row t of the run's output: base + t * os
          if (bf16) std::fill(sums.begin(), sums.begin() + (r.end - r.start) * nc, 0.f);
          for (int64_t k0 = 0; k0 < rank; k0 += kRanks) {  // kRanks rows of B at a time, in order
            const int64_t kn = std::min(kRanks, rank - k0);
            const auto* b = bp + (r.slot * R + k0) * D + c0;
            for (int64_t t = r.start; t < r.end; t += kTokens) {
              const int64_t tn = std::min(kTokens, r.end - t);
              float v[kTokens][kRanks] = {};  // weight * x·A of these tokens at these ranks
              for (int64_t j = 0; j < tn; ++j) {
                const float* s = xp + (r.off + t + j - r.start) * width + k0 * members + member;
                for (int64_t k = 0; k < kn; ++k) v[j][k] = wp[i] * s[k * members];
              }
              float* out = base + t * os;
              switch (tn) {
                case 4: expand_tile<4>(out, os, b, D, v, kn, nc); break;
                case 3: expand_tile<3>(out, os, b, D, v, kn, nc); break;
                case 2: expand_tile<2>(out, os, b, D, v, kn, nc); break;
                default: expand_tile<1>(out, os, b, D, v, kn, nc);
              }
            }
          }
          if (bf16) {
            for (int64_t t = r.start; t < r.end; ++t) {
              at::BFloat16* row = yb + t * ys + c0;
              const float* sum = base + t * os;
              for (int64_t c = 0; c < nc; ++c) row[c] = at::BFloat16(static_cast<float>(row[c]) + sum[c]);
            }
          }
        }
      }
    });
  };
  if (B.scalar_type() == at::kBFloat16)
    run_blocks(B.data_ptr<at::BFloat16>());
  else
    run_blocks(B.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(loramux_cpu, m) {
  m.def("sgmv_shrink(Tensor x, Tensor A, Tensor runs, int rows, Tensor? member_ranks) -> Tensor");
  m.def(
      "sgmv_expand(Tensor(a!) y, Tensor xa, Tensor B, Tensor runs, Tensor weights, Tensor? member_ranks, int member, "
      "int members) -> ()");
}

TORCH_LIBRARY_IMPL(loramux_cpu, CPU, m) {
  m.impl("sgmv_shrink", &sgmv_shrink);
  m.impl("sgmv_expand", &sgmv_expand);
}
