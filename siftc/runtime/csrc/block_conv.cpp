// Block-sparse and N:M Conv2d forward and backward on CPU: implicit GEMM over the kernel positions.
//
// Geometry (siftc/sparse/patterns.py, Tiling): the weight (O, I, KH, KW) is read as (O, I, K), K = KH*KW; a
// block is R output channels x C input channels at one kernel position k. Reordered as the (O, K*I) matrix
// Wv[o, k*I + i] = W[o, i, k], a block is an R x C block of Wv, so the forward is a block-sparse GEMM whose
// view column k*I + i reads input channel i shifted by kernel position k: siftc.runtime.block_conv builds
// Wv's BSR index (ptr, bcol) with block_index, and the input gradient's from (I, K*O), Wt[i, k*O + o] =
// W[o, i, k] (its blocks C x R, gathered from the forward's through `tperm`).
//
// Activations are packed batch-innermost and split into stride phases (space to depth):
//   Xs (I, sh, sw, Hs, Ws, Bp), Xs[i, a, b, y, x] = Xpad[i, y*sh + a, x*sw + b], Hs = ceil(Hp / sh)
// so kernel position (kh, kw) reads phase (kh*dh % sh, kw*dw % sw) at offset (kh*dh / sh, kw*dw / sw) and
// output row oh's positions ow = 0 .. Wo-1 with their batch are one contiguous run of Wo*Bp elements in
// both Xs and Y (O, Ho, Wo, Bp): a block times one output row is a run of vector FMAs, whatever the stride.
//   forward  Y[o-rows of block row] = sum over its blocks W_blk . Xs[the block's channels, its k's shift]:
//            register tiles of RT rows x NV vectors, every loaded Xs vector feeding RT accumulators.
//   dX       dXs[i, a, b] = sum over (o, k of phase (a, b)) W[o, i, k] dYpad[o, shifted back by k]: the same
//            gather on Wt's blocks, one phase at a time over that phase's kernel positions.
//   dW       dW_blk[r][c] = sum over output positions and batch of dY[o_r] . Xs[i_c shifted by k], chunk by
//            chunk of output rows so dY's R channels stay in L1 across a block row's blocks.
// Every pass runs over chunks of a row's vectors sized so that one chunk of the input across all channels
// and kernel positions stays in L2 while every block row of the thread uses it.
// fp32 and fp64; 32-byte (AVX2) or 64-byte (AVX-512) vectors as -march=native allows.
// ATen's per-operator headers, not <ATen/ATen.h>, whose declarations of every operator cost this file
// 9 s of its 32 s compile (CPU time, -O3, measured); the generated kernels are the same.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "block_simd.h"

