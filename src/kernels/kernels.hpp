// The per-ISA kernel table. The macro-kernels (moe.cpp) are ISA-independent and call these
// through function pointers; each ISA file fills one table with code compiled for that ISA.
#pragma once
#include <cstdint>

#include "cpu.hpp"
#include "types.hpp"

namespace kt {

// Packed B operand ("VNNI panel"): 16 output columns x K, stored as [K/2][16][2] bf16, so that
// one 64-byte row holds the (k, k+1) pairs of 16 columns: a zmm for VDPBF16PS and a row of an
// AMX B tile. K is padded to a multiple of 32 (one AMX tile), N to a multiple of 16.
constexpr int kPanelCols = 16;
constexpr int kKAlign = 32;
// Limits of rank_update: LoRA rank and columns per call.
constexpr int kMaxRank = 128;
constexpr int64_t kRankUpdateMaxCols = 256;

// Memory a worker reads next (the next task's B operand source: `runs` runs of `run_lines` 64-byte
// lines, run_stride bytes apart), prefetched a line per micro-kernel K step, so that those reads
// overlap the current GEMM's compute instead of running in a pass of their own. A hint: a
// micro-kernel may ignore it.
struct PrefetchStream {
  const char* base = nullptr;
  int64_t run_lines = 0, run_stride = 0, runs = 0;
  int64_t run = 0, line = 0;
  bool done() const { return run >= runs; }
  const char* advance() {  // the next line (only while !done())
    const char* p = base + run * run_stride + line * 64;
    if (++line == run_lines) line = 0, ++run;
    return p;
  }
};

// Micro-kernel: C[rows x 16*np] (= or +=) A[rows x K] * B, where A is bf16 row-major (lda elements,
// K = 2*kpairs, a multiple of 32), rows a multiple of the set's row_multiple, and B is np panels, panel p
// at B + p*panel_stride. Tile math only: never sees a K or N edge (padded by the packer); rows are
// padded to row_multiple where the unit needs whole tiles (AMX), else taken as they come.
// `prefetch` (may be null) is advanced as the K steps run.
using GemmFn = void (*)(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride,
                        int64_t kpairs, int np, float* C, int64_t ldc, bool accumulate, PrefetchStream* prefetch);

// Packs a K x N matrix into panels (pack.hpp's pack_panels; per ISA because the LoRA matrices are
// packed at every call).
struct MatrixView;
using PackPanelsFn = void (*)(const MatrixView& src, int64_t K, int64_t N, int64_t Kp, int64_t k_offset,
                              int64_t panel_step, bf16* dst, int64_t lo_delta);
// KernelSet::project_f32 and expand_f32.
using ProjectF32Fn = void (*)(const bf16* A, int64_t lda, int64_t rows, const float* const* S, int count, int64_t sk,
                              int64_t sn, int64_t K, int64_t N, float* const* C, int64_t ldc);
using ExpandF32Fn = void (*)(const float* coef, int64_t ldcoef, int64_t rows, const float* S, int64_t sk, int64_t sn,
                             int64_t K, int64_t N, float* C, int64_t ldc);

// Operand maker of the backward GEMMs: the transpose of a packed operand S (src_panels panels of
// 16 columns, consecutive panels src_panel_distance elements apart) restricted to its rows
// [k0, k0 + kcount), written as packed panels D = S^T: kcount/16 panels (panel j at
// dst + j * dst_panel_stride), rows [dst_row0, dst_row0 + dst_rows) of each, where D's row
// dst_row0 + n is S's column n (zero for n >= 16 * src_panels). k0, kcount: multiples of 16;
// dst_row0, dst_rows: even.
using TransposePanelsFn = void (*)(const bf16* src, int64_t src_panel_distance, int64_t src_panels, int64_t k0,
                                   int64_t kcount, bf16* dst, int64_t dst_panel_stride, int64_t dst_row0,
                                   int64_t dst_rows);
// The portable one (pack.cpp, built without ISA flags).
void transpose_panels_generic(const bf16* src, int64_t src_panel_distance, int64_t src_panels, int64_t k0,
                              int64_t kcount, bf16* dst, int64_t dst_panel_stride, int64_t dst_row0, int64_t dst_rows);

// One expert's B operand in a quantized storage, packed once in the bf16 panel order so that a
// decoder streams it: panel p (16 columns, Kp rows) starts at data + p * panel_bytes.
// 8-bit formats: the codes, one byte per element in the bf16 panel's element order, then at
// scale_offset the scales:
//   int8        fp32 [16]                one per column (output row)
//   fp8_block   fp32 [ceil(Kp/128)]      one per 128 rows (the panel's 16 columns share a block)
// 4-bit formats (scale_offset unused): a scale group is 16 pair-rows (32 rows), its codes 4 pair-rows per
// 64-byte block, whose little-endian 16-bit word i holds element i of pair-row 4b + j in bits 4j..4j+3
// (one load and a shift give a pair-row's 32 codes in the panel's element order), and its scales one per
// column:
//   int4_group  fp32 / bf16 [16]   mxfp4  E8M0 bytes [16]
// The groups come in chunks of FourBitChunks::groups, each chunk its 64 bytes of scales and then its codes,
// so a panel is one sequential stream (scales at the panel's end were a second one, which the prefetchers
// followed badly: in a standalone 3-panel loop, one core read 4-bit panels ~20% slower).
// Codes: int8 and int4 two's complement, fp8 e4m3fn, mxfp4 e2m1 (sign in the high bit).
struct QuantPanels {
  Storage storage;
  ScaleType scale_type;
  const uint8_t* data;
  int64_t panel_bytes;
  int64_t scale_offset;
};

// Where the 4-bit formats' codes and scales sit in a panel (QuantPanels). A chunk holds 4, 2 or 1 groups
// (1-, 2-, 4-byte scales): shifts, not divisions, since block() runs for every 64 bytes of codes.
struct FourBitChunks {
  int log_groups;  // log2 of the groups per chunk (64 bytes of scales)
  explicit FourBitChunks(int64_t scale_bytes) : log_groups(scale_bytes == 1 ? 2 : scale_bytes == 2 ? 1 : 0) {}
  int64_t groups() const { return int64_t(1) << log_groups; }
  // Byte offset of the 64-byte code block of pair-rows 4 (q / 4) .. 4 (q / 4) + 3.
  int64_t block(int64_t q) const { return ((q >> 2) + (q >> (4 + log_groups)) + 1) * 64; }
  // Byte offset of the 16 scales of group g (pair-rows 16 g .. 16 g + 15).
  int64_t scales(int64_t g) const {
    return (g >> log_groups) * (64 + (int64_t(256) << log_groups)) + ((g & (groups() - 1)) << (6 - log_groups));
  }
  // Bytes of a panel of kp rows (a multiple of 32).
  int64_t panel_bytes(int64_t kp) const { return ((kp / 32 + groups() - 1) >> log_groups) * 64 + kp / 32 * 256; }
};
// Bytes per scale of a 4-bit format.
constexpr int64_t four_bit_scale_bytes(Storage s, ScaleType t) {
  return s == Storage::mxfp4 ? 1 : t == ScaleType::f32 ? 4 : 2;
}

// Operand maker of a quantized storage: pair-rows [q0, q0 + nq) of the panels first_panel,
// first_panel + panel_step, ... (np of them) decoded to bf16 panels, the j-th at
// dst + j * dst_panel_stride with pair-row q0 as its row 0. Every decoder rounds value * scale
// (fp32) to nearest even bf16 with denormals flushed (as VCVTNE2PS2BF16), so all are bitwise equal.
using DecodePanelsFn = void (*)(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np,
                                int64_t q0, int64_t nq, bf16* dst, int64_t dst_panel_stride);
// The portable one (pack.cpp, built without ISA flags).
void decode_panels_generic(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                           int64_t nq, bf16* dst, int64_t dst_panel_stride);

// Micro-kernel of the few-row forward GEMMs of a quantized storage, straight from its codes:
// C[rows][16*np] = A[rows][2*kpairs] x panels [first_panel, first_panel + np) of src, where every
// code's value (exact in bf16) meets A in VDPBF16PS and a scale group's fp32 sums are then multiplied
// by its scales: MATH.md's q * s without the bf16 rounding decode_panels applies to the product. For
// experts with a few rows (the codes are read and turned into values again per 4 rows), where
// reading B bounds the GEMM and a decoded copy would cost a store and a reload per pair-row.
using GemmCodesFn = void (*)(const QuantPanels& src, int64_t first_panel, int np, int64_t kpairs, const bf16* A,
                             int64_t lda, int64_t rows, float* C, int64_t ldc);

// A backward GEMM of an expert with few rows, multiplied by the transpose of its forward panels instead
// of by a transposed operand: C[m][2q + t] (+)= sum over panels p < np and columns j < 16 of
// A[m*lda + 16p + j] * B[p*panel_stride + 32q + 2j + t], for q < nq (a multiple of 8: whole panels of C)
// and t < 2; B points at the first pair-row wanted of panel 0. A's row m is read up to 16 np. `stream`: B
// comes from memory (not a decoded buffer in cache), so a kernel may ask for what it reads next.
using GemmTFn = void (*)(const bf16* A, int64_t lda, int64_t rows, const bf16* B, int64_t panel_stride, int64_t np,
                         int64_t nq, float* C, int64_t ldc, bool accumulate, bool stream);
// gemm_t on a quantized storage's panels first_panel, first_panel + panel_step, ... (np of them), their
// pair-rows [q0, q0 + nq) (q0, nq multiples of 8) decoded in registers: as decode_panels writes them
// (bitwise decode_panels then gemm_t, without the decoded copy), or with `exact`, by code * scale itself
// as gemm_codes multiplies (each panel's products of the codes, then its scales in fp32): the backward of
// the experts whose forward ran on gemm_codes.
using GemmCodesTFn = void (*)(const QuantPanels& src, int64_t first_panel, int64_t panel_step, int64_t np, int64_t q0,
                              int64_t nq, const bf16* A, int64_t lda, int64_t rows, float* C, int64_t ldc,
                              bool accumulate, bool exact);

// The expert variants of MATH.md ("Expert variants"): the activation, whether a gate multiplies it,
// gpt-oss / DeepSeek-V4 clamps and up offset, and frozen biases. Chosen once per call: the
// macro-kernels pick the epilogue instantiated for (gated, activation) from the KernelSet.
enum class Activation : int {
  swish = 0,      // z sigmoid(alpha z): silu (alpha 1), quick_gelu (alpha 1.702), gpt-oss's glu
  gelu = 1,       // z Phi(z) (erf)
  gelu_tanh = 2,  // gelu_pytorch_tanh / gelu_new
  relu = 3,
  relu2 = 4,      // max(z, 0)^2
};
constexpr int kActivations = 5;

struct ExpertVariant {
  bool gated = true;          // h = act(g) * (u + up_offset); else h = act(u) (the gate panels are zero)
  Activation activation = Activation::swish;
  float alpha = 1.0f;         // swish's alpha
  float limit = __builtin_inff();  // gated only: g <= limit, -limit <= u <= limit before the activation
  float up_offset = 0.0f;     // gpt-oss: (u + 1)
  const float* gate_bias = nullptr;  // [E][I] fp32, frozen (null: none)
  const float* up_bias = nullptr;    // [E][I]
  const float* down_bias = nullptr;  // [E][H]
};

// Forward epilogue of one row: h = variant(gate, up) as bf16 (the pre-activations include LoRA and
// biases); gate, up rounded to bf16 go to the cache's g, u when not null.
using GateForwardFn = void (*)(const ExpertVariant& v, const float* gate, const float* up, int64_t n, bf16* g, bf16* u,
                               bf16* h);
// Backward epilogue of one row: from dh_raw (unweighted) and the cached g, u: dg, du (bf16, routing
// weight w applied) and h (bf16, when not null). Returns dh_raw . h, the routing-weight gradient's
// share of these columns.
using GateBackwardFn = float (*)(const ExpertVariant& v, const float* dh_raw, const bf16* g, const bf16* u, int64_t n,
                                 float w, bf16* dg, bf16* du, bf16* h);

struct KernelSet {
  Isa isa;
  int mr;            // rows of A per register (or tile) block of the micro-kernel
  int row_multiple;  // A operands' rows are padded per expert to a multiple of this (AMX: a tile's 16)
  GemmFn gemm;
  TransposePanelsFn transpose_panels;
  DecodePanelsFn decode_panels;
  GemmCodesFn gemm_codes;  // null: few-row quantized GEMMs decode K chunks with decode_panels instead
  GemmTFn gemm_t;
  GemmCodesTFn gemm_codes_t;  // null: decode_panels into a buffer, then gemm_t
  PackPanelsFn pack_panels;
  // Epilogues per [gated][activation], one template instantiated per entry (elementwise.hpp).
  GateForwardFn gate_forward[2][kActivations];
  GateBackwardFn gate_backward[2][kActivations];
  // LoRA gradients in fp32 (the adapters are trained; the LoRA products themselves run on gemm).
  // G[i][c] = scale * sum_p coef[p][i] * pscale[p] * rows[p][c], i < m <= kMaxRank,
  // c < n <= kRankUpdateMaxCols, summed in p order
  // (fixed order: the result does not depend on threads). pscale and row_index may be null.
  void (*rank_update)(float* G, int64_t ldg, int m, int64_t n, const float* coef, int64_t ldcoef,
                      const float* pscale, float scale, const bf16* rows, int64_t ldrow, const int32_t* row_index,
                      int64_t P);
  // The same values written as G[c][i] (ld ldg): the gradients of the [out][rank] matrices (the B's).
  void (*rank_update_t)(float* G, int64_t ldg, int m, int64_t n, const float* coef, int64_t ldcoef,
                        const float* pscale, float scale, const bf16* rows, int64_t ldrow, const int32_t* row_index,
                        int64_t P);
  // C[i][m][n] = sum_k A[m][k] * S[i](k, n) in fp32 for i < count (1 or 2), m < rows, n < N; S[i](k, n) =
  // S[i][k*sk + n*sn] with sk == 1 or sn == 1; a fixed order. The LoRA projects of an expert with few rows:
  // each operand is used once, so reading the fp32 matrix straight beats packing it (and keeps it whole,
  // not split in two parts). Two matrices (gate's and up's) may be read in lock-step: two streams.
  ProjectF32Fn project_f32;
  // C[m][n] += sum_k coef[m][k] * S(k, n) in fp32, S as in project_f32; a fixed order. The LoRA expands
  // of an expert with few rows (the coefficients in fp32, not rounded to bf16).
  ExpandF32Fn expand_f32;
  // dst = bf16(src)
  void (*to_bf16_row)(const float* src, int64_t n, bf16* dst);
  // out = sum_j weights[j] * rows[j] (out is zero when count == 0); weights may be null (all 1).
  void (*weighted_sum)(float* out, const float* const* rows, const float* weights, int count, int64_t n);
};

bool kernels_built(Isa isa);
const KernelSet& kernels_for(Isa isa);

}  // namespace kt

namespace kt {
// GFLOP/s of the micro-kernel of `isa` in a tight loop on L1-resident operands, on `threads`
// workers for about `seconds`: the machine's compute peak as our kernels can reach it.
double kernel_peak_gflops(Isa isa, int threads, double seconds);
}  // namespace kt
