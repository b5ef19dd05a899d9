// CUDA kernels of the CDAM ops (the fallback GPU backend beside the Triton kernels).
//
// Divergences use the centred form of cdam_common.h with the hardware lg2.approx.f32 and fp32
// accumulation. Every launch uses a one-dimensional grid (block3 unfolds it), so no batch or
// tile count meets the 65535 limit of grid axes y and z. The products with v run on the tensor cores through nvcuda::wmma (fp16 or
// bf16 fragments, fp32 accumulators; fp32 v is split into bf16 hi + lo parts, three products),
// with the weights produced tile by tile in shared memory and never written to global memory.
// Needs sm_80+ (bf16 WMMA); built for sm_80 and sm_90.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cdam_common.h"
#include "cdam_cuda.h"

namespace cdam_cuda {
namespace {

using namespace nvcuda;

constexpr int kThreads = 128;           // 4 warps per block
constexpr int kRows = 16;               // query rows per block: one WMMA row tile
constexpr int kKeys = 32;               // keys per step: two WMMA k-steps
constexpr int kPairs = kRows * kKeys / kThreads;  // (row, key) pairs per thread: 4
constexpr int kSlots = kKeys / kPairs;  // threads sharing a row: 8 consecutive lanes
constexpr int kClassChunk = 32;         // classes staged in shared memory at a time
constexpr int kCols = 256;              // output columns per block: 16 WMMA tiles, 4 per warp
constexpr int kTileLd = kKeys + 8;      // 16-bit weight-tile stride (WMMA wants a multiple of 8)
constexpr int kReduceThreads = 256;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ float lg2_approx(float x) {
  float y;
  asm("lg2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// s log2(s w), 0 for s = 0 (s w clamped to a normal float before the log).
__device__ __forceinline__ float term(float s, float w) { return s * lg2_approx(fmaxf(s * w, cdam::kTinyMass)); }

// max / min that keep NaN (fmaxf / fminf drop it): a NaN divergence must reach the row range.
__device__ __forceinline__ float nanmax(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float nanmin(float a, float b) { return (a < b || a != a) ? a : b; }

__device__ __forceinline__ float divergence(float ri, float rk, float sum) {
  const float J = cdam::kHalfLn2 * (ri + rk - sum);
  return J < 0.f ? 0.f : J;  // clamp at 0, NaN stays NaN
}

using Transform = cdam::TransformFactors;

// Spec 2.5-2.6 for one divergence of a row with range [lo, hi], as kernels/common.py's
// cdam_transform: A = (exp(-alpha t) - exp(-alpha)) * factor with t = (J - lo) / span >= 0 taken
// directly (no overflow for any alpha; the row minimum gives exactly 1); for small alpha
// A = exp(-alpha t) X g(alpha X) * factor, g(y) = (1 - e^-y) / y by its Taylor series. NaN stays NaN.
__device__ __forceinline__ float cdam_weight(float J, float hi, float lo, const Transform& tr) {
  const float span = hi - lo;
  const float inv = span < cdam::kConstantRowEps ? 0.f : 1.f / span;  // constant rows: t = 0, A = 1
  float t = (J - lo) * inv;
  t = t < 0.f ? 0.f : t;
  const float e = exp2f(-tr.alpha_log2e * t);
  float a;
  if (tr.small) {
    const float x = (hi - J) * inv, y = tr.alpha * x;
    const float g =
        1.f - y * (0.5f - y * (1.f / 6.f - y * (1.f / 24.f - y * (1.f / 120.f - y * (1.f / 720.f - y * (1.f / 5040.f))))));
    a = t == 0.f ? 1.f : e * x * g * tr.factor;
  } else {
    a = (e - tr.exp_neg_alpha) * tr.factor;  // (1 - exp(-alpha)) * factor == 1 exactly
  }
  return a < 0.f ? 0.f : a;
}

// This block's (x, y, z) in a grid of nx x ny x nz blocks launched as one-dimensional (flat_grid).
struct Block3 {
  int x, y, z;
};
__device__ __forceinline__ Block3 block3(int nx, int ny) {
  const int64_t id = blockIdx.x;
  return Block3{int(id % nx), int((id / nx) % ny), int(id / (int64_t(nx) * ny))};
}

// Max / min across the kSlots lanes that share a row (aligned groups of 8 lanes), keeping NaN.
__device__ __forceinline__ float group_max(float v) {
  for (int off = kSlots / 2; off; off >>= 1) v = nanmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float group_min(float v) {
  for (int off = kSlots / 2; off; off >>= 1) v = nanmin(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float group_sum(float v) {
  for (int off = kSlots / 2; off; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// ------------------------------------------------------------------ divergence tiles

struct TileSmem {
  float p[kRows][kClassChunk + 1];  // +1: rows fall in different banks
  float q[kKeys][kClassChunk + 1];
  float w[kClassChunk];             // centring weights of the chunk's classes
};

// Thread t owns row t / kSlots and keys (t % kSlots) + kSlots * u of the kRows x kKeys tile at
// (i0, k0); sums[u] = sum_c s log2(s w_c) for those pairs. Every thread of the block must call it.
__device__ void divergence_sums(const float* __restrict__ p, int n, const float* __restrict__ q, int m,
                                const float* __restrict__ w, int C, int i0, int k0, TileSmem& sm,
                                float (&sums)[kPairs]) {
  const int t = threadIdx.x, r = t / kSlots, x = t % kSlots;
#pragma unroll
  for (int u = 0; u < kPairs; ++u) sums[u] = 0.f;
  for (int c0 = 0; c0 < C; c0 += kClassChunk) {
    const int cn = min(kClassChunk, C - c0);
    __syncthreads();  // the previous chunk (or tile) is consumed
    for (int e = t; e < kRows * kClassChunk; e += kThreads) {
      const int rr = e / kClassChunk, cc = e % kClassChunk;
      sm.p[rr][cc] = (i0 + rr < n && cc < cn) ? p[int64_t(i0 + rr) * C + c0 + cc] : 0.f;
    }
    for (int e = t; e < kKeys * kClassChunk; e += kThreads) {
      const int kk = e / kClassChunk, cc = e % kClassChunk;
      sm.q[kk][cc] = (k0 + kk < m && cc < cn) ? q[int64_t(k0 + kk) * C + c0 + cc] : 0.f;
    }
    if (t < kClassChunk) sm.w[t] = t < cn ? w[c0 + t] : 0.f;
    __syncthreads();
    for (int c = 0; c < cn; ++c) {
      const float pv = sm.p[r][c], wc = sm.w[c];
#pragma unroll
      for (int u = 0; u < kPairs; ++u) sums[u] += term(pv + sm.q[x + kSlots * u][c], wc);
    }
  }
}

// The divergences of this thread's pairs (0 for pairs outside the matrix).
__device__ void divergence_tile(const Dist& a, const Dist& b, int bz, int C, bool self, int i0, int k0, TileSmem& sm,
                                float (&J)[kPairs]) {
  const float* pa = a.p + int64_t(bz) * a.n * C;
  const float* pb = b.p + int64_t(bz) * b.n * C;
  divergence_sums(pa, a.n, pb, b.n, a.w + int64_t(bz) * C, C, i0, k0, sm, J);
  const int i = i0 + threadIdx.x / kSlots, x = threadIdx.x % kSlots;
  const float ri = i < a.n ? a.r[int64_t(bz) * a.n + i] : 0.f;
#pragma unroll
  for (int u = 0; u < kPairs; ++u) {
    const int k = k0 + x + kSlots * u;
    const bool inside = i < a.n && k < b.n;
    J[u] = !inside || (self && i == k) ? 0.f : divergence(ri, b.r[int64_t(bz) * b.n + k], J[u]);
  }
}

__global__ void __launch_bounds__(kThreads) pairwise_jsd_kernel(Dist a, Dist b, int C, bool self, float* __restrict__ J) {
  __shared__ TileSmem sm;
  const Block3 blk = block3(int(ceil_div(b.n, kKeys)), int(ceil_div(a.n, kRows)));
  const int bz = blk.z, i0 = blk.y * kRows, k0 = blk.x * kKeys;
  float vals[kPairs];
  divergence_tile(a, b, bz, C, self, i0, k0, sm, vals);
  const int i = i0 + threadIdx.x / kSlots, x = threadIdx.x % kSlots;
  if (i >= a.n) return;
#pragma unroll
  for (int u = 0; u < kPairs; ++u) {
    const int k = k0 + x + kSlots * u;
    if (k < b.n) J[(int64_t(bz) * a.n + i) * b.n + k] = vals[u];
  }
}

// Row ranges of the self divergences without storing them: J >= 0, so the float bit patterns
// order like the values and integer atomics apply.
__global__ void __launch_bounds__(kThreads) jsd_row_range_kernel(Dist a, int C, float* __restrict__ hi,
                                                                 float* __restrict__ lo) {
  __shared__ TileSmem sm;
  const Block3 blk = block3(int(ceil_div(a.n, kKeys)), int(ceil_div(a.n, kRows)));
  const int bz = blk.z, i0 = blk.y * kRows, k0 = blk.x * kKeys;
  float vals[kPairs];
  divergence_tile(a, a, bz, C, true, i0, k0, sm, vals);
  const int i = i0 + threadIdx.x / kSlots, x = threadIdx.x % kSlots;
  float top = 0.f, bottom = INFINITY;
#pragma unroll
  for (int u = 0; u < kPairs; ++u)
    if (k0 + x + kSlots * u < a.n) {
      top = nanmax(top, vals[u]);
      bottom = nanmin(bottom, vals[u]);
    }
  top = group_max(top);
  bottom = group_min(bottom);
  if (x == 0 && i < a.n) {
    // J >= 0 or NaN: as integers the bit patterns order like the values, and a (positive) NaN
    // is above +inf, so it wins the max and the row's range becomes NaN
    atomicMax(reinterpret_cast<int*>(hi) + int64_t(bz) * a.n + i, __float_as_int(top));
    atomicMin(reinterpret_cast<int*>(lo) + int64_t(bz) * a.n + i, __float_as_int(bottom));
  }
}

__global__ void fill_row_range_kernel(float* hi, float* lo, int64_t rows) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e < rows) {
    hi[e] = 0.f;
    lo[e] = INFINITY;
  }
}

// Block-wide max and min of (top, bottom) into hi[row], lo[row].
__device__ void block_range(float top, float bottom, float* hi, float* lo, int64_t row) {
  __shared__ float tops[kReduceThreads / 32], bottoms[kReduceThreads / 32];
  for (int off = 16; off; off >>= 1) {
    top = nanmax(top, __shfl_xor_sync(0xffffffffu, top, off));
    bottom = nanmin(bottom, __shfl_xor_sync(0xffffffffu, bottom, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    tops[warp] = top;
    bottoms[warp] = bottom;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kReduceThreads / 32; ++w) {
      top = nanmax(top, tops[w]);
      bottom = nanmin(bottom, bottoms[w]);
    }
    hi[row] = top;
    lo[row] = bottom;
  }
}

__global__ void __launch_bounds__(kReduceThreads) row_range_kernel(const float* __restrict__ J, int M,
                                                                   float* __restrict__ hi, float* __restrict__ lo) {
  const int64_t row = blockIdx.x;
  const float* src = J + row * M;
  float top = -INFINITY, bottom = INFINITY;
  for (int k = threadIdx.x; k < M; k += kReduceThreads) {
    top = nanmax(top, src[k]);
    bottom = nanmin(bottom, src[k]);
  }
  block_range(top, bottom, hi, lo, row);
}

// U_s[i, k] = sum_a sum_b w[i, a] w[k, b] J_s[idx[i, a], idx[k, b]] (batch element's J_s).
__device__ __forceinline__ float upsampled(const float* __restrict__ Js, int ns, const int* __restrict__ idx,
                                           const float* __restrict__ wts, int i, int k) {
  float u = 0.f;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const float* row = Js + int64_t(idx[i * 4 + a]) * ns;
    float t = 0.f;
#pragma unroll
    for (int c = 0; c < 4; ++c) t += wts[k * 4 + c] * row[idx[k * 4 + c]];
    u += wts[i * 4 + a] * t;
  }
  return u;
}

// The value of scale s at full-grid pair (i, k) of batch element bz, from materialised J_s.
__device__ __forceinline__ float stored_value(const ScaleView& s, int bz, int N, int i, int k) {
  if (s.idx == nullptr) return s.J[(int64_t(bz) * N + i) * N + k];
  return upsampled(s.J + int64_t(bz) * s.ns * s.ns, s.ns, s.idx, s.wts, i, k);
}

__global__ void __launch_bounds__(kReduceThreads) upsampled_row_range_kernel(ScaleView s, int N, float* __restrict__ hi,
                                                                             float* __restrict__ lo) {
  const Block3 blk = block3(N, 1);
  const int i = blk.x, bz = blk.z;
  float top = -INFINITY, bottom = INFINITY;
  for (int k = threadIdx.x; k < N; k += kReduceThreads) {
    const float u = stored_value(s, bz, N, i, k);
    top = nanmax(top, u);
    bottom = nanmin(bottom, u);
  }
  block_range(top, bottom, hi, lo, int64_t(bz) * N + i);
}

__global__ void cdam_transform_kernel(float* __restrict__ J, int64_t total, int M, const float* __restrict__ hi,
                                      const float* __restrict__ lo, Transform tr) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = e / M;
    J[e] = cdam_weight(J[e], hi[row], lo[row], tr);
  }
}

__global__ void multiscale_map_kernel(ScaleSet scales, int N, Transform tr, float* __restrict__ out) {
  const Block3 blk = block3(int(ceil_div(N, 256)), N);
  const int k = blk.x * blockDim.x + threadIdx.x, i = blk.y, bz = blk.z;
  if (k >= N) return;
  const int64_t row = int64_t(bz) * N + i;
  float total = 0.f;
  for (int s = 0; s < scales.count; ++s) {
    const ScaleView& sv = scales.s[s];
    total += cdam_weight(stored_value(sv, bz, N, i, k), sv.hi[row], sv.lo[row], tr);
  }
  out[row * N + k] = total / scales.count;
}

// ------------------------------------------------------------------ fused products with v

enum Policy : int { kCdamStored = 0, kCdamRecompute = 1, kMultiscale = 2, kSoftmax = 3 };

struct AttnParams {
  Dist a, b;  // queries, keys (both = a for the CDAM maps)
  const float* J = nullptr;   // kCdamStored: [B, N, N]
  const float* hi = nullptr;  // kCdam*: row ranges [B, N]
  const float* lo = nullptr;
  ScaleSet scales;            // kMultiscale
  bool self = true;
  int C = 0;
  Transform tr;
  float neg_inv_tau = 0.f;
  ValuesView v;
  float* out = nullptr;       // [B, N, D] float32
};

template <typename T>
struct Convert;
template <>
struct Convert<__half> {
  __device__ static __half from(float x) { return __float2half_rn(x); }
  __device__ static float to(__half x) { return __half2float(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ static float to(__nv_bfloat16 x) { return __bfloat162float(x); }
};

// Weights of this thread's pairs for one kRows x kKeys step (softmax: the logits).
template <int kPolicy>
__device__ void step_weights(const AttnParams& prm, int bz, int i0, int k0, TileSmem& sm, float (&w)[kPairs]) {
  const int N = prm.a.n, M = prm.b.n;
  const int i = i0 + threadIdx.x / kSlots, x = threadIdx.x % kSlots;
  if constexpr (kPolicy == kCdamStored || kPolicy == kCdamRecompute) {
    if constexpr (kPolicy == kCdamRecompute) divergence_tile(prm.a, prm.a, bz, prm.C, true, i0, k0, sm, w);
    const int64_t row = int64_t(bz) * N + i;
    const float top = i < N ? prm.hi[row] : 0.f, bottom = i < N ? prm.lo[row] : 0.f;
#pragma unroll
    for (int u = 0; u < kPairs; ++u) {
      const int k = k0 + x + kSlots * u;
      if (i >= N || k >= N) {
        w[u] = 0.f;
        continue;
      }
      const float J = kPolicy == kCdamStored ? prm.J[row * N + k] : w[u];
      w[u] = cdam_weight(J, top, bottom, prm.tr);
    }
  } else if constexpr (kPolicy == kMultiscale) {
    bool recompute = false;  // the same for every thread: the full grid's J is not stored
    int full = 0;
    for (int s = 0; s < prm.scales.count; ++s)
      if (prm.scales.s[s].J == nullptr) {
        recompute = true;
        full = s;
      }
    float Jfull[kPairs];
    if (recompute) {
      const Dist& d = prm.scales.s[full].dist;
      divergence_tile(d, d, bz, prm.C, true, i0, k0, sm, Jfull);
    }
    const int64_t row = int64_t(bz) * N + i;
#pragma unroll
    for (int u = 0; u < kPairs; ++u) {
      const int k = k0 + x + kSlots * u;
      w[u] = 0.f;
      if (i >= N || k >= N) continue;
      for (int s = 0; s < prm.scales.count; ++s) {
        const ScaleView& sv = prm.scales.s[s];
        const float val = sv.J == nullptr ? Jfull[u] : stored_value(sv, bz, N, i, k);
        w[u] += cdam_weight(val, sv.hi[row], sv.lo[row], prm.tr);
      }
      w[u] /= prm.scales.count;
    }
  } else {  // kSoftmax
    divergence_tile(prm.a, prm.b, bz, prm.C, prm.self, i0, k0, sm, w);
#pragma unroll
    for (int u = 0; u < kPairs; ++u) w[u] = k0 + x + kSlots * u < M ? w[u] * prm.neg_inv_tau : -INFINITY;
  }
}

// out[b, i0:i0+kRows, d0:d0+kCols] = W @ v, W produced kKeys columns at a time. For the softmax
// the accumulators are rescaled by exp(m_old - m_new) whenever a row's running max m grows.
template <typename T, bool kSplit, int kPolicy>
__global__ void __launch_bounds__(kThreads) attention_kernel(AttnParams prm) {
  __shared__ TileSmem sm;
  __shared__ __align__(32) float acc[kRows][kCols];
  __shared__ __align__(32) T w_hi[kRows][kTileLd];
  __shared__ __align__(32) T w_lo[kSplit ? kRows : 1][kTileLd];
  __shared__ float row_scale[kRows], row_max[kRows], row_sum[kRows];

  const Block3 blk = block3(int(ceil_div(prm.v.Dp, kCols)), int(ceil_div(prm.a.n, kRows)));
  const int bz = blk.z, i0 = blk.y * kRows, d0 = blk.x * kCols;
  const int t = threadIdx.x, r = t / kSlots, x = t % kSlots, warp = t / 32;
  const int N = prm.a.n, M = prm.b.n;
  for (int e = t; e < kRows * kCols; e += kThreads) acc[e / kCols][e % kCols] = 0.f;
  if (t < kRows) {
    row_scale[t] = 1.f;
    row_max[t] = -INFINITY;
    row_sum[t] = 0.f;
  }
  __syncthreads();

  for (int k0 = 0; k0 < M; k0 += kKeys) {
    float w[kPairs];
    step_weights<kPolicy>(prm, bz, i0, k0, sm, w);
    if constexpr (kPolicy == kSoftmax) {
      // Online softmax: key k0 is always inside, so the tile max is finite.
      const float m_old = row_max[r];
      float tile_max = -INFINITY;
#pragma unroll
      for (int u = 0; u < kPairs; ++u) tile_max = fmaxf(tile_max, w[u]);
      const float m_new = fmaxf(m_old, group_max(tile_max));
      float tile_sum = 0.f;
#pragma unroll
      for (int u = 0; u < kPairs; ++u) {
        w[u] = expf(w[u] - m_new);  // exp(-inf) = 0 for keys past M
        tile_sum += w[u];
      }
      tile_sum = group_sum(tile_sum);
      __syncwarp();  // every lane of the row has read row_max before it changes
      if (x == 0) {
        const float scale = expf(m_old - m_new);  // 0 on the first step (m_old = -inf)
        row_scale[r] = scale;
        row_sum[r] = row_sum[r] * scale + tile_sum;
        row_max[r] = m_new;
      }
    }
#pragma unroll
    for (int u = 0; u < kPairs; ++u) {
      const T h = Convert<T>::from(w[u]);
      w_hi[r][x + kSlots * u] = h;
      if constexpr (kSplit) w_lo[r][x + kSlots * u] = Convert<T>::from(w[u] - Convert<T>::to(h));
    }
    __syncthreads();
    if constexpr (kPolicy == kSoftmax) {
      for (int e = t; e < kRows * kCols; e += kThreads) acc[e / kCols][e % kCols] *= row_scale[e / kCols];
      __syncthreads();
    }
    for (int f = warp; f < kCols / 16; f += kThreads / 32) {
      const int col = d0 + f * 16;
      if (col >= prm.v.Dp) break;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      wmma::load_matrix_sync(c, &acc[0][f * 16], kCols, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kKeys; kk += 16) {
        const int64_t voff = (int64_t(bz) * prm.v.Mp + k0 + kk) * prm.v.Dp + col;
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_hi;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_hi;
        wmma::load_matrix_sync(a_hi, &w_hi[0][kk], kTileLd);
        wmma::load_matrix_sync(b_hi, static_cast<const T*>(prm.v.hi) + voff, prm.v.Dp);
        wmma::mma_sync(c, a_hi, b_hi, c);
        if constexpr (kSplit) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a_lo;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b_lo;
          wmma::load_matrix_sync(a_lo, &w_lo[0][kk], kTileLd);
          wmma::load_matrix_sync(b_lo, static_cast<const T*>(prm.v.lo) + voff, prm.v.Dp);
          wmma::mma_sync(c, a_hi, b_lo, c);
          wmma::mma_sync(c, a_lo, b_hi, c);
        }
      }
      wmma::store_matrix_sync(&acc[0][f * 16], c, kCols, wmma::mem_row_major);
    }
    __syncthreads();
  }

  const int D = prm.v.D;
  for (int e = t; e < kRows * kCols; e += kThreads) {
    const int rr = e / kCols, cc = e % kCols, i = i0 + rr, d = d0 + cc;
    if (i >= N || d >= D) continue;
    float val = acc[rr][cc];
    if constexpr (kPolicy == kSoftmax) val /= row_sum[rr];
    prm.out[(int64_t(bz) * N + i) * D + d] = val;
  }
}

// A one-dimensional grid of nx * ny * nz blocks (the kernels unfold it with block3), or 0 when
// that exceeds the 2^31 - 1 blocks of grid axis x.
unsigned flat_grid(int64_t nx, int64_t ny, int64_t nz) {
  const int64_t total = nx * ny * nz;
  return total > INT32_MAX ? 0u : unsigned(total);
}

template <int kPolicy>
cudaError_t launch_attention(const AttnParams& prm, int B, cudaStream_t stream) {
  const unsigned grid = flat_grid(ceil_div(prm.v.Dp, kCols), ceil_div(prm.a.n, kRows), B);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  switch (prm.v.kind) {
    case ValueKind::kHalf:
      attention_kernel<__half, false, kPolicy><<<grid, kThreads, 0, stream>>>(prm);
      break;
    case ValueKind::kBf16:
      attention_kernel<__nv_bfloat16, false, kPolicy><<<grid, kThreads, 0, stream>>>(prm);
      break;
    case ValueKind::kSplitBf16:
      attention_kernel<__nv_bfloat16, true, kPolicy><<<grid, kThreads, 0, stream>>>(prm);
      break;
  }
  return cudaGetLastError();
}

Transform make_transform(float alpha) { return cdam::transform_factors(double(alpha)); }

unsigned tile_grid(int n, int m, int B) { return flat_grid(ceil_div(m, kKeys), ceil_div(n, kRows), B); }

}  // namespace

// ------------------------------------------------------------------ launchers

cudaError_t pairwise_jsd(Dist a, Dist b, int B, int C, bool self, float* J, cudaStream_t stream) {
  const unsigned grid = tile_grid(a.n, b.n, B);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  pairwise_jsd_kernel<<<grid, kThreads, 0, stream>>>(a, b, C, self, J);
  return cudaGetLastError();
}

cudaError_t fill_row_range(float* hi, float* lo, int64_t rows, cudaStream_t stream) {
  fill_row_range_kernel<<<unsigned(ceil_div(rows, 256)), 256, 0, stream>>>(hi, lo, rows);
  return cudaGetLastError();
}

cudaError_t jsd_row_range(Dist a, int B, int C, float* hi, float* lo, cudaStream_t stream) {
  const unsigned grid = tile_grid(a.n, a.n, B);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  jsd_row_range_kernel<<<grid, kThreads, 0, stream>>>(a, C, hi, lo);
  return cudaGetLastError();
}

cudaError_t row_range(const float* J, int64_t rows, int M, float* hi, float* lo, cudaStream_t stream) {
  const unsigned grid = flat_grid(rows, 1, 1);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  row_range_kernel<<<grid, kReduceThreads, 0, stream>>>(J, M, hi, lo);
  return cudaGetLastError();
}

cudaError_t upsampled_row_range(const ScaleView& s, int B, int N, float* hi, float* lo, cudaStream_t stream) {
  const unsigned grid = flat_grid(N, 1, B);
  if (grid == 0) return cudaErrorInvalidConfiguration;
  upsampled_row_range_kernel<<<grid, kReduceThreads, 0, stream>>>(s, N, hi, lo);
  return cudaGetLastError();
}

cudaError_t cdam_transform(float* J, int64_t rows, int M, const float* hi, const float* lo, float alpha,
                           cudaStream_t stream) {
  const int64_t total = rows * M;
  const unsigned blocks = unsigned(std::min<int64_t>(ceil_div(total, 256), 65535));
  cdam_transform_kernel<<<blocks, 256, 0, stream>>>(J, total, M, hi, lo, make_transform(alpha));
  return cudaGetLastError();
}

cudaError_t multiscale_map(const ScaleSet& scales, int B, int N, float alpha, float* out, cudaStream_t stream) {
  const unsigned grid = flat_grid(ceil_div(N, 256), N, B);  // N on "y" of a flat grid: N > 65535 works
  if (grid == 0) return cudaErrorInvalidConfiguration;
  multiscale_map_kernel<<<grid, 256, 0, stream>>>(scales, N, make_transform(alpha), out);
  return cudaGetLastError();
}

cudaError_t cdam_attention(Dist a, const float* J, const float* hi, const float* lo, int B, int C, float alpha,
                           ValuesView v, float* out, cudaStream_t stream) {
  AttnParams prm;
  prm.a = prm.b = a;
  prm.J = J;
  prm.hi = hi;
  prm.lo = lo;
  prm.C = C;
  prm.tr = make_transform(alpha);
  prm.v = v;
  prm.out = out;
  return J != nullptr ? launch_attention<kCdamStored>(prm, B, stream) : launch_attention<kCdamRecompute>(prm, B, stream);
}

cudaError_t multiscale_attention(const ScaleSet& scales, int B, int C, int N, float alpha, ValuesView v, float* out,
                                 cudaStream_t stream) {
  AttnParams prm;
  prm.a.n = prm.b.n = N;
  prm.scales = scales;
  prm.C = C;
  prm.tr = make_transform(alpha);
  prm.v = v;
  prm.out = out;
  return launch_attention<kMultiscale>(prm, B, stream);
}

cudaError_t jsd_attention(Dist a, Dist b, bool self, int B, int C, float tau, ValuesView v, float* out,
                          cudaStream_t stream) {
  AttnParams prm;
  prm.a = a;
  prm.b = b;
  prm.self = self;
  prm.C = C;
  // J <= ln 2: clamped to the float32 range the scale keeps every logit finite for any tau > 0
  prm.neg_inv_tau = float(std::max(-1.0 / double(tau), -double(cdam::kFloat32Max)));
  prm.v = v;
  prm.out = out;
  return launch_attention<kSoftmax>(prm, B, stream);
}

}  // namespace cdam_cuda