namespace siftc_block_conv {

using namespace siftc_block;  // vectors, tiles, sddmm_block (block_simd.h)

constexpr int64_t kL1Bytes = 16 * 1024;  // the dY bytes of a block row's chunk in the weight gradient

// One gather pass: view block row i's entries are ptr[i] .. ptr[i+1]; entry e's VR x VC block starts at
// blocks + boff[e] (row-major) and its input at in + ioff[e] (+ c * cs_in for its c-th channel). The output
// has `nrows` view block rows of VR channels, cs_out apart; spatially, `rows` rows of `nvec` vectors, the
// input's row r at in_row * r, the output's at out_row * r.
struct Pass {
  const int64_t* ptr;
  const int64_t* boff;
  const int64_t* ioff;
  int64_t nrows, cs_in, cs_out, rows, in_row, out_row, nvec;
};

// out[RT channels, NV vectors] = bias + sum over entries [lo, hi) of W_blk[r0 .. r0+RT) . in[block's channels]
template <typename T, int VR, int VC, int RT, int NV>
SIFTC_TILE void gather_tile(const T* __restrict in, T* __restrict out, int64_t cs_in, int64_t cs_out,
                            const int64_t* __restrict boff, const int64_t* __restrict ioff,
                            const T* __restrict blocks, int64_t lo, int64_t hi, int r0, const T* bias) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) {
      V z = {};
      acc[r][v] = z + (bias ? bias[r] : T(0));
    }
  for (int64_t e = lo; e < hi; ++e) {
    const T* w = blocks + boff[e] + r0 * VC;
    const T* src = in + ioff[e];
    for (int c = 0; c < VC; ++c) {
      V x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load<V>(src + c * cs_in + v * L);
      for (int r = 0; r < RT; ++r) {
        const T wr = w[r * VC + c];
        for (int v = 0; v < NV; ++v) acc[r][v] += wr * x[v];
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) store<V>(out + r * cs_out + v * L, acc[r][v]);
}

// The vectors of a chunk: as many as keep the input one chunk reads (channels x kernel shifts) in L2.
static int64_t chunk_vectors(int64_t in_rows_touched, int64_t nvec, int64_t min_vec) {
  const int64_t per_vec = std::max<int64_t>(1, in_rows_touched) * kVecBytes;
  return std::min(nvec, std::max(min_vec, kL2Bytes / per_vec / min_vec * min_vec));
}

// out = bias + the pass's view weight times in, for every spatial row and chunk.
template <typename T, int VR, int VC>
static void gather(const T* in, T* out, const Pass& p, const T* blocks, const T* bias, int64_t touched) {
  constexpr int L = Vec<T>::lanes;
  constexpr int RT = (kVecBytes == 64 && VR >= 8) ? 8 : (VR < 4 ? VR : 4);
  constexpr int NVMAX = kAcc / RT > 8 ? 8 : kAcc / RT;
  const int64_t chunk = chunk_vectors(touched, p.nvec, NVMAX);
  at::parallel_for(0, p.nrows, grain(p.nrows), [&](int64_t i0, int64_t i1) {
    for (int64_t y = 0; y < p.rows; ++y)
      for (int64_t c0 = 0; c0 < p.nvec; c0 += chunk) {
        const int64_t n = std::min(chunk, p.nvec - c0);
        const T* in_y = in + y * p.in_row + c0 * L;
        for (int64_t i = i0; i < i1; ++i) {
          T* out_i = out + i * VR * p.cs_out + y * p.out_row + c0 * L;
          const int64_t lo = p.ptr[i], hi = p.ptr[i + 1];
          for_tiles<NVMAX>(n, [&](int64_t v0, auto nv) {  // the row groups of a tile back to back: in L1
            for (int r0 = 0; r0 < VR; r0 += RT)
              gather_tile<T, VR, VC, RT, decltype(nv)::value>(in_y + v0 * L, out_i + r0 * p.cs_out + v0 * L, p.cs_in,
                                                              p.cs_out, p.boff, p.ioff, blocks, lo, hi, r0,
                                                              bias ? bias + i * VR + r0 : nullptr);
          });
        }
      }
  });
}

// dblocks[e] += dY[block row's R channels] . in[block's C channels] over n vectors of one row, RS rows at a time.
template <typename T, int R, int C, int RS>
SIFTC_TILE void sddmm_tile(const T* __restrict dy, const T* __restrict in, int64_t cs_dy, int64_t cs_in,
                           const int64_t* __restrict ioff, T* __restrict dblocks, int64_t lo, int64_t hi, int64_t n) {
  for (int64_t e = lo; e < hi; ++e)
    for (int rs = 0; rs < R; rs += RS)
      sddmm_block<T, RS, C, true>(dy + rs * cs_dy, cs_dy, in + ioff[e], cs_in, n, dblocks + e * (R * C) + rs * C);
}

// dblocks (nb, R, C) = dY . in^T at the forward pass's blocks (p: the forward pass, dy laid out like its out).
template <typename T, int R, int C>
static void sddmm(const T* dy, const T* in, const Pass& p, T* dblocks, int64_t nb, int64_t touched) {
  constexpr int L = Vec<T>::lanes;
  constexpr int RS = sddmm_rows_at_once<R, C>();
  static_assert(R % RS == 0, "the row groups tile the block");
  std::fill(dblocks, dblocks + nb * R * C, T(0));
  const int64_t l1 = std::max<int64_t>(1, kL1Bytes / (R * kVecBytes));
  const int64_t chunk = std::min(chunk_vectors(touched, p.nvec, 1), l1);
  at::parallel_for(0, p.nrows, grain(p.nrows), [&](int64_t i0, int64_t i1) {
    for (int64_t y = 0; y < p.rows; ++y)
      for (int64_t c0 = 0; c0 < p.nvec; c0 += chunk) {
        const int64_t n = std::min(chunk, p.nvec - c0);
        for (int64_t i = i0; i < i1; ++i)
          sddmm_tile<T, R, C, RS>(dy + i * R * p.cs_out + y * p.out_row + c0 * L, in + y * p.in_row + c0 * L,
                                  p.cs_out, p.cs_in, p.ioff, dblocks, p.ptr[i], p.ptr[i + 1], n);
      }
  });
}

#define SIFTC_BLOCK_SHAPES(X) X(1, 1) X(4, 1) X(8, 1) X(16, 1) X(1, 4) X(4, 4)
#define SIFTC_SHAPE_LIST "1x1 (N:M), 4x1, 8x1, 16x1, 1x4, 4x4"

template <int A, int B> struct Shape { static constexpr int R = A, C = B; };

template <typename F>
static void dispatch(int64_t R, int64_t C, F&& f) {
#define SIFTC_CASE(r, c) \
  if (R == r && C == c) return f(Shape<r, c>{});
  SIFTC_BLOCK_SHAPES(SIFTC_CASE)
#undef SIFTC_CASE
  TORCH_CHECK(false, "siftc: no block conv kernel for ", R, "x", C, " blocks; the kernels take ", SIFTC_SHAPE_LIST);
}

// ---- geometry ----------------------------------------------------------------------------------------------
struct Geo {
  int64_t B, I, H, W, O, KH, KW, K, sh, sw, ph, pw, dh, dw, Ho, Wo, Bp, Hs, Ws;
  int64_t a(int64_t k) const { return (k / KW) * dh % sh; }  // kernel position k's phase and shift
  int64_t b(int64_t k) const { return (k % KW) * dw % sw; }
  int64_t dy(int64_t k) const { return (k / KW) * dh / sh; }
  int64_t dx(int64_t k) const { return (k % KW) * dw / sw; }
  int64_t plane() const { return Hs * Ws * Bp; }           // one phase of one channel in Xs
  int64_t cs_x() const { return sh * sw * plane(); }       // one channel of Xs
};

static Geo geometry(const at::Tensor& x, at::IntArrayRef shape, at::IntArrayRef stride, at::IntArrayRef padding,
                    at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && shape.size() == 4, "siftc: block_conv2d expects a 4-d input and a 4-d weight shape, "
              "got ", x.dim(), "-d input and weight shape ", shape);
  TORCH_CHECK(x.size(1) == shape[1], "siftc: input has ", x.size(1), " channels, weight shape ", shape,
              " expects ", shape[1], " (groups=1 only)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && stride[0] > 0 && stride[1] > 0 &&
                  dilation[0] > 0 && dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              "siftc: block_conv2d needs 2 positive strides and dilations and 2 non-negative paddings");
  Geo g{};
  g.B = x.size(0); g.I = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.O = shape[0]; g.KH = shape[2]; g.KW = shape[3]; g.K = g.KH * g.KW;
  g.sh = stride[0]; g.sw = stride[1]; g.ph = padding[0]; g.pw = padding[1]; g.dh = dilation[0]; g.dw = dilation[1];
  const int64_t Hp = g.H + 2 * g.ph, Wp = g.W + 2 * g.pw;
  g.Ho = (Hp - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (Wp - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(Hp - g.dh * (g.KH - 1) - 1 >= 0 && Wp - g.dw * (g.KW - 1) - 1 >= 0 && g.Ho > 0 && g.Wo > 0,
              "siftc: block_conv2d output would be empty for input ", x.sizes(), " and weight shape ", shape);
  g.Bp = (std::max<int64_t>(g.B, 1) + kBatchPad - 1) / kBatchPad * kBatchPad;
  g.Hs = (Hp + g.sh - 1) / g.sh;
  g.Ws = (Wp + g.sw - 1) / g.sw;
  return g;
}

// x (B, I, H, W) -> Xs (I, sh, sw, Hs, Ws, Bp), zero padded.
static at::Tensor pack_input(const at::Tensor& x, const Geo& g) {
  const int64_t eh = g.Hs * g.sh - (g.H + 2 * g.ph), ew = g.Ws * g.sw - (g.W + 2 * g.pw);
  at::Tensor xp = at::constant_pad_nd(x, {g.pw, g.pw + ew, g.ph, g.ph + eh, 0, 0, 0, g.Bp - g.B});
  return xp.view({g.Bp, g.I, g.Hs, g.sh, g.Ws, g.sw}).permute({1, 3, 5, 2, 4, 0}).contiguous();
}

// Per entry of the (rows, K*cols/CB) view index (ptr, bcol): the element offset of its input, channel block
// bcol % (cols/CB) at kernel position bcol / (cols/CB); `offset(k)` the kernel position's shift.
template <typename F>
static at::Tensor input_offsets(const at::Tensor& bcol, int64_t nbc_ch, int64_t CB, int64_t cs, F&& offset) {
  const int64_t nb = bcol.numel();
  at::Tensor out = at::empty({nb}, at::kLong);
  const int32_t* col = bcol.const_data_ptr<int32_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t e = 0; e < nb; ++e) o[e] = (col[e] % nbc_ch) * CB * cs + offset(col[e] / nbc_ch);
  return out;
}

static void check_index(const at::Tensor& blocks, const at::Tensor& ptr, const at::Tensor& bcol, int64_t nbr,
                        const char* what) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.is_contiguous() && bcol.scalar_type() == at::kInt &&
                  bcol.is_contiguous(),
              "siftc: the ", what, " block index must be (int64 ptr, int32 bcol), contiguous");
  TORCH_CHECK(ptr.numel() == nbr + 1 && bcol.numel() == blocks.size(0) &&
                  ptr.const_data_ptr<int64_t>()[nbr] == blocks.size(0),
              "siftc: the ", what, " block index (", ptr.numel() - 1, " block rows, ", bcol.numel(),
              " blocks) is not this weight's (", nbr, " block rows, ", blocks.size(0),
              " blocks); rebuild it with siftc.runtime.block_conv.index");
}

