// LoRA side paths of a step on CPU in two calls per projection group: segmented x·A and (x·A)·B over runs
// of tokens, each run reading its own slot's weights once (the SGMV shape of punica and S-LoRA): float32 or
// bfloat16 weights, widened in registers (or once into a float32 buffer where several tiles read them); float32
// sums and x·A; a float32 or bfloat16 input and output. Both work in register tiles of 4 tokens.
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
#include <type_traits>
#include <vector>

#include "table.h"
#include "vec.h"

namespace {

using namespace loramux;

constexpr int64_t kRows = 16;     // A rows (rank x member) of one shrink work item
constexpr int64_t kBlock = 16;    // tokens of one shrink work item (a long run splits over the threads)
constexpr int64_t kTile = 4;      // tokens (and A rows) of one register tile
constexpr int64_t kMinCols = 64;  // fewest output columns of one expand work item
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

// n rows of d elements of src (row stride rs) as float32: src itself, or widened into dst [n, d].
template <typename T>
inline const float* as_float(const T* src, int64_t rs, int64_t n, int64_t d, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      int64_t c = 0;
      for (; c + kLanes <= d; c += kLanes) store(dst + i * d + c, load(src + i * rs + c));
      for (; c < d; ++c) dst[i * d + c] = widen(src[i * rs + c]);
    }
    return dst;
  }
}

// x [N, d_in], A [S, R, M, d_in] (contiguous) -> xa [rows, R*M] float32:
// xa[off + i, q] = <A[slot, q / M, q % M], x[start + i]> for q / M < the run's rank of member q % M (the rest
// of a row is left unset and never read). A work item is up to kBlock tokens of a run by kRows rows of A;
// bfloat16 rows are widened once an item (x) or once a tile of A rows.
template <typename TA, typename TX>
void shrink_runs(const TX* xp, int64_t xs, const TA* ap, const std::vector<Run>& rs, const std::vector<int64_t>& ranks,
                 int64_t R, int64_t M, int64_t D, float* op) {
  std::vector<int64_t> first(rs.size() + 1, 0);  // first work item of each run
  std::vector<int64_t> chunks(rs.size(), 0);     // each run's chunks of kRows rows, to its largest member rank
  for (size_t i = 0; i < rs.size(); ++i) {
    int64_t deepest = 0;
    for (int64_t m = 0; m < M; ++m) deepest = std::max(deepest, member_rank(rs[i], ranks, m, M));
    chunks[i] = (deepest * M + kRows - 1) / kRows;
    first[i + 1] = first[i] + chunks[i] * ((rs[i].end - rs[i].start + kBlock - 1) / kBlock);
  }
  const int64_t width = R * M, items = first.back();
  at::parallel_for(0, items, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> xbuf(std::is_same_v<TX, float> ? 0 : kBlock * D);
    std::vector<float> abuf(std::is_same_v<TA, float> ? 0 : kTile * D);
    for (int64_t item = lo; item < hi; ++item) {
      const size_t i = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
      const Run& r = rs[i];
      const int64_t q0 = (item - first[i]) % chunks[i] * kRows, t0 = r.start + (item - first[i]) / chunks[i] * kBlock;
      const int64_t tn_all = std::min(t0 + kBlock, r.end) - t0;
      int64_t rows[kRows], n_rows = 0;  // the chunk's rows within their member's rank
      for (int64_t q = q0; q < std::min(q0 + kRows, r.rank * M); ++q) {
        if (q / M < member_rank(r, ranks, q % M, M)) rows[n_rows++] = q;
      }
      if (n_rows == 0) continue;
      const float* x = as_float(xp + t0 * xs, xs, tn_all, D, xbuf.data());
      const int64_t xrs = std::is_same_v<TX, float> ? xs : D;
      const TA* a = ap + r.slot * R * M * D;
      for (int64_t p = 0; p < n_rows; p += kTile) {
        const int64_t qn = std::min(kTile, n_rows - p);
        const auto tiles = [&](const auto* const* ar) {  // the item's token tiles against these 4 rows of A
          for (int64_t t = 0; t < tn_all; t += kTile) {
            const int64_t tn = std::min(kTile, tn_all - t);
            const float* xr[kTile];
            for (int64_t j = 0; j < kTile; ++j) xr[j] = x + (t + std::min(j, tn - 1)) * xrs;
            float out[kTile][kTile];
            dots4<kTile>(ar, xr, D, out);
            for (int64_t j = 0; j < tn; ++j) {
              for (int64_t u = 0; u < qn; ++u) op[(r.off + t0 - r.start + t + j) * width + rows[p + u]] = out[j][u];
            }
          }
        };
        const TA* ar[kTile];  // a tile's missing rows repeat its last (their sums are dropped)
        for (int64_t u = 0; u < kTile; ++u) ar[u] = a + rows[p + std::min(u, qn - 1)] * D;
        if (std::is_same_v<TA, float> || tn_all <= kTile) {
          tiles(ar);
        } else {  // bfloat16 rows read by several token tiles: widened once
          const float* wide[kTile];
          for (int64_t u = 0; u < kTile; ++u) wide[u] = as_float(ar[u], D, 1, D, abuf.data() + u * D);
          tiles(wide);
        }
      }
    }
  });
}

