#include "pack.hpp"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "decode.hpp"
#include "pool.hpp"

namespace kt {
namespace {

inline bf16 to_packed(float v) { return f32_to_bf16(v); }
inline bf16 to_packed(bf16 v) { return v; }  // bf16 sources are copied bit for bit

// The hi and lo parts of an fp32 value (the LoRA matrices, packed at every call) round as VCVTNE2PS2BF16
// does, so that the AVX-512 packer (pack_avx512.hpp) can use it and still agree bitwise: nearest even,
// denormal inputs as signed zeros, NaN quieted.
inline bf16 part_bf16(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16((u >> 16) | 0x40u);
  if ((u & 0x7f800000u) == 0) return bf16((u >> 16) & 0x8000u);
  return bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline bf16 high_part(float v) { return part_bf16(v); }
inline bf16 high_part(bf16 v) { return v; }
inline bf16 low_part(float v) { return part_bf16(v - bf16_to_f32(part_bf16(v))); }
inline bf16 low_part(bf16) { return bf16(0); }  // bf16 sources have no low part

using word = uint32_t __attribute__((may_alias));  // a (k, k+1) pair of a panel row

// kLow: also write each value's low part lo_delta elements after its high part (one read of the source).
template <bool kLow, class T>
void pack_typed(const T* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp, int64_t k_offset,
                int64_t panel_step, bf16* dst, int64_t lo_delta) {
  const int64_t panel_stride = Kp * kPanelCols;
  for (int64_t j = 0; j * kPanelCols < N; ++j) {
    bf16* pd = dst + j * panel_step * panel_stride;
    const int64_t cols = std::min<int64_t>(kPanelCols, N - j * kPanelCols);
    const T* ps = src + j * kPanelCols * sn;
    auto single_row = [&](int64_t k) {  // a row without its pair partner in this matrix
      const int64_t kk = k + k_offset;
      for (int64_t n = 0; n < cols; ++n) {
        bf16* d = pd + (kk >> 1) * 2 * kPanelCols + 2 * n + (kk & 1);
        *d = kLow ? high_part(ps[k * sk + n * sn]) : to_packed(ps[k * sk + n * sn]);
        if constexpr (kLow) d[lo_delta] = low_part(ps[k * sk + n * sn]);
      }
    };
    int64_t k0 = 0, k1 = K;
    if (k_offset & 1) single_row(k0++);
    if ((k1 - k0) & 1) single_row(--k1);
    // Two source rows make one panel row of (k, k+1) words; walk the source in its contiguous direction.
    word* rows = reinterpret_cast<word*>(pd) + ((k0 + k_offset) >> 1) * kPanelCols;
    auto put = [&](word* row, int64_t k, int64_t n) {
      const T a = ps[k * sk + n * sn], b = ps[(k + 1) * sk + n * sn];
      if constexpr (kLow) {
        *row = uint32_t(high_part(a)) | uint32_t(high_part(b)) << 16;
        row[lo_delta / 2] = uint32_t(low_part(a)) | uint32_t(low_part(b)) << 16;
      } else {
        *row = uint32_t(to_packed(a)) | uint32_t(to_packed(b)) << 16;
      }
    };
    if (sn == 1) {
      for (int64_t k = k0; k < k1; k += 2, rows += kPanelCols)
        for (int64_t n = 0; n < cols; ++n) put(rows + n, k, n);
    } else {
      for (int64_t n = 0; n < cols; ++n)
        for (int64_t k = k0, q = 0; k < k1; k += 2, ++q) put(rows + q * kPanelCols + n, k, n);
    }
  }
}

constexpr int64_t kDecodeChunk = 16;  // source panels decoded at a time for a transposed operand

constexpr bool four_bit(Storage s) { return s == Storage::int4_group || s == Storage::mxfp4; }

// Rows up to which gemm_codes beats decoding K chunks into L1 for the micro-kernel: gemm_codes turns
// the codes into values again for every 4 rows, which costs a 4-bit code ~2 vector operations per
// pair-row and an 8-bit one 5-6 (T=64 / T=128 forwards of the bench layer, same process: int8 and
// fp8_block 6-10% faster with 4 here than with 16, int4_group 16-30% slower with 4).
int64_t codes_rows_limit(Storage s) { return four_bit(s) ? 16 : 4; }

// Bytes of one panel (QuantPanels) for Kp rows, and where an 8-bit format's scales start in it.
int64_t panel_bytes(Storage s, ScaleType t, int64_t Kp) {
  if (four_bit(s)) return FourBitChunks(four_bit_scale_bytes(s, t)).panel_bytes(Kp);
  const int64_t scales = s == Storage::int8 ? kPanelCols * 4 : ceil_div(Kp, 128) * 4;
  return round_up(Kp * kPanelCols + scales, 64);
}
int64_t scale_offset(Storage s, int64_t Kp) { return four_bit(s) ? 0 : Kp * kPanelCols; }

// Code of W[o][k] of one expert's projection in the checkpoint's layout (QuantSource), as
// QuantPanels stores it (int4: two's complement nibble).
template <Storage S>
uint8_t source_code(const void* codes, int64_t in, int64_t o, int64_t k) {
  if constexpr (S == Storage::int4_group) {
    const uint32_t word = static_cast<const uint32_t*>(codes)[o * ceil_div(in, 8) + k / 8];
    return uint8_t(((word >> (4 * (k % 8))) & 0xf) ^ 8);  // stored as q + 8
  } else if constexpr (S == Storage::mxfp4) {
    const uint8_t byte = static_cast<const uint8_t*>(codes)[(o * ceil_div(in, 32) + k / 32) * 16 + (k % 32) / 2];
    return (byte >> (4 * (k & 1))) & 0xf;
  } else {
    return static_cast<const uint8_t*>(codes)[o * in + k];
  }
}

// Packs one expert's projection W [out][in] (B[k][n] = W[n][k]) into the quantized panels
// first_panel, first_panel + panel_step, ... of `base` (zero-filled beforehand).
template <Storage S>
void pack_quantized(ScaleType t, const QuantSource& src, int64_t out, int64_t in, uint8_t* base, int64_t panel_bytes,
                    int64_t scale_offset, int64_t first_panel, int64_t panel_step) {
  const int64_t groups = ceil_div(in, 32), blocks = ceil_div(in, 128);
  const int64_t scale_size = four_bit_scale_bytes(S, t);
  const FourBitChunks chunks(scale_size);
  for (int64_t j = 0; j * kPanelCols < out; ++j) {
    uint8_t* panel = base + (first_panel + j * panel_step) * panel_bytes;
    uint8_t* scales = panel + scale_offset;  // the 8-bit formats
    const int64_t o0 = j * kPanelCols, cols = std::min<int64_t>(kPanelCols, out - o0);
    if constexpr (S == Storage::fp8_block)  // the panel's columns share one row of 128-blocks
      std::memcpy(scales, static_cast<const float*>(src.scales) + (o0 / 128) * blocks, blocks * 4);
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t o = o0 + c;
      for (int64_t k = 0; k < in; ++k) {
        const uint8_t code = source_code<S>(src.codes, in, o, k);
        const int64_t pos = 2 * c + (k & 1), q = k >> 1;
        if constexpr (four_bit(S))  // bits 4 (q % 4) of 16-bit word pos of q's block (kernels.hpp)
          panel[chunks.block(q) + 2 * pos + ((q >> 1) & 1)] |= uint8_t(code << (4 * (q & 1)));
        else
          panel[q * 2 * kPanelCols + pos] = code;
      }
      if constexpr (S == Storage::int8) {
        std::memcpy(scales + c * 4, static_cast<const float*>(src.scales) + o, 4);
      } else if constexpr (four_bit(S)) {
        const uint8_t* from = static_cast<const uint8_t*>(src.scales) + o * groups * scale_size;
        for (int64_t g = 0; g < groups; ++g)
          std::memcpy(panel + chunks.scales(g) + c * scale_size, from + g * scale_size, scale_size);
      }
    }
  }
}

void pack_quantized(Storage s, ScaleType t, const QuantSource& src, int64_t out, int64_t in, uint8_t* base,
                    int64_t panel_bytes, int64_t scale_offset, int64_t first_panel, int64_t panel_step) {
  auto run = [&](auto fn) { fn(t, src, out, in, base, panel_bytes, scale_offset, first_panel, panel_step); };
  switch (s) {
    case Storage::int8:
      return run(pack_quantized<Storage::int8>);
    case Storage::fp8_block:
      return run(pack_quantized<Storage::fp8_block>);
    case Storage::int4_group:
      return run(pack_quantized<Storage::int4_group>);
    default:
      return run(pack_quantized<Storage::mxfp4>);
  }
}

}  // namespace

void decode_panels_generic(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                           int64_t nq, bf16* dst, int64_t dst_panel_stride) {
  decode_panels_portable(src, first_panel, panel_step, np, q0, nq, dst, dst_panel_stride);
}

void pack_panels(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset, int64_t panel_step,
                 bf16* dst, int64_t lo_delta) {
  auto pack = [&](auto low) {
    constexpr bool kLow = decltype(low)::value;
    if (src.dtype == DType::f32)
      pack_typed<kLow>(static_cast<const float*>(src.data), src.sk, src.sn, K, N, Kp, k_offset, panel_step, dst, lo_delta);
    else
      pack_typed<kLow>(static_cast<const bf16*>(src.data), src.sk, src.sn, K, N, Kp, k_offset, panel_step, dst, lo_delta);
  };
  if (lo_delta)
    pack(std::true_type{});
  else
    pack(std::false_type{});
}

void pack_panels_f32(Isa isa, const float* src, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t Kp,
                     int64_t k_offset, int64_t panel_step, bf16* dst, int64_t lo_delta) {
  kernels_for(isa).pack_panels(MatrixView{src, DType::f32, sk, sn}, K, N, Kp, k_offset, panel_step, dst, lo_delta);
}

void project_f32(Isa isa, const bf16* A, int64_t lda, int64_t rows, const float* S, const float* S2, int64_t sk,
                 int64_t sn, int64_t K, int64_t N, float* C, float* C2, int64_t ldc) {
  const float* matrices[2] = {S, S2};
  float* results[2] = {C, C2};
  kernels_for(isa).project_f32(A, lda, rows, matrices, S2 ? 2 : 1, sk, sn, K, N, results, ldc);
}

void expand_f32(Isa isa, const float* coef, int64_t ldcoef, int64_t rows, const float* S, int64_t sk, int64_t sn,
                int64_t K, int64_t N, float* C, int64_t ldc) {
  kernels_for(isa).expand_f32(coef, ldcoef, rows, S, sk, sn, K, N, C, ldc);
}

void gemm_t(Isa isa, const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t np,
            int64_t nq, float* C, int64_t ldc, bool accumulate) {
  kernels_for(isa).gemm_t(A, lda, rows, B, panel_stride, np, nq, C, ldc, accumulate, false);
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
        make_operand(g, e, 0, layout(g).panels, transpose_panels_generic, decode_panels_generic, d);
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

void PackedExperts::init_quantized() {
  for (int f = 0; f < 2; ++f) {
    const int64_t Kp = layouts_[f].Kp;
    scale_offset_[f] = scale_offset(storage, Kp);
    panel_bytes_[f] = panel_bytes(storage, scale_type, Kp);
    quant_[f] = Buffer<uint8_t>(size_t(E * layouts_[f].panels * panel_bytes_[f]));
  }
}

PackedExperts::PackedExperts(int64_t E_, int64_t H_, int64_t I_, const QuantizedSource& src, Pool& pool)
    : E(E_),
      H(H_),
      I(I_),
      Ip(round_up(I_, kKAlign)),
      backward(BackwardWeights::on_the_fly),
      storage(src.storage),
      scale_type(src.scale_type),
      layouts_{PanelLayout(H_, 2 * round_up(I_, kPanelCols)), PanelLayout(I_, H_), PanelLayout(H_, I_),
               PanelLayout(2 * round_up(I_, kKAlign), H_)} {
  init_quantized();
  // Bytes of one expert's codes and scales in the checkpoint's layout (QuantSource).
  auto expert = [&](const QuantSource& q, int64_t e, int64_t out, int64_t in) {
    int64_t codes = out * in, scales = out * 4;
    switch (storage) {
      case Storage::fp8_block:
        scales = ceil_div(out, 128) * ceil_div(in, 128) * 4;
        break;
      case Storage::int4_group:
        codes = out * ceil_div(in, 8) * 4, scales = out * ceil_div(in, 32) * (scale_type == ScaleType::f32 ? 4 : 2);
        break;
      case Storage::mxfp4:
        codes = out * ceil_div(in, 32) * 16, scales = out * ceil_div(in, 32);
        break;
      default:
        break;
    }
    return QuantSource{static_cast<const uint8_t*>(q.codes) + e * codes, static_cast<const uint8_t*>(q.scales) + e * scales};
  };
  auto job = std::make_shared<Job>([&](Worker& w) {
    w.for_each(E * 2, [&](int64_t task) {
      const int64_t e = task / 2, f = task % 2;  // f: Gemm::gate_up or Gemm::down
      const int64_t bytes = layouts_[f].panels * panel_bytes_[f];
      uint8_t* d = quant_[f].data() + e * bytes;
      std::fill(d, d + bytes, uint8_t(0));
      if (f == 0) {  // gate and up panels interleaved
        pack_quantized(storage, scale_type, expert(src.gate, e, I, H), I, H, d, panel_bytes_[0], scale_offset_[0], 0, 2);
        pack_quantized(storage, scale_type, expert(src.up, e, I, H), I, H, d, panel_bytes_[0], scale_offset_[0], 1, 2);
      } else {
        pack_quantized(storage, scale_type, expert(src.down, e, H, I), H, I, d, panel_bytes_[1], scale_offset_[1], 0, 1);
      }
    });
  });
  pool.run(job);
}

PackedExperts::PackedExperts(int64_t E_, int64_t H_, int64_t I_, Storage storage_, ScaleType scale_type_,
                             const uint8_t* gate_up, size_t gate_up_bytes, const uint8_t* down, size_t down_bytes)
    : E(E_),
      H(H_),
      I(I_),
      Ip(round_up(I_, kKAlign)),
      backward(BackwardWeights::on_the_fly),
      storage(storage_),
      scale_type(scale_type_),
      layouts_{PanelLayout(H_, 2 * round_up(I_, kPanelCols)), PanelLayout(I_, H_), PanelLayout(H_, I_),
               PanelLayout(2 * round_up(I_, kKAlign), H_)} {
  init_quantized();
  if (gate_up_bytes != quant_[0].bytes() || down_bytes != quant_[1].bytes())
    throw std::invalid_argument("quantized bytes: sizes do not match the shapes and storage");
  std::memcpy(quant_[0].data(), gate_up, quant_[0].bytes());
  std::memcpy(quant_[1].data(), down, quant_[1].bytes());
}

QuantPanels PackedExperts::quant_panels(Gemm g, int64_t e) const {
  const int f = int(g);
  return QuantPanels{storage, scale_type, quant_[f].data() + e * layouts_[f].panels * panel_bytes_[f], panel_bytes_[f],
                     scale_offset_[f]};
}

int64_t PackedExperts::operand_buffer_elements(Gemm g, int64_t np) const {
  const bool forward = g == Gemm::gate_up || g == Gemm::down;
  if (storage == Storage::bf16) return forward ? 0 : np * layout(g).panel_stride();
  // a transposed operand also needs the decoded rows of kDecodeChunk source panels
  return np * layout(g).panel_stride() + (forward ? 0 : kDecodeChunk * np * kPanelCols * kPanelCols);
}

void PackedExperts::transpose_from(Gemm f, int64_t e, int64_t first, int64_t step, int64_t n, int64_t k0,
                                   int64_t kcount, TransposePanelsFn transpose, DecodePanelsFn decode, bf16* dst,
                                   int64_t dst_panel_stride, int64_t row0, int64_t rows, bf16* scratch) const {
  if (storage == Storage::bf16) {
    const int64_t stride = layout(f).panel_stride();
    transpose(packed(f, e) + first * stride, step * stride, n, k0, kcount, dst, dst_panel_stride, row0, rows);
    return;
  }
  const QuantPanels q = quant_panels(f, e);
  for (int64_t c = 0; c < n; c += kDecodeChunk) {
    const int64_t m = std::min(kDecodeChunk, n - c);
    decode(q, first + c * step, step, m, k0 / 2, kcount / 2, scratch, kcount * kPanelCols);
    const int64_t done = c * kPanelCols;  // the last chunk also writes the padding rows
    transpose(scratch, kcount * kPanelCols, m, 0, kcount, dst, dst_panel_stride, row0 + done,
              c + m == n ? rows - done : m * kPanelCols);
  }
}

void PackedExperts::make_operand(Gemm g, int64_t e, int64_t p0, int64_t np, TransposePanelsFn transpose,
                                 DecodePanelsFn decode, bf16* dst) const {
  const PanelLayout& out = layout(g);
  bf16* scratch = dst + np * out.panel_stride();
  if (g == Gemm::down_t) {  // columns i of dh = rows i of down's layout
    transpose_from(Gemm::down, e, 0, 1, layout(Gemm::down).panels, p0 * kPanelCols, np * kPanelCols, transpose, decode,
                   dst, out.panel_stride(), 0, out.Kp, scratch);
  } else {  // columns h of dx = rows h of gate_up's layout; gate rows [0, Ip), up rows [Ip, 2 Ip)
    for (int half = 0; half < 2; ++half)
      transpose_from(Gemm::gate_up, e, half, 2, layout(Gemm::gate_up).panels / 2, p0 * kPanelCols, np * kPanelCols,
                     transpose, decode, dst, out.panel_stride(), half * Ip, Ip, scratch);
  }
}

PrefetchStream PackedExperts::operand_source(Gemm g, int64_t e, int64_t p0, int64_t np) const {
  const bool transposed = g == Gemm::down_t || g == Gemm::gate_up_t;
  if (!transposed || backward == BackwardWeights::resident || storage != Storage::bf16) return {};
  const Gemm f = g == Gemm::down_t ? Gemm::down : Gemm::gate_up;
  const PanelLayout& src = layout(f);
  // make_operand reads pair-rows [8 p0, 8 (p0 + np)) of every source panel: 8 np lines of 64 bytes.
  PrefetchStream s;
  s.base = reinterpret_cast<const char*>(packed(f, e) + p0 * 8 * 2 * kPanelCols);
  s.run_lines = 8 * np;
  s.run_stride = src.panel_stride() * int64_t(sizeof(bf16));
  s.runs = src.panels;
  return s;
}

const bf16* PackedExperts::operand(Gemm g, int64_t e, int64_t p0, int64_t np, const KernelSet& ks,
                                   bf16* buffer) const {
  if (g == Gemm::gate_up || g == Gemm::down)  // whole K: the decoded panels' stride is the layout's
    return forward_operand(g, e, p0, np, 0, layout(g).Kp / 2, ks, buffer).data;
  if (backward == BackwardWeights::resident) return packed(g, e) + p0 * layout(g).panel_stride();
  make_operand(g, e, p0, np, ks.transpose_panels, ks.decode_panels, buffer);
  return buffer;
}

PackedExperts::OperandView PackedExperts::forward_operand(Gemm g, int64_t e, int64_t p0, int64_t np, int64_t q0,
                                                         int64_t nq, const KernelSet& ks, bf16* buffer) const {
  const int64_t stride = layout(g).panel_stride();
  if (storage == Storage::bf16) return {packed(g, e) + p0 * stride + q0 * 2 * kPanelCols, stride};
  ks.decode_panels(quant_panels(g, e), p0, 1, np, q0, nq, buffer, nq * 2 * kPanelCols);
  return {buffer, nq * 2 * kPanelCols};
}

bool PackedExperts::streams_codes(int64_t rows, const KernelSet& ks) const {
  return storage != Storage::bf16 && ks.gemm_codes && rows <= codes_rows_limit(storage);
}

bool PackedExperts::forward_from_codes(Gemm g, int64_t e, int64_t p0, int np, const bf16* A, int64_t lda,
                                       int64_t rows, float* C, int64_t ldc, const KernelSet& ks) const {
  if (!streams_codes(rows, ks)) return false;
  ks.gemm_codes(quant_panels(g, e), p0, np, layout(g).Kp / 2, A, lda, rows, C, ldc);
  return true;
}

bool PackedExperts::backward_from_forward(Gemm g, int64_t e, int64_t p0, int np, const bf16* A, int64_t lda,
                                          int64_t rows, float* C, int64_t ldc, const KernelSet& ks,
                                          bf16* buffer) const {
  if (backward == BackwardWeights::resident) return false;
  const Gemm f = g == Gemm::down_t ? Gemm::down : Gemm::gate_up;
  const int64_t q0 = p0 * kPanelCols / 2, nq = np * kPanelCols / 2, panels = layout(f).panels;
  // product(first, step, n, a, accumulate) over the forward panels first, first + step, ... (n of them):
  // down's all take A; gate's (even) take dg, up's (odd) du.
  auto transposed = [&](auto&& product) {
    if (f == Gemm::down) return product(0, 1, panels, A, false);
    product(0, 2, panels / 2, A, false);
    product(1, 2, panels / 2, A + Ip, true);
  };
  if (storage != Storage::bf16 && ks.gemm_codes_t) {  // decoded in registers: no copy to store and reload
    const QuantPanels q = quant_panels(f, e);
    // by code * scale itself where the forward multiplied by it (forward_from_codes): the gradient of the
    // function the forward computed
    const bool exact = streams_codes(rows, ks);
    transposed([&](int64_t first, int64_t step, int64_t n, const bf16* a, bool accumulate) {
      ks.gemm_codes_t(q, first, step, n, q0, nq, a, lda, rows, C, ldc, accumulate, exact);
    });
    return true;
  }
  const bf16* B = buffer;  // the panels' pair-rows [q0, q0 + nq)
  int64_t stride = nq * 2 * kPanelCols;
  if (storage == Storage::bf16)
    B = packed(f, e) + q0 * 2 * kPanelCols, stride = layout(f).panel_stride();
  else
    ks.decode_panels(quant_panels(f, e), 0, 1, panels, q0, nq, buffer, stride);
  const bool stream = storage == Storage::bf16;
  transposed([&](int64_t first, int64_t step, int64_t n, const bf16* a, bool accumulate) {
    ks.gemm_t(a, lda, rows, B + first * stride, step * stride, n, nq, C, ldc, accumulate, stream);
  });
  return true;
}

void PackedExperts::dequantize(int64_t e, float* gate, float* up, float* down) const {
  auto at = [](const bf16* panels, int64_t panel_distance, int64_t k, int64_t n) {
    return bf16_to_f32(panels[(n / kPanelCols) * panel_distance + (k >> 1) * 2 * kPanelCols + (n % kPanelCols) * 2 +
                              (k & 1)]);
  };
  Buffer<bf16> decoded;
  auto forward = [&](Gemm g) -> const bf16* {  // expert e's bf16 forward layout, decoded if quantized
    if (storage == Storage::bf16) return packed(g, e);
    const PanelLayout& L = layout(g);
    decoded = Buffer<bf16>(size_t(L.elements()));
    decode_panels_generic(quant_panels(g, e), 0, 1, L.panels, 0, L.Kp / 2, decoded.data(), L.panel_stride());
    return decoded.data();
  };
  const bf16* gu = forward(Gemm::gate_up);
  const int64_t gu_stride = layout(Gemm::gate_up).panel_stride();
  for (int64_t i = 0; i < I; ++i)
    for (int64_t h = 0; h < H; ++h) {
      gate[i * H + h] = at(gu, 2 * gu_stride, h, i);
      up[i * H + h] = at(gu + gu_stride, 2 * gu_stride, h, i);
    }
  const bf16* d = forward(Gemm::down);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < I; ++i) down[h * I + i] = at(d, layout(Gemm::down).panel_stride(), i, h);
}

}  // namespace kt
