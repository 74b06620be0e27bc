// Block-sparse and N:M Linear forward and backward on CPU: kernels that reuse each loaded operand vector.
//
// Layout (BSR). A weight of shape (O, I) whose non-zeros are whole R x C blocks (R output rows x C inputs)
// is held as `blocks` (nb, R, C), contiguous, in block-row-major order, plus
//   ptr  (O/R + 1) int64   block row i's blocks are ptr[i] .. ptr[i+1]
//   bcol (nb)      int32   their block columns, ascending within a row
//   tptr (I/C + 1) int64   the transposed view: block column j's blocks are tptr[j] .. tptr[j+1]
//   trow (nb)      int32   their block rows, ascending
//   tblk (nb)      int32   their indexes in `blocks`
// An N:M weight (N non-zeros in every M consecutive inputs of a row) is the same layout with 1 x 1 blocks:
// plain column indices, every row the same length. `block_index` builds all of it from a layer's flat
// ascending positions in O(nnz), with `perm`: blocks.flatten()[k] = values[perm[k]].
//
// Activations are packed batch-innermost as the unstructured kernels do (sparse_ops.cpp): X (B, I) ->
// Xp (I, Bp), the batch padded to a multiple of 16, so one weight times one input row is a run of vector
// FMAs over the batch. Three kernels, each on a register tile of rows x batch vectors:
//   gather   Out[rows of block row i] += sum over its blocks W_blk . In[the block's columns]: the tile's
//            RT rows of a block share every loaded In vector (RT FMAs per load). Used when the block has at
//            least as many rows as columns (R x 1, 4 x 4, 1 x 1); column panels keep In's slice in L2.
//   scatter  for each block column j: In[j's columns] held in registers, Out[row] += W_blk . In for each
//            block of the column: C FMAs per Out load/store. Used for 1 x C blocks (one output row, no
//            shared input), each thread owning a range of Out rows, in L2-sized panels.
//   sddmm    dW_blk[r][c] = dot(dY[row r], X[col c]) over the batch for every block: R + C loads per R x C
//            FMAs, dY's R rows staying in L1 across the block row's blocks.
// forward  Y = X W^T    gather (R >= C) or scatter (R < C) of W over Xp
// dX       dX = dY W    the same on W^T (blocks C x R read transposed in place: no gather of values)
// dW       sddmm of dYp and Xp at the blocks, (nb, R, C) like `blocks`
// fp32 and fp64; vectors of 32 bytes (AVX2) or 64 (AVX-512) as -march=native allows, through GCC vector
// extensions; every core through at::parallel_for.
// ATen's per-operator headers, not <ATen/ATen.h>, whose declarations of every operator cost this file
// 14 s of its 39 s compile (CPU time, -O3, measured); the generated kernels are the same.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "block_simd.h"

namespace siftc_block {

// Element (r, c) of a VR x VC view block: stored as it is (TR false) or as its VC x VR transpose (TR true,
// the forward's block read for W^T).
template <typename T, int VR, int VC, bool TR>
static inline T wat(const T* b, int r, int c) { return TR ? b[c * VR + r] : b[r * VC + c]; }

// Every thread takes a range of block rows and walks them panel by panel: f(i, lo, hi, p) for block row i's
// entries [lo, hi) whose column lies in panel p (columns [p*pcols, (p+1)*pcols)); a cursor per row marks
// where its next panel starts, since columns ascend within a row.
template <typename F>
static void by_row_panels(int64_t nbr, int64_t ncols, int64_t pcols, const int64_t* ptr, const int32_t* col, F&& f) {
  const int64_t npanels = std::max<int64_t>(1, (ncols + pcols - 1) / pcols);
  at::parallel_for(0, nbr, grain(nbr), [&](int64_t i0, int64_t i1) {
    std::vector<int64_t> cur(ptr + i0, ptr + i1);
    for (int64_t p = 0; p < npanels; ++p) {
      const int64_t limit = p + 1 == npanels ? INT64_MAX : (p + 1) * pcols;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t lo = cur[i - i0], end = ptr[i + 1];
        int64_t hi = lo;
        while (hi < end && col[hi] < limit) ++hi;
        cur[i - i0] = hi;
        f(i, lo, hi, p);
      }
    }
  });
}