static void check(const at::Tensor& x, const at::Tensor& blocks, at::IntArrayRef shape, const at::Tensor& ptr,
                  const at::Tensor& bcol) {
  TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), "siftc: block kernels run on CPU tensors only");
  TORCH_CHECK(x.scalar_type() == blocks.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "siftc: block kernels need float32 (or float64) input and blocks of one dtype, got ", x.scalar_type(),
              " and ", blocks.scalar_type());
  TORCH_CHECK(blocks.dim() == 3 && blocks.is_contiguous(), "siftc: blocks must be contiguous (nblocks, R, C), got ",
              blocks.sizes());
  const int64_t R = blocks.size(1), C = blocks.size(2);
  TORCH_CHECK(shape.size() == 4 && R > 0 && C > 0 && shape[0] % R == 0 && shape[1] % C == 0,
              "siftc: weight shape ", shape, " does not divide into ", R, "x", C, " blocks");
  check_index(blocks, ptr, bcol, shape[0] / R, "forward");
}

// The forward pass over Xs into Y (O, Ho, Wo, Bp).
static Pass forward_pass(const Geo& g, const at::Tensor& ptr, const at::Tensor& ioff, const at::Tensor& boff,
                         int64_t R, int lanes) {
  return {ptr.const_data_ptr<int64_t>(), boff.const_data_ptr<int64_t>(), ioff.const_data_ptr<int64_t>(),
          g.O / R, g.cs_x(), g.Ho * g.Wo * g.Bp, g.Ho, g.Ws * g.Bp, g.Wo * g.Bp, g.Wo * g.Bp / lanes};
}

