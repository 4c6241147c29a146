#include "moe.hpp"

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace kt {
namespace {

constexpr int64_t kRowBlock = 64;        // rows of A per task (a multiple of every ISA's mr)
constexpr int64_t kColBlock = 64;        // output columns per task: 4 panels
constexpr int64_t kPanelsPerBlock = kColBlock / kPanelCols;
constexpr int64_t kTokenBlock = 16;      // tokens per task of the final per-token reduction
constexpr int64_t kGradCols = kRankUpdateMaxCols;  // columns per LoRA-gradient task

size_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

// The LoRA matrices of the active experts in fp32, laid out for lora_project / lora_expand:
// the A matrices as given ([r][H], [r][I]) and the B matrices transposed ([r][I], [r][H]).
// fp32 A matrices are read in place; the rest is converted per call (the optimizer may have
// changed them since the last one).
class LoraMatrices {
 public:
  enum Which { Ag, Au, Ad, BgT, BuT, BdT, kCount };

  LoraMatrices(const LoraView& L, int64_t H, int64_t I, int64_t n_active)
      : L_(L), H_(H), I_(I), per_slot_(L.rank * 3 * (H + I)), data_(size_t(per_slot_ * n_active)),
        ptrs_(size_t(n_active)) {}

  // Fills slot `slot` with expert e; slots are independent (one task each).
  void prepare(int64_t slot, int64_t e) {
    const int64_t r = L_.rank, H = H_, I = I_;
    float* d = data_.data() + slot * per_slot_;
    auto& p = ptrs_[slot];
    auto a_matrix = [&](const void* base, int64_t cols) -> const float* {
      if (L_.dtype == DType::f32) return static_cast<const float*>(base) + e * r * cols;
      const bf16* src = static_cast<const bf16*>(base) + e * r * cols;
      float* out = d;
      for (int64_t i = 0; i < r * cols; ++i) out[i] = bf16_to_f32(src[i]);
      d += r * cols;
      return out;
    };
    auto b_transposed = [&](const void* base, int64_t rows) -> const float* {  // [rows][r] -> [r][rows]
      float* out = d;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t q = 0; q < r; ++q) out[q * rows + i] = load_as_f32(base, L_.dtype, (e * rows + i) * r + q);
      d += r * rows;
      return out;
    };
    p[Ag] = a_matrix(L_.gate_a, H);
    p[Au] = a_matrix(L_.up_a, H);
    p[Ad] = a_matrix(L_.down_a, I);
    p[BgT] = b_transposed(L_.gate_b, I);
    p[BuT] = b_transposed(L_.up_b, I);
    p[BdT] = b_transposed(L_.down_b, H);
  }
  const float* get(int64_t slot, Which w) const { return ptrs_[slot][w]; }

 private:
  LoraView L_;
  int64_t H_, I_, per_slot_;
  Buffer<float> data_;
  std::vector<std::array<const float*, kCount>> ptrs_;
};

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
  }
  int64_t size() const { return int64_t(blocks.size()); }
  int64_t experts() const { return int64_t(first.size()) - 1; }
  const RowBlock& operator[](int64_t i) const { return blocks[i]; }
  template <class F>
  void for_expert(int64_t slot, F&& f) const {
    for (int64_t i = first[slot]; i < first[slot + 1]; ++i) f(blocks[i]);
  }
};