// ---- gather: out[RT rows from r0 of block row, NV vectors] (+)= sum over entries [lo, hi) ----------------
// Entry e is block blk[e] (or e when blk is null) at view block column col[e]; `in` and `out` point at the
// tile's first vector (in: row 0; out: the tile's first row); ld is the row length, Bp elements.
template <typename T, int VR, int VC, bool TR, int RT, int NV>
SIFTC_TILE void gather_tile(const T* __restrict in, T* __restrict out, int64_t ld, const int32_t* __restrict col,
                            const int32_t* __restrict blk, const T* __restrict blocks, int64_t lo, int64_t hi, int r0,
                            bool first, const T* bias) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) {
      if (first) {
        V z = {};
        acc[r][v] = z + (bias ? bias[r] : T(0));
      } else {
        acc[r][v] = load<V>(out + r * ld + v * L);
      }
    }
  for (int64_t e = lo; e < hi; ++e) {
    const T* w = blocks + (int64_t)(blk ? blk[e] : e) * (VR * VC);
    const T* src = in + (int64_t)col[e] * VC * ld;
    for (int c = 0; c < VC; ++c) {
      V x[NV];
      for (int v = 0; v < NV; ++v) x[v] = load<V>(src + c * ld + v * L);
      for (int r = 0; r < RT; ++r) {
        const T wr = wat<T, VR, VC, TR>(w, r0 + r, c);
        for (int v = 0; v < NV; ++v) acc[r][v] += wr * x[v];
      }
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int v = 0; v < NV; ++v) store<V>(out + r * ld + v * L, acc[r][v]);
}

// out (nbr*VR, ld) = bias + the view weight (block rows nbr, lists ptr/col/blk) times in (in_bcols*VC, ld).
template <typename T, int VR, int VC, bool TR>
static void gather(const T* in, T* out, int64_t ld, int64_t nbr, int64_t in_bcols, const int64_t* ptr,
                   const int32_t* col, const int32_t* blk, const T* blocks, const T* bias) {
  constexpr int L = Vec<T>::lanes;
  constexpr int RT = (kVecBytes == 64 && VR >= 8) ? 8 : (VR < 4 ? VR : 4);
  constexpr int NVMAX = kAcc / RT > 8 ? 8 : kAcc / RT;
  const int64_t nvec = ld / L;
  const int64_t pcols = std::max<int64_t>(1, kL2Bytes / (VC * ld * (int64_t)sizeof(T)));  // block columns a panel
  by_row_panels(nbr, in_bcols, pcols, ptr, col, [&](int64_t i, int64_t lo, int64_t hi, int64_t p) {
    if (p > 0 && lo == hi) return;  // panel 0 writes every row (bias or zero)
    // the row groups of one batch tile run back to back: the In lines they share are still in L1
    for_tiles<NVMAX>(nvec, [&](int64_t v0, auto nv) {
      for (int r0 = 0; r0 < VR; r0 += RT)
        gather_tile<T, VR, VC, TR, RT, decltype(nv)::value>(in + v0 * L, out + (i * VR + r0) * ld + v0 * L, ld, col,
                                                            blk, blocks, lo, hi, r0, p == 0,
                                                            bias ? bias + i * VR + r0 : nullptr);
    });
  });
}

