// The neural combiner's MLP kernels; contract in loramix/mlp.h. Baseline ISA: the inner loops
// over the hidden units are plain arrays the compiler vectorizes.
#include "loramix/mlp.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "loramix/parallel.h"

namespace loramix {
namespace {

// a[h] = b1[h] + Σ_f z[f]·W1[f,h]
inline void preact(const double* z, std::size_t F, const double* W1, const double* b1, std::size_t H, double* a) {
  for (std::size_t h = 0; h < H; ++h) a[h] = b1[h];
  for (std::size_t f = 0; f < F; ++f) {
    const double zf = z[f];
    const double* w = W1 + f * H;
    for (std::size_t h = 0; h < H; ++h) a[h] += zf * w[h];
  }
}

void check_hidden(std::size_t H) {
  if (H == 0 || H > kMlpMaxHidden) throw std::invalid_argument("mlp: hidden size must be in [1, 256]");
}

}  // namespace

void mlp_forward(const double* Z, std::size_t M, std::size_t F, const double* W1, const double* b1,
                 const double* w2, const double* skip, std::size_t H, double* s, int threads) {
  check_hidden(H);
  parallel_for(M, kMlpBlock, threads, nullptr, [&](std::size_t begin, std::size_t end, int) {
    double a[kMlpMaxHidden];
    for (std::size_t m = begin; m < end; ++m) {
      const double* z = Z + m * F;
      preact(z, F, W1, b1, H, a);
      double acc = 0.0;
      for (std::size_t f = 0; f < F; ++f) acc += z[f] * skip[f];
      double hid = 0.0;
      for (std::size_t h = 0; h < H; ++h) hid += w2[h] * (a[h] / (1.0 + std::fabs(a[h])));
      s[m] = acc + hid;
    }
  });
}

void mlp_backward(const double* Z, std::size_t M, std::size_t F, const double* W1, const double* b1,
                  const double* w2, std::size_t H, const double* ds, double* gW1, double* gb1, double* gw2,
                  double* gskip, int threads) {
  check_hidden(H);
  const std::size_t nblocks = (M + kMlpBlock - 1) / kMlpBlock;
  const std::size_t width = F * H + 2 * H + F;   // one block's partials: W1, b1, w2, skip
  std::vector<double> part(nblocks * width, 0.0);
  parallel_for(nblocks, 1, threads, nullptr, [&](std::size_t b0, std::size_t b1_, int) {
    double a[kMlpMaxHidden], da[kMlpMaxHidden], lb[kMlpMaxHidden], l2[kMlpMaxHidden];
    std::vector<double> lw_(F * H), ls_(F);
    double* __restrict lw = lw_.data();
    double* __restrict ls = ls_.data();
    for (std::size_t b = b0; b < b1_; ++b) {
      std::fill(lw, lw + F * H, 0.0);
      std::fill(ls, ls + F, 0.0);
      std::fill(lb, lb + H, 0.0);
      std::fill(l2, l2 + H, 0.0);
      const std::size_t end = std::min(M, (b + 1) * kMlpBlock);
      for (std::size_t m = b * kMlpBlock; m < end; ++m) {
        const double d = ds[m];
        if (d == 0.0) continue;
        const double* z = Z + m * F;
        preact(z, F, W1, b1, H, a);
        for (std::size_t h = 0; h < H; ++h) {
          const double u = 1.0 / (1.0 + std::fabs(a[h]));   // softsign'(a) = u², softsign(a) = a·u
          l2[h] += d * (a[h] * u);
          da[h] = d * w2[h] * u * u;
          lb[h] += da[h];
        }
        for (std::size_t f = 0; f < F; ++f) {
          const double zf = z[f];
          ls[f] += d * zf;
          double* __restrict row = lw + f * H;
          for (std::size_t h = 0; h < H; ++h) row[h] += da[h] * zf;
        }
      }
      double* out = part.data() + b * width;   // this block's partials: W1, b1, w2, skip
      std::copy(lw, lw + F * H, out);
      std::copy(lb, lb + H, out + F * H);
      std::copy(l2, l2 + H, out + F * H + H);
      std::copy(ls, ls + F, out + F * H + 2 * H);
    }
  });
  // fixed order over blocks: the same bits for any thread count
  double* outs[4] = {gW1, gb1, gw2, gskip};
  const std::size_t sizes[4] = {F * H, H, H, F};
  std::size_t off = 0;
  for (int k = 0; k < 4; ++k) {
    for (std::size_t i = 0; i < sizes[k]; ++i) {
      double acc = 0.0;
      for (std::size_t b = 0; b < nblocks; ++b) acc += part[b * width + off + i];
      outs[k][i] = acc;
    }
    off += sizes[k];
  }
}

}  // namespace loramix
