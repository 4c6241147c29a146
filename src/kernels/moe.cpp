#include "moe.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace kt {
namespace {

constexpr int64_t kRowBlock = 64;        // rows of A per task (a multiple of every ISA's mr and row_multiple)
// Output columns per task: 6 panels, a whole number of every micro-kernel's register or tile
// blocks (AVX-512: 3 panels, AMX: 2), so no call runs a narrow remainder.
constexpr int64_t kPanelsPerBlock = 6;
constexpr int64_t kColBlock = kPanelsPerBlock * kPanelCols;
constexpr int64_t kFewRows = 16;        // see ExpertBlocks::few_rows
constexpr int64_t kTokenBlock = 16;      // tokens per task of the final per-token reduction
constexpr int64_t kGradCols = kRankUpdateMaxCols;  // columns per LoRA-gradient task


// A row block of one expert: padded rows [prow, prow + rows) of A, routes from route0 for the
// first `real` of them.
struct RowBlock {
  int32_t e;
  int64_t prow, route0, rows, real;
};

// Row blocks of the active experts; those of plan.active[slot] are [first[slot], first[slot + 1]).
struct ExpertBlocks {
  std::vector<RowBlock> blocks;
  std::vector<int64_t> first;
  ExpertBlocks(const RoutingPlan& plan, const std::vector<int64_t>& poff) {
    for (int32_t e : plan.active) {
      first.push_back(int64_t(blocks.size()));
      int64_t n = plan.count(e), padded = poff[e + 1] - poff[e];
      for (int64_t r = 0; r < padded; r += kRowBlock)
        blocks.push_back({e, poff[e] + r, plan.offset[e] + r, std::min(kRowBlock, padded - r),
                          std::clamp<int64_t>(n - r, 0, kRowBlock)});
    }
    first.push_back(int64_t(blocks.size()));
    for (size_t slot = 0; slot + 1 < first.size(); ++slot)
      for (int64_t i = first[slot]; i < first[slot + 1]; ++i) slot_of.push_back(int64_t(slot));
  }
  std::vector<int64_t> slot_of;  // active slot of each block
  int64_t slot(int64_t block) const { return slot_of[block]; }
  int64_t size() const { return int64_t(blocks.size()); }
  bool single(int64_t slot) const { return first[slot + 1] - first[slot] == 1; }
  // An expert with at most kFewRows rows: its GEMMs are bound by reading B.
  bool few_rows(int64_t slot) const { return single(slot) && blocks[first[slot]].rows <= kFewRows; }
  int64_t experts() const { return int64_t(first.size()) - 1; }
  const RowBlock& operator[](int64_t i) const { return blocks[i]; }
  template <class F>
  void for_expert(int64_t slot, F&& f) const {
    for (int64_t i = first[slot]; i < first[slot + 1]; ++i) f(blocks[i]);
  }
};

// A task of a forward GEMM phase: panels [p0, p0 + np) of active slot `slot`, its results in rows of ldc floats.
struct ColumnTask {
  int64_t slot, p0, np, ldc;
};

// Panels per task of an expert whose few rows multiply straight from its codes (PackedExperts::streams_codes),
// where gemm_codes runs each of its streams on over consecutive panels (6 of 8-bit codes, 8 of 4-bit): a
// task's start costs the prefetchers a ramp on every stream, and a 6-panel task of 8-bit codes is only
// 72 KiB (down) to 192 KiB (gate/up). T=16 forward of the bench layer against 6-panel tasks, same process:
// int8 and fp8_block 13-14% faster with fp32 LoRA, 4-10% without; the 4-bit formats 0-4%. Its rows (at
// most kFewRows) fit the scratch of a 64-row, 6-panel task.
constexpr int64_t kCodesTaskPanels = 4 * kPanelsPerBlock;
static_assert(kFewRows * kCodesTaskPanels <= kRowBlock * kPanelsPerBlock);

// The tasks of a forward GEMM of `panels` panels over the active experts: kPanelsPerBlock panels each,
// kCodesTaskPanels where long_tasks(slot). Both even, so gate and up panel pairs stay whole.
template <class Long>
std::vector<ColumnTask> column_tasks(const ExpertBlocks& blocks, int64_t panels, Long&& long_tasks) {
  std::vector<ColumnTask> tasks;
  for (int64_t slot = 0; slot < blocks.experts(); ++slot) {
    const int64_t per_task = long_tasks(slot) ? kCodesTaskPanels : kPanelsPerBlock;
    for (int64_t p0 = 0; p0 < panels; p0 += per_task)
      tasks.push_back({slot, p0, std::min(per_task, panels - p0), per_task * kPanelCols});
  }
  return tasks;
}

// C[rows][16*np] = A[rows][K] * B (np panels of layout l).
void gemm_rows(const KernelSet& ks, const bf16* A, int64_t lda, int64_t rows, const bf16* B, const PanelLayout& l,
               int np, float* C, int64_t ldc, PrefetchStream* prefetch = nullptr) {
  ks.gemm(A, lda, rows, B, l.panel_stride(), l.Kp / 2, np, C, ldc, false, prefetch);
}

// The active experts' LoRA matrices as bf16 VNNI panels, packed per call (the optimizer changes
// them between calls), so that every LoRA product runs on the GEMM micro-kernel with fp32
// accumulation: a "project" (activations x A^T or B^T: rank-r results) and an "expand" (rank-r
// coefficients x B^T or A, accumulated into the base GEMM's tile). Where gate and up share an
// operand, gate's rank components sit at [0, r) and up's at [R, R + r), R = round_up(r, 16).
//   forward:  project x -> [a_g | a_u]   K=H,  N=R+r     expand into g|u   K=R+r, N=2*I16 (interleaved)
//             project h -> a_d           K=I,  N=r       expand into o     K=r,   N=H
//   backward: project gy -> b_d          K=H,  N=r       expand into dh    K=r,   N=I
//             project dg|du -> [c_g|c_u] K=2Ip, N=R+r    expand into dx    K=R+r, N=H
// fp32 LoRA matrices are carried as two bf16 parts, hi = bf16(v) and lo = bf16(v - hi), so the
// products use v to ~16 bits (rounding fp32 LoRA to bf16 was the largest error against the fp32
// reference): a project's operand gets the lo parts as W more columns [W, 2W), an expand's as W
// more K rows [W, 2W), W = the project's width N rounded to 16, and the expand's A operand holds
// the coefficients twice. For r <= 8 the down side's expand still takes one AMX K step.
// An expert with many rows has its operands packed once per call (prepare) and shared by its row
// blocks; one with a single row block gets each operand packed by the task that uses it (operand).
// With fp32 matrices, an expert with at most kFewRows rows ("direct") packs none: its LoRA runs in fp32
// straight from the matrices, each read once, in one pass per project: the project (project_direct),
// then the whole expand (expand_direct) into rows of fp32 results that the base GEMM's tasks add to their
// accumulators. (Expanding per task read a few KiB of each B at a time, latency-bound: in a T=16 forward
// the expands read their 17.5 MB at ~14 GB/s, a sixth of an int4_group call.)
// The packed expands' A operands (bf16 coefficients per padded row) live here too.
class LoraPanels {
 public:
  enum Which { kProjectGateUp, kExpandGateUp, kProjectDown, kExpandDown, kCount };

