// The routing plan of one call: the (token, slot) pairs grouped by expert, in token order.
#pragma once
#include <cstdint>
#include <vector>

namespace kt {

struct RoutingPlan {
  int64_t T = 0, k = 0, E = 0;
  int64_t routes = 0;                // slots with an expert (0 <= ids < E)
  std::vector<int64_t> offset;       // E + 1: routes of expert e are [offset[e], offset[e+1])
  std::vector<int32_t> route_token;  // token of each route
  std::vector<int32_t> route_slot;   // t * k + j of each route
  std::vector<float> route_weight;   // routing weight of each route
  std::vector<int32_t> slot_route;   // T * k: route of slot (t, j), or -1
  std::vector<int32_t> active;       // experts with at least one route

  // ids: [T][k], -1 = unused slot, ids >= E (expert-parallel sentinels) skipped like -1;
  // throws std::invalid_argument on an id below -1.
  RoutingPlan(const int32_t* ids, const float* w, int64_t T, int64_t k, int64_t E);
  int64_t count(int64_t e) const { return offset[e + 1] - offset[e]; }
  // Row offsets when each expert's rows are padded to a multiple of mr (A operands).
  std::vector<int64_t> padded_offsets(int mr) const;
};

}  // namespace kt
