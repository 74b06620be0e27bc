// Sparse Linear / Conv2d forward and backward on CPU, touching only the non-zeros.
//
// A layer's weight is its non-zero `values` (nnz,) at flat row-major `positions` (ascending, int32) into a
// dense weight of shape (O, C, KH, KW) (a Linear's (O, C) is KH = KW = 1). The ops take the values and that
// shape, never a dense weight, and the weight gradient they return is values-shaped (nnz,).
//
// SparseProp's layout: activations are repacked batch-innermost, (C, H, W, Bp) with the batch padded to a
// multiple of 16, so one weight non-zero times one input position is a run of full vector FMAs. A Linear
// is the 1x1 convolution of a 1x1 image, so one code path serves both.
//
//   forward      Y[o, pos]   = sum_{(c,k) in row o} W[o,c,k] * Xp[c, pos*stride + k*dilation]    (spmm)
//   grad input   dXp[c, pos] = sum_{(o,k) in row c} W[o,c,k] * dY[o, (pos - k*dilation) / stride]  (spmm on
//                the transposed index, one stride phase of pos at a time: see grad_input)
//   grad values  dV[n]       = sum_pos dY[o, pos] . Xp[c, pos*stride + k*dilation]  for the non-zero n at
//                (o, c, k)                                                                        (sddmm)
//
// The index (built from the positions by build_index in O(nnz)) is a CSR split into column panels so the
// slice of the input one panel touches stays in L2: entries sorted by (panel, row, column);
// ptr[p*R + r] .. ptr[p*R + r + 1] are row r's entries in panel p, and panel p holds groups
// [p*P, (p+1)*P) with P = ceil(groups / panels). An entry stores code = group << 8 | kernel_position
// (group = input channel for the forward index, output channel for the transposed one) and widx = its
// non-zero's index in `values` (its rank among the positions). The forward index with one panel is in
// position order, widx the identity: its values are read in place, with no gather. A thread's pass walks
// tiles of output positions x batch vectors, then panels, then its rows, so each tile's input slice over a
// panel is read from L2 while every row uses it, and each output tile stays in cache across the panels (a
// Linear has one tile: panel-major). Values are read at call time, so optimizer updates need no index
// rebuild; the forward returns its packed input, which the backward reuses for the weight gradient, and the
// backward reads the transposed values out of `values` through the transposed index's widx. Non-zeros whose
// value is exactly zero stay in the index (a weight regrown at zero gets its gradient).
//
// Each phase (siftc.pack_x, siftc.spmm, siftc.sddmm, siftc.gather, siftc.pack_dy, siftc.unpack) is a
// RECORD_FUNCTION scope, so torch.profiler splits a step into them; when no profiler is active a scope
// costs a flag check.
// ATen's per-operator headers, not <ATen/ATen.h>, whose declarations of every operator cost this file
// 7 s of its 32 s compile (CPU time, -O3, measured); the generated kernels are the same.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_unsafe_view.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <type_traits>
#include <memory>
#include <string>
#include <vector>

namespace siftc {

constexpr int64_t kBatchPad = 16;  // batch padded to a multiple of this (one AVX-512 float vector)
constexpr int kCodeShift = 8;      // code = group << 8 | kernel position; so kh*kw <= 256
// Register tiles sized to the machine's vector registers, through GCC vector extensions: with AVX-512,
// 64-byte vectors and 16 accumulators (of 32 zmm registers); otherwise (AVX2: 16 ymm registers) 32-byte
// vectors and 8 accumulators, which leaves room for the operand loads. A 64-byte vector on AVX2 is two
// ymm halves, and 16 of them (32 registers) spilled to the stack on every FMA.
#ifdef __AVX512F__
constexpr int kVecBytes = 64;
constexpr int kMaxAcc = 16;  // accumulator vectors held in registers per tile
#else
constexpr int kVecBytes = 32;
constexpr int kMaxAcc = 8;
#endif
typedef float vfloat __attribute__((vector_size(kVecBytes), aligned(4), may_alias));
typedef double vdouble __attribute__((vector_size(kVecBytes), aligned(8), may_alias));
template <typename T> struct Vec;
template <> struct Vec<float> { using type = vfloat; static constexpr int lanes = kVecBytes / 4; };
template <> struct Vec<double> { using type = vdouble; static constexpr int lanes = kVecBytes / 8; };

template <typename T>
static inline T hsum(typename Vec<T>::type v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_add_ps((__m512)v);
  else return _mm512_reduce_add_pd((__m512d)v);
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {  // 8 -> 4 -> 2 -> 1 lanes in registers
    __m128 q = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
  } else {
    __m128d q = _mm_add_pd(_mm256_castpd256_pd128((__m256d)v), _mm256_extractf128_pd((__m256d)v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
  }
#endif
  T s = 0;
  for (int i = 0; i < Vec<T>::lanes; ++i) s += v[i];
  return s;
}

// Where one output row's tile of positions lives. A tile is NT positions x NV vectors.
struct Geometry {
  int64_t rows;          // R: output rows (output channels, or input channels for the grad input)
  int64_t pos_h, pos_w;  // output position grid
  int64_t nvec;          // vectors per position (Bp / lanes)
  int64_t in_h, in_w;    // input element step per output position step
  int64_t out_h, out_w;  // output element step per output position step
  int64_t out_row;       // output element step between rows
  int64_t group;         // input element step per group (channel)
  const int64_t* koff;   // input element offset per kernel position
};

struct Tile {
  int64_t in_off, out_off;  // element offsets of the tile's first position, first vector
  int nv, nt;               // vectors per position, positions
};

// Tiles covering the whole output grid: batch vectors in power-of-two chunks of at most kMaxAcc, then runs
// of kMaxAcc/NV positions along the row, the leftover positions one at a time.
static std::vector<Tile> make_tiles(const Geometry& g, int lanes) {
  std::vector<Tile> tiles;
  for (int64_t v0 = 0; v0 < g.nvec;) {
    int nv = kMaxAcc;
    while (nv > g.nvec - v0) nv /= 2;
    const int nt = std::max(1, kMaxAcc / nv);
    for (int64_t h = 0; h < g.pos_h; ++h) {
      int64_t w = 0;
      for (; w + nt <= g.pos_w; w += nt)
        tiles.push_back({h * g.in_h + w * g.in_w + v0 * lanes, h * g.out_h + w * g.out_w + v0 * lanes, nv, nt});
      for (; w < g.pos_w; ++w)
        tiles.push_back({h * g.in_h + w * g.in_w + v0 * lanes, h * g.out_h + w * g.out_w + v0 * lanes, nv, 1});
    }
    v0 += nv;
  }
  return tiles;
}

// ---- spmm: out[r, tile] (+)= sum over row r's entries in one panel ---------------------------------------
template <typename T, int NV, int NT>
static void spmm_tile(const T* __restrict in, T* __restrict out, const Geometry& g, const int32_t* __restrict code,
                      const T* __restrict vals, int64_t lo, int64_t hi, bool first, T init) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[NT][NV];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NV; ++v) {
      if (first) {
        V z = {};
        acc[t][v] = z + init;
      } else {
        acc[t][v] = *(const V*)(out + t * g.out_w + v * L);
      }
    }
  const int64_t in_w = g.in_w;
  for (int64_t n = lo; n < hi; ++n) {
    const int32_t c = code[n];
    const T* src = in + (int64_t)(c >> kCodeShift) * g.group + g.koff[c & ((1 << kCodeShift) - 1)];
    const T val = vals[n];
    for (int t = 0; t < NT; ++t)
      for (int v = 0; v < NV; ++v) acc[t][v] += val * *(const V*)(src + t * in_w + v * L);
  }
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NV; ++v) *(V*)(out + t * g.out_w + v * L) = acc[t][v];
}