  LoraPanels(const LoraView& L, int64_t H, int64_t I, const ExpertBlocks& blocks, bool backward, int threads)
      : L_(L), H_(H), I_(I), r_(L.rank), R_(round_up(L.rank, kPanelCols)), backward_(backward),
        split_(L.dtype == DType::f32) {
    const int64_t r = r_, R = R_, Ip = round_up(I, kKAlign);
    width_[kProjectGateUp] = width_[kExpandGateUp] = round_up(R + r, kPanelCols);
    width_[kProjectDown] = width_[kExpandDown] = round_up(r, kPanelCols);
    const int parts = split_ ? 2 : 1;
    auto project = [&](Which w, int64_t K, int64_t N) { layouts_[w] = PanelLayout(K, split_ ? parts * width_[w] : N); };
    auto expand = [&](Which w, int64_t K, int64_t N) { layouts_[w] = PanelLayout(split_ ? parts * width_[w] : K, N); };
    if (!backward) {
      project(kProjectGateUp, H, R + r);
      expand(kExpandGateUp, R + r, 2 * round_up(I, kPanelCols));
      project(kProjectDown, I, r);
      expand(kExpandDown, r, H);
    } else {  // "gate_up" = the dx side, "down" = the dh side
      project(kProjectGateUp, 2 * Ip, R + r);
      expand(kExpandGateUp, R + r, H);
      project(kProjectDown, H, r);
      expand(kExpandDown, r, I);
    }
    for (int w = 0; w < kCount; ++w) offset_[w + 1] = offset_[w] + layouts_[w].elements();
    int64_t shared = 0;       // slots for the experts whose row blocks share one packing
    int64_t direct_rows = 0;  // rows of the direct slots' expand results
    for (int64_t slot = 0; slot < blocks.experts(); ++slot) {
      shared_index_.push_back(blocks.single(slot) ? -1 : shared++);
      const bool direct = split_ && blocks.few_rows(slot);
      direct_row_.push_back(direct ? direct_rows : -1);
      if (direct) direct_rows += blocks[blocks.first[slot]].rows;
    }
    data_ = Buffer<bf16>(size_t(offset_[kCount] * shared), Memory::workspace);
    int64_t M = 0;  // padded rows
    for (int64_t i = 0; i < blocks.size(); ++i) M = std::max(M, blocks[i].prow + blocks[i].rows);
    for (Which x : {kExpandGateUp, kExpandDown}) {
      packed_coef_[x] = Buffer<bf16>(size_t(M * layouts_[x].Kp), Memory::workspace);
      direct_out_[x] = Buffer<float>(size_t(direct_rows * direct_ld(x)), Memory::workspace);
    }
    buffer_elements_ = std::max({layouts_[kProjectGateUp].elements(), layouts_[kProjectDown].elements(),
                                 kPanelsPerBlock * layouts_[kExpandGateUp].panel_stride(),
                                 kPanelsPerBlock * layouts_[kExpandDown].panel_stride()});
    buffers_ = Buffer<bf16>(size_t(buffer_elements_ * threads), Memory::workspace);
  }

  int64_t rank() const { return r_; }
  int64_t rank_slot() const { return R_; }  // up's first rank component in shared operands
  // Columns of a project's result (= K rows of its expand) before the lo part; whether there is one.
  int64_t width(Which w) const { return width_[w]; }
  bool split() const { return split_; }
  const PanelLayout& layout(Which w) const { return layouts_[w]; }

  // Whether active slot `slot` runs its LoRA straight from the fp32 matrices.
  bool direct(int64_t slot) const { return direct_row_[slot] >= 0; }
  // A packed expand's coefficient rows from padded row prow (ld: the layout's Kp).
  bf16* packed_coef(Which which, int64_t prow) { return packed_coef_[which].data() + prow * layouts_[which].Kp; }
  // A direct slot's results of expand `which`: a row per padded row of the expert, its columns those of
  // the operand's panels (gate's and up's alternate), ld direct_ld.
  float* direct_out(Which which, int64_t slot) {
    return direct_out_[which].data() + direct_row_[slot] * direct_ld(which);
  }
  int64_t direct_ld(Which which) const { return layouts_[which].panels * kPanelCols; }

  // Packs all operands of active slot `slot` (expert e) if its row blocks share them (more than one);
  // slots are independent (one task each).
  void prepare(const KernelSet& ks, int64_t slot, int64_t e) {
    if (shared_index_[slot] < 0) return;
    bf16* base = data_.data() + shared_index_[slot] * offset_[kCount];
    std::fill(base, base + offset_[kCount], bf16(0));
    for (int w = 0; w < kCount; ++w) pack(ks, Which(w), e, 0, layouts_[w].panels, base + offset_[w]);
  }

  // Panels [p0, p0 + np) (np <= kPanelsPerBlock for an expand) of operand `which` of active slot
  // `slot` (expert e), panel stride as the layout's: in its shared packing (prepare), else packed now
  // into worker tid's buffer, valid until its next call; none (null) for a direct slot. An expert with
  // one row block uses each panel once, so its operands are packed by the task that uses them into a
  // cache-sized buffer, instead of written to memory in a pass of their own and read back.
  const bf16* operand(const KernelSet& ks, int64_t slot, int64_t e, Which which, int64_t p0, int64_t np, int tid) {
    if (direct(slot)) return nullptr;
    const PanelLayout& l = layouts_[which];
    if (shared_index_[slot] >= 0)
      return data_.data() + shared_index_[slot] * offset_[kCount] + offset_[which] + p0 * l.panel_stride();
    bf16* buffer = buffers_.data() + tid * buffer_elements_;
    std::fill(buffer, buffer + np * l.panel_stride(), bf16(0));
    pack(ks, which, e, p0, np, buffer);
    return buffer;
  }

  // A project of a direct slot's expert e (KernelSet::project_f32): v [rows][ldv] = A x the operand, its
  // columns as the packed project's (gate's at [0, r), up's at [R, R + r)); columns between them are
  // left as they are. Parts that multiply the same columns of A (the forward's Ag and Au) are read in
  // lock-step, two streams (T=16 forward of the bench layer, same process, 2 threads, against one after the
  // other: the gate/up LoRA phase 6-12% faster in three runs).
  void project_direct(const KernelSet& ks, Which which, int64_t e, const bf16* A, int64_t lda, int64_t rows, float* v,
                      int64_t ldv) const {
    Part parts[2];
    int n = 0;
    for_each_part(which, [&](const Part& p) { parts[n++] = p; });
    const float* S[2];
    float* C[2];
    for (int i = 0; i < n; ++i) {
      S[i] = static_cast<const float*>(parts[i].t) + e * parts[i].rows * parts[i].cols;
      C[i] = v + parts[i].first * kPanelCols;
    }
    const Part& p = parts[0];
    const int64_t sk = p.transpose ? 1 : p.cols, sn = p.transpose ? p.cols : 1;
    if (n == 2 && parts[1].k_offset == p.k_offset && parts[1].K == p.K && parts[1].N == p.N &&
        parts[1].cols == p.cols && parts[1].transpose == p.transpose)
      return ks.project_f32(A + p.k_offset, lda, rows, S, 2, sk, sn, p.K, p.N, C, ldv);
    for (int i = 0; i < n; ++i)
      ks.project_f32(A + parts[i].k_offset, lda, rows, S + i, 1, sk, sn, parts[i].K, parts[i].N, C + i, ldv);
  }

  // The whole expand of a direct slot's expert e (KernelSet::expand_f32): out [rows][direct_ld] += coef
  // [rows][ldcoef] (fp32, at the packed expand's K positions) x the operand, a call per panel.
  void expand_direct(const KernelSet& ks, Which which, int64_t e, const float* coef, int64_t ldcoef, int64_t rows,
                     float* out) const {
    for_each_part(which, [&](const Part& p) {
      const float* S = static_cast<const float*>(p.t) + e * p.rows * p.cols;
      const int64_t sk = p.transpose ? 1 : p.cols, sn = p.transpose ? p.cols : 1;
      for (int64_t j = 0; j * kPanelCols < p.N; ++j)
        ks.expand_f32(coef + p.k_offset, ldcoef, rows, S + j * kPanelCols * sn, sk, sn, p.K,
                      std::min<int64_t>(kPanelCols, p.N - j * kPanelCols), out + (p.first + j * p.step) * kPanelCols,
                      direct_ld(which));
    });
  }

