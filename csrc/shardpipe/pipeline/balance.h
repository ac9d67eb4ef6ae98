#pragma once

#include <cstdint>
#include <vector>

namespace shardpipe {

// Splits a sequence of non-negative costs into `partitions` contiguous, non-empty groups and
// returns the group sizes (the "balance" of a pipeline: how many layers each stage gets).
//
// The result is exact, chosen by these rules in order:
//   1. the largest group cost is as small as possible (the slowest stage sets the pace);
//   2. among those, the sizes are as even as possible (smallest sum of squared sizes);
//   3. among those, the lexicographically smallest list of sizes (earlier groups smaller).
// A group's cost is the sum of its costs added left to right in double precision, so the
// result is reproducible and can be checked against a brute-force search bit for bit.
//
// Throws std::invalid_argument when partitions < 1, partitions > costs.size(), or a cost is
// negative or not finite. Runs in O(partitions * n^2) time and O(partitions * n) memory.
std::vector<int64_t> balance_partition(const std::vector<double>& costs, int64_t partitions);

}  // namespace shardpipe