template <typename TX>
void shrink_typed(const at::Tensor& x, const at::Tensor& A, const std::vector<Run>& rs,
                  const std::vector<int64_t>& ranks, at::Tensor& xa) {
  const int64_t R = A.size(1), M = A.size(2), D = A.size(3);
  if (A.scalar_type() == at::kBFloat16)
    shrink_runs(x.data_ptr<TX>(), x.stride(0), A.data_ptr<at::BFloat16>(), rs, ranks, R, M, D, xa.data_ptr<float>());
  else
    shrink_runs(x.data_ptr<TX>(), x.stride(0), A.data_ptr<float>(), rs, ranks, R, M, D, xa.data_ptr<float>());
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
  if (x.scalar_type() == at::kBFloat16)
    shrink_typed<at::BFloat16>(x, A, rs, ranks, xa);
  else
    shrink_typed<float>(x, A, rs, ranks, xa);
  return xa;
}

// y[j, :NV lanes] (+)= sum_k v[j][k] * b[k, :NV lanes] for kTile rows j (v [kTile, kn], b row stride bs) over
// ranks k < kn: the sums stay in registers over every rank, each B element loaded once for the tile's rows.
// A float32 y takes y + sum; a bfloat16 y the same, rounded once. Rows past tn are computed and dropped.
template <int NV, typename W, typename Y>
inline void expand_tile(Y* y, int64_t ys, int64_t tn, const W* b, int64_t bs, const float* v, int64_t kn) {
  Vec acc[kTile][NV] = {};
  for (int64_t k = 0; k < kn; ++k) {
    Vec bv[NV];
    for (int u = 0; u < NV; ++u) bv[u] = load(b + k * bs + u * kLanes);
    for (int j = 0; j < kTile; ++j) {
      const float vk = v[j * kn + k];
      for (int u = 0; u < NV; ++u) acc[j][u] += vk * bv[u];
    }
  }
  for (int64_t j = 0; j < tn; ++j) {
    for (int u = 0; u < NV; ++u) {
      Y* row = y + j * ys + u * kLanes;
      store(row, load(row) + acc[j][u]);
    }
  }
}

// expand_tile's columns one at a time (the tail past the last whole vector).
template <typename W, typename Y>
inline void expand_column(Y* y, int64_t ys, int64_t tn, const W* b, int64_t bs, const float* v, int64_t kn) {
  for (int64_t j = 0; j < tn; ++j) {
    float s = 0.f;
    for (int64_t k = 0; k < kn; ++k) s += v[j * kn + k] * widen(b[k * bs]);
    y[j * ys] = static_cast<Y>(widen(y[j * ys]) + s);
  }
}

