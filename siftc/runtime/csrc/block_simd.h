// What the block kernels (block_ops.cpp: Linear, block_conv.cpp: Conv2d) share: vector types of the width
// -march=native allows, tiling helpers, and the weight gradient's block dot product.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace siftc_block {

#ifdef __AVX512F__
constexpr int kVecBytes = 64;  // one zmm
constexpr int kAcc = 24;       // accumulator vectors a tile may hold (32 registers)
#else
constexpr int kVecBytes = 32;  // one ymm
constexpr int kAcc = 12;       // of 16 registers
#endif
constexpr int64_t kBatchPad = 16;         // batch padded to a multiple of this (as sparse_ops.cpp)
constexpr int64_t kL2Bytes = 256 * 1024;  // operand bytes a panel keeps in L2 (a quarter of 1 MiB: 256 KiB
                                          // to 512 KiB measured alike on the wide 90% shapes, 2 MiB slower)

typedef float vfloat __attribute__((vector_size(kVecBytes), aligned(4), may_alias));
typedef double vdouble __attribute__((vector_size(kVecBytes), aligned(8), may_alias));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = vfloat; static constexpr int lanes = kVecBytes / 4; };
template <> struct Vec<double> { using type = vdouble; static constexpr int lanes = kVecBytes / 8; };

template <typename V>
static inline V load(const void* p) { return *(const V*)p; }
template <typename V>
static inline void store(void* p, V v) { *(V*)p = v; }

template <typename T>
static inline T hsum(typename Vec<T>::type v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::lanes; ++i) s += v[i];
  return s;
}

// Batch vectors [0, nvec) in tiles of NVMAX, then 4, 2, 1: f(v0, std::integral_constant<int, NV>).
template <int NVMAX, typename F>
static inline void for_tiles(int64_t nvec, F&& f) {
  int64_t v = 0;
  for (; v + NVMAX <= nvec; v += NVMAX) f(v, std::integral_constant<int, NVMAX>{});
  if constexpr (NVMAX > 4) for (; v + 4 <= nvec; v += 4) f(v, std::integral_constant<int, 4>{});
  if constexpr (NVMAX > 2) for (; v + 2 <= nvec; v += 2) f(v, std::integral_constant<int, 2>{});
  if constexpr (NVMAX > 1) for (; v < nvec; ++v) f(v, std::integral_constant<int, 1>{});
}

// A tile kernel is its own function, compiled with the whole register file to itself; a call is nothing
// next to a tile's work.
#define SIFTC_TILE __attribute__((noinline)) static

static inline int64_t grain(int64_t n) {
  const int64_t t = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (n + t - 1) / t);
}

// g[r*C + c] = (ACC: +=) sum over n vectors of dy[r*cs_dy + v*L] * x[c*cs_x + v*L] for the RS rows and C
// columns of one block's row group: RS + C loads per RS x C FMAs, U vectors a step.
template <typename T, int RS, int C, bool ACC>
static inline void sddmm_block(const T* __restrict dy, int64_t cs_dy, const T* __restrict x, int64_t cs_x, int64_t n,
                               T* __restrict g) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  constexpr int U = (kAcc * 2 / 3) / (RS * C) < 1 ? 1 : (kAcc * 2 / 3) / (RS * C);
  V acc[RS][C][U] = {};
  int64_t v = 0;
  for (; v + U <= n; v += U)
    for (int u = 0; u < U; ++u) {
      V xv[C];
      for (int c = 0; c < C; ++c) xv[c] = load<V>(x + c * cs_x + (v + u) * L);
      for (int r = 0; r < RS; ++r) {
        const V d = load<V>(dy + r * cs_dy + (v + u) * L);
        for (int c = 0; c < C; ++c) acc[r][c][u] += d * xv[c];
      }
    }
  for (; v < n; ++v)
    for (int r = 0; r < RS; ++r)
      for (int c = 0; c < C; ++c) acc[r][c][0] += load<V>(dy + r * cs_dy + v * L) * load<V>(x + c * cs_x + v * L);
  for (int r = 0; r < RS; ++r)
    for (int c = 0; c < C; ++c) {
      V sum = acc[r][c][0];
      for (int u = 1; u < U; ++u) sum += acc[r][c][u];
      if constexpr (ACC) g[r * C + c] += hsum<T>(sum);
      else g[r * C + c] = hsum<T>(sum);
    }
}

// Row groups of a block's weight gradient: RS of R rows at a time, as many as the accumulators allow.
template <int R, int C>
constexpr int sddmm_rows_at_once() {
  constexpr int CAP = kVecBytes == 64 ? 8 : 4;  // dY rows per pass (their loads and the accumulators fit)
  constexpr int RS0 = (kAcc * 2 / 3) / C < 1 ? 1 : (kAcc * 2 / 3) / C;
  return std::min({R, RS0, CAP});
}

}  // namespace siftc_block