template <typename T>
using SpmmFn = void (*)(const T*, T*, const Geometry&, const int32_t*, const T*, int64_t, int64_t, bool, T);

template <typename T>
static SpmmFn<T> spmm_fn(int nv, int nt) {
  switch (nv * 100 + nt) {
    case 116: return spmm_tile<T, 1, 16>;
    case 108: return spmm_tile<T, 1, 8>;
    case 204: return spmm_tile<T, 2, 4>;
    case 402: return spmm_tile<T, 4, 2>;
    case 101: return spmm_tile<T, 1, 1>;
    case 208: return spmm_tile<T, 2, 8>;
    case 201: return spmm_tile<T, 2, 1>;
    case 404: return spmm_tile<T, 4, 4>;
    case 401: return spmm_tile<T, 4, 1>;
    case 802: return spmm_tile<T, 8, 2>;
    case 801: return spmm_tile<T, 8, 1>;
    case 1601: return spmm_tile<T, 16, 1>;
  }
  TORCH_CHECK(false, "siftc: no spmm tile for nv=", nv, " nt=", nt);
}

// The non-zero values in index order, read row by row. Read inside the FMA loop (panel by panel, jumping
// between rows) each value was a dependent cache miss, half the loop's time; gathered first, the FMA loop
// streams them. src[n] is entry n's index in `from` (the layer's values): within a forward row the panels'
// entries ascend through the values, so they stream in address order.
template <typename T>
static at::Tensor gather_values(const T* from, const int64_t* ptr, const int32_t* src, int64_t rows, int64_t npanels,
                                const at::TensorOptions& opt) {
  RECORD_FUNCTION("siftc.gather", std::vector<c10::IValue>());
  at::Tensor vals = at::empty({ptr[npanels * rows]}, opt);
  T* v = vals.data_ptr<T>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t p = 0; p < npanels; ++p)
        for (int64_t n = ptr[p * rows + r]; n < ptr[p * rows + r + 1]; ++n) v[n] = from[src[n]];
  });
  return vals;
}

static inline int64_t row_grain(int64_t rows) {
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, (rows + nt - 1) / nt);
}

template <typename T>
static void spmm(const T* in, T* out, const Geometry& g, const at::Tensor& ptr_t, const at::Tensor& code_t,
                 const T* vals, const T* bias) {
  RECORD_FUNCTION("siftc.spmm", std::vector<c10::IValue>());
  const int64_t R = g.rows;
  const int64_t npanels = (ptr_t.numel() - 1) / R;
  const int64_t* ptr = ptr_t.data_ptr<int64_t>();
  const int32_t* code = code_t.data_ptr<int32_t>();
  const auto tiles = make_tiles(g, Vec<T>::lanes);
  std::vector<SpmmFn<T>> fns;
  for (const auto& t : tiles) fns.push_back(spmm_fn<T>(t.nv, t.nt));
  at::parallel_for(0, R, row_grain(R), [&](int64_t r0, int64_t r1) {
    for (size_t i = 0; i < tiles.size(); ++i)
      for (int64_t p = 0; p < npanels; ++p)
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t lo = ptr[p * R + r], hi = ptr[p * R + r + 1];
          if (p > 0 && lo == hi) continue;
          fns[i](in + tiles[i].in_off, out + r * g.out_row + tiles[i].out_off, g, code, vals, lo, hi, p == 0,
                 bias ? bias[r] : T(0));
        }
  });
}

// ---- sddmm: dV at row r's entries += dot(A[r, tile], X[entry, tile]) -------------------------------------
// ADD false: the entry's first tile (write the value); true: a later tile (add to it). Entry n's gradient
// goes to dvals[widx[n]], its non-zero's place in `values`.
template <typename T, int NV, int NT, bool ADD>
static void sddmm_tile(const T* __restrict a, const T* __restrict x, const Geometry& g,
                       const int32_t* __restrict code, const int32_t* __restrict widx, T* __restrict dvals,
                       int64_t lo, int64_t hi) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V av[NT][NV];
  for (int t = 0; t < NT; ++t)
    for (int v = 0; v < NV; ++v) av[t][v] = *(const V*)(a + t * g.out_w + v * L);
  const int64_t in_w = g.in_w;
  for (int64_t n = lo; n < hi; ++n) {
    const int32_t c = code[n];
    const T* src = x + (int64_t)(c >> kCodeShift) * g.group + g.koff[c & ((1 << kCodeShift) - 1)];
    V part[4] = {};  // four chains so the FMAs do not wait on each other
    for (int t = 0; t < NT; ++t)
      for (int v = 0; v < NV; ++v) part[(t * NV + v) & 3] += av[t][v] * *(const V*)(src + t * in_w + v * L);
    const V s = (part[0] + part[1]) + (part[2] + part[3]);
    if (ADD) dvals[widx[n]] += hsum<T>(s);
    else dvals[widx[n]] = hsum<T>(s);
  }
}

