// Input side of every divergence call: validation of the matrices and their rows, row
// normalization, and the per-row precomputation of the sparse algorithm (Sparse rows).
#include "divergence_internal.h"

#include <cstring>
#include <sstream>
#include <stdexcept>

namespace loramix {
namespace divergence_impl {

namespace {

template <class T>
int64_t count_nonzero(const T* x, int64_t n) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k) c += x[k] != T(0);
  return c;
}

}  // namespace

[[noreturn]] void bad_row(const char* name, int64_t r, const std::string& what) {
  std::ostringstream os;
  os << "divergence: row " << r << " of " << name << " " << what;
  throw std::invalid_argument(os.str());
}

std::string fmt(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

Sparse build_sparse(const HistMatrix& M, const char* name, Metric metric, double eps,
                    const DivergenceKernels& K, int threads, Cancel* cancel) {
  Sparse S;
  S.rows = M.rows;
  S.cols = M.cols;
  std::vector<int64_t> count(M.rows);
  std::vector<double> sums(M.rows);
  // The scalar reader: validates row r (throws, naming the fault) and sums it.
  auto read_row = [&](int64_t r) {
    int64_t c = 0;
    sums[r] = scan_row(M, name, r, [&](int64_t, double) { ++c; });
    count[r] = c;
  };
  // Sparse float64 rows: checked by a vector kernel (the reader runs only on a row that fails,
  // to throw its message) and summed two rows at a time: each row's compensated sum adds the
  // same values in the same order, two dependency chains run side by side. Errors come in the
  // reader's order (row r's before row r + 1's).
  const bool fast = M.sparse && M.dtype == DType::F64;
  const double* data = static_cast<const double*>(M.data);
  auto checked = [&](int64_t r) {
    const int64_t o = M.indptr[r];
    return K.check_row_f64(M.indices + o, data + o, static_cast<std::size_t>(M.indptr[r + 1] - o), M.cols,
                           &count[r]);
  };
  auto finish = [&](int64_t r, double total) {
    if (total == 0.0 || !(total < kInf)) read_row(r);  // throws: all zero / sums to infinity
    sums[r] = total;
  };
  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (int64_t r = static_cast<int64_t>(b); r < static_cast<int64_t>(e); ++r) {
      if (!fast) {
        read_row(r);
        continue;
      }
      if (!checked(r)) read_row(r);  // throws
      if (r + 1 == static_cast<int64_t>(e) || !checked(r + 1)) {
        read_row(r);  // alone (if r + 1 failed, row r's own error, if any, comes first)
        continue;
      }
      CompSum s1, s2;
      comp_sum2<true>(data + M.indptr[r], M.indptr[r + 1] - M.indptr[r], data + M.indptr[r + 1],
                      M.indptr[r + 2] - M.indptr[r + 1], &s1, &s2);
      finish(r, s1.value());
      finish(r + 1, s2.value());
      ++r;
    }
  });
  S.ptr.assign(M.rows + 1, 0);
  for (int64_t r = 0; r < M.rows; ++r) S.ptr[r + 1] = S.ptr[r] + count[r];
  const int64_t nnz = S.ptr[M.rows];
  S.idx.resize(nnz);
  if (metric != Metric::js) S.a.resize(nnz);  // js needs a only to derive p, w and U
  if (metric != Metric::wd) {
    S.v1.resize(nnz);
    S.v2.resize(nnz);
    S.c1.resize(M.rows);
    S.c2.resize(M.rows);
  }
  int64_t max_row = 0;
  for (int64_t r = 0; r < M.rows; ++r) max_row = std::max(max_row, count[r]);
  const int nt = std::max(1, threads);
  if (metric == Metric::js) {
    // Two rows at a time: for each, its column indices and the raw values it holds (straight
    // from the input where that is float64 without explicit zeros), then p, w and u by the
    // row kernel (u(a) = 1/2 [p log(2p/(a + 2eps)) + eps log(2eps/(a + 2eps))], p = a + eps,
    // a = x / sum: divisions and logs vectorized), then the two rows' U side by side.
    std::vector<std::vector<double>> scratch(nt, std::vector<double>(4 * max_row));
    parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
      double* t0 = scratch[w].data();
      for (int64_t r = static_cast<int64_t>(b); r < static_cast<int64_t>(e); r += 2) {
        const int64_t rn = std::min<int64_t>(r + 2, static_cast<int64_t>(e));
        for (int64_t q = r; q < rn; ++q) {
          const int64_t o = S.ptr[q], n = count[q];
          int32_t* ix = S.idx.data() + o;
          double* xr = t0 + (2 + q - r) * max_row;
          const double* x = xr;
          if (fast && M.indptr[q + 1] - M.indptr[q] == n) {
            std::memcpy(ix, M.indices + M.indptr[q], static_cast<std::size_t>(n) * sizeof(int32_t));
            x = data + M.indptr[q];
          } else {
            int64_t k = 0;
            auto put = [&](int64_t col, double v) {
              ix[k] = static_cast<int32_t>(col);
              xr[k++] = v;
            };
            if (M.dtype == DType::F32) each_nonzero<float>(M, q, put);
            else each_nonzero<double>(M, q, put);
          }
          K.js_row_f64(x, static_cast<std::size_t>(n), sums[q], eps, S.v1.data() + o, S.v2.data() + o,
                       t0 + (q - r) * max_row);
        }
        CompSum U1, U2;
        comp_sum2<false>(t0, count[r], t0 + max_row, rn - r == 2 ? count[r + 1] : 0, &U1, &U2);
        S.c1[r] = U1.value();
        if (rn - r == 2) S.c1[r + 1] = U2.value();
      }
    });
    return S;
  }
  std::vector<std::vector<double>> scratch(nt, std::vector<double>(metric == Metric::wd ? 0 : max_row));

  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int w) {
    double* t0 = scratch[w].data();
    for (std::size_t rr = b; rr < e; ++rr) {
      const int64_t r = static_cast<int64_t>(rr);
      const int64_t o = S.ptr[r], n = count[r];
      const double sum = sums[r];
      double* an = S.a.data() + o;
      int32_t* ix = S.idx.data() + o;
      int64_t k = 0;
      auto put = [&](int64_t col, double x) {
        ix[k] = static_cast<int32_t>(col);
        an[k] = x / sum;
        ++k;
      };
      if (M.dtype == DType::F32) each_nonzero<float>(M, r, put);
      else each_nonzero<double>(M, r, put);
      if (metric == Metric::wd) continue;
      const double* a = an;
      double* v1 = S.v1.data() + o;
      double* v2 = S.v2.data() + o;
      double* x0 = t0;
      // kl (wd rows stop above)
      for (int64_t k2 = 0; k2 < n; ++k2) x0[k2] = eps > 0.0 ? (a[k2] + eps) / eps : a[k2];
      K.log_f64(x0, v1, n);
      for (int64_t k2 = 0; k2 < n; ++k2)  // (a + eps)/eps overflows for eps below ~1e-308
        if (!(x0[k2] <= std::numeric_limits<double>::max())) v1[k2] = std::log(a[k2] + eps) - std::log(eps);
      CompSum F, G;
      for (int64_t k2 = 0; k2 < n; ++k2) {
        if (eps > 0.0) {
          v2[k2] = 0.0;
          F.add((a[k2] + eps) * v1[k2]);
          G.add(v1[k2]);
        } else {
          v2[k2] = a[k2] * v1[k2];
        }
      }
      S.c1[r] = F.value();
      S.c2[r] = -eps * G.value();
    }
  });
  return S;
}