 private:
  // A matrix of an operand: expert e's [rows][cols] of t as B (k, n) = t[n][k] (transpose) or t[k][n],
  // K x N, at rows from k_offset, its panel j at operand panel first + j * step.
  struct Part {
    const void* t;
    int64_t rows, cols;
    bool transpose;
    int64_t K, N, k_offset, first, step;
  };
  template <class F>
  void for_each_part(Which which, F&& f) const {
    const int64_t r = r_, R = R_, H = H_, I = I_, up_panel = R / kPanelCols;
    auto part = [&](Which w, const Part& p) {
      if (w == which) f(p);
    };
    if (!backward_) {
      part(kProjectGateUp, {L_.gate_a, r, H, true, H, r, 0, 0, 1});  // (k=h, n=q) = Ag[q][h]
      part(kProjectGateUp, {L_.up_a, r, H, true, H, r, 0, up_panel, 1});
      part(kExpandGateUp, {L_.gate_b, I, r, true, r, I, 0, 0, 2});  // (k=q, n=i) = Bg[i][q]
      part(kExpandGateUp, {L_.up_b, I, r, true, r, I, R, 1, 2});
      part(kProjectDown, {L_.down_a, r, I, true, I, r, 0, 0, 1});  // (k=i, n=q) = Ad[q][i]
      part(kExpandDown, {L_.down_b, H, r, true, r, H, 0, 0, 1});   // (k=q, n=h) = Bd[h][q]
    } else {
      const int64_t Ip = round_up(I, kKAlign);
      part(kProjectGateUp, {L_.gate_b, I, r, false, I, r, 0, 0, 1});  // (k=i, n=q) = Bg[i][q]
      part(kProjectGateUp, {L_.up_b, I, r, false, I, r, Ip, up_panel, 1});
      part(kExpandGateUp, {L_.gate_a, r, H, false, r, H, 0, 0, 1});  // (k=q, n=h) = Ag[q][h]
      part(kExpandGateUp, {L_.up_a, r, H, false, r, H, R, 0, 1});
      part(kProjectDown, {L_.down_b, H, r, false, H, r, 0, 0, 1});  // (k=h, n=q) = Bd[h][q]
      part(kExpandDown, {L_.down_a, r, I, false, r, I, 0, 0, 1});   // (k=q, n=i) = Ad[q][i]
    }
  }

  // Packs panels [p0, p0 + np) of expert e's operand `which` into dst (dst's panel 0 = panel p0).
  void pack(const KernelSet& ks, Which which, int64_t e, int64_t p0, int64_t np, bf16* dst) const {
    const size_t elem = L_.dtype == DType::f32 ? 4 : 2;
    const PanelLayout& l = layouts_[which];
    // The lo parts: a project's width / 16 panels further, an expand's width K rows further.
    const bool is_project = which == kProjectGateUp || which == kProjectDown;
    const int64_t lo_delta = !split_ ? 0 : is_project ? width_[which] / kPanelCols * l.panel_stride() : width_[which] * kPanelCols;
    for_each_part(which, [&](const Part& p) {  // those of its panels that fall in [p0, p0 + np)
      const int64_t j0 = std::max<int64_t>(0, ceil_div(p0 - p.first, p.step));
      const int64_t j1 =
          std::min(ceil_div(p.N, kPanelCols), p0 + np - p.first <= 0 ? 0 : ceil_div(p0 + np - p.first, p.step));
      if (j1 <= j0) return;
      const int64_t sn = p.transpose ? p.cols : 1, sk = p.transpose ? 1 : p.cols;
      const char* data = static_cast<const char*>(p.t) + (e * p.rows * p.cols + j0 * kPanelCols * sn) * elem;
      const int64_t n = std::min(p.N - j0 * kPanelCols, (j1 - j0) * kPanelCols);
      ks.pack_panels(MatrixView{data, L_.dtype, sk, sn}, p.K, n, l.Kp, p.k_offset, p.step,
                     dst + (p.first + j0 * p.step - p0) * l.panel_stride(), lo_delta);
    });
  }

