// Host-side terms of the centred divergence (cdam_common.h) for the CUDA bindings: the same
// formulas as cdam_fast/centring.py, evaluated with ATen ops on the tensors' device. (The CPU
// extension computes them in fused loops, cdam_cpu.cpp: centring_weights / centred_row_terms.)
#pragma once

#include <torch/extension.h>

#include "cdam_common.h"

namespace cdam {

// w [B, C] float32 = 1 / (2 u), u the mean class distribution of the rows of p (and q) of each
// batch element over finite entries only (a NaN row stays NaN without spreading), float64,
// clamped at kTinyMass so 1 / u is finite.
inline at::Tensor centring_weights(const at::Tensor& p, const at::Tensor* q) {
  const at::Tensor rows = (q ? at::cat({p, *q}, 1) : p).to(at::kDouble);
  const at::Tensor finite = at::isfinite(rows);
  const at::Tensor total = at::where(finite, rows, at::zeros_like(rows)).sum(1);
  const at::Tensor u = (total / finite.sum(1).clamp_min(1)).clamp_min(static_cast<double>(kTinyMass));
  return (0.5 / u).to(at::kFloat).contiguous();
}

// r [B, n] float32 = sum_c p log2(2 p w) in float64 (0 log 0 = 0), rounded once.
inline at::Tensor centred_row_terms(const at::Tensor& p, const at::Tensor& w) {
  const at::Tensor pd = p.to(at::kDouble);
  const at::Tensor arg = 2.0 * pd * w.to(at::kDouble).unsqueeze(1);
  return (at::xlogy(pd, arg).sum(-1) * static_cast<double>(1.4426950408889634)).to(at::kFloat).contiguous();
}

}  // namespace cdam
