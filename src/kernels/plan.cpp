#include "plan.hpp"

#include <stdexcept>
#include <string>

#include "common.hpp"

namespace kt {

RoutingPlan::RoutingPlan(const int32_t* ids, const float* w, int64_t T_, int64_t k_, int64_t E_)
    : T(T_), k(k_), E(E_), offset(E_ + 1, 0), slot_route(T_ * k_, -1) {
  for (int64_t s = 0; s < T * k; ++s) {
    int32_t e = ids[s];
    if (e < -1)
      throw std::invalid_argument("ids: expert id " + std::to_string(e) + " at slot " + std::to_string(s) +
                                  " is below -1");
    if (e >= 0 && e < E) ++offset[e + 1];
  }
  for (int64_t e = 0; e < E; ++e) {
    if (offset[e + 1] > 0) active.push_back(int32_t(e));
    offset[e + 1] += offset[e];
  }
  routes = offset[E];
  route_token.resize(routes);
  route_slot.resize(routes);
  route_weight.resize(routes);
  std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
  for (int64_t s = 0; s < T * k; ++s) {
    int32_t e = ids[s];
    if (e < 0 || e >= E) continue;  // unused slot, or an expert-parallel sentinel (another rank's expert)
    int64_t r = fill[e]++;
    route_token[r] = int32_t(s / k);
    route_slot[r] = int32_t(s);
    route_weight[r] = w[s];
    slot_route[s] = int32_t(r);
  }
}

std::vector<int64_t> RoutingPlan::padded_offsets(int mr) const {
  std::vector<int64_t> out(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) out[e + 1] = out[e] + round_up(count(e), mr);
  return out;
}

}  // namespace kt