static at::Tensor block_offsets(int64_t nb, int64_t RC) { return at::arange(nb, at::kLong).mul_(RC); }

static at::Tensor forward_offsets(const Geo& g, const at::Tensor& bcol, int64_t C) {
  return input_offsets(bcol, g.I / C, C, g.cs_x(), [&](int64_t k) {
    return (g.a(k) * g.sw + g.b(k)) * g.plane() + (g.dy(k) * g.Ws + g.dx(k)) * g.Bp;
  });
}

// ---- ops ---------------------------------------------------------------------------------------------------
// y = conv2d(x, W) + bias for the weight of `shape` (O, I, KH, KW) held as `blocks` (nb, R, C) with the
// (O, K*I) view's index (ptr, bcol); the backward's index (tptr, tcol, tperm) rides along for autograd.
// Returns (y, xs): xs the packed input the backward reuses.
std::tuple<at::Tensor, at::Tensor> block_conv2d(const at::Tensor& x, const at::Tensor& blocks, at::IntArrayRef shape,
                                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                                const at::Tensor& ptr, const at::Tensor& bcol,
                                                const at::Tensor& /*tptr*/, const at::Tensor& /*tcol*/,
                                                const at::Tensor& /*tperm*/) {
  check(x, blocks, shape, ptr, bcol);
  const Geo g = geometry(x, shape, stride, padding, dilation);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == g.O && b.scalar_type() == x.scalar_type()),
              "siftc: bias must have ", g.O, " entries of the input's dtype");
  const int64_t R = blocks.size(1), C = blocks.size(2);
  const at::Tensor xs = pack_input(x, g);
  at::Tensor y = at::empty({g.O, g.Ho, g.Wo, g.Bp}, x.options());
  const at::Tensor ioff = forward_offsets(g, bcol, C), boff = block_offsets(blocks.size(0), R * C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d", [&] {
    const Pass p = forward_pass(g, ptr, ioff, boff, R, Vec<scalar_t>::lanes);
    dispatch(R, C, [&](auto s) {
      constexpr int SR = decltype(s)::R, SC = decltype(s)::C;
      gather<scalar_t, SR, SC>(xs.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p,
                               blocks.const_data_ptr<scalar_t>(), b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                               g.I * g.KH);
    });
  });
  return {y.narrow(3, 0, g.B).permute({3, 0, 1, 2}).contiguous(), xs};
}