// ---- scatter: out[rows of each entry's block] += W_blk[:, c0 .. c0+CT) . in[CT rows, NV vectors] ---------
// `in` points at the block column's row c0, tile's first vector; `out` at row 0, the tile's first vector.
template <typename T, int VR, int VC, bool TR, int CT, int NV>
SIFTC_TILE void scatter_tile(const T* __restrict in, T* __restrict out, int64_t ld,
                             const int32_t* __restrict row, const int32_t* __restrict blk,
                             const T* __restrict blocks, int64_t lo, int64_t hi, int c0) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  V x[CT][NV];
  for (int c = 0; c < CT; ++c)
    for (int v = 0; v < NV; ++v) x[c][v] = load<V>(in + c * ld + v * L);
  for (int64_t e = lo; e < hi; ++e) {
    const T* w = blocks + (int64_t)(blk ? blk[e] : e) * (VR * VC);
    T* dst = out + (int64_t)row[e] * VR * ld;
    for (int r = 0; r < VR; ++r) {
      V a[NV];
      for (int v = 0; v < NV; ++v) a[v] = load<V>(dst + r * ld + v * L);
      for (int c = 0; c < CT; ++c) {
        const T wr = wat<T, VR, VC, TR>(w, r, c0 + c);
        for (int v = 0; v < NV; ++v) a[v] += wr * x[c][v];
      }
      for (int v = 0; v < NV; ++v) store<V>(dst + r * ld + v * L, a[v]);
    }
  }
}

// out (nbr*VR, ld) = bias + the view weight times in (nbc*VC, ld), walking the view's block columns
// (lists cptr/row/blk, rows ascending within a column). A thread owns a range of out's block rows and
// walks it in panels that stay in L2; per column a cursor marks the panel's first entry.
template <typename T, int VR, int VC, bool TR>
static void scatter(const T* in, T* out, int64_t ld, int64_t nbr, int64_t nbc, const int64_t* cptr,
                    const int32_t* row, const int32_t* blk, const T* blocks, const T* bias) {
  constexpr int L = Vec<T>::lanes;
  constexpr int CT = VC < (kVecBytes == 64 ? 8 : 4) ? VC : (kVecBytes == 64 ? 8 : 4);
  constexpr int NVMAX = (kAcc - 2) / (CT + 1) < 1 ? 1 : (kAcc - 2) / (CT + 1);
  const int64_t nvec = ld / L;
  const int64_t prows = std::max<int64_t>(1, kL2Bytes / (VR * ld * (int64_t)sizeof(T)));  // block rows a panel
  at::parallel_for(0, nbr, grain(nbr), [&](int64_t i0, int64_t i1) {
    for (int64_t r = i0 * VR; r < i1 * VR; ++r) {
      T* o = out + r * ld;
      std::fill(o, o + ld, bias ? bias[r] : T(0));
    }
    std::vector<int64_t> cur(nbc);
    for (int64_t j = 0; j < nbc; ++j)
      cur[j] = std::lower_bound(row + cptr[j], row + cptr[j + 1], (int32_t)i0) - row;
    for (int64_t a = i0; a < i1; a += prows) {
      const int64_t b = std::min(i1, a + prows);
      for (int64_t j = 0; j < nbc; ++j) {
        const int64_t lo = cur[j], end = cptr[j + 1];
        int64_t hi = lo;
        while (hi < end && row[hi] < b) ++hi;
        cur[j] = hi;
        if (lo == hi) continue;
        for_tiles<NVMAX>(nvec, [&](int64_t v0, auto nv) {  // column groups back to back: Out's lines in L1
          for (int c0 = 0; c0 < VC; c0 += CT)
            scatter_tile<T, VR, VC, TR, CT, decltype(nv)::value>(in + (j * VC + c0) * ld + v0 * L, out + v0 * L, ld,
                                                                 row, blk, blocks, lo, hi, c0);
        });
      }
    }
  });
}

// ---- sddmm: dblocks[e] = dY[block row's R rows] . X[block's C columns]^T over the batch -------------------
// Every block in [lo, hi) of one block row, RS of its rows at a time; `dy0` points at the block row's first row.
template <typename T, int R, int C, int RS>
SIFTC_TILE void sddmm_rows(const T* __restrict dy0, const T* __restrict x, int64_t ld, const int32_t* __restrict col,
                           T* __restrict dblocks, int64_t lo, int64_t hi) {
  const int64_t nvec = ld / Vec<T>::lanes;
  for (int64_t e = lo; e < hi; ++e)
    for (int rs = 0; rs < R; rs += RS)  // row groups back to back: X's C rows stay in L1
      sddmm_block<T, RS, C, false>(dy0 + rs * ld, ld, x + (int64_t)col[e] * C * ld, ld, nvec, dblocks + e * (R * C) + rs * C);
}

