#include "pack.hpp"

#include <algorithm>
#include <type_traits>

#include "pool.hpp"

namespace kt {
namespace {

template <PackPart P>
inline bf16 to_packed(float v) {
  const bf16 high = f32_to_bf16(v);
  return P == PackPart::high ? high : f32_to_bf16(v - bf16_to_f32(high));
}
template <PackPart P>
inline bf16 to_packed(bf16 v) {  // bf16 sources are copied bit for bit (they have no low part)
  return P == PackPart::high ? v : bf16(0);
}

using word = uint32_t __attribute__((may_alias));  // a (k, k+1) pair of a panel row

template <PackPart P, class T>
void pack_typed(const T* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp, int64_t k_offset,
                int64_t panel_step, bf16* dst) {
  const int64_t panel_stride = Kp * kPanelCols;
  for (int64_t j = 0; j * kPanelCols < N; ++j) {
    bf16* pd = dst + j * panel_step * panel_stride;
    const int64_t cols = std::min<int64_t>(kPanelCols, N - j * kPanelCols);
    const T* ps = src + j * kPanelCols * sn;
    auto single_row = [&](int64_t k) {  // a row without its pair partner in this matrix
      const int64_t kk = k + k_offset;
      for (int64_t n = 0; n < cols; ++n) pd[(kk >> 1) * 2 * kPanelCols + 2 * n + (kk & 1)] = to_packed<P>(ps[k * sk + n * sn]);
    };
    int64_t k0 = 0, k1 = K;
    if (k_offset & 1) single_row(k0++);
    if ((k1 - k0) & 1) single_row(--k1);
    // Two source rows make one panel row of (k, k+1) words; walk the source in its contiguous direction.
    auto pair = [&](int64_t k, int64_t n) {
      return uint32_t(to_packed<P>(ps[k * sk + n * sn])) | uint32_t(to_packed<P>(ps[(k + 1) * sk + n * sn])) << 16;
    };
    word* rows = reinterpret_cast<word*>(pd) + ((k0 + k_offset) >> 1) * kPanelCols;
    if (sn == 1) {
      for (int64_t k = k0; k < k1; k += 2, rows += kPanelCols)
        for (int64_t n = 0; n < cols; ++n) rows[n] = pair(k, n);
    } else {
      for (int64_t n = 0; n < cols; ++n)
        for (int64_t k = k0, q = 0; k < k1; k += 2, ++q) rows[q * kPanelCols + n] = pair(k, n);
    }
  }
}

}  // namespace

void pack_panels(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                 bf16* dst, PackPart part) {
  auto pack = [&](auto p) {
    constexpr PackPart P = decltype(p)::value;
    if (src.dtype == DType::f32)
      pack_typed<P>(static_cast<const float*>(src.data), src.sk, src.sn, K, N, Kp, k_offset, panel_step, dst);
    else
      pack_typed<P>(static_cast<const bf16*>(src.data), src.sk, src.sn, K, N, Kp, k_offset, panel_step, dst);
  };
  if (part == PackPart::high)
    pack(std::integral_constant<PackPart, PackPart::high>{});
  else
    pack(std::integral_constant<PackPart, PackPart::low>{});
}

void transpose_panels_generic(const bf16* src, int64_t src_panel_distance, int64_t src_panels, int64_t k0,
                              int64_t kcount, bf16* dst, int64_t dst_panel_stride, int64_t dst_row0,
                              int64_t dst_rows) {
  const int64_t src_cols = src_panels * kPanelCols;
  for (int64_t j = 0; j < kcount / kPanelCols; ++j) {
    bf16* d = dst + j * dst_panel_stride;
    for (int64_t n = 0; n < dst_rows; ++n) {
      const int64_t row = dst_row0 + n;
      bf16* drow = d + (row >> 1) * 2 * kPanelCols + (row & 1);
      if (n >= src_cols) {
        for (int64_t c = 0; c < kPanelCols; ++c) drow[2 * c] = 0;
        continue;
      }
      const bf16* s = src + (n / kPanelCols) * src_panel_distance + (n % kPanelCols) * 2;
      for (int64_t c = 0; c < kPanelCols; ++c) {
        const int64_t k = k0 + j * kPanelCols + c;
        drow[2 * c] = s[(k >> 1) * 2 * kPanelCols + (k & 1)];
      }
    }
  }
}

PackedExperts::PackedExperts(int64_t E_, int64_t H_, int64_t I_, const Source& src, Pool& pool,
                             BackwardWeights backward_)
    : E(E_),
      H(H_),
      I(I_),
      Ip(round_up(I_, kKAlign)),
      backward(backward_),
      layouts_{PanelLayout(H_, 2 * round_up(I_, kPanelCols)), PanelLayout(I_, H_), PanelLayout(H_, I_),
               PanelLayout(2 * round_up(I_, kKAlign), H_)},
      gate_up_(E_ * layout(Gemm::gate_up).elements()),
      down_(E_ * layout(Gemm::down).elements()) {
  const bool resident = backward == BackwardWeights::resident;
  if (resident) {
    gate_up_t_ = Buffer<bf16>(E_ * layout(Gemm::gate_up_t).elements());
    down_t_ = Buffer<bf16>(E_ * layout(Gemm::down_t).elements());
  }
  // B[k][n] of expert e: either [rows][cols] itself (k = row) or its transpose (k = col).
  auto expert = [](const Tensor3& t, int64_t e, bool transpose) {
    const int64_t* st = t.strides;
    const char* base = static_cast<const char*>(t.data) + e * st[0] * (t.dtype == DType::f32 ? 4 : 2);
    return transpose ? MatrixView{base, t.dtype, st[2], st[1]} : MatrixView{base, t.dtype, st[1], st[2]};
  };
  auto job = std::make_shared<Job>([&](Worker& w) {
    w.for_each(E * 2, [&](int64_t task) {
      const int64_t e = task / 2;
      if (task % 2 == 0) {  // gate/up: B[k=h][n=i] = W[i][h], gate and up panels interleaved
        const PanelLayout& L = layout(Gemm::gate_up);
        bf16* d = gate_up_.data() + e * L.elements();
        std::fill(d, d + L.elements(), bf16(0));
        pack_panels(expert(src.gate, e, true), H, I, L.Kp, 0, 2, d);
        pack_panels(expert(src.up, e, true), H, I, L.Kp, 0, 2, d + L.panel_stride());
      } else {  // down: B[k=i][n=h] = Wd[h][i]
        const PanelLayout& L = layout(Gemm::down);
        bf16* d = down_.data() + e * L.elements();
        std::fill(d, d + L.elements(), bf16(0));
        pack_panels(expert(src.down, e, true), I, H, L.Kp, 0, 1, d);
      }
    });
    if (resident)  // the backward layouts from the forward ones, as the operand makers would
      w.for_each(E * 2, [&](int64_t task) {
        const int64_t e = task / 2;
        const Gemm g = task % 2 ? Gemm::gate_up_t : Gemm::down_t;
        bf16* d = (g == Gemm::gate_up_t ? gate_up_t_ : down_t_).data() + e * layout(g).elements();
        make_operand(g, e, 0, layout(g).panels, transpose_panels_generic, d);
      });
  });
  pool.run(job);
}

const bf16* PackedExperts::packed(Gemm g, int64_t e) const {
  const int64_t n = layout(g).elements() * e;
  switch (g) {
    case Gemm::gate_up:
      return gate_up_.data() + n;
    case Gemm::down:
      return down_.data() + n;
    case Gemm::down_t:
      return down_t_.data() + n;
    default:
      return gate_up_t_.data() + n;
  }
}

void PackedExperts::make_operand(Gemm g, int64_t e, int64_t p0, int64_t np, TransposePanelsFn transpose,
                                 bf16* dst) const {
  const PanelLayout& out = layout(g);
  if (g == Gemm::down_t) {  // columns i of dh = rows i of down's layout
    const PanelLayout& src = layout(Gemm::down);
    transpose(packed(Gemm::down, e), src.panel_stride(), src.panels, p0 * kPanelCols, np * kPanelCols, dst,
              out.panel_stride(), 0, out.Kp);
  } else {  // columns h of dx = rows h of gate_up's layout; gate rows [0, Ip), up rows [Ip, 2 Ip)
    const PanelLayout& src = layout(Gemm::gate_up);
    const bf16* gate = packed(Gemm::gate_up, e);
    for (int half = 0; half < 2; ++half)
      transpose(gate + half * src.panel_stride(), 2 * src.panel_stride(), src.panels / 2, p0 * kPanelCols,
                np * kPanelCols, dst, out.panel_stride(), half * Ip, Ip);
  }
}

const bf16* PackedExperts::operand(Gemm g, int64_t e, int64_t p0, int64_t np, const KernelSet& ks,
                                   bf16* buffer) const {
  const bool on_the_fly = (g == Gemm::down_t || g == Gemm::gate_up_t) && backward == BackwardWeights::on_the_fly;
  if (!on_the_fly) return packed(g, e) + p0 * layout(g).panel_stride();
  make_operand(g, e, p0, np, ks.transpose_panels, buffer);
  return buffer;
}

void PackedExperts::dequantize(int64_t e, float* gate, float* up, float* down) const {
  auto at = [](const bf16* panels, int64_t panel_distance, int64_t k, int64_t n) {
    return bf16_to_f32(panels[(n / kPanelCols) * panel_distance + (k >> 1) * 2 * kPanelCols + (n % kPanelCols) * 2 +
                              (k & 1)]);
  };
  const bf16* gu = packed(Gemm::gate_up, e);
  const int64_t gu_stride = layout(Gemm::gate_up).panel_stride();
  for (int64_t i = 0; i < I; ++i)
    for (int64_t h = 0; h < H; ++h) {
      gate[i * H + h] = at(gu, 2 * gu_stride, h, i);
      up[i * H + h] = at(gu + gu_stride, 2 * gu_stride, h, i);
    }
  const bf16* d = packed(Gemm::down, e);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < I; ++i) down[h * I + i] = at(d, layout(Gemm::down).panel_stride(), i, h);
}

}  // namespace kt
