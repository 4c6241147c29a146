#include "pack.hpp"

#include <algorithm>

#include "pool.hpp"

namespace kt {
namespace {

inline bf16 to_packed(float v) { return f32_to_bf16(v); }
inline bf16 to_packed(bf16 v) { return v; }  // bf16 sources are copied bit for bit

template <class T>
void pack_typed(const T* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp, int64_t k_offset,
                int64_t panel_step, bf16* dst) {
  const int64_t panel_stride = Kp * kPanelCols;
  for (int64_t j = 0; j * kPanelCols < N; ++j) {
    bf16* pd = dst + j * panel_step * panel_stride;
    const int64_t cols = std::min<int64_t>(kPanelCols, N - j * kPanelCols);
    const T* ps = src + j * kPanelCols * sn;
    // Walk the source in its contiguous direction.
    if (sn == 1) {
      for (int64_t k = 0; k < K; ++k) {
        int64_t kk = k + k_offset;
        bf16* row = pd + (kk >> 1) * 2 * kPanelCols + (kk & 1);
        for (int64_t n = 0; n < cols; ++n) row[2 * n] = to_packed(ps[k * sk + n]);
      }
    } else {
      for (int64_t n = 0; n < cols; ++n)
        for (int64_t k = 0; k < K; ++k) {
          int64_t kk = k + k_offset;
          pd[(kk >> 1) * 2 * kPanelCols + 2 * n + (kk & 1)] = to_packed(ps[k * sk + n * sn]);
        }
    }
  }
}

}  // namespace

void pack_panels(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                 bf16* dst) {
  if (src.dtype == DType::f32)
    pack_typed(static_cast<const float*>(src.data), src.sk, src.sn, K, N, Kp, k_offset, panel_step, dst);
  else
    pack_typed(static_cast<const bf16*>(src.data), src.sk, src.sn, K, N, Kp, k_offset, panel_step, dst);
}

PackedExperts::PackedExperts(int64_t E_, int64_t H_, int64_t I_, const Source& src, Pool& pool)
    : E(E_),
      H(H_),
      I(I_),
      Ip(round_up(I_, kKAlign)),
      gate_up_fwd(H_, 2 * round_up(I_, kPanelCols)),
      down_fwd(I_, H_),
      down_bwd(H_, I_),
      gate_up_bwd(2 * round_up(I_, kKAlign), H_),
      gate_up_fwd_(E_ * gate_up_fwd.elements()),
      down_fwd_(E_ * down_fwd.elements()),
      down_bwd_(E_ * down_bwd.elements()),
      gate_up_bwd_(E_ * gate_up_bwd.elements()) {
  // B[k][n] of expert e: either [rows][cols] itself (k = row) or its transpose (k = col).
  auto expert = [](const Tensor3& t, int64_t e, bool transpose) {
    const int64_t* st = t.strides;
    const char* base = static_cast<const char*>(t.data) + e * st[0] * (t.dtype == DType::f32 ? 4 : 2);
    return transpose ? MatrixView{base, t.dtype, st[2], st[1]} : MatrixView{base, t.dtype, st[1], st[2]};
  };
  auto job = std::make_shared<Job>([&](Worker& w) {
    w.for_each(E * 4, [&](int64_t task) {
      int64_t e = task / 4;
      switch (task % 4) {
        case 0: {  // gate/up, forward: B[k=h][n=i] = W[i][h]
          bf16* d = gate_up_fwd_.data() + e * gate_up_fwd.elements();
          std::fill(d, d + gate_up_fwd.elements(), bf16(0));
          pack_panels(expert(src.gate, e, true), H, I, gate_up_fwd.Kp, 0, 2, d);
          pack_panels(expert(src.up, e, true), H, I, gate_up_fwd.Kp, 0, 2,
                      d + gate_up_fwd.panel_stride());
          break;
        }
        case 1: {  // down, forward: B[k=i][n=h] = Wd[h][i]
          bf16* d = down_fwd_.data() + e * down_fwd.elements();
          std::fill(d, d + down_fwd.elements(), bf16(0));
          pack_panels(expert(src.down, e, true), I, H, down_fwd.Kp, 0, 1, d);
          break;
        }
        case 2: {  // down, backward: B[k=h][n=i] = Wd[h][i]
          bf16* d = down_bwd_.data() + e * down_bwd.elements();
          std::fill(d, d + down_bwd.elements(), bf16(0));
          pack_panels(expert(src.down, e, false), H, I, down_bwd.Kp, 0, 1, d);
          break;
        }
        default: {  // gate/up, backward: B[k=i][n=h] = W[i][h], up rows after Ip
          bf16* d = gate_up_bwd_.data() + e * gate_up_bwd.elements();
          std::fill(d, d + gate_up_bwd.elements(), bf16(0));
          pack_panels(expert(src.gate, e, false), I, H, gate_up_bwd.Kp, 0, 1, d);
          pack_panels(expert(src.up, e, false), I, H, gate_up_bwd.Kp, Ip, 1, d);
          break;
        }
      }
    });
  });
  pool.run(job);
}

}  // namespace kt