template <typename T, int R, int C>
static void sddmm(const T* dy, const T* x, int64_t ld, int64_t nbr, int64_t nbc, const int64_t* ptr,
                  const int32_t* col, T* dblocks) {
  constexpr int RS = sddmm_rows_at_once<R, C>();
  static_assert(R % RS == 0, "the row groups tile the block");
  const int64_t pcols = std::max<int64_t>(1, kL2Bytes / (C * ld * (int64_t)sizeof(T)));
  by_row_panels(nbr, nbc, pcols, ptr, col, [&](int64_t i, int64_t lo, int64_t hi, int64_t) {
    sddmm_rows<T, R, C, RS>(dy + i * R * ld, x, ld, col, dblocks, lo, hi);
  });
}

// ---- one pattern's three passes ----------------------------------------------------------------------------
struct Index {
  int64_t nbr, nbc, ld;
  const int64_t *ptr, *tptr;
  const int32_t *bcol, *trow, *tblk;
};

template <typename T, int R, int C>
struct Kernels {
  static void forward(const T* xp, T* yp, const T* blocks, const T* bias, const Index& ix) {
    if constexpr (R >= C)
      gather<T, R, C, false>(xp, yp, ix.ld, ix.nbr, ix.nbc, ix.ptr, ix.bcol, nullptr, blocks, bias);
    else
      scatter<T, R, C, false>(xp, yp, ix.ld, ix.nbr, ix.nbc, ix.tptr, ix.trow, ix.tblk, blocks, bias);
  }
  static void grad_input(const T* dyp, T* dxp, const T* blocks, const Index& ix) {  // W^T: C x R view blocks
    if constexpr (C >= R)
      gather<T, C, R, true>(dyp, dxp, ix.ld, ix.nbc, ix.nbr, ix.tptr, ix.trow, ix.tblk, blocks, nullptr);
    else
      scatter<T, C, R, true>(dyp, dxp, ix.ld, ix.nbc, ix.nbr, ix.ptr, ix.bcol, nullptr, blocks, nullptr);
  }
  static void grad_weight(const T* dyp, const T* xp, T* dblocks, const Index& ix) {
    sddmm<T, R, C>(dyp, xp, ix.ld, ix.nbr, ix.nbc, ix.ptr, ix.bcol, dblocks);
  }
};

#define SIFTC_BLOCK_SHAPES(X) X(1, 1) X(4, 1) X(8, 1) X(16, 1) X(1, 4) X(4, 4)
#define SIFTC_SHAPE_LIST "1x1 (N:M), 4x1, 8x1, 16x1, 1x4, 4x4"

template <typename T, typename F>
static void dispatch(int64_t R, int64_t C, F&& f) {
#define SIFTC_CASE(r, c) \
  if (R == r && C == c) return f(Kernels<T, r, c>{});
  SIFTC_BLOCK_SHAPES(SIFTC_CASE)
#undef SIFTC_CASE
  TORCH_CHECK(false, "siftc: no block kernel for ", R, "x", C, " blocks; the kernels take ", SIFTC_SHAPE_LIST);
}

// ---- packing (batch innermost) -----------------------------------------------------------------------------
static int64_t batch_pad(int64_t b) { return (std::max<int64_t>(b, 1) + kBatchPad - 1) / kBatchPad * kBatchPad; }

// (B, F) -> (F, Bp), zero padded: ATen's blocked 2-d transpose copy.
static at::Tensor pack(const at::Tensor& x, int64_t Bp) {
  at::Tensor xc = x.contiguous();
  if (Bp != x.size(0)) xc = at::constant_pad_nd(xc, {0, 0, 0, Bp - x.size(0)});
  return xc.t().contiguous();
}

// (F, Bp) -> (B, F): transpose whole, then keep the first B rows (a fresh tensor, not a view).
static at::Tensor unpack(const at::Tensor& p, int64_t B) {
  at::Tensor y = p.t().contiguous();
  if (B != p.size(1)) y.resize_({B, p.size(0)});
  return y;
}

