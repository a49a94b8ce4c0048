// The neural combiner's MLP (python/loramix/weights/mlp.py): forward and backward passes over
// many feature rows, in float64, at the portable baseline.
//
// Contract:
//  - Z is M×F row-major (standardized per-pair features); W1 F×H; b1, w2 H; skip F; all float64.
//  - mlp_forward: s[m] = Σ_h w2[h]·softsign(b1[h] + Σ_f Z[m,f]·W1[f,h]) + Σ_f Z[m,f]·skip[f],
//    softsign(a) = a / (1 + |a|). Each s[m] depends on row m only (any thread count gives the
//    same bits).
//  - mlp_backward: the gradient of Σ_m ds[m]·s[m] with respect to W1, b1, w2 and skip, written
//    to gW1 (F×H), gb1 (H), gw2 (H), gskip (F) (overwritten, not accumulated). The hidden layer is
//    recomputed from Z (no M×H buffer). Rows with ds[m] == 0 contribute nothing and are skipped.
//    Sums run over fixed blocks of kMlpBlock rows, each block's partials summed in block order:
//    the result does not depend on the thread count.
//  - H ≤ kMlpMaxHidden (std::invalid_argument otherwise); threads ≤ 1 runs on the caller.
#pragma once
#include <cstddef>

namespace loramix {

constexpr std::size_t kMlpBlock = 4096;
constexpr std::size_t kMlpMaxHidden = 256;

void mlp_forward(const double* Z, std::size_t M, std::size_t F, const double* W1, const double* b1,
                 const double* w2, const double* skip, std::size_t H, double* s, int threads);

void mlp_backward(const double* Z, std::size_t M, std::size_t F, const double* W1, const double* b1,
                  const double* w2, std::size_t H, const double* ds, double* gW1, double* gb1, double* gw2,
                  double* gskip, int threads);

}  // namespace loramix