template <typename T>
using SddmmFn = void (*)(const T*, const T*, const Geometry&, const int32_t*, const int32_t*, T*, int64_t,
                         int64_t);

template <typename T, bool ADD>
static SddmmFn<T> sddmm_fn(int nv, int nt) {
  switch (nv * 100 + nt) {
    case 116: return sddmm_tile<T, 1, 16, ADD>;
    case 108: return sddmm_tile<T, 1, 8, ADD>;
    case 204: return sddmm_tile<T, 2, 4, ADD>;
    case 402: return sddmm_tile<T, 4, 2, ADD>;
    case 101: return sddmm_tile<T, 1, 1, ADD>;
    case 208: return sddmm_tile<T, 2, 8, ADD>;
    case 201: return sddmm_tile<T, 2, 1, ADD>;
    case 404: return sddmm_tile<T, 4, 4, ADD>;
    case 401: return sddmm_tile<T, 4, 1, ADD>;
    case 802: return sddmm_tile<T, 8, 2, ADD>;
    case 801: return sddmm_tile<T, 8, 1, ADD>;
    case 1601: return sddmm_tile<T, 16, 1, ADD>;
  }
  TORCH_CHECK(false, "siftc: no sddmm tile for nv=", nv, " nt=", nt);
}

// g describes A (as "out") and X (as "in"); dvals (nnz,) is the values' gradient, every entry written: one
// dot product per tile, summed over the tiles in the loop order of spmm (so dY is read once rather than
// once per panel), stored at the entry's widx. Within a forward row and panel the entries' widx are
// consecutive, so the stores are sequential.
template <typename T>
static void sddmm(const T* a, const T* x, const Geometry& g, const at::Tensor& ptr_t, const at::Tensor& code_t,
                  const at::Tensor& widx_t, T* dvals) {
  RECORD_FUNCTION("siftc.sddmm", std::vector<c10::IValue>());
  const int64_t R = g.rows;
  const int64_t npanels = (ptr_t.numel() - 1) / R;
  const int64_t* ptr = ptr_t.data_ptr<int64_t>();
  const int32_t* code = code_t.data_ptr<int32_t>();
  const int32_t* widx = widx_t.data_ptr<int32_t>();
  const auto tiles = make_tiles(g, Vec<T>::lanes);
  std::vector<SddmmFn<T>> assign, add;
  for (const auto& t : tiles) {
    assign.push_back(sddmm_fn<T, false>(t.nv, t.nt));
    add.push_back(sddmm_fn<T, true>(t.nv, t.nt));
  }
  at::parallel_for(0, R, row_grain(R), [&](int64_t r0, int64_t r1) {
    for (size_t i = 0; i < tiles.size(); ++i)
      for (int64_t p = 0; p < npanels; ++p)
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t lo = ptr[p * R + r], hi = ptr[p * R + r + 1];
          if (lo == hi) continue;
          (i == 0 ? assign[i] : add[i])(a + r * g.out_row + tiles[i].out_off, x + tiles[i].in_off, g, code, widx,
                                        dvals, lo, hi);
        }
  });
}

// ---- layout changes ---------------------------------------------------------------------------------------
// Moving the batch to the innermost position is a transpose between the batch and the source's (or the
// destination's) contiguous dimension; 16x16 tiles go through AVX-512 registers in 64 shuffles instead of
// 256 scalar strided copies.
#ifdef __AVX512F__
// dst[j * dstride + i] = src[i * sstride + j] for i, j < 16.
static inline void transpose16(const float* src, int64_t sstride, float* dst, int64_t dstride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * sstride);
  for (int i = 0; i < 16; i += 2) {  // lane l of t[i], t[i+1]: rows i, i+1 interleaved at columns 4l..4l+3
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // lane l of r[i + m]: rows i..i+3 at column 4l + m
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {  // column 4l + m = lane l of r[m], r[4 + m], r[8 + m], r[12 + m]
    const __m512 v0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), v1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    _mm512_storeu_ps(dst + m * dstride, _mm512_shuffle_f32x4(v0, v2, 0x88));
    _mm512_storeu_ps(dst + (4 + m) * dstride, _mm512_shuffle_f32x4(v0, v2, 0xDD));
    _mm512_storeu_ps(dst + (8 + m) * dstride, _mm512_shuffle_f32x4(v1, v3, 0x88));
    _mm512_storeu_ps(dst + (12 + m) * dstride, _mm512_shuffle_f32x4(v1, v3, 0xDD));
  }
}
#endif

// One 16x16 tile of copy4d: dst[i * di + k * dk] = src[i * si + k * sk] for i < ni, k < nk.
template <typename T>
static inline void copy_tile(T* dst, int64_t di, int64_t dk, const T* src, int64_t si, int64_t sk, int64_t ni,
                             int64_t nk) {
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>) {
    if (ni == 16 && nk == 16 && si == 1 && dk == 1) return transpose16(src, sk, dst, di);
    if (ni == 16 && nk == 16 && sk == 1 && di == 1) return transpose16(src, si, dst, dk);
  }
#endif
  for (int64_t i = 0; i < ni; ++i)
    for (int64_t k = 0; k < nk; ++k) dst[i * di + k * dk] = src[i * si + k * sk];
}