// ---- checks ------------------------------------------------------------------------------------------------
static Index check(const at::Tensor& x, const at::Tensor& blocks, at::IntArrayRef shape, const at::Tensor& ptr,
                   const at::Tensor& bcol, const at::Tensor& tptr, const at::Tensor& trow, const at::Tensor& tblk,
                   int64_t ld) {
  TORCH_CHECK(x.device().is_cpu() && blocks.device().is_cpu(), "siftc: block kernels run on CPU tensors only");
  TORCH_CHECK(x.scalar_type() == blocks.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "siftc: block kernels need float32 (or float64) input and blocks of one dtype, got ", x.scalar_type(),
              " and ", blocks.scalar_type());
  TORCH_CHECK(shape.size() == 2 && x.dim() == 2 && x.size(1) == shape[1], "siftc: block_linear expects a 2-d input "
              "(N, ", shape.size() == 2 ? shape[1] : -1, ") for weight shape ", shape, ", got ", x.sizes());
  TORCH_CHECK(blocks.dim() == 3 && blocks.is_contiguous(), "siftc: blocks must be contiguous (nblocks, R, C), got ",
              blocks.sizes());
  const int64_t R = blocks.size(1), C = blocks.size(2), nb = blocks.size(0);
  TORCH_CHECK(R > 0 && C > 0 && shape[0] % R == 0 && shape[1] % C == 0, "siftc: weight shape ", shape,
              " does not divide into ", R, "x", C, " blocks");
  const int64_t nbr = shape[0] / R, nbc = shape[1] / C;
  for (const auto* t : {&ptr, &tptr})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "siftc: block index ptr/tptr must be int64");
  for (const auto* t : {&bcol, &trow, &tblk})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->numel() == nb,
                "siftc: the block index has ", t->numel(), " ", t->scalar_type(), " entries in bcol/trow/tblk for ",
                nb, " blocks (int32, one a block); rebuild it with block_index from this layer's positions");
  TORCH_CHECK(ptr.numel() == nbr + 1 && tptr.numel() == nbc + 1 && ptr.data_ptr<int64_t>()[nbr] == nb &&
                  tptr.data_ptr<int64_t>()[nbc] == nb,
              "siftc: the block index is for another layer (", ptr.numel() - 1, " block rows, ", tptr.numel() - 1,
              " block columns; this weight has ", nbr, " and ", nbc, " of ", R, "x", C, " with ", nb,
              " blocks); rebuild it with block_index");
  return {nbr, nbc, ld, ptr.data_ptr<int64_t>(), tptr.data_ptr<int64_t>(), bcol.data_ptr<int32_t>(),
          trow.data_ptr<int32_t>(), tblk.data_ptr<int32_t>()};
}

// ---- ops ---------------------------------------------------------------------------------------------------
// y = x W^T + bias for the weight of `shape` (O, I) held as `blocks`; returns (y, xp), xp the packed input
// the backward reuses.
std::tuple<at::Tensor, at::Tensor> block_linear(const at::Tensor& x, const at::Tensor& blocks, at::IntArrayRef shape,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                                                const at::Tensor& bcol, const at::Tensor& tptr, const at::Tensor& trow,
                                                const at::Tensor& tblk) {
  const int64_t B = x.size(0), Bp = batch_pad(B);
  const Index ix = check(x, blocks, shape, ptr, bcol, tptr, trow, tblk, Bp);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || (b.numel() == shape[0] && b.scalar_type() == x.scalar_type()),
              "siftc: bias must have ", shape[0], " entries of the input's dtype");
  const at::Tensor xp = pack(x, Bp);
  at::Tensor yp = at::empty({shape[0], Bp}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_linear", [&] {
    dispatch<scalar_t>(blocks.size(1), blocks.size(2), [&](auto k) {
      k.forward(xp.const_data_ptr<scalar_t>(), yp.data_ptr<scalar_t>(), blocks.const_data_ptr<scalar_t>(),
                b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, ix);
    });
  });
  return {unpack(yp, B), xp};
}