// C[rows][16*np] = A[rows][K] * B (np panels of layout l).
void gemm_rows(const KernelSet& ks, const bf16* A, int64_t lda, int64_t rows, const bf16* B, const PanelLayout& l,
               int np, float* C, int64_t ldc) {
  ks.gemm(A, lda, rows, B, l.panel_stride(), l.Kp / 2, np, C, ldc, false);
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

ForwardCache::ForwardCache(RoutingPlan p, int64_t H_, int64_t I_, int64_t rank_, bool keep)
    : plan(std::move(p)),
      H(H_),
      I(I_),
      rank(rank_),
      x(keep ? size_t(plan.T * H_) : 0),
      g(keep ? size_t(plan.routes * I_) : 0),
      u(keep ? size_t(plan.routes * I_) : 0),
      ag(size_t(plan.routes * rank_)),
      au(size_t(plan.routes * rank_)),
      ad(size_t(plan.routes * rank_)) {}

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

  auto cache =
      std::make_shared<ForwardCache>(RoutingPlan(a.ids, a.w, T, a.k, weights->E), H, I, r, a.save_for_backward);
  const std::vector<int64_t> poff = cache->plan.padded_offsets(ks.mr);
  const int64_t M = poff[weights->E];

  struct Workspace {
    Buffer<bf16> xa, ha;  // A operands: gathered x, h (rows padded per expert)
    Buffer<float> o, scratch;
    ExpertBlocks blocks;
    std::vector<int64_t> expert_slot;  // expert -> index in plan.active
    std::unique_ptr<LoraMatrices> lora;
    int64_t scratch_per_thread;
  };
  auto ws = std::make_shared<Workspace>(Workspace{{}, {}, {}, {}, ExpertBlocks(cache->plan, poff), {}, {}, 0});
  ws->xa = Buffer<bf16>(size_t(M * Hp));
  ws->ha = Buffer<bf16>(size_t(M * Ip));
  ws->o = Buffer<float>(size_t(cache->plan.routes * H));
  ws->expert_slot.assign(weights->E, -1);
  const int64_t n_active = int64_t(cache->plan.active.size());
  for (int64_t i = 0; i < n_active; ++i) ws->expert_slot[cache->plan.active[i]] = i;
  if (lora) ws->lora = std::make_unique<LoraMatrices>(a.lora, H, I, n_active);
  ws->scratch_per_thread = std::max(kRowBlock * kColBlock, H);
  ws->scratch = Buffer<float>(size_t(ws->scratch_per_thread * threads));
  if (cache_out) *cache_out = cache;

  const int64_t n_blocks = ws->blocks.size();
  const int64_t n_lora = lora ? n_active : 0;
  const int64_t i_panels = ceil_div(I, kPanelCols);
  const int64_t i_chunks = ceil_div(i_panels, 2);  // 2 gate + 2 up panels per task
  const int64_t h_chunks = ceil_div(weights->layout(Gemm::down).panels, kPanelsPerBlock);
  const int64_t x_chunks = a.save_for_backward ? ceil_div(T, kTokenBlock) : 0;
  const int64_t t_chunks = ceil_div(T, kTokenBlock);

  return std::make_shared<Job>([=](Worker& wk) {
    const PackedExperts& W = *weights;
    ForwardCache& c = *cache;
    const RoutingPlan& plan = c.plan;
    Workspace& w = *ws;
    float* scratch = w.scratch.data() + wk.tid() * w.scratch_per_thread;

    // 1. Pack A (gather each expert's tokens), prepare the active experts' LoRA, cache x.
    wk.for_each(n_blocks + n_lora + x_chunks, [&](int64_t task) {
      if (task < n_blocks) {
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
        w.lora->prepare(task - n_blocks, plan.active[task - n_blocks]);
      } else {
        int64_t t0 = (task - n_blocks - n_lora) * kTokenBlock;
        std::memcpy(c.x.data() + t0 * H, x_in + t0 * H, std::min(kTokenBlock, T - t0) * H * sizeof(bf16));
      }
    });

    // 2. LoRA A of gate and up: a_g = Ag x, a_u = Au x (fp32, kept for the backward).
    if (lora)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        const int64_t slot = w.expert_slot[b.e];
        const bf16* A = w.xa.data() + b.prow * Hp;
        ks.lora_project(A, Hp, b.real, H, w.lora->get(slot, LoraMatrices::Ag), H, int(r), c.ag.data() + b.route0 * r, r);
        ks.lora_project(A, Hp, b.real, H, w.lora->get(slot, LoraMatrices::Au), H, int(r), c.au.data() + b.route0 * r, r);
      });

    // 3. Gate and up (+ s Bg a_g, s Bu a_u), then h = silu(g) * u straight from the accumulators.
    //    One task per (expert, column chunk), over all of the expert's rows: B is read once.
    wk.for_each(n_active * i_chunks, [&](int64_t task) {
      const int64_t slot = task / i_chunks;
      const int64_t j0 = 2 * (task % i_chunks), pairs = std::min<int64_t>(2, i_panels - j0);
      const PanelLayout& L = W.layout(Gemm::gate_up);
      const bf16* B = W.operand(Gemm::gate_up, plan.active[slot], 2 * j0, 2 * pairs, ks, nullptr);
      w.blocks.for_expert(slot, [&](const RowBlock& b) {
        gemm_rows(ks, w.xa.data() + b.prow * Hp, Hp, b.rows, B, L, int(2 * pairs), scratch, kColBlock);
        for (int64_t jj = 0; jj < pairs; ++jj) {
          const int64_t col = (j0 + jj) * kPanelCols, n = std::min<int64_t>(kPanelCols, I - col);
          float* cg = scratch + 2 * jj * kPanelCols;
          float* cu = cg + kPanelCols;
          if (lora) {
            ks.lora_expand(cg, kColBlock, b.real, n, c.ag.data() + b.route0 * r, r, int(r), s,
                           w.lora->get(slot, LoraMatrices::BgT) + col, I);
            ks.lora_expand(cu, kColBlock, b.real, n, c.au.data() + b.route0 * r, r, int(r), s,
                           w.lora->get(slot, LoraMatrices::BuT) + col, I);
          }
          for (int64_t i = 0; i < b.rows; ++i) {
            const bool keep = a.save_for_backward && i < b.real;
            const int64_t route = b.route0 + i;
            ks.swiglu_forward(cg + i * kColBlock, cu + i * kColBlock, n, keep ? c.g.data() + route * I + col : nullptr,
                              keep ? c.u.data() + route * I + col : nullptr, w.ha.data() + (b.prow + i) * Ip + col);
          }
        }
        if (j0 + pairs == i_panels)  // K padding of h
          for (int64_t i = 0; i < b.rows; ++i) {
            bf16* h = w.ha.data() + (b.prow + i) * Ip;
            std::fill(h + I, h + Ip, bf16(0));
          }
      });
    });

    // 4. LoRA A of down: a_d = Ad h.
    if (lora)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        ks.lora_project(w.ha.data() + b.prow * Ip, Ip, b.real, I, w.lora->get(w.expert_slot[b.e], LoraMatrices::Ad), I,
                        int(r), c.ad.data() + b.route0 * r, r);
      });

    // 5. Down (+ s Bd a_d): one unweighted output row per route; tasks as in 3.
    wk.for_each(n_active * h_chunks, [&](int64_t task) {
      const int64_t slot = task / h_chunks;
      const int64_t p0 = (task % h_chunks) * kPanelsPerBlock;
      const PanelLayout& L = W.layout(Gemm::down);
      const int np = int(std::min(kPanelsPerBlock, L.panels - p0));
      const bf16* B = W.operand(Gemm::down, plan.active[slot], p0, np, ks, nullptr);
      const int64_t col = p0 * kPanelCols, n = std::min<int64_t>(np * kPanelCols, H - col);
      w.blocks.for_expert(slot, [&](const RowBlock& b) {
        gemm_rows(ks, w.ha.data() + b.prow * Ip, Ip, b.rows, B, L, np, scratch, kColBlock);
        if (lora)
          ks.lora_expand(scratch, kColBlock, b.real, n, c.ad.data() + b.route0 * r, r, int(r), s,
                         w.lora->get(slot, LoraMatrices::BdT) + col, H);
        for (int64_t i = 0; i < b.real; ++i)
          std::memcpy(w.o.data() + (b.route0 + i) * H + col, scratch + i * kColBlock, n * sizeof(float));
      });
    });

    // 6. y[t] = sum_j w[t, j] o[t, j], in slot order (deterministic).
    wk.for_each(t_chunks, [&](int64_t task) {
      reduce_tokens(ks, plan, w.o.data(), H, a.w, a.y, a.y_dtype, scratch, task * kTokenBlock);
    });
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
  if (r != cache->rank)
    throw std::invalid_argument("cache: made with LoRA rank " + std::to_string(cache->rank) + ", the state has rank " +
                                std::to_string(r));
  if (!cache->g.data() && cache->plan.routes > 0)
    throw std::invalid_argument("cache: made without save_for_backward");
  const std::vector<int64_t> poff = cache->plan.padded_offsets(ks.mr);
  const int64_t M = poff[weights->E];
  const int64_t i_panels = ceil_div(I, kPanelCols);
  const int64_t i_chunks = ceil_div(i_panels, 2);  // 2 panels (32 columns of I) per task

  struct Workspace {
    Buffer<bf16> gy, dgu, hb;  // A operands: gathered gy, [dg | du]; h for dAd
    Buffer<float> dwpart, dxr, bd, cg, cu, scratch;
    Buffer<bf16> operand;  // per worker: the B operand of one (expert, column chunk)
    ExpertBlocks blocks;
    std::vector<int64_t> expert_slot;
    std::unique_ptr<LoraMatrices> lora;
    int64_t scratch_per_thread, operand_per_thread;
  };
  const int64_t routes = cache->plan.routes;
  auto ws = std::make_shared<Workspace>(
      Workspace{{}, {}, {}, {}, {}, {}, {}, {}, {}, {}, ExpertBlocks(cache->plan, poff), {}, {}, 0, 0});
  ws->gy = Buffer<bf16>(size_t(M * Hp));
  ws->dgu = Buffer<bf16>(size_t(M * 2 * Ip));
  ws->dwpart = Buffer<float>(size_t(routes * i_chunks));
  ws->dxr = Buffer<float>(size_t(routes * H));
  ws->expert_slot.assign(weights->E, -1);
  const int64_t n_active = int64_t(cache->plan.active.size());
  for (int64_t i = 0; i < n_active; ++i) ws->expert_slot[cache->plan.active[i]] = i;
  if (lora) {
    ws->hb = Buffer<bf16>(size_t(routes * I));
    ws->bd = Buffer<float>(size_t(routes * r));
    ws->cg = Buffer<float>(size_t(routes * r));
    ws->cu = Buffer<float>(size_t(routes * r));
    ws->lora = std::make_unique<LoraMatrices>(a.lora, H, I, n_active);
  }
  ws->scratch_per_thread = std::max({kRowBlock * kColBlock, r * kGradCols, H});
  ws->scratch = Buffer<float>(size_t(ws->scratch_per_thread * threads));
  ws->operand_per_thread = std::max(weights->operand_buffer_elements(Gemm::down_t, 2),
                                    weights->operand_buffer_elements(Gemm::gate_up_t, kPanelsPerBlock));
  if (weights->backward == BackwardWeights::on_the_fly)
    ws->operand = Buffer<bf16>(size_t(ws->operand_per_thread * threads));

  const int64_t n_blocks = ws->blocks.size();
  const int64_t n_lora = lora ? n_active : 0;
  const int64_t h_chunks = ceil_div(weights->layout(Gemm::gate_up_t).panels, kPanelsPerBlock);
  const int64_t t_chunks = ceil_div(T, kTokenBlock);
  // LoRA-gradient tasks: (active expert, gradient, column chunk); three gradients span H
  // columns (dAg, dAu, dBd), three span I (dBg, dBu, dAd).
  const int64_t gh = ceil_div(H, kGradCols), gi = ceil_div(I, kGradCols);
  const int64_t grad_tasks_per_expert = lora ? 3 * gh + 3 * gi : 0;

  return std::make_shared<Job>([=](Worker& wk) {
    const PackedExperts& W = *weights;
    const ForwardCache& c = *cache;
    const RoutingPlan& plan = c.plan;
    Workspace& w = *ws;
    float* scratch = w.scratch.data() + wk.tid() * w.scratch_per_thread;
    bf16* operand = w.operand.data() ? w.operand.data() + wk.tid() * w.operand_per_thread : nullptr;
    const int64_t ldd = 2 * Ip;  // dg | du

    // 1. Gather gy per expert (unweighted), clear the dg/du padding, prepare the LoRA matrices.
    wk.for_each(n_blocks + n_lora, [&](int64_t task) {
      if (task >= n_blocks) {
        w.lora->prepare(task - n_blocks, plan.active[task - n_blocks]);
        return;
      }
      const RowBlock& b = w.blocks[task];
      for (int64_t i = 0; i < b.rows; ++i) {
        bf16* g = w.gy.data() + (b.prow + i) * Hp;
        bf16* d = w.dgu.data() + (b.prow + i) * ldd;
        if (i < b.real) {
          std::memcpy(g, gy_in + int64_t(plan.route_token[b.route0 + i]) * H, H * sizeof(bf16));
          std::fill(g + H, g + Hp, bf16(0));
          std::fill(d + I, d + Ip, bf16(0));
          std::fill(d + Ip + I, d + ldd, bf16(0));
        } else {
          std::fill(g, g + Hp, bf16(0));
          std::fill(d, d + ldd, bf16(0));
        }
      }
    });

    // 2. b_d = Bd^T gy (unweighted).
    if (lora)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        ks.lora_project(w.gy.data() + b.prow * Hp, Hp, b.real, H, w.lora->get(w.expert_slot[b.e], LoraMatrices::BdT),
                        H, int(r), w.bd.data() + b.route0 * r, r);
      });

    // 3. dh_raw = Wd^T gy + s Ad^T b_d; epilogue: dw share, dg, du (and h for dAd). One task per
    //    (expert, column chunk): its B operand is made once and used by all of the expert's rows.
    wk.for_each(n_active * i_chunks, [&](int64_t task) {
      const int64_t slot = task / i_chunks, chunk = task % i_chunks, p0 = 2 * chunk;
      const PanelLayout& L = W.layout(Gemm::down_t);
      const int np = int(std::min<int64_t>(2, i_panels - p0));
      const bf16* B = W.operand(Gemm::down_t, plan.active[slot], p0, np, ks, operand);
      const int64_t col = p0 * kPanelCols, n = std::min<int64_t>(np * kPanelCols, I - col);
      w.blocks.for_expert(slot, [&](const RowBlock& b) {
        gemm_rows(ks, w.gy.data() + b.prow * Hp, Hp, b.rows, B, L, np, scratch, kColBlock);
        if (lora)
          ks.lora_expand(scratch, kColBlock, b.real, n, w.bd.data() + b.route0 * r, r, int(r), s,
                         w.lora->get(slot, LoraMatrices::Ad) + col, I);
        for (int64_t i = 0; i < b.real; ++i) {
          const int64_t route = b.route0 + i;
          bf16* d = w.dgu.data() + (b.prow + i) * ldd;
          w.dwpart.data()[route * i_chunks + chunk] =
              ks.swiglu_backward(scratch + i * kColBlock, c.g.data() + route * I + col, c.u.data() + route * I + col,
                                 n, plan.route_weight[route], d + col, d + Ip + col,
                                 lora ? w.hb.data() + route * I + col : nullptr);
        }
      });
    });

    // 4. c_g = Bg^T dg, c_u = Bu^T du.
    if (lora)
      wk.for_each(n_blocks, [&](int64_t task) {
        const RowBlock& b = w.blocks[task];
        const int64_t slot = w.expert_slot[b.e];
        const bf16* A = w.dgu.data() + b.prow * ldd;
        ks.lora_project(A, ldd, b.real, I, w.lora->get(slot, LoraMatrices::BgT), I, int(r), w.cg.data() + b.route0 * r, r);
        ks.lora_project(A + Ip, ldd, b.real, I, w.lora->get(slot, LoraMatrices::BuT), I, int(r),
                        w.cu.data() + b.route0 * r, r);
      });

    // 5. dx rows = [dg | du] [Wg; Wu] + s (Ag^T c_g + Au^T c_u), and the six LoRA gradients.
    wk.for_each(n_active * h_chunks + n_active * grad_tasks_per_expert, [&](int64_t task) {
      if (task < n_active * h_chunks) {  // dx rows, per (expert, column chunk) as in 3
        const int64_t slot = task / h_chunks;
        const int64_t p0 = (task % h_chunks) * kPanelsPerBlock;
        const PanelLayout& L = W.layout(Gemm::gate_up_t);
        const int np = int(std::min(kPanelsPerBlock, L.panels - p0));
        const bf16* B = W.operand(Gemm::gate_up_t, plan.active[slot], p0, np, ks, operand);
        const int64_t col = p0 * kPanelCols, n = std::min<int64_t>(np * kPanelCols, H - col);
        w.blocks.for_expert(slot, [&](const RowBlock& b) {
          gemm_rows(ks, w.dgu.data() + b.prow * ldd, ldd, b.rows, B, L, np, scratch, kColBlock);
          if (lora) {
            ks.lora_expand(scratch, kColBlock, b.real, n, w.cg.data() + b.route0 * r, r, int(r), s,
                           w.lora->get(slot, LoraMatrices::Ag) + col, H);
            ks.lora_expand(scratch, kColBlock, b.real, n, w.cu.data() + b.route0 * r, r, int(r), s,
                           w.lora->get(slot, LoraMatrices::Au) + col, H);
          }
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
      const int64_t c0 = (g < 3 * gh ? g % gh : (g - 3 * gh) % gi) * kGradCols;
      const int64_t ncols = std::min(kGradCols, (kind < 3 ? H : I) - c0);
      // [r][cols] gradients are written in place; [cols][r] ones go through scratch.
      auto direct = [&](float* G, int64_t ld, const float* coef, const float* pscale, const bf16* rows, int64_t ldrow,
                        const int32_t* index) {
        ks.rank_update(G + e * r * ld + c0, ld, int(r), ncols, coef + off * r, r, pscale, s, rows + c0, ldrow, index,
                       n_e);
      };
      auto transposed = [&](float* G, int64_t cols, const float* coef, const float* pscale, const bf16* rows,
                            int64_t ldrow) {
        ks.rank_update(scratch, kGradCols, int(r), ncols, coef + off * r, r, pscale, s, rows + c0, ldrow, nullptr, n_e);
        float* out = G + (e * cols + c0) * r;
        for (int64_t col = 0; col < ncols; ++col)
          for (int64_t q = 0; q < r; ++q) out[col * r + q] = scratch[q * kGradCols + col];
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
          direct(a.d_down_a, I, w.bd.data(), wr, w.hb.data() + off * I, I, nullptr);
          break;
      }
    });

    // 6. dx[t] = sum_j dx rows (w already applied); dw[t, j] = sum of its dh_raw . h shares.
    wk.for_each(t_chunks, [&](int64_t task) {
      reduce_tokens(ks, plan, w.dxr.data(), H, nullptr, a.dx, a.dx_dtype, scratch, task * kTokenBlock);
      for (int64_t t = task * kTokenBlock; t < std::min(T, (task + 1) * kTokenBlock); ++t)
        for (int64_t j = 0; j < plan.k; ++j) {
          const int32_t route = plan.slot_route[t * plan.k + j];
          float sum = 0.0f;
          if (route >= 0)
            for (int64_t q = 0; q < i_chunks; ++q) sum += w.dwpart.data()[route * i_chunks + q];
          a.dw[t * plan.k + j] = sum;
        }
    });
  });
}

}  // namespace kt