// dst[i0,i1,i2,i3] = src[i0,i1,i2,i3] for arbitrary element strides; blocked over (i2, i3), or over (i0, i3)
// when i1 = i2 = 1 (a Linear's transpose), so both sides stream through L1.
template <typename T>
static void copy4d(T* dst, const int64_t* ds, const T* src, const int64_t* ss, const int64_t* n) {
  constexpr int64_t B = 16;
  const bool flat = n[1] == 1 && n[2] == 1;
  const int64_t a = flat ? 0 : 2;  // the dimension blocked against i3
  const int64_t outer = flat ? 1 : n[0] * n[1];
  const int64_t nblk = (n[a] + B - 1) / B;
  at::parallel_for(0, outer * nblk, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t o = j / nblk, ib = (j % nblk) * B, ie = std::min(n[a], ib + B);
      const int64_t i0 = flat ? 0 : o / n[1], i1 = flat ? 0 : o % n[1];
      const T* s0 = src + i0 * ss[0] + i1 * ss[1] + ib * ss[a];
      T* d0 = dst + i0 * ds[0] + i1 * ds[1] + ib * ds[a];
      for (int64_t kb = 0; kb < n[3]; kb += B)
        copy_tile<T>(d0 + kb * ds[3], ds[a], ds[3], s0 + kb * ss[3], ss[a], ss[3], ie - ib, std::min(B, n[3] - kb));
    }
  });
}

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct ConvShape {
  int64_t B, C, H, W, O, KH, KW, sh, sw, ph, pw, dh, dw, Ho, Wo, Bp, Hp, Wp;
};

// shape: the dense weight's (O, C, KH, KW).
static ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef shape, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && shape.size() == 4, "siftc: conv2d expects a 4-d input and a 4-d weight shape, got ",
              x.dim(), "-d input and weight shape ", shape);
  TORCH_CHECK(x.size(1) == shape[1], "siftc: input has ", x.size(1), " channels, weight shape ", shape, " expects ",
              shape[1], " (groups=1 only)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "siftc: stride/padding/dilation need 2 values");
  ConvShape s{};
  s.B = x.size(0); s.C = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.O = shape[0]; s.KH = shape[2]; s.KW = shape[3];
  s.sh = stride[0]; s.sw = stride[1]; s.ph = padding[0]; s.pw = padding[1]; s.dh = dilation[0]; s.dw = dilation[1];
  TORCH_CHECK(s.KH * s.KW <= (1 << kCodeShift), "siftc: kernel ", s.KH, "x", s.KW, " is larger than 256 positions");
  s.Hp = s.H + 2 * s.ph; s.Wp = s.W + 2 * s.pw;
  s.Ho = (s.Hp - s.dh * (s.KH - 1) - 1) / s.sh + 1;
  s.Wo = (s.Wp - s.dw * (s.KW - 1) - 1) / s.sw + 1;
  TORCH_CHECK(s.Ho > 0 && s.Wo > 0, "siftc: conv2d output would be empty");
  s.Bp = round_up(std::max<int64_t>(s.B, 1), kBatchPad);
  return s;
}

// An uninitialised (C, Hb, Wb, Bp) buffer whose interior [oh, oh + h) x [ow, ow + w) is about to be written
// for the first B of Bp lanes: zero only the rest, instead of zeroing all of it and writing the interior
// twice (a padded 3x3 layer's border is a few percent of the buffer).
template <typename T>
static at::Tensor empty_zero_border(int64_t C, int64_t Hb, int64_t Wb, int64_t Bp, int64_t B, int64_t oh, int64_t ow,
                                    int64_t h, int64_t w, const at::TensorOptions& opt) {
  if (B != Bp) return at::zeros({C, Hb, Wb, Bp}, opt);  // the batch padding is inside every position
  at::Tensor buf = at::empty({C, Hb, Wb, Bp}, opt);
  if (oh == 0 && ow == 0 && h == Hb && w == Wb) return buf;
  T* base = buf.data_ptr<T>();
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* ch = base + c * Hb * Wb * Bp;
      std::fill(ch, ch + oh * Wb * Bp, T(0));
      std::fill(ch + (oh + h) * Wb * Bp, ch + Hb * Wb * Bp, T(0));
      for (int64_t i = oh; i < oh + h; ++i) {
        std::fill(ch + i * Wb * Bp, ch + (i * Wb + ow) * Bp, T(0));
        std::fill(ch + (i * Wb + ow + w) * Bp, ch + (i + 1) * Wb * Bp, T(0));
      }
    }
  });
  return buf;
}

// x (B, C, H, W) any strides -> (C, Hp, Wp, Bp), zero padded.
template <typename T>
static at::Tensor pack_input(const at::Tensor& x, const ConvShape& s) {
  RECORD_FUNCTION("siftc.pack_x", std::vector<c10::IValue>());
  at::Tensor xp = empty_zero_border<T>(s.C, s.Hp, s.Wp, s.Bp, s.B, s.ph, s.pw, s.H, s.W, x.options());
  const int64_t ds[4] = {s.Hp * s.Wp * s.Bp, s.Wp * s.Bp, s.Bp, 1};
  const int64_t ss[4] = {x.stride(1), x.stride(2), x.stride(3), x.stride(0)};
  const int64_t n[4] = {s.C, s.H, s.W, s.B};
  copy4d<T>(xp.data_ptr<T>() + (s.ph * s.Wp + s.pw) * s.Bp, ds, x.const_data_ptr<T>(), ss, n);
  return xp;
}

// (Ch, Hb, Wb, Bp) buffer -> (B, Ch, h, w) contiguous, taking positions [off, off + h/w).
template <typename T>
static at::Tensor unpack(const at::Tensor& buf, int64_t B, int64_t h, int64_t w, int64_t oh, int64_t ow,
                         const at::Tensor& like) {
  RECORD_FUNCTION("siftc.unpack", std::vector<c10::IValue>());
  const int64_t Ch = buf.size(0), Hb = buf.size(1), Wb = buf.size(2), Bp = buf.size(3);
  const int64_t hh = std::min(h, Hb - oh), ww = std::min(w, Wb - ow);
  at::Tensor out = (hh < h || ww < w) ? at::zeros({B, Ch, h, w}, like.options()) : at::empty({B, Ch, h, w}, like.options());
  if (hh <= 0 || ww <= 0) return out;
  const int64_t ds[4] = {h * w, w, 1, Ch * h * w};
  const int64_t ss[4] = {Hb * Wb * Bp, Wb * Bp, Bp, 1};
  const int64_t n[4] = {Ch, hh, ww, B};
  copy4d<T>(out.data_ptr<T>(), ds, buf.const_data_ptr<T>() + (oh * Wb + ow) * Bp, ss, n);
  return out;
}