// y [N, d_out] += w_i * xa[run i's rows, member::members up to its rank] @ B[slot_i, :rank] for each run i.
// Each thread takes a block of whole wide tiles of columns and every run over it, so runs that share tokens
// add in order.
template <typename Y, typename W>
void expand_runs(Y* yp, int64_t ys, const float* xp, int64_t width, const W* bp, int64_t R, int64_t D,
                 const std::vector<Run>& rs, const float* wp, const std::vector<int64_t>& ranks, int64_t member,
                 int64_t members) {
  constexpr int64_t kWide = 4 * kLanes;  // columns of a wide tile
  int64_t longest = 0;
  for (const Run& r : rs) longest = std::max(longest, r.end - r.start);
  // one column block per thread: longer stretches of each B row than two blocks a thread
  // (0.84x the expand time of a 16-adapter decode step)
  const int64_t split = at::get_num_threads();
  const int64_t cols = std::max(kMinCols, ((D + split - 1) / split + kWide - 1) / kWide * kWide);
  at::parallel_for(0, (D + cols - 1) / cols, 1, [&](int64_t lo, int64_t hi) {
    // w * x·A of one run, [tokens (and a tile's padding), rank]: contiguous factors for the tiles
    std::vector<float> v((longest + kTile) * R), wide_b(std::is_same_v<W, float> ? 0 : R * kWide);
    for (int64_t blk = lo; blk < hi; ++blk) {
      const int64_t c0 = blk * cols, c1 = std::min(D, c0 + cols);
      for (size_t i = 0; i < rs.size(); ++i) {
        const Run& r = rs[i];
        const int64_t rank = member_rank(r, ranks, member, members), n = r.end - r.start;
        if (rank == 0 || n == 0) continue;
        for (int64_t j = 0; j < n + kTile; ++j) {  // padding rows repeat the run's last token (their sums dropped)
          const float* s = xp + (r.off + std::min(j, n - 1)) * width + member;
          for (int64_t k = 0; k < rank; ++k) v[j * rank + k] = wp[i] * s[k * members];
        }
        const W* b = bp + r.slot * R * D;
        Y* y = yp + r.start * ys;
        int64_t c = c0;
        const auto wide = [&](const auto* bc, int64_t bs) {  // the run's token tiles over columns c..c+kWide-1
          for (int64_t t = 0; t < n; t += kTile)
            expand_tile<4>(y + t * ys + c, ys, std::min(kTile, n - t), bc, bs, v.data() + t * rank, rank);
        };
        for (; c + kWide <= c1; c += kWide) {
          if (std::is_same_v<W, float> || n <= kTile)
            wide(b + c, D);
          else  // bfloat16 B read by several tiles: widened once
            wide(as_float(b + c, D, rank, kWide, wide_b.data()), kWide);
        }
        for (; c + kLanes <= c1; c += kLanes) {
          for (int64_t t = 0; t < n; t += kTile)
            expand_tile<1>(y + t * ys + c, ys, std::min(kTile, n - t), b + c, D, v.data() + t * rank, rank);
        }
        for (; c < c1; ++c) {
          for (int64_t t = 0; t < n; t += kTile)
            expand_column(y + t * ys + c, ys, std::min(kTile, n - t), b + c, D, v.data() + t * rank, rank);
        }
      }
    }
  });
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
  const auto run = [&](auto* yp, const auto* bp) {
    expand_runs(yp, y.stride(0), xp, xa.size(1), bp, R, D, rs, wp, ranks, member, members);
  };
  const bool bf16_b = B.scalar_type() == at::kBFloat16;
  if (bf16 && bf16_b)
    run(y.data_ptr<at::BFloat16>(), B.data_ptr<at::BFloat16>());
  else if (bf16)
    run(y.data_ptr<at::BFloat16>(), B.data_ptr<float>());
  else if (bf16_b)
    run(y.data_ptr<float>(), B.data_ptr<at::BFloat16>());
  else
    run(y.data_ptr<float>(), B.data_ptr<float>());
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