double nonzero_fraction(const HistMatrix& M, int threads, Cancel* cancel) {
  std::vector<int64_t> cnt(M.rows, 0);
  parallel_for(M.rows, 16, threads, cancel, [&](std::size_t b, std::size_t e, int) {
    for (std::size_t r = b; r < e; ++r) {
      const int64_t off = static_cast<int64_t>(r) * M.row_stride;
      cnt[r] = M.dtype == DType::F32 ? count_nonzero(static_cast<const float*>(M.data) + off, M.cols)
                                     : count_nonzero(static_cast<const double*>(M.data) + off, M.cols);
    }
  });
  int64_t total = 0;
  for (int64_t c : cnt) total += c;
  return M.rows ? static_cast<double>(total) / (static_cast<double>(M.rows) * static_cast<double>(M.cols)) : 0.0;
}

void check_matrix(const HistMatrix& M, const char* name) {
  if (M.dtype != DType::F32 && M.dtype != DType::F64)
    throw std::invalid_argument(std::string("divergence: ") + name + " values must be F32 or F64, not " +
                                dtype_name(M.dtype));
  if (M.rows < 0 || M.cols < 1)
    throw std::invalid_argument(std::string("divergence: ") + name + " must have at least one column");
  if (M.cols > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument(std::string("divergence: ") + name + " has more than 2^31-1 columns");
  if (M.sparse) {
    if (!M.indptr || (M.rows > 0 && M.indptr[0] != 0))
      throw std::invalid_argument(std::string("divergence: ") + name + " CSR indptr must start at 0");
    for (int64_t r = 0; r < M.rows; ++r)
      if (M.indptr[r + 1] < M.indptr[r])
        throw std::invalid_argument(std::string("divergence: ") + name + " CSR indptr must be non-decreasing");
  }
}

void check_eps(double eps) {
  if (!(eps >= 0.0) || !std::isfinite(eps))
    throw std::invalid_argument("divergence: eps must be finite and >= 0, got " + fmt(eps));
}

}  // namespace divergence_impl
}  // namespace loramix