// An index of `rows` rows over the layer's `nnz` values: every value is one entry.
static void check_index(const at::Tensor& ptr, const at::Tensor& code, const at::Tensor& widx, int64_t rows,
                        int64_t nnz, const char* what) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && code.scalar_type() == at::kInt && widx.scalar_type() == at::kInt,
              "siftc: ", what, " index must be (int64 ptr, int32 code, int32 widx)");
  TORCH_CHECK(ptr.is_contiguous() && code.is_contiguous() && widx.is_contiguous(), "siftc: index tensors must be contiguous");
  TORCH_CHECK(ptr.numel() >= rows + 1 && (ptr.numel() - 1) % rows == 0, "siftc: ", what, " index ptr has ",
              ptr.numel(), " entries, not a multiple of ", rows, " rows plus one");
  TORCH_CHECK(code.numel() == widx.numel(), "siftc: ", what, " index code/widx lengths differ");
  TORCH_CHECK(code.numel() == nnz && ptr.data_ptr<int64_t>()[ptr.numel() - 1] == nnz, "siftc: ", what, " index has ",
              code.numel(), " entries for ", nnz, " values; rebuild it from the layer's positions (build_index)");
}

static void check_inputs(const at::Tensor& x, const at::Tensor& values, at::IntArrayRef shape) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), "siftc: native kernels run on CPU tensors only");
  TORCH_CHECK(x.scalar_type() == values.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "siftc: native kernels need float32 (or float64) input and values of one dtype, got ", x.scalar_type(),
              " and ", values.scalar_type());
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  TORCH_CHECK(values.dim() == 1 && values.numel() <= numel, "siftc: values must be the (nnz,) non-zeros of a weight "
              "of shape ", shape, " (", numel, " entries), got shape ", values.sizes());
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Input gradient, one stride phase at a time. dXp[c, y, x] (padded-input coordinates) collects
// W[o,c,kh,kw] * dY[o, (y - kh*dh)/sh, (x - kw*dw)/sw] over the kernel positions where both divisions are
// exact, so the positions with y = ay (mod sh), x = ax (mod sw) form one phase with a fixed set of kernel
// positions: an spmm over that phase's sub-grid of dXp, reading dY (zero padded by ceil(Q/stride), not
// zero-dilated) through the transposed index filtered to the phase's kernel positions. Stride 1 is one
// phase with every position; a strided conv no longer multiplies the dilation's zeros (3/4 of the work
// at stride 2).
// dY (B, O, Ho, Wo) any strides -> (O, Ho + 2 PH, Wo + 2 PW, Bp), zero padded by PH = ceil((KH-1)*dh / sh)
// (PW likewise): the input gradient's operand, and, through its interior, the weight gradient's.
struct PackedGrad {
  at::Tensor d;
  int64_t PH, PW, HD, WD;
};

template <typename T>
static PackedGrad pack_grad(const at::Tensor& grad, const ConvShape& s) {
  RECORD_FUNCTION("siftc.pack_dy", std::vector<c10::IValue>());
  PackedGrad p;
  p.PH = ceil_div((s.KH - 1) * s.dh, s.sh);
  p.PW = ceil_div((s.KW - 1) * s.dw, s.sw);
  p.HD = s.Ho + 2 * p.PH;
  p.WD = s.Wo + 2 * p.PW;
  p.d = empty_zero_border<T>(s.O, p.HD, p.WD, s.Bp, s.B, p.PH, p.PW, s.Ho, s.Wo, grad.options());
  const int64_t ds[4] = {p.HD * p.WD * s.Bp, p.WD * s.Bp, s.Bp, 1};
  const int64_t ss[4] = {grad.stride(1), grad.stride(2), grad.stride(3), grad.stride(0)};
  const int64_t n[4] = {s.O, s.Ho, s.Wo, s.B};
  copy4d<T>(p.d.data_ptr<T>() + (p.PH * p.WD + p.PW) * s.Bp, ds, grad.const_data_ptr<T>(), ss, n);
  return p;
}

