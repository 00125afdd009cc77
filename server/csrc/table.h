// The int64 tables loramux's CPU kernels take from the Python side (runs, decode rows, member ranks).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace loramux {

// t's entries, where t is a contiguous [rows, cols] int64 CPU tensor (rows < 0: any number of rows); else an
// error that names the table and the shape it must have.
inline const int64_t* int64_table(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 2 &&
                  (rows < 0 || t.size(0) == rows) && t.size(1) == cols && t.is_contiguous(),
              name, " must be a contiguous [", rows < 0 ? std::string("n") : std::to_string(rows), ", ", cols,
              "] int64 CPU tensor");
  return t.data_ptr<int64_t>();
}

}  // namespace loramux
