// Constants shared by the CPU (cdam_cpu.cpp) and CUDA (cdam_cuda.cu) implementations.
//
// The divergence is evaluated in its base-2 entropy form (see cdam_fast/backends/cpu_backend.py):
//   r_i  = sum_c p_ic (log2 p_ic + 1)
//   J_ij = (ln 2 / 2) (r_i + r'_j - sum_c s log2 s),  s = p_ic + q_jc,
// which needs one logarithm per (i, j, c) and accumulates in fp32 whatever the input dtype.
#pragma once

namespace cdam {

// log2 is taken of max(s, kTinyMass) so that s = 0 contributes 0 * finite = 0 (0 log 0 = 0);
// 1e-30 is a normal float, so no denormal reaches the logarithm. (The AVX2 CPU log2 needs no
// clamp: it maps 0 to -127 through the exponent bits.)
constexpr float kTinyMass = 1e-30f;
// ln(2) / 2: converts the base-2 sums into half a natural-log divergence.
constexpr float kHalfLn2 = 0.34657359027997264f;
// Rows whose divergences span less than this (nats) are numerically constant: A = 1 (spec 2.6).
constexpr float kConstantRowEps = 1e-6f;

}  // namespace cdam