 private:
  LoraView L_;
  int64_t H_, I_, r_, R_;
  bool backward_, split_;
  int64_t width_[kCount] = {};
  PanelLayout layouts_[kCount];
  int64_t offset_[kCount + 1] = {};
  Buffer<bf16> data_;
  std::vector<int64_t> shared_index_;  // per active slot: its packing in data_, or -1 (packed per task)
  std::vector<int64_t> direct_row_;    // per active slot: its first row in direct_out_, or -1 (not direct)
  Buffer<bf16> packed_coef_[kCount];   // of the two expands
  Buffer<float> direct_out_[kCount];
  Buffer<bf16> buffers_;        // per worker: operands of unprepared slots
  int64_t buffer_elements_ = 0;
};

LoraPanels::Which expand_of(LoraPanels::Which project) {
  return project == LoraPanels::kProjectGateUp ? LoraPanels::kExpandGateUp : LoraPanels::kExpandDown;
}

// The project of row block `task` (worker tid): C = A [rows][K] x the project operand (scratch), then,
// per row, the rank-r results v = C_hi + C_lo in fp32 -> dst0 (columns [0, r)) and dst1 (columns
// [R, R + r), when not null) for the first `real` rows, and the expand's coefficients bf16(scale * v)
// for all rows into lp (twice when the LoRA is split, zero K padding). A direct slot gets v straight from
// the fp32 matrices and runs its whole expand here, on scale * v in fp32 (LoraPanels::direct_out).
void lora_project(const KernelSet& ks, LoraPanels& lp, LoraPanels::Which which, const ExpertBlocks& blocks,
                  int64_t task, int tid, const bf16* A, int64_t lda, float* scratch, float* dst0, float* dst1,
                  float scale) {
  const RowBlock& b = blocks[task];
  const int64_t slot = blocks.slot(task), rows = b.rows, real = b.real;
  const PanelLayout& l = lp.layout(which);
  const int64_t ldc = kPanelCols * l.panels, width = lp.width(which), r = lp.rank(), R = lp.rank_slot();
  const LoraPanels::Which expand = expand_of(which);
  const int64_t ldcoef = lp.layout(expand).Kp;
  const bool direct = lp.direct(slot);
  if (direct) {
    for (int64_t i = 0; i < rows; ++i) std::fill(scratch + i * ldc, scratch + i * ldc + width, 0.0f);
    lp.project_direct(ks, which, b.e, A, lda, rows, scratch, ldc);
  } else {
    const bf16* B = lp.operand(ks, slot, b.e, which, 0, l.panels, tid);
    ks.gemm(A, lda, rows, B, l.panel_stride(), l.Kp / 2, int(l.panels), scratch, ldc, false, nullptr);
  }
  for (int64_t i = 0; i < rows; ++i) {
    float* v = scratch + i * ldc;
    if (!direct && lp.split())
      for (int64_t j = 0; j < width; ++j) v[j] += v[width + j];
    if (i < real) {
      std::memcpy(dst0 + i * r, v, r * sizeof(float));
      if (dst1) std::memcpy(dst1 + i * r, v + R, r * sizeof(float));
    }
    if (direct) {
      for (int64_t j = 0; j < width; ++j) v[j] *= scale;
      continue;
    }
    bf16* k = lp.packed_coef(expand, b.prow + i);
    for (int64_t j = 0; j < width; ++j) k[j] = f32_to_bf16(scale * v[j]);
    int64_t used = width;
    if (lp.split()) std::memcpy(k + width, k, width * sizeof(bf16)), used += width;
    std::fill(k + used, k + ldcoef, bf16(0));
  }
  if (direct) {
    float* out = lp.direct_out(expand, slot);
    std::fill(out, out + rows * lp.direct_ld(expand), 0.0f);
    lp.expand_direct(ks, expand, b.e, scratch, ldc, rows, out);
  }
}

// The expand of row block b (of active slot `slot`) into C [rows][16 * np]: its coefficients x the
// operand's panels [p0, p0 + np), B (LoraPanels::operand: null for a direct slot).
void lora_expand(const KernelSet& ks, LoraPanels& lp, LoraPanels::Which which, int64_t slot, const RowBlock& b,
                 int64_t p0, int np, const bf16* B, float* C, int64_t ldc) {
  if (lp.direct(slot)) {  // done in its project: add those columns
    const float* out = lp.direct_out(which, slot) + p0 * kPanelCols;
    const int64_t ld = lp.direct_ld(which), n = np * kPanelCols;
    for (int64_t i = 0; i < b.rows; ++i)
      for (int64_t c = 0; c < n; ++c) C[i * ldc + c] += out[i * ld + c];
    return;
  }
  const PanelLayout& l = lp.layout(which);
  ks.gemm(lp.packed_coef(which, b.prow), l.Kp, b.rows, B, l.panel_stride(), l.Kp / 2, np, C, ldc, true, nullptr);
}

// rows [0, real) of C (ldc) += bias [n] (nothing when bias is null).
void add_bias_rows(float* C, int64_t ldc, int64_t real, const float* bias, int64_t n) {
  if (!bias) return;
  for (int64_t i = 0; i < real; ++i)
    for (int64_t c = 0; c < n; ++c) C[i * ldc + c] += bias[c];
}

float dot_bf16(const float* a, const bf16* b, int64_t n) {
  float s = 0.0f;
  for (int64_t c = 0; c < n; ++c) s += a[c] * bf16_to_f32(b[c]);
  return s;
}

// Pair-rows per chunk of a forward operand decoded just before use: 6 panels of them are 24 KiB (L1).
constexpr int64_t kDecodePairs = 64;

// C[rows][16*np] = A x panels [p0, p0 + np) of expert e's forward GEMM g, for the `real` first of
// the rows (the others, A's padding, get zeros where not computed). B: the operand made for the
// whole column block (shared by the expert's row blocks), or null: an expert with few rows (the
// memory-bound case) multiplies straight from the codes where the ISA can (gemm_codes), else it
// decodes its codes a chunk of K at a time into `buffer` and runs each chunk while it is in L1, so
// the codes stream with the GEMM instead of in a pass of their own. (At 64 rows the chunks' C
// reloads cost more than they save: T=1024 forward 10% slower.)
void forward_gemm(const KernelSet& ks, const PackedExperts& W, Gemm g, int64_t e, int64_t p0, int np, const bf16* B,
                  bf16* buffer, const bf16* A, int64_t lda, int64_t rows, int64_t real, float* C, int64_t ldc) {
  const PanelLayout& L = W.layout(g);
  if (B) return gemm_rows(ks, A, lda, rows, B, L, np, C, ldc);
  if (W.forward_from_codes(g, e, p0, np, A, lda, real, C, ldc, ks)) {
    for (int64_t i = real; i < rows; ++i) std::fill(C + i * ldc, C + i * ldc + np * kPanelCols, 0.0f);
    return;
  }
  for (int64_t q0 = 0; q0 < L.Kp / 2; q0 += kDecodePairs) {
    const int64_t nq = std::min(kDecodePairs, L.Kp / 2 - q0);
    const PackedExperts::OperandView op = W.forward_operand(g, e, p0, np, q0, nq, ks, buffer);
    ks.gemm(A + 2 * q0, lda, rows, op.data, op.panel_stride, nq, np, C, ldc, q0 > 0, nullptr);
  }
}

// C[rows][16*np] = A x panels [p0, p0 + np) of expert e's backward GEMM g: B the operand made for the column
// block (shared by the expert's row blocks), or null: an expert with few rows, whose `real` rows multiply by
// the transpose of the forward panels instead (PackedExperts::backward_from_forward; padding rows get zeros).
// Making the transposed operand of an expert with few rows cost more than the GEMM itself: a T=16 backward
// of bf16 weights ran at half the speed of its forward.
void backward_gemm(const KernelSet& ks, const PackedExperts& W, Gemm g, int64_t e, int64_t p0, int np, const bf16* B,
                   bf16* buffer, const bf16* A, int64_t lda, int64_t rows, int64_t real, float* C, int64_t ldc,
                   PrefetchStream* ahead) {
  if (B) return gemm_rows(ks, A, lda, rows, B, W.layout(g), np, C, ldc, ahead);
  W.backward_from_forward(g, e, p0, np, A, lda, real, C, ldc, ks, buffer);
  for (int64_t i = real; i < rows; ++i) std::fill(C + i * ldc, C + i * ldc + np * kPanelCols, 0.0f);
}

// Per-token reduction of per-route rows: out[t] = sum_j weight * rows[route(t, j)], converted.
void reduce_tokens(const KernelSet& ks, const RoutingPlan& plan, const float* routes_rows, int64_t H,
                   const float* slot_weight, void* out, DType out_dtype, float* scratch, int64_t t0) {
  const float* rows[64];
  float weights[64];
  for (int64_t t = t0; t < std::min(plan.T, t0 + kTokenBlock); ++t) {
    int count = 0;
    for (int64_t j = 0; j < plan.k; ++j) {
      int32_t r = plan.slot_route[t * plan.k + j];
      if (r < 0) continue;
      rows[count] = routes_rows + r * H;
      weights[count++] = slot_weight ? slot_weight[t * plan.k + j] : 1.0f;
    }
    if (out_dtype == DType::f32) {
      ks.weighted_sum(static_cast<float*>(out) + t * H, rows, weights, count, H);
    } else {
      ks.weighted_sum(scratch, rows, weights, count, H);
      ks.to_bf16_row(scratch, H, static_cast<bf16*>(out) + t * H);
    }
  }
}

}  // namespace

ForwardCache::ForwardCache(RoutingPlan p, int64_t H_, int64_t I_, int64_t rank_, bool keep, Part part_)
    : plan(std::move(p)),
      H(H_),
      I(I_),
      rank(rank_),
      part(part_),
      saved(keep),
      x(keep && part_ != Part::down ? size_t(plan.T * H_) : 0, Memory::workspace),
      g(keep && part_ != Part::gate_up ? size_t(plan.routes * I_) : 0, Memory::workspace),
      u(keep && part_ == Part::whole ? size_t(plan.routes * I_) : 0, Memory::workspace),
      ag(size_t(plan.routes * rank_), Memory::workspace),
      au(size_t(plan.routes * rank_), Memory::workspace),
      ad(size_t(plan.routes * rank_), Memory::workspace) {}

size_t ForwardCache::nbytes() const {
  return x.bytes() + g.bytes() + u.bytes() + ag.bytes() + au.bytes() + ad.bytes() +
         plan.offset.size() * sizeof(int64_t) +
         (plan.route_token.size() + plan.route_slot.size() + plan.slot_route.size() + plan.active.size()) *
             sizeof(int32_t) +
         plan.route_weight.size() * sizeof(float);
}

