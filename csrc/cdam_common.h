// Shared by the CPU (cdam_cpu.cpp) and CUDA (cdam_cuda_kernels.cu) implementations.
//
// The divergence is evaluated in its centred base-2 form (cdam_fast/centring.py): with
// w_c = 1 / (2 u_c), u the batch element's mean class distribution,
//   r_i  = sum_c p_ic log2(2 p_ic w_c)                      (per row, float64, cdam_centring.h)
//   J_ij = (ln 2 / 2) (r_i + r'_j - sum_c s log2(s w_c)),  s = p_ic + q_jc,
// one multiply and one logarithm per (i, j, c), accumulated in fp32 whatever the input dtype;
// the summed terms are small for flat distributions, so fp32 keeps J accurate.
// The numerical constants come from cdam_fast/constants.py through the generated
// cdam_constants.h (kConstantRowEps, kTinyMass, kHalfLn2, kLog2e, kSmallAlphaLimit, kFloat32Max).
#pragma once

#include "cdam_constants.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace cdam {

// CPU kernels (forward and backward): classes summed into one partial sum of a divergence before
// it joins the total, so the rounding error grows with C / kClassBlock + kClassBlock instead of C.
constexpr int64_t kClassBlock = 64;

// Host-side factors of the CDAM transform for one alpha (cdam_fast/constants.py: transform_factors):
// A = (exp2(-alpha_log2e t) - exp_neg_alpha) * factor, or for small alpha
// A = exp2(-alpha_log2e t) X g(alpha X) * factor (kernels/common.py: cdam_transform).
struct TransformFactors {
  float alpha = 0.f;
  float alpha_log2e = 0.f;  // clamped to the float32 range
  float exp_neg_alpha = 0.f;
  float factor = 0.f;       // 1 / (1 - exp(-alpha)) with (1 - exp_neg_alpha) * factor == 1 in float; small: 1 / g(alpha)
  bool small = false;
};

inline TransformFactors transform_factors(double alpha) {
  TransformFactors tf;
  tf.alpha = static_cast<float>(alpha);
  tf.small = alpha < kSmallAlphaLimit;
  tf.alpha_log2e = static_cast<float>(std::min(alpha * static_cast<double>(kLog2e), static_cast<double>(kFloat32Max)));
  tf.exp_neg_alpha = static_cast<float>(std::exp(-alpha));
  const double den = -std::expm1(-alpha);  // 1 - exp(-alpha) > 0
  if (tf.small) {
    tf.factor = static_cast<float>(alpha / den);
    return tf;
  }
  // unit_factor: a few ulps so that the row minimum (exp(0) = 1) maps to exactly 1
  const float x = 1.f - tf.exp_neg_alpha;
  float f = static_cast<float>(1.0 / den);
  for (int k = 0; k < 8 && x * f != 1.f; ++k) f = std::nextafter(f, x * f > 1.f ? 0.f : 2.f);
  tf.factor = f;
  return tf;
}

}  // namespace cdam