// Returns (dx, dblocks): dx (N, I) if need_input, dblocks (nb, R, C) if need_weight, else empty tensors.
std::tuple<at::Tensor, at::Tensor> block_linear_backward(const at::Tensor& grad, const at::Tensor& x,
                                                         const at::Tensor& xp, const at::Tensor& blocks,
                                                         at::IntArrayRef shape, const at::Tensor& ptr,
                                                         const at::Tensor& bcol, const at::Tensor& tptr,
                                                         const at::Tensor& trow, const at::Tensor& tblk,
                                                         bool need_input, bool need_weight) {
  const int64_t B = x.size(0), Bp = batch_pad(B);
  const Index ix = check(x, blocks, shape, ptr, bcol, tptr, trow, tblk, Bp);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == shape[0] &&
                  grad.scalar_type() == x.scalar_type(),
              "siftc: block_linear grad_output has shape ", grad.sizes(), ", expected [", B, ", ", shape[0], "]");
  TORCH_CHECK(xp.dim() == 2 && xp.size(0) == shape[1] && xp.size(1) == Bp && xp.is_contiguous() &&
                  xp.scalar_type() == x.scalar_type(),
              "siftc: packed input has shape ", xp.sizes(), ", expected [", shape[1], ", ", Bp,
              "] (block_linear's second output)");
  at::Tensor dx = at::empty({0}, x.options()), db = at::empty({0}, x.options());
  const at::Tensor gp = pack(grad, Bp);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "block_linear_backward", [&] {
    dispatch<scalar_t>(blocks.size(1), blocks.size(2), [&](auto k) {
      if (need_weight) {
        db = at::empty_like(blocks);
        k.grad_weight(gp.const_data_ptr<scalar_t>(), xp.const_data_ptr<scalar_t>(), db.data_ptr<scalar_t>(), ix);
      }
      if (need_input) {
        at::Tensor dxp = at::empty({shape[1], Bp}, x.options());
        k.grad_input(gp.const_data_ptr<scalar_t>(), dxp.data_ptr<scalar_t>(), blocks.const_data_ptr<scalar_t>(), ix);
        dx = unpack(dxp, B);
      }
    });
  });
  return {dx, db};
}