// Returns (dx, dblocks); tptr/tcol: the (I, K*O) view's index, tperm: its (nb, C, R) blocks' entries in the
// forward blocks' flat order.
std::tuple<at::Tensor, at::Tensor> block_conv2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& xs, const at::Tensor& blocks, at::IntArrayRef shape,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, const at::Tensor& ptr,
    const at::Tensor& bcol, const at::Tensor& tptr, const at::Tensor& tcol, const at::Tensor& tperm, bool need_input,
    bool need_weight) {
  check(x, blocks, shape, ptr, bcol);
  const Geo g = geometry(x, shape, stride, padding, dilation);
  const int64_t R = blocks.size(1), C = blocks.size(2), nb = blocks.size(0);
  check_index(blocks, tptr, tcol, g.I / C, "transposed");
  TORCH_CHECK(tperm.scalar_type() == at::kInt && tperm.numel() == blocks.numel(),
              "siftc: tperm must be the (nnz,) int32 map of the transposed blocks");
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.B && grad.size(1) == g.O && grad.size(2) == g.Ho &&
                  grad.size(3) == g.Wo && grad.scalar_type() == x.scalar_type(),
              "siftc: block_conv2d grad_output has shape ", grad.sizes(), ", expected [", g.B, ", ", g.O, ", ", g.Ho,
              ", ", g.Wo, "]");
  TORCH_CHECK(xs.dim() == 6 && xs.size(0) == g.I && xs.size(3) == g.Hs && xs.size(4) == g.Ws && xs.size(5) == g.Bp &&
                  xs.is_contiguous() && xs.scalar_type() == x.scalar_type(),
              "siftc: packed input has shape ", xs.sizes(), ", not block_conv2d's second output for this input");
  at::Tensor dx = at::empty({0}, x.options()), db = at::empty({0}, x.options());
  // dY (B, O, Ho, Wo) -> dYpad (O, HD, WD, Bp): interior at (PH, PW), PH the largest phase shift
  const int64_t PH = g.dy(g.K - g.KW), PW = g.dx(g.KW - 1), HD = PH + g.Hs, WD = PW + g.Ws;
  at::Tensor dyp = at::constant_pad_nd(grad, {PW, WD - PW - g.Wo, PH, HD - PH - g.Ho, 0, 0, 0, g.Bp - g.B})
                       .permute({1, 2, 3, 0}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_conv2d_backward", [&] {
    using T = scalar_t;
    constexpr int L = Vec<T>::lanes;
    dispatch(R, C, [&](auto s) {
      constexpr int SR = decltype(s)::R, SC = decltype(s)::C;
      if (need_weight) {
        const at::Tensor ioff = forward_offsets(g, bcol, C), boff = block_offsets(nb, R * C);
        Pass p = forward_pass(g, ptr, ioff, boff, R, L);
        // dY as the forward's out: channel stride HD*WD*Bp, row stride WD*Bp, from the interior
        p.cs_out = HD * WD * g.Bp;
        p.out_row = WD * g.Bp;
        db = at::empty_like(blocks);
        sddmm<T, SR, SC>(dyp.const_data_ptr<T>() + (PH * WD + PW) * g.Bp, xs.const_data_ptr<T>(), p,
                         db.data_ptr<T>(), nb, g.I * g.KH);
      }
      if (need_input) {
        const at::Tensor tblocks = blocks.reshape(-1).index_select(0, tperm).view({nb, C, R});
        at::Tensor dxs = at::empty({g.I, g.sh, g.sw, g.Hs, g.Ws, g.Bp}, x.options());
        const int32_t* col = tcol.const_data_ptr<int32_t>();
        const int64_t* tp = tptr.const_data_ptr<int64_t>();
        const int64_t nbr = g.I / C, nbc_ch = g.O / R;
        const at::Tensor ioff_all = input_offsets(tcol, nbc_ch, R, HD * WD * g.Bp, [&](int64_t k) {
          return ((PH - g.dy(k)) * WD + (PW - g.dx(k))) * g.Bp;
        });
        const int64_t* io = ioff_all.const_data_ptr<int64_t>();
        for (int64_t a = 0; a < g.sh; ++a)
          for (int64_t b = 0; b < g.sw; ++b) {  // the phase's entries, in row order
            at::Tensor pptr = at::empty({nbr + 1}, at::kLong), pboff = at::empty({nb}, at::kLong),
                       pioff = at::empty({nb}, at::kLong);
            int64_t *q = pptr.data_ptr<int64_t>(), *qb = pboff.data_ptr<int64_t>(), *qi = pioff.data_ptr<int64_t>();
            int64_t m = 0;
            for (int64_t i = 0; i < nbr; ++i) {
              q[i] = m;
              for (int64_t e = tp[i]; e < tp[i + 1]; ++e) {
                const int64_t k = col[e] / nbc_ch;
                if (g.a(k) != a || g.b(k) != b) continue;
                qb[m] = e * R * C;
                qi[m++] = io[e];
              }
            }
            q[nbr] = m;
            const Pass p{q, qb, qi, nbr, HD * WD * g.Bp, g.cs_x(), g.Hs, WD * g.Bp, g.Ws * g.Bp, g.Ws * g.Bp / L};
            gather<T, SC, SR>(dyp.const_data_ptr<T>(), dxs.data_ptr<T>() + (a * g.sw + b) * g.plane(), p,
                              tblocks.const_data_ptr<T>(), nullptr, g.O * g.KH);
          }
        dx = dxs.permute({5, 0, 3, 1, 4, 2})
                 .reshape({g.Bp, g.I, g.Hs * g.sh, g.Ws * g.sw})
                 .narrow(0, 0, g.B)
                 .narrow(2, g.ph, g.H)
                 .narrow(3, g.pw, g.W)
                 .contiguous();
      }
    });
  });
  return {dx, db};
}

TORCH_LIBRARY_FRAGMENT(siftc, m) {
  // blocks (nb, R, C) with shape (O, I, KH, KW) stand for the weight; ptr/bcol index its (O, K*I) view,
  // tptr/tcol its (I, K*O) view, tperm maps the latter's blocks to the former's entries.
  m.def("block_conv2d(Tensor x, Tensor blocks, int[] shape, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, Tensor ptr, Tensor bcol, Tensor tptr, Tensor tcol, Tensor tperm) -> (Tensor, Tensor)");
  m.def("block_conv2d_backward(Tensor grad, Tensor x, Tensor xs, Tensor blocks, int[] shape, int[2] stride, "
        "int[2] padding, int[2] dilation, Tensor ptr, Tensor bcol, Tensor tptr, Tensor tcol, Tensor tperm, "
        "bool need_input, bool need_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(siftc, CPU, m) {
  m.impl("block_conv2d", &block_conv2d);
  m.impl("block_conv2d_backward", &block_conv2d_backward);
}

}  // namespace siftc_block_conv
