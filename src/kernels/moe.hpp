// Macro-kernels of the MoE expert layer (MATH.md): forward and backward as pool jobs.
// Threads, edges and epilogues live here; tile math is the micro-kernel's (kernels.hpp).
#pragma once
#include <cstdint>
#include <memory>

#include "common.hpp"
#include "kernels.hpp"
#include "pack.hpp"
#include "plan.hpp"
#include "pool.hpp"

namespace kt {

// The six LoRA tensors of the caller, contiguous, in PEFT's per-expert shapes, read at call time
// (so in-place optimizer updates are always seen). rank == 0 means no LoRA.
struct LoraView {
  const void* gate_a = nullptr;  // [E][r][H]
  const void* gate_b = nullptr;  // [E][I][r]
  const void* up_a = nullptr;    // [E][r][H]
  const void* up_b = nullptr;    // [E][I][r]
  const void* down_a = nullptr;  // [E][r][I]
  const void* down_b = nullptr;  // [E][H][r]
  DType dtype = DType::f32;
  int64_t rank = 0;
  float scale = 0.0f;
};

// Which part of the layer a call computes. The split path runs an experts module's own gate function
// (any _apply_gate) in torch between two kernel calls: gate_up (x -> g, u with LoRA and biases, written
// per slot) and down (h per slot -> y); each has its own backward.
enum class Part : int { whole = 0, gate_up = 1, down = 2 };

// Residuals of one forward call, sized by its T: x, the rounded gate/up pre-activations (or h for the
// down part) and the LoRA intermediates (fp32), all indexed by route. Consumed by one backward; its
// memory then goes back to the workspace cache (bounded) for the next calls.
struct ForwardCache {
  ForwardCache(RoutingPlan p, int64_t H, int64_t I, int64_t rank, bool keep, Part part);
  RoutingPlan plan;
  int64_t H, I, rank;
  Part part;
  bool saved;                // made with save_for_backward
  Buffer<bf16> x;            // [T][H] (whole, gate_up)
  Buffer<bf16> g, u;         // [routes][I] (whole); g holds h for the down part
  Buffer<float> ag, au, ad;  // [routes][rank]
  size_t nbytes() const;
};

struct ForwardArgs {
  const void* x;  // bf16 [T][H] contiguous
  const int32_t* ids;
  const float* w;  // [T][k]
  int64_t T, k;
  void* y;  // [T][H], y_dtype
  DType y_dtype;
  LoraView lora;
  ExpertVariant variant;
  bool save_for_backward;
  Part part = Part::whole;
  float* gate_up_out = nullptr;  // gate_up: [T][k][2I] fp32, g | u per slot (slots without a route untouched)
  const bf16* h_in = nullptr;    // down: [T][k][I] bf16, h per slot (x unused)
};

struct BackwardArgs {
  const void* gy;  // bf16 [T][H] contiguous
  void* dx;        // [T][H], dx_dtype
  DType dx_dtype;
  float* dw;  // [T][k]
  LoraView lora;
  ExpertVariant variant;  // the forward's
  // fp32 gradients in the LoRA tensors' shapes, every element written (zeros for experts without
  // routes): the caller need not clear them. The down part writes the down ones, the gate_up part the
  // others.
  float *d_gate_a, *d_gate_b, *d_up_a, *d_up_b, *d_down_a, *d_down_b;
  float* dh_out = nullptr;        // down part: [T][k][I] fp32, dh = w dh_raw per slot (dx is not written)
  const bf16* dgu_in = nullptr;   // gate_up part: [T][k][2I] bf16, dg | du per slot (dw is not written)
};

// Validates, plans and allocates in the caller's thread (throws std::invalid_argument /
// std::bad_alloc); the returned job only computes, on a pool of `threads` workers. The cache is
// filled when the job is done.
std::shared_ptr<Job> make_forward_job(std::shared_ptr<const PackedExperts> weights, const KernelSet& kernels,
                                      int threads, const ForwardArgs& args, std::shared_ptr<ForwardCache>* cache_out);
std::shared_ptr<Job> make_backward_job(std::shared_ptr<const PackedExperts> weights, const KernelSet& kernels,
                                       int threads, std::shared_ptr<const ForwardCache> cache,
                                       const BackwardArgs& args);

}  // namespace kt