template <typename T>
static at::Tensor grad_input(const PackedGrad& pg, const at::Tensor& x, const at::Tensor& values,
                             const ConvShape& s, const at::Tensor& tptr, const at::Tensor& tcode,
                             const at::Tensor& twidx) {
  const int64_t qh = (s.KH - 1) * s.dh, qw = (s.KW - 1) * s.dw;
  const int64_t PH = pg.PH, PW = pg.PW, HD = pg.HD, WD = pg.WD;
  const at::Tensor& d = pg.d;
  // dX over the input positions the forward reads, [0, Hx) x [0, Wx) (the rest stays zero): the
  // padded border is not computed, which at 4x4 would be more than the interior.
  const int64_t Hx = std::max<int64_t>(0, std::min(s.H, (s.Ho - 1) * s.sh + 1 + qh - s.ph));
  const int64_t Wx = std::max<int64_t>(0, std::min(s.W, (s.Wo - 1) * s.sw + 1 + qw - s.pw));
  at::Tensor gx = at::empty({s.C, Hx, Wx, s.Bp}, x.options());
  const int64_t R = s.C, npanels = (tptr.numel() - 1) / R;
  const at::Tensor vals = gather_values<T>(values.const_data_ptr<T>(), tptr.data_ptr<int64_t>(),
                                           twidx.data_ptr<int32_t>(), R, npanels, x.options());
  const int64_t KK = s.KH * s.KW;
  for (int64_t ay = 0; ay < s.sh; ++ay)
    for (int64_t ax = 0; ax < s.sw; ++ax) {
      const int64_t Uh = ceil_div(Hx - ay, s.sh), Uw = ceil_div(Wx - ax, s.sw);
      if (Uh <= 0 || Uw <= 0) continue;
      std::vector<int64_t> koff(KK, 0);
      std::vector<char> valid(KK, 0);
      int64_t nvalid = 0;
      for (int64_t i = 0; i < s.KH; ++i)
        for (int64_t j = 0; j < s.KW; ++j) {
          const int64_t ry = s.ph + ay - i * s.dh, rx = s.pw + ax - j * s.dw;  // padded-input coordinates
          if (ry % s.sh || rx % s.sw) continue;
          valid[i * s.KW + j] = 1;
          ++nvalid;
          koff[i * s.KW + j] = ((ry / s.sh + PH) * WD + rx / s.sw + PW) * s.Bp;
        }
      at::Tensor ptr = tptr, code = tcode;
      const T* pv = vals.const_data_ptr<T>();
      std::unique_ptr<T[]> fvals;
      if (nvalid < KK) {  // keep the phase's entries, in the same (panel, row) order
        const int64_t* p0 = tptr.data_ptr<int64_t>();
        const int32_t* c0 = tcode.data_ptr<int32_t>();
        ptr = at::empty({npanels * R + 1}, tptr.options());
        int64_t* p1 = ptr.data_ptr<int64_t>();
        int64_t m = 0;
        for (int64_t b = 0; b < npanels * R; ++b) {
          p1[b] = m;
          for (int64_t e = p0[b]; e < p0[b + 1]; ++e) m += valid[c0[e] & ((1 << kCodeShift) - 1)];
        }
        p1[npanels * R] = m;
        code = at::empty({std::max<int64_t>(m, 1)}, tcode.options());
        fvals.reset(new T[std::max<int64_t>(m, 1)]);
        int32_t* c1 = code.data_ptr<int32_t>();
        at::parallel_for(0, npanels * R, 256, [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) {
            int64_t k = p1[b];
            for (int64_t e = p0[b]; e < p0[b + 1]; ++e)
              if (valid[c0[e] & ((1 << kCodeShift) - 1)]) {
                c1[k] = c0[e];
                fvals[k++] = pv[e];
              }
          }
        });
        pv = fvals.get();
      }
      Geometry g{R, Uh, Uw, s.Bp / Vec<T>::lanes, WD * s.Bp, s.Bp, s.sh * Wx * s.Bp, s.sw * s.Bp,
                 Hx * Wx * s.Bp, HD * WD * s.Bp, koff.data()};
      spmm<T>(d.const_data_ptr<T>(), gx.data_ptr<T>() + (ay * Wx + ax) * s.Bp, g, ptr, code, pv, nullptr);
    }
  return unpack<T>(gx, s.B, s.H, s.W, 0, 0, x);
}

// ---- ops ---------------------------------------------------------------------------------------------------
template <typename T>
static std::tuple<at::Tensor, at::Tensor> conv_forward_impl(const at::Tensor& x, const at::Tensor& values_in,
                                                            const std::optional<at::Tensor>& bias, const ConvShape& s,
                                                            const at::Tensor& ptr, const at::Tensor& code,
                                                            const at::Tensor& widx) {
  const at::Tensor values = values_in.contiguous();
  const at::Tensor xp = pack_input<T>(x, s);
  at::Tensor y = at::empty({s.O, s.Ho, s.Wo, s.Bp}, x.options());
  std::vector<int64_t> koff(s.KH * s.KW);
  for (int64_t i = 0; i < s.KH; ++i)
    for (int64_t j = 0; j < s.KW; ++j) koff[i * s.KW + j] = (i * s.dh * s.Wp + j * s.dw) * s.Bp;
  Geometry g{s.O, s.Ho, s.Wo, s.Bp / Vec<T>::lanes, s.sh * s.Wp * s.Bp, s.sw * s.Bp, s.Wo * s.Bp, s.Bp,
             s.Ho * s.Wo * s.Bp, s.Hp * s.Wp * s.Bp, koff.data()};
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t npanels = (ptr.numel() - 1) / s.O;
  // one panel: the index is in position order, widx the identity, so the values are read where they are
  const at::Tensor vals = npanels == 1 ? values
                                       : gather_values<T>(values.const_data_ptr<T>(), ptr.data_ptr<int64_t>(),
                                                          widx.data_ptr<int32_t>(), s.O, npanels, x.options());
  spmm<T>(xp.const_data_ptr<T>(), y.data_ptr<T>(), g, ptr, code, vals.const_data_ptr<T>(),
          b.defined() ? b.const_data_ptr<T>() : nullptr);
  return {unpack<T>(y, s.B, s.Ho, s.Wo, 0, 0, x), xp};
}

// values (nnz,) are the non-zeros of a weight of `shape` (O, C, KH, KW). Returns (y, xp): the output and the
// packed input, which the backward reuses.
std::tuple<at::Tensor, at::Tensor> sparse_conv2d(
    const at::Tensor& x, const at::Tensor& values, at::IntArrayRef shape, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& ptr,
    const at::Tensor& code, const at::Tensor& widx, const at::Tensor& tptr, const at::Tensor& tcode,
    const at::Tensor& twidx, const at::Tensor& wptr, const at::Tensor& wcode, const at::Tensor& wwidx) {
  check_inputs(x, values, shape);
  const ConvShape s = conv_shape(x, shape, stride, padding, dilation);
  check_index(ptr, code, widx, s.O, values.numel(), "forward");
  if (x.scalar_type() == at::kDouble) return conv_forward_impl<double>(x, values, bias, s, ptr, code, widx);
  return conv_forward_impl<float>(x, values, bias, s, ptr, code, widx);
}