// positions: the (nnz,) ascending flat row-major indices of a weight of `shape` (O, I) whose non-zeros are
// whole R x C blocks. Returns (ptr, bcol, perm, tptr, trow, tblk) as described at the top. O(nnz): block
// rows counted, their blocks listed from each block's top-left entry (positions ascend, so in column
// order), every entry placed with a cursor moving along its block row's list, then the transposed lists by
// a counting sort over block columns.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_index(
    const at::Tensor& positions_in, at::IntArrayRef shape, int64_t R, int64_t C) {
  TORCH_CHECK(positions_in.scalar_type() == at::kInt && positions_in.dim() == 1,
              "siftc: block_index needs the (nnz,) int32 positions, got ", positions_in.scalar_type(), " of shape ",
              positions_in.sizes());
  TORCH_CHECK(shape.size() == 2, "siftc: block_index takes a Linear's (out, in) weight shape, got ", shape);
  TORCH_CHECK(R > 0 && C > 0 && shape[0] % R == 0 && shape[1] % C == 0, "siftc: weight shape ", shape,
              " does not divide into ", R, "x", C, " blocks");
  const int64_t O = shape[0], I = shape[1], RC = R * C, nbr = O / R, nbc = I / C;
  TORCH_CHECK(O * I < (int64_t(1) << 31), "siftc: weight of shape ", shape, " has more than 2^31 entries");
  const at::Tensor positions = positions_in.contiguous();
  const int32_t* pos = positions.const_data_ptr<int32_t>();
  const int64_t nnz = positions.numel();
  TORCH_CHECK(nnz % RC == 0, "siftc: ", nnz, " non-zeros are not a whole number of ", R, "x", C, " blocks");
  for (int64_t n = 0; n < nnz; ++n)
    TORCH_CHECK(pos[n] >= 0 && pos[n] < O * I && (n == 0 || pos[n] > pos[n - 1]), "siftc: positions must be "
                "ascending, distinct and in [0, ", O * I, "); entry ", n, " is ", pos[n]);
  const int64_t nb = nnz / RC;
  at::Tensor ptr_t = at::zeros({nbr + 1}, at::kLong), bcol_t = at::empty({nb}, at::kInt);
  int64_t* ptr = ptr_t.data_ptr<int64_t>();
  int32_t* bcol = bcol_t.data_ptr<int32_t>();
  for (int64_t n = 0; n < nnz; ++n) {
    const int64_t o = pos[n] / I, c = pos[n] % I;
    if (o % R == 0 && c % C == 0) ++ptr[o / R + 1];
  }
  for (int64_t i = 0; i < nbr; ++i) ptr[i + 1] += ptr[i];
  TORCH_CHECK(ptr[nbr] == nb, "siftc: the positions are not whole ", R, "x", C, " blocks: ", ptr[nbr],
              " blocks have their first entry, ", nnz, " non-zeros make ", nb);
  std::vector<int64_t> fill(ptr, ptr + nbr);
  for (int64_t n = 0; n < nnz; ++n) {
    const int64_t o = pos[n] / I, c = pos[n] % I;
    if (o % R == 0 && c % C == 0) bcol[fill[o / R]++] = int32_t(c / C);
  }
  at::Tensor perm_t = at::empty({nnz}, at::kInt);
  int32_t* perm = perm_t.data_ptr<int32_t>();
  int64_t k = 0, row = -1;
  for (int64_t n = 0; n < nnz; ++n) {
    const int64_t o = pos[n] / I, c = pos[n] % I, i = o / R, j = c / C;
    if (o != row) row = o, k = ptr[i];
    while (k < ptr[i + 1] && bcol[k] < j) ++k;
    TORCH_CHECK(k < ptr[i + 1] && bcol[k] == j, "siftc: the positions are not whole ", R, "x", C, " blocks: (row ",
                o, ", column ", c, ") is a non-zero but block (", i, ", ", j, ")'s first entry is not");
    perm[k * RC + (o % R) * C + c % C] = int32_t(n);
  }
  at::Tensor tptr_t = at::zeros({nbc + 1}, at::kLong), trow_t = at::empty({nb}, at::kInt),
             tblk_t = at::empty({nb}, at::kInt);
  int64_t* tptr = tptr_t.data_ptr<int64_t>();
  int32_t* trow = trow_t.data_ptr<int32_t>();
  int32_t* tblk = tblk_t.data_ptr<int32_t>();
  for (int64_t b = 0; b < nb; ++b) ++tptr[bcol[b] + 1];
  for (int64_t j = 0; j < nbc; ++j) tptr[j + 1] += tptr[j];
  std::vector<int64_t> tcur(tptr, tptr + nbc);
  for (int64_t i = 0; i < nbr; ++i)
    for (int64_t b = ptr[i]; b < ptr[i + 1]; ++b) {
      const int64_t e = tcur[bcol[b]]++;
      trow[e] = int32_t(i);
      tblk[e] = int32_t(b);
    }
  return {ptr_t, bcol_t, perm_t, tptr_t, trow_t, tblk_t};
}

TORCH_LIBRARY_FRAGMENT(siftc, m) {
  m.def("block_index(Tensor positions, int[] shape, int R, int C) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  // blocks (nb, R, C) and shape (the dense weight's (O, I)) stand for the weight; the five index tensors
  // are block_index's without perm. Returns (y, packed input); the backward returns (dx, dblocks).
  m.def("block_linear(Tensor x, Tensor blocks, int[] shape, Tensor? bias, Tensor ptr, Tensor bcol, Tensor tptr, "
        "Tensor trow, Tensor tblk) -> (Tensor, Tensor)");
  m.def("block_linear_backward(Tensor grad, Tensor x, Tensor xp, Tensor blocks, int[] shape, Tensor ptr, "
        "Tensor bcol, Tensor tptr, Tensor trow, Tensor tblk, bool need_input, bool need_weight) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(siftc, CPU, m) {
  m.impl("block_index", &block_index);
  m.impl("block_linear", &block_linear);
  m.impl("block_linear_backward", &block_linear_backward);
}

}  // namespace siftc_block
