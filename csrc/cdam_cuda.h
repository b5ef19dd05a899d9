// Launchers of the CUDA kernels (cdam_cuda_kernels.cu), called by the torch bindings in
// cdam_cuda.cpp. Plain pointers and the CUDA runtime only, so the .cu files compile without
// the torch headers. All float arrays are float32, contiguous, batch-major; every launcher
// returns cudaGetLastError() after queuing its kernels on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace cdam_cuda {

// Up to this many scales per multiscale call (the spec uses 7).
constexpr int kMaxScales = 16;

// How v enters the tensor cores: fp16, bf16, or fp32 split into bf16 hi + lo parts (three bf16
// products, about 16 significant bits).
enum class ValueKind : int { kHalf = 0, kBf16 = 1, kSplitBf16 = 2 };

// A batch of class distributions p [B, n, C] with its row terms r [B, n] and the centring
// weights w [B, C] it shares with the other side of the divergence (cdam_common.h).
struct Dist {
  const float* p = nullptr;
  const float* r = nullptr;
  const float* w = nullptr;
  int n = 0;
};

// One scale of a multi-scale map: either its divergences J [B, ns, ns] are materialised, or
// (full grid only, J == nullptr) they are recomputed from `dist`. idx/wts [N, 4] are the
// bilinear taps onto the full grid (nullptr for the full grid); hi/lo [B, N] the row range of
// the (upsampled) divergences.
struct ScaleView {
  int ns = 0;  // grid cells at this scale
  const float* J = nullptr;
  Dist dist;
  const int* idx = nullptr;
  const float* wts = nullptr;
  const float* hi = nullptr;
  const float* lo = nullptr;
};

struct ScaleSet {
  ScaleView s[kMaxScales];
  int count = 0;
};

// J [B, N, M] between rows of a and b (self: diagonal exactly 0).
cudaError_t pairwise_jsd(Dist a, Dist b, int B, int C, bool self, float* J, cudaStream_t stream);

// hi/lo [B, N] of the self divergences of `a`, without storing them (hi must start at 0, lo at
// +inf: see fill_row_range).
cudaError_t jsd_row_range(Dist a, int B, int C, float* hi, float* lo, cudaStream_t stream);

// hi = 0, lo = +inf for `rows` rows.
cudaError_t fill_row_range(float* hi, float* lo, int64_t rows, cudaStream_t stream);

// hi/lo of each row of J [rows, M].
cudaError_t row_range(const float* J, int64_t rows, int M, float* hi, float* lo, cudaStream_t stream);

// hi/lo [B, N] of the upsampled divergences of an upsampled scale (J, idx, wts set).
cudaError_t upsampled_row_range(const ScaleView& s, int B, int N, float* hi, float* lo, cudaStream_t stream);

// In place: J [rows, M] -> expm1(alpha X) / expm1(alpha), X the row min-max of 1 - J.
cudaError_t cdam_transform(float* J, int64_t rows, int M, const float* hi, const float* lo, float alpha,
                           cudaStream_t stream);

// out [B, N, N] = mean over scales of the transformed (upsampled) divergences; every scale
// materialised.
cudaError_t multiscale_map(const ScaleSet& scales, int B, int N, float alpha, float* out, cudaStream_t stream);

// The fused products out [B, N, D] (float32) = W @ v with W never written to memory. v is given
// padded as vhi (and vlo for kSplitBf16) [B, Mp, Dp], 16-bit, Mp a multiple of 32 and Dp of 16.
struct ValuesView {
  const void* hi = nullptr;
  const void* lo = nullptr;
  ValueKind kind = ValueKind::kHalf;
  int Mp = 0, Dp = 0, D = 0;
};

// W = cdam transform of J (J materialised [B, N, N] if J != nullptr, else recomputed from a).
cudaError_t cdam_attention(Dist a, const float* J, const float* hi, const float* lo, int B, int C, float alpha,
                           ValuesView v, float* out, cudaStream_t stream);

// W = mean over scales of the transformed upsampled divergences.
cudaError_t multiscale_attention(const ScaleSet& scales, int B, int C, int N, float alpha, ValuesView v, float* out,
                                 cudaStream_t stream);

// W = softmax_k(-J(a_i, b_k) / tau), one pass with an online softmax.
cudaError_t jsd_attention(Dist a, Dist b, bool self, int B, int C, float tau, ValuesView v, float* out,
                          cudaStream_t stream);

}  // namespace cdam_cuda