template <typename T>
static std::tuple<at::Tensor, at::Tensor> conv_backward_impl(const at::Tensor& grad, const at::Tensor& x,
                                                             const at::Tensor& xp, const at::Tensor& values,
                                                             const ConvShape& s, const at::Tensor& ptr,
                                                             const at::Tensor& code, const at::Tensor& widx,
                                                             const at::Tensor& tptr, const at::Tensor& tcode,
                                                             const at::Tensor& twidx, bool need_input,
                                                             bool need_weight) {
  at::Tensor dx = at::empty({0}, x.options()), dv = at::empty({0}, x.options());
  const PackedGrad pg = pack_grad<T>(grad, s);
  if (need_weight) {
    std::vector<int64_t> koff(s.KH * s.KW);
    for (int64_t i = 0; i < s.KH; ++i)
      for (int64_t j = 0; j < s.KW; ++j) koff[i * s.KW + j] = (i * s.dh * s.Wp + j * s.dw) * s.Bp;
    // A = dY: the interior of the padded dY
    Geometry g{s.O, s.Ho, s.Wo, s.Bp / Vec<T>::lanes, s.sh * s.Wp * s.Bp, s.sw * s.Bp, pg.WD * s.Bp, s.Bp,
               pg.HD * pg.WD * s.Bp, s.Hp * s.Wp * s.Bp, koff.data()};
    dv = at::empty({values.numel()}, x.options());
    sddmm<T>(pg.d.const_data_ptr<T>() + (pg.PH * pg.WD + pg.PW) * s.Bp, xp.const_data_ptr<T>(), g, ptr, code, widx,
             dv.data_ptr<T>());
  }
  if (need_input) dx = grad_input<T>(pg, x, values.contiguous(), s, tptr, tcode, twidx);
  return {dx, dv};
}

// xp: the forward's packed input (sparse_conv2d's second output). Returns (dx, dvalues), dvalues (nnz,).
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& xp, const at::Tensor& values, at::IntArrayRef shape,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& tptr,
    const at::Tensor& tcode, const at::Tensor& twidx, const at::Tensor& ptr, const at::Tensor& code,
    const at::Tensor& widx, bool need_input, bool need_weight) {
  check_inputs(x, values, shape);
  const ConvShape s = conv_shape(x, shape, stride, padding, dilation);
  TORCH_CHECK(xp.dim() == 4 && xp.size(0) == s.C && xp.size(1) == s.Hp && xp.size(2) == s.Wp && xp.size(3) == s.Bp &&
                  xp.is_contiguous() && xp.scalar_type() == x.scalar_type(),
              "siftc: packed input has shape ", xp.sizes(), ", expected [", s.C, ", ", s.Hp, ", ", s.Wp, ", ", s.Bp,
              "] (sparse_conv2d's second output)");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == s.B && grad.size(1) == s.O && grad.size(2) == s.Ho &&
                  grad.size(3) == s.Wo && grad.scalar_type() == x.scalar_type(),
              "siftc: conv2d grad_output has shape ", grad.sizes(), ", expected [", s.B, ", ", s.O, ", ", s.Ho, ", ",
              s.Wo, "]");
  check_index(ptr, code, widx, s.O, values.numel(), "weight-gradient");
  check_index(tptr, tcode, twidx, s.C, values.numel(), "transposed");
  if (x.scalar_type() == at::kDouble)
    return conv_backward_impl<double>(grad, x, xp, values, s, ptr, code, widx, tptr, tcode, twidx, need_input,
                                      need_weight);
  return conv_backward_impl<float>(grad, x, xp, values, s, ptr, code, widx, tptr, tcode, twidx, need_input,
                                   need_weight);
}

// A Linear is the 1x1 convolution of a 1x1 image: (N, in) -> (N, in, 1, 1), weight shape (O, C) -> (O, C, 1, 1).
static at::Tensor as_image(const at::Tensor& t) { return t.as_strided({t.size(0), t.size(1), 1, 1}, {t.stride(0), t.stride(1), 1, 1}); }

static std::vector<int64_t> linear_shape(const at::Tensor& x, at::IntArrayRef shape, const char* op) {
  TORCH_CHECK(x.dim() == 2 && shape.size() == 2, "siftc: ", op, " expects a 2-d input and a 2-d weight shape, got ",
              x.dim(), "-d input and weight shape ", shape);
  return {shape[0], shape[1], 1, 1};
}

std::tuple<at::Tensor, at::Tensor> sparse_linear(
    const at::Tensor& x, const at::Tensor& values, at::IntArrayRef shape, const std::optional<at::Tensor>& bias,
    const at::Tensor& ptr, const at::Tensor& code, const at::Tensor& widx, const at::Tensor& tptr,
    const at::Tensor& tcode, const at::Tensor& twidx, const at::Tensor& wptr, const at::Tensor& wcode,
    const at::Tensor& wwidx) {
  const auto shape4 = linear_shape(x, shape, "sparse_linear");
  auto [y, xp] = sparse_conv2d(as_image(x), values, shape4, bias, {1, 1}, {0, 0}, {1, 1}, ptr, code, widx, tptr, tcode,
                               twidx, wptr, wcode, wwidx);
  // _unsafe_view: y is fresh, so its (N, out) shape is not a view autograd must protect; a view output of
  // an op with an autograd formula cannot be modified in place (ReLU(inplace=True) right after the layer).
  return {at::_unsafe_view(y, {x.size(0), shape[0]}), xp};
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& xp, const at::Tensor& values, at::IntArrayRef shape,
    const at::Tensor& tptr, const at::Tensor& tcode, const at::Tensor& twidx, const at::Tensor& wptr,
    const at::Tensor& wcode, const at::Tensor& wwidx, bool need_input, bool need_weight) {
  const auto shape4 = linear_shape(x, shape, "sparse_linear_backward");
  TORCH_CHECK(grad.dim() == 2, "siftc: sparse_linear_backward expects a 2-d grad_output, got ", grad.dim(), "-d");
  auto [dx, dv] = sparse_conv2d_backward(as_image(grad), as_image(x), xp, values, shape4, {1, 1}, {0, 0}, {1, 1},
                                         tptr, tcode, twidx, wptr, wcode, wwidx, need_input, need_weight);
  if (need_input) dx = dx.view({x.size(0), x.size(1)});
  return {dx, dv};
}