std::shared_ptr<Job> make_forward_job(std::shared_ptr<const PackedExperts> weights, const KernelSet& ks, int threads,
                                      const ForwardArgs& a, std::shared_ptr<ForwardCache>* cache_out) {
  const int64_t H = weights->H, I = weights->I, Hp = weights->layout(Gemm::gate_up).Kp, Ip = weights->Ip, T = a.T;
  const int64_t r = a.lora.rank;
  const bool lora = r > 0;
  const float s = a.lora.scale;
  const bf16* x_in = static_cast<const bf16*>(a.x);
  const ExpertVariant V = a.variant;
  const GateForwardFn epilogue = ks.gate_forward[V.gated][int(V.activation)];

  const Part part = a.part;
  auto cache = std::make_shared<ForwardCache>(RoutingPlan(a.ids, a.w, T, a.k, weights->E), H, I, r,
                                              a.save_for_backward, part);
  const std::vector<int64_t> poff = cache->plan.padded_offsets(ks.row_multiple);
  const int64_t M = poff[weights->E];

  struct Workspace {
    Buffer<bf16> xa, ha;            // A operands: gathered x, h (rows padded per expert)
    Buffer<float> o, scratch;
    Buffer<bf16> operand;  // per worker: a decoded B operand of one (expert, column chunk), if the storage needs it
    ExpertBlocks blocks;
    std::unique_ptr<LoraPanels> lora;
    int64_t scratch_per_thread, operand_per_thread;
    std::vector<ColumnTask> gate_up_tasks, down_tasks;
  };
  auto ws =
      std::make_shared<Workspace>(Workspace{{}, {}, {}, {}, {}, ExpertBlocks(cache->plan, poff), {}, 0, 0, {}, {}});
  if (part != Part::down) ws->xa = Buffer<bf16>(size_t(M * Hp), Memory::workspace);
  if (part != Part::gate_up) ws->ha = Buffer<bf16>(size_t(M * Ip), Memory::workspace);
  if (part != Part::gate_up) ws->o = Buffer<float>(size_t(cache->plan.routes * H), Memory::workspace);
  const int64_t n_active = int64_t(cache->plan.active.size());
  int64_t lora_cols = 0;  // columns of the widest LoRA project
  if (lora) {
    ws->lora = std::make_unique<LoraPanels>(a.lora, H, I, ws->blocks, false, threads);
    lora_cols = kPanelCols * ws->lora->layout(LoraPanels::kProjectGateUp).panels;
  }
  ws->scratch_per_thread = std::max({kRowBlock * kColBlock, kRowBlock * lora_cols, H});
  ws->scratch = Buffer<float>(size_t(ws->scratch_per_thread * threads), Memory::workspace);
  ws->operand_per_thread = std::max(weights->operand_buffer_elements(Gemm::gate_up, kPanelsPerBlock),
                                    weights->operand_buffer_elements(Gemm::down, kPanelsPerBlock));
  if (ws->operand_per_thread)
    ws->operand = Buffer<bf16>(size_t(ws->operand_per_thread * threads), Memory::workspace);
  if (cache_out) *cache_out = cache;

  const int64_t n_blocks = ws->blocks.size();
  const int64_t n_lora = lora ? n_active : 0;
  const int64_t i_panels = ceil_div(I, kPanelCols);
  {
    const ExpertBlocks& blocks = ws->blocks;
    const LoraPanels* lp = ws->lora.get();
    auto long_tasks = [&](int64_t slot) {
      return blocks.few_rows(slot) && weights->streams_codes(blocks[blocks.first[slot]].real, ks) &&
             (!lp || lp->direct(slot));  // a packed LoRA expand takes at most kPanelsPerBlock panels
    };
    ws->gate_up_tasks = column_tasks(blocks, 2 * i_panels, long_tasks);  // gate and up panels alternate
    ws->down_tasks = column_tasks(blocks, weights->layout(Gemm::down).panels, long_tasks);
  }
  const int64_t x_chunks = a.save_for_backward && part != Part::down ? ceil_div(T, kTokenBlock) : 0;
  const int64_t t_chunks = ceil_div(T, kTokenBlock);

  return std::make_shared<Job>([=](Worker& wk) mutable {
    const PackedExperts& W = *weights;
    ForwardCache& c = *cache;
    const RoutingPlan& plan = c.plan;
    Workspace& w = *ws;
    float* scratch = w.scratch.data() + wk.tid() * w.scratch_per_thread;
    bf16* operand = w.operand.data() ? w.operand.data() + wk.tid() * w.operand_per_thread : nullptr;
    // The B operand of a task of 3 or 5 (panels [p0, p0 + np) of forward GEMM g), made once for all of the
    // expert's rows; none (null) where a quantized expert with few rows streams its codes (forward_gemm).
    auto task_operand = [&](Gemm g, int64_t slot, int64_t p0, int64_t np) -> const bf16* {
      if (W.storage != Storage::bf16 && w.blocks.few_rows(slot)) return nullptr;
      return W.operand(g, plan.active[slot], p0, np, ks, operand);
    };

    // 1. Pack A (gather each expert's tokens, or for the down part its routes' h), prepare the active
    //    experts' LoRA, cache x (or h).
    wk.for_each(n_blocks + n_lora + x_chunks, [&](int64_t task) {
      if (task < n_blocks && part == Part::down) {
        const RowBlock& b = w.blocks[task];
        for (int64_t i = 0; i < b.rows; ++i) {
          bf16* dst = w.ha.data() + (b.prow + i) * Ip;
          int64_t used = 0;
          if (i < b.real) {
            const int64_t route = b.route0 + i;
            std::memcpy(dst, a.h_in + int64_t(plan.route_slot[route]) * I, I * sizeof(bf16));
            if (a.save_for_backward) std::memcpy(c.g.data() + route * I, dst, I * sizeof(bf16));
            used = I;
          }
          std::fill(dst + used, dst + Ip, bf16(0));
        }
      } else if (task < n_blocks) {
        const RowBlock& b = w.blocks[task];
        for (int64_t i = 0; i < b.rows; ++i) {
          bf16* dst = w.xa.data() + (b.prow + i) * Hp;
          int64_t used = 0;
          if (i < b.real) {
            std::memcpy(dst, x_in + int64_t(plan.route_token[b.route0 + i]) * H, H * sizeof(bf16));
            used = H;
          }
          std::fill(dst + used, dst + Hp, bf16(0));
        }
      } else if (task < n_blocks + n_lora) {
        w.lora->prepare(ks, task - n_blocks, plan.active[task - n_blocks]);
      } else {
        int64_t t0 = (task - n_blocks - n_lora) * kTokenBlock;
        std::memcpy(c.x.data() + t0 * H, x_in + t0 * H, std::min(kTokenBlock, T - t0) * H * sizeof(bf16));
      }
    });

    // 2. LoRA A of gate and up: [a_g | a_u] = x [Ag; Au]^T (fp32, kept for the backward), and
    //    s [a_g | a_u] in bf16 as the A operand of the expand in 3.
    if (lora && part != Part::down)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        LoraPanels& lp = *w.lora;
        lora_project(ks, lp, LoraPanels::kProjectGateUp, w.blocks, task, wk.tid(), w.xa.data() + b.prow * Hp, Hp,
                     scratch, c.ag.data() + b.route0 * r, c.au.data() + b.route0 * r, s);
      });

    // 3. Gate and up (+ s Bg a_g, s Bu a_u, + biases), then h = the variant's act(g) * u (or act(u))
    //    straight from the accumulators. One task per (expert, column chunk), over all of the
    //    expert's rows: B is read once. The gate_up part writes g, u out per slot instead.
    if (part != Part::down) wk.for_each(int64_t(w.gate_up_tasks.size()), [&](int64_t task) {
      const ColumnTask& t = w.gate_up_tasks[task];
      const int64_t slot = t.slot, p0 = t.p0, ldc = t.ldc, j0 = p0 / 2, pairs = t.np / 2;  // gate/up panel pairs
      const int np = int(t.np);
      const bf16* B = task_operand(Gemm::gate_up, slot, p0, np);
      const bf16* LB =
          lora ? w.lora->operand(ks, slot, plan.active[slot], LoraPanels::kExpandGateUp, p0, np, wk.tid()) : nullptr;
      w.blocks.for_expert(slot, [&](const RowBlock& b) {
        forward_gemm(ks, W, Gemm::gate_up, b.e, p0, np, B, operand, w.xa.data() + b.prow * Hp, Hp, b.rows, b.real,
                     scratch, ldc);
        if (lora)  // + s Bg a_g, s Bu a_u: a few more K steps on the same tiles
          lora_expand(ks, *w.lora, LoraPanels::kExpandGateUp, slot, b, p0, np, LB, scratch, ldc);
        for (int64_t jj = 0; jj < pairs; ++jj) {
          const int64_t col = (j0 + jj) * kPanelCols, n = std::min<int64_t>(kPanelCols, I - col);
          float* cg = scratch + 2 * jj * kPanelCols;
          float* cu = cg + kPanelCols;
          add_bias_rows(cg, ldc, b.real, V.gate_bias ? V.gate_bias + b.e * I + col : nullptr, n);
          add_bias_rows(cu, ldc, b.real, V.up_bias ? V.up_bias + b.e * I + col : nullptr, n);
          if (part == Part::gate_up) {
            for (int64_t i = 0; i < b.real; ++i) {
              float* out = a.gate_up_out + int64_t(plan.route_slot[b.route0 + i]) * 2 * I + col;
              std::memcpy(out, cg + i * ldc, n * sizeof(float));
              std::memcpy(out + I, cu + i * ldc, n * sizeof(float));
            }
            continue;
          }
          for (int64_t i = 0; i < b.rows; ++i) {
            const bool keep = a.save_for_backward && i < b.real;
            const int64_t route = b.route0 + i;
            epilogue(V, cg + i * ldc, cu + i * ldc, n, keep ? c.g.data() + route * I + col : nullptr,
                     keep ? c.u.data() + route * I + col : nullptr, w.ha.data() + (b.prow + i) * Ip + col);
          }
        }
        if (j0 + pairs == i_panels && part == Part::whole)  // K padding of h
          for (int64_t i = 0; i < b.rows; ++i) {
            bf16* h = w.ha.data() + (b.prow + i) * Ip;
            std::fill(h + I, h + Ip, bf16(0));
          }
      });
    });

    // 4. LoRA A of down: a_d = Ad h (fp32, kept), s a_d in bf16 for the expand in 5.
    if (lora && part != Part::gate_up)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        LoraPanels& lp = *w.lora;
        lora_project(ks, lp, LoraPanels::kProjectDown, w.blocks, task, wk.tid(), w.ha.data() + b.prow * Ip, Ip,
                     scratch, c.ad.data() + b.route0 * r, nullptr, s);
      });

    // 5. Down (+ s Bd a_d, + bias): one unweighted output row per route; tasks as in 3.
    if (part != Part::gate_up) wk.for_each(int64_t(w.down_tasks.size()), [&](int64_t task) {
      const ColumnTask& t = w.down_tasks[task];
      const int64_t slot = t.slot, p0 = t.p0, ldc = t.ldc;
      const int np = int(t.np);
      const bf16* B = task_operand(Gemm::down, slot, p0, np);
      const int64_t col = p0 * kPanelCols, n = std::min<int64_t>(np * kPanelCols, H - col);
      const bf16* LB =
          lora ? w.lora->operand(ks, slot, plan.active[slot], LoraPanels::kExpandDown, p0, np, wk.tid()) : nullptr;
      w.blocks.for_expert(slot, [&](const RowBlock& b) {
        forward_gemm(ks, W, Gemm::down, b.e, p0, np, B, operand, w.ha.data() + b.prow * Ip, Ip, b.rows, b.real,
                     scratch, ldc);
        if (lora) lora_expand(ks, *w.lora, LoraPanels::kExpandDown, slot, b, p0, np, LB, scratch, ldc);
        add_bias_rows(scratch, ldc, b.real, V.down_bias ? V.down_bias + b.e * H + col : nullptr, n);
        for (int64_t i = 0; i < b.real; ++i)
          std::memcpy(w.o.data() + (b.route0 + i) * H + col, scratch + i * ldc, n * sizeof(float));
      });
    });

    // 6. y[t] = sum_j w[t, j] o[t, j], in slot order (deterministic).
    if (part != Part::gate_up) wk.for_each(t_chunks, [&](int64_t task) {
      reduce_tokens(ks, plan, w.o.data(), H, a.w, a.y, a.y_dtype, scratch, task * kTokenBlock);
    });
    // Every worker is past the last phase's barrier: the workspace goes back to the cache before
    // the job reports done, so the caller's next call can reuse it.
    if (wk.tid() == 0) ws.reset();
  });
}