// positions: the (nnz,) ascending flat indices of the non-zeros in a dense weight of `shape`, viewed as
// (O, C, KK). Returns (ptr, code, widx) for rows O grouped by C (transpose=false) or rows C grouped by O
// (transpose=true), column panels of `panel` groups; widx[n] is entry n's index in the values. O(nnz): one
// pass counts the entries of each (panel, row) bucket, one fills them, in position order.
std::tuple<at::Tensor, at::Tensor, at::Tensor> build_index(const at::Tensor& positions_in, at::IntArrayRef shape,
                                                           int64_t panel, bool transpose) {
  TORCH_CHECK(positions_in.scalar_type() == at::kInt && positions_in.dim() == 1,
              "siftc: build_index needs the (nnz,) int32 positions, got ", positions_in.scalar_type(), " of shape ",
              positions_in.sizes());
  TORCH_CHECK(shape.size() >= 2, "siftc: build_index needs a weight shape of at least 2 dims, got ", shape);
  TORCH_CHECK(panel >= 1, "siftc: build_index panel must be >= 1, got ", panel);
  const int64_t O = shape[0], C = shape[1];
  int64_t kk = 1;
  for (size_t i = 2; i < shape.size(); ++i) kk *= shape[i];
  TORCH_CHECK(kk >= 1 && kk <= (1 << kCodeShift), "siftc: build_index kernel of ", kk, " positions, need 1..256");
  TORCH_CHECK(O * C * kk < (int64_t(1) << 31), "siftc: weight of shape ", shape, " has more than 2^31 entries");
  TORCH_CHECK((transpose ? O : C) < (int64_t(1) << (31 - kCodeShift)), "siftc: too many channels for the index");
  const at::Tensor positions = positions_in.contiguous();
  const int32_t* pos = positions.const_data_ptr<int32_t>();
  const int64_t nnz = positions.numel();
  for (int64_t n = 0; n < nnz; ++n)
    TORCH_CHECK(pos[n] >= 0 && pos[n] < O * C * kk && (n == 0 || pos[n] > pos[n - 1]), "siftc: positions must be "
                "ascending, distinct and in [0, ", O * C * kk, "); entry ", n, " is ", pos[n],
                n ? " after " : "", n ? std::to_string(pos[n - 1]) : std::string());
  const int64_t R = transpose ? C : O, G = transpose ? O : C;
  const int64_t np = (G + panel - 1) / panel;
  if (np > 0) panel = (G + np - 1) / np;  // balanced: the same panel count, no small last panel
  auto bucket = [&](int64_t p) {
    const int64_t o = p / (C * kk), c = p / kk % C;
    return transpose ? (o / panel) * R + c : (c / panel) * R + o;
  };
  at::Tensor ptr_t = at::zeros({np * R + 1}, at::kLong);
  int64_t* ptr = ptr_t.data_ptr<int64_t>();
  for (int64_t n = 0; n < nnz; ++n) ++ptr[bucket(pos[n]) + 1];
  for (int64_t i = 0; i < np * R; ++i) ptr[i + 1] += ptr[i];
  at::Tensor code_t = at::empty({nnz}, at::kInt), widx_t = at::empty({nnz}, at::kInt);
  int32_t* code = code_t.data_ptr<int32_t>();
  int32_t* widx = widx_t.data_ptr<int32_t>();
  std::vector<int64_t> cur(ptr, ptr + np * R);
  for (int64_t n = 0; n < nnz; ++n) {  // ascending positions: each bucket fills in (column, kernel) order
    const int64_t p = pos[n], o = p / (C * kk), c = p / kk % C, k = p % kk;
    const int64_t e = cur[bucket(p)]++;
    code[e] = int32_t(((transpose ? o : c) << kCodeShift) | k);
    widx[e] = int32_t(n);
  }
  return {ptr_t, code_t, widx_t};
}

// (vector bytes, accumulators) of the register tiles this build was compiled for, for the Python side's
// panel sizing (siftc/runtime/native.py).
static std::vector<int64_t> register_tile() { return {kVecBytes, kMaxAcc}; }

TORCH_LIBRARY(siftc, m) {
  m.def("register_tile() -> int[]", &register_tile);
  m.def("build_index(Tensor positions, int[] shape, int panel, bool transpose) -> (Tensor, Tensor, Tensor)");
  // `values` (nnz,) and `shape` (the dense weight's) stand for the weight. Three indexes: forward (rows =
  // outputs), grad input (rows = inputs), grad weight (rows = outputs, its panels sized for the weight
  // gradient's partial sums); each one's third tensor is its entries' indexes in `values`. The forward takes
  // all three so autograd can save them, and returns (y, packed input); the backward takes the packed input
  // and returns (dx, dvalues), dvalues (nnz,).
  m.def("sparse_linear(Tensor x, Tensor values, int[] shape, Tensor? bias, Tensor ptr, Tensor code, Tensor widx, "
        "Tensor tptr, Tensor tcode, Tensor twidx, Tensor wptr, Tensor wcode, Tensor wwidx) -> (Tensor, Tensor)");
  m.def("sparse_linear_backward(Tensor grad, Tensor x, Tensor xp, Tensor values, int[] shape, Tensor tptr, "
        "Tensor tcode, Tensor twidx, Tensor wptr, Tensor wcode, Tensor wwidx, bool need_input, bool need_weight) "
        "-> (Tensor, Tensor)");
  m.def("sparse_conv2d(Tensor x, Tensor values, int[] shape, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, Tensor ptr, Tensor code, Tensor widx, Tensor tptr, Tensor tcode, Tensor twidx, "
        "Tensor wptr, Tensor wcode, Tensor wwidx) -> (Tensor, Tensor)");
  m.def("sparse_conv2d_backward(Tensor grad, Tensor x, Tensor xp, Tensor values, int[] shape, int[2] stride, "
        "int[2] padding, int[2] dilation, Tensor tptr, Tensor tcode, Tensor twidx, Tensor wptr, Tensor wcode, "
        "Tensor wwidx, bool need_input, bool need_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(siftc, CPU, m) {
  m.impl("build_index", &build_index);
  m.impl("sparse_linear", &sparse_linear);
  m.impl("sparse_linear_backward", &sparse_linear_backward);
  m.impl("sparse_conv2d", &sparse_conv2d);
  m.impl("sparse_conv2d_backward", &sparse_conv2d_backward);
}

}  // namespace siftc