std::shared_ptr<Job> make_backward_job(std::shared_ptr<const PackedExperts> weights, const KernelSet& ks, int threads,
                                       std::shared_ptr<const ForwardCache> cache, const BackwardArgs& a) {
  const int64_t H = weights->H, I = weights->I, Hp = weights->layout(Gemm::gate_up).Kp, Ip = weights->Ip,
                T = cache->plan.T;
  const int64_t r = a.lora.rank;
  const bool lora = r > 0;
  const float s = a.lora.scale;
  const bf16* gy_in = static_cast<const bf16*>(a.gy);
  const ExpertVariant V = a.variant;
  const GateBackwardFn epilogue = ks.gate_backward[V.gated][int(V.activation)];
  if (r != cache->rank)
    throw std::invalid_argument("cache: made with LoRA rank " + std::to_string(cache->rank) + ", the state has rank " +
                                std::to_string(r));
  if (!cache->saved)
    throw std::invalid_argument("cache: made without save_for_backward");
  const Part part = cache->part;
  if ((part == Part::down) != (a.dh_out != nullptr) || (part == Part::gate_up) != (a.dgu_in != nullptr))
    throw std::invalid_argument("cache: made by the forward of another part of the layer");
  const std::vector<int64_t> poff = cache->plan.padded_offsets(ks.row_multiple);
  const int64_t M = poff[weights->E];
  const int64_t i_panels = ceil_div(I, kPanelCols);
  const int64_t i_chunks = ceil_div(i_panels, kPanelsPerBlock);
  // dw[t, j] = gy_t . o = dh_raw . h + gy_t . bd[e]: one share per column chunk of 3, one for the bias.
  const int64_t dw_parts = i_chunks + 1;

  struct Workspace {
    Buffer<bf16> gy, dgu, hb;        // A operands: gathered gy, [dg | du]; h for dAd
    Buffer<float> dwpart, dxr, bd, cg, cu, scratch;
    Buffer<bf16> operand;  // per worker: the B operand of one (expert, column chunk)
    ExpertBlocks blocks;
    std::unique_ptr<LoraPanels> lora;
    int64_t scratch_per_thread, operand_per_thread;
  };
  const int64_t routes = cache->plan.routes;
  auto ws = std::make_shared<Workspace>(
      Workspace{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, ExpertBlocks(cache->plan, poff), {}, 0, 0});
  ws->gy = Buffer<bf16>(size_t(M * Hp), Memory::workspace);
  ws->dgu = Buffer<bf16>(size_t(M * 2 * Ip), Memory::workspace);
  ws->dwpart = Buffer<float>(size_t(routes * dw_parts), Memory::workspace);
  ws->dxr = Buffer<float>(size_t(routes * H), Memory::workspace);
  const int64_t n_active = int64_t(cache->plan.active.size());
  int64_t lora_cols = 0;  // columns of the widest LoRA project
  if (lora) {
    ws->hb = Buffer<bf16>(size_t(routes * I), Memory::workspace);
    ws->bd = Buffer<float>(size_t(routes * r), Memory::workspace);
    ws->cg = Buffer<float>(size_t(routes * r), Memory::workspace);
    ws->cu = Buffer<float>(size_t(routes * r), Memory::workspace);
    ws->lora = std::make_unique<LoraPanels>(a.lora, H, I, ws->blocks, true, threads);
    lora_cols = kPanelCols * ws->lora->layout(LoraPanels::kProjectGateUp).panels;
  }
  ws->scratch_per_thread = std::max({kRowBlock * kColBlock, kRowBlock * lora_cols, H});
  ws->scratch = Buffer<float>(size_t(ws->scratch_per_thread * threads), Memory::workspace);
  ws->operand_per_thread = std::max(weights->operand_buffer_elements(Gemm::down_t, kPanelsPerBlock),
                                    weights->operand_buffer_elements(Gemm::gate_up_t, kPanelsPerBlock));
  if (weights->backward == BackwardWeights::on_the_fly)
    ws->operand = Buffer<bf16>(size_t(ws->operand_per_thread * threads), Memory::workspace);

  const int64_t n_blocks = ws->blocks.size();
  const int64_t n_lora = lora ? n_active : 0;
  const int64_t h_chunks = ceil_div(weights->layout(Gemm::gate_up_t).panels, kPanelsPerBlock);
  const int64_t t_chunks = ceil_div(T, kTokenBlock);
  // LoRA-gradient tasks: (active expert, gradient, column chunk); three gradients span H
  // columns (dAg, dAu, dBd), three span I (dBg, dBu, dAd).
  const int64_t gh = ceil_div(H, kGradCols), gi = ceil_div(I, kGradCols);
  const int64_t grad_tasks_per_expert = lora ? 3 * gh + 3 * gi : 0;
  std::vector<int32_t> idle;  // experts without routes: their LoRA gradients are zeros
  if (lora) {
    std::vector<char> active(size_t(weights->E), 0);
    for (int32_t e : cache->plan.active) active[size_t(e)] = 1;
    for (int32_t e = 0; e < int32_t(weights->E); ++e)
      if (!active[size_t(e)]) idle.push_back(e);
  }
  const int64_t n_idle = int64_t(idle.size());

  return std::make_shared<Job>([=](Worker& wk) mutable {
    const PackedExperts& W = *weights;
    const ForwardCache& c = *cache;
    const RoutingPlan& plan = c.plan;
    Workspace& w = *ws;
    float* scratch = w.scratch.data() + wk.tid() * w.scratch_per_thread;
    bf16* operand = w.operand.data() ? w.operand.data() + wk.tid() * w.operand_per_thread : nullptr;
    const int64_t ldd = 2 * Ip;  // dg | du
    // The B operand of a task of 3 or 5 (panels [p0, p0 + np) of backward GEMM g), made once for all of the
    // expert's rows; none (null) for an expert with few rows (backward_gemm), unless resident.
    auto task_operand = [&](Gemm g, int64_t slot, int64_t p0, int64_t np) -> const bf16* {
      if (W.backward == BackwardWeights::on_the_fly && w.blocks.few_rows(slot)) return nullptr;
      return W.operand(g, plan.active[slot], p0, np, ks, operand);
    };

    // 1. Gather gy per expert (unweighted), clear the dg/du padding, prepare the LoRA matrices, zero the
    //    LoRA gradients of the experts without routes (of this part). The gate_up part gathers its
    //    given [dg | du] instead of gy.
    wk.for_each(n_blocks + n_lora + n_idle, [&](int64_t task) {
      if (task >= n_blocks + n_lora) {
        const int64_t e = idle[size_t(task - n_blocks - n_lora)];
        auto clear = [&](float* G, int64_t size) { std::fill(G + e * size, G + (e + 1) * size, 0.0f); };
        if (part != Part::down) {
          for (float* G : {a.d_gate_a, a.d_up_a}) clear(G, r * H);
          for (float* G : {a.d_gate_b, a.d_up_b}) clear(G, I * r);
        }
        if (part != Part::gate_up) clear(a.d_down_a, r * I), clear(a.d_down_b, H * r);
        return;
      }
      if (task >= n_blocks) {
        w.lora->prepare(ks, task - n_blocks, plan.active[task - n_blocks]);
        return;
      }
      const RowBlock& b = w.blocks[task];
      if (part == Part::gate_up) {
        for (int64_t i = 0; i < b.rows; ++i) {
          bf16* d = w.dgu.data() + (b.prow + i) * ldd;
          std::fill(d, d + ldd, bf16(0));
          if (i < b.real) {
            const bf16* src = a.dgu_in + int64_t(plan.route_slot[b.route0 + i]) * 2 * I;
            std::memcpy(d, src, I * sizeof(bf16));
            std::memcpy(d + Ip, src + I, I * sizeof(bf16));
          }
        }
        return;
      }
      for (int64_t i = 0; i < b.rows; ++i) {
        bf16* g = w.gy.data() + (b.prow + i) * Hp;
        bf16* d = w.dgu.data() + (b.prow + i) * ldd;
        if (i < b.real) {
          std::memcpy(g, gy_in + int64_t(plan.route_token[b.route0 + i]) * H, H * sizeof(bf16));
          w.dwpart.data()[(b.route0 + i) * dw_parts + i_chunks] =
              V.down_bias ? dot_bf16(V.down_bias + b.e * H, g, H) : 0.0f;
          std::fill(g + H, g + Hp, bf16(0));
          std::fill(d + I, d + Ip, bf16(0));
          std::fill(d + Ip + I, d + ldd, bf16(0));
        } else {
          std::fill(g, g + Hp, bf16(0));
          std::fill(d, d + ldd, bf16(0));
        }
      }
    });

    // 2. b_d = Bd^T gy (unweighted, fp32), s b_d in bf16 for the expand in 3.
    if (lora && part != Part::gate_up)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        LoraPanels& lp = *w.lora;
        lora_project(ks, lp, LoraPanels::kProjectDown, w.blocks, task, wk.tid(), w.gy.data() + b.prow * Hp, Hp,
                     scratch, w.bd.data() + b.route0 * r, nullptr, s);
      });

    // 3. dh_raw = Wd^T gy + s Ad^T b_d; epilogue: dw share, dg, du (and h for dAd). One task per
    //    (expert, column chunk): its B operand is made once and used by all of the expert's rows.
    //    The down part writes dh = w dh_raw out per slot instead; h is the one its forward was given.
    if (part != Part::gate_up) wk.for_each_ahead(n_active * i_chunks, [&](int64_t task, int64_t next) {
      const int64_t slot = task / i_chunks, chunk = task % i_chunks, p0 = kPanelsPerBlock * chunk;
      const int np = int(std::min<int64_t>(kPanelsPerBlock, i_panels - p0));
      const bf16* B = task_operand(Gemm::down_t, slot, p0, np);
      PrefetchStream ahead;  // the next task's operand source, read while this GEMM runs
      if (next >= 0) {
        const int64_t q0 = kPanelsPerBlock * (next % i_chunks);
        ahead = W.operand_source(Gemm::down_t, plan.active[next / i_chunks], q0,
                                 std::min<int64_t>(kPanelsPerBlock, i_panels - q0));
      }
      const int64_t col = p0 * kPanelCols, n = std::min<int64_t>(np * kPanelCols, I - col);
      const bf16* LB =
          lora ? w.lora->operand(ks, slot, plan.active[slot], LoraPanels::kExpandDown, p0, np, wk.tid()) : nullptr;
      w.blocks.for_expert(slot, [&](const RowBlock& b) {
        backward_gemm(ks, W, Gemm::down_t, b.e, p0, np, B, operand, w.gy.data() + b.prow * Hp, Hp, b.rows, b.real,
                      scratch, kColBlock, &ahead);
        if (lora) lora_expand(ks, *w.lora, LoraPanels::kExpandDown, slot, b, p0, np, LB, scratch, kColBlock);
        for (int64_t i = 0; i < b.real; ++i) {
          const int64_t route = b.route0 + i;
          if (part == Part::down) {
            const float* dh_raw = scratch + i * kColBlock;
            const bf16* h = c.g.data() + route * I + col;
            float* out = a.dh_out + int64_t(plan.route_slot[route]) * I + col;
            const float wr = plan.route_weight[route];
            float dot = 0.0f;
            for (int64_t q = 0; q < n; ++q) {
              out[q] = wr * dh_raw[q];
              dot += dh_raw[q] * bf16_to_f32(h[q]);
            }
            w.dwpart.data()[route * dw_parts + chunk] = dot;
            continue;
          }
          bf16* d = w.dgu.data() + (b.prow + i) * ldd;
          w.dwpart.data()[route * dw_parts + chunk] =
              epilogue(V, scratch + i * kColBlock, c.g.data() + route * I + col, c.u.data() + route * I + col, n,
                       plan.route_weight[route], d + col, d + Ip + col, lora ? w.hb.data() + route * I + col : nullptr);
        }
      });
    });

    // 4. [c_g | c_u] = [dg | du] [Bg, 0; 0, Bu] (fp32), s [c_g | c_u] in bf16 for the expand in 5.
    if (lora && part != Part::down)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        LoraPanels& lp = *w.lora;
        lora_project(ks, lp, LoraPanels::kProjectGateUp, w.blocks, task, wk.tid(), w.dgu.data() + b.prow * ldd, ldd,
                     scratch, w.cg.data() + b.route0 * r, w.cu.data() + b.route0 * r, s);
      });

    // 5. dx rows = [dg | du] [Wg; Wu] + s (Ag^T c_g + Au^T c_u), and the six LoRA gradients.
    wk.for_each_ahead(n_active * h_chunks + n_active * grad_tasks_per_expert, [&](int64_t task, int64_t next) {
      if (task < n_active * h_chunks) {  // dx rows, per (expert, column chunk) as in 3
        if (part == Part::down) return;
        const int64_t slot = task / h_chunks;
        const int64_t p0 = (task % h_chunks) * kPanelsPerBlock;
        const PanelLayout& L = W.layout(Gemm::gate_up_t);
        const int np = int(std::min(kPanelsPerBlock, L.panels - p0));
        const bf16* B = task_operand(Gemm::gate_up_t, slot, p0, np);
        PrefetchStream ahead;  // the next dx task's operand source, read while this GEMM runs
        if (next >= 0 && next < n_active * h_chunks) {
          const int64_t q0 = (next % h_chunks) * kPanelsPerBlock;
          ahead = W.operand_source(Gemm::gate_up_t, plan.active[next / h_chunks], q0,
                                   std::min(kPanelsPerBlock, L.panels - q0));
        }
        const int64_t col = p0 * kPanelCols, n = std::min<int64_t>(np * kPanelCols, H - col);
        const bf16* LB =
            lora ? w.lora->operand(ks, slot, plan.active[slot], LoraPanels::kExpandGateUp, p0, np, wk.tid()) : nullptr;
        w.blocks.for_expert(slot, [&](const RowBlock& b) {
          backward_gemm(ks, W, Gemm::gate_up_t, b.e, p0, np, B, operand, w.dgu.data() + b.prow * ldd, ldd, b.rows,
                        b.real, scratch, kColBlock, &ahead);
          if (lora) lora_expand(ks, *w.lora, LoraPanels::kExpandGateUp, slot, b, p0, np, LB, scratch, kColBlock);
          for (int64_t i = 0; i < b.real; ++i)
            std::memcpy(w.dxr.data() + (b.route0 + i) * H + col, scratch + i * kColBlock, n * sizeof(float));
        });
        return;
      }
      task -= n_active * h_chunks;
      const int64_t slot = task / grad_tasks_per_expert, e = plan.active[slot];
      const int64_t g = task % grad_tasks_per_expert;
      const int64_t off = plan.offset[e], n_e = plan.count(e), prow_e = poff[e];
      const float* wr = plan.route_weight.data() + off;
      const int kind = g < 3 * gh ? int(g / gh) : 3 + int((g - 3 * gh) / gi);
      const bool down_gradient = kind == 2 || kind == 5;  // dBd, dAd: the down part's
      if ((part == Part::down && !down_gradient) || (part == Part::gate_up && down_gradient)) return;
      const int64_t c0 = (g < 3 * gh ? g % gh : (g - 3 * gh) % gi) * kGradCols;
      const int64_t ncols = std::min(kGradCols, (kind < 3 ? H : I) - c0);
      // [r][cols] gradients (the A's) and [cols][r] ones (the B's), written in place.
      auto direct = [&](float* G, int64_t ld, const float* coef, const float* pscale, const bf16* rows, int64_t ldrow,
                        const int32_t* index) {
        ks.rank_update(G + e * r * ld + c0, ld, int(r), ncols, coef + off * r, r, pscale, s, rows + c0, ldrow, index,
                       n_e);
      };
      auto transposed = [&](float* G, int64_t cols, const float* coef, const float* pscale, const bf16* rows,
                            int64_t ldrow) {
        ks.rank_update_t(G + (e * cols + c0) * r, r, int(r), ncols, coef + off * r, r, pscale, s, rows + c0, ldrow,
                         nullptr, n_e);
      };
      const int32_t* tokens = plan.route_token.data() + off;
      switch (kind) {
        case 0:  // dAg = s sum c_g x^T
          direct(a.d_gate_a, H, w.cg.data(), nullptr, c.x.data(), H, tokens);
          break;
        case 1:  // dAu = s sum c_u x^T
          direct(a.d_up_a, H, w.cu.data(), nullptr, c.x.data(), H, tokens);
          break;
        case 2:  // dBd = s sum (w gy) a_d^T
          transposed(a.d_down_b, H, c.ad.data(), wr, w.gy.data() + prow_e * Hp, Hp);
          break;
        case 3:  // dBg = s sum dg a_g^T
          transposed(a.d_gate_b, I, c.ag.data(), nullptr, w.dgu.data() + prow_e * ldd, ldd);
          break;
        case 4:  // dBu = s sum du a_u^T
          transposed(a.d_up_b, I, c.au.data(), nullptr, w.dgu.data() + prow_e * ldd + Ip, ldd);
          break;
        default:  // dAd = s sum (w b_d) h^T
          direct(a.d_down_a, I, w.bd.data(), wr, (part == Part::down ? c.g.data() : w.hb.data()) + off * I, I,
                 nullptr);
          break;
      }
    });

    // 6. dx[t] = sum_j dx rows (w already applied); dw[t, j] = sum of its dh_raw . h shares.
    wk.for_each(t_chunks, [&](int64_t task) {
      if (part != Part::down)
        reduce_tokens(ks, plan, w.dxr.data(), H, nullptr, a.dx, a.dx_dtype, scratch, task * kTokenBlock);
      if (part == Part::gate_up) return;
      for (int64_t t = task * kTokenBlock; t < std::min(T, (task + 1) * kTokenBlock); ++t)
        for (int64_t j = 0; j < plan.k; ++j) {
          const int32_t route = plan.slot_route[t * plan.k + j];
          float sum = 0.0f;
          if (route >= 0)
            for (int64_t q = 0; q < dw_parts; ++q) sum += w.dwpart.data()[route * dw_parts + q];
          a.dw[t * plan.k + j] = sum;
        }
    });
    if (wk.tid() == 0) ws.reset();  // as in the forward
  });
}

}  // namespace kt
