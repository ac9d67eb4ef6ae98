// balance_partition against an exhaustive search over every split, with the same rules.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "shardpipe/pipeline/balance.h"

namespace {

using Balance = std::vector<int64_t>;

// (largest group cost, sum of squared sizes, sizes): the documented order of preference.
using Rank = std::tuple<double, int64_t, Balance>;

Rank rank_of(const std::vector<double>& costs, const Balance& balance) {
  double largest = 0.0;
  int64_t squares = 0;
  size_t start = 0;
  for (int64_t size : balance) {
    double group = 0.0;
    for (size_t i = start; i < start + static_cast<size_t>(size); ++i) group += costs[i];
    largest = std::max(largest, group);
    squares += size * size;
    start += static_cast<size_t>(size);
  }
  return {largest, squares, balance};
}

Balance brute_force(const std::vector<double>& costs, int64_t partitions) {
  const auto n = static_cast<int64_t>(costs.size());
  bool found = false;
  Rank best;
  Balance current;
  std::function<void(int64_t)> extend = [&](int64_t used) {
    const auto left = partitions - static_cast<int64_t>(current.size());
    if (left == 0) {
      if (used != n) return;
      Rank rank = rank_of(costs, current);
      if (!found || rank < best) best = rank;
      found = true;
      return;
    }
    for (int64_t size = 1; used + size + (left - 1) <= n; ++size) {
      current.push_back(size);
      extend(used + size);
      current.pop_back();
    }
  };
  extend(0);
  return std::get<2>(best);
}

TEST(BalancePartition, MatchesBruteForceOnRandomCosts) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<double> real(0.0, 10.0);
  std::uniform_int_distribution<int> small(0, 3);
  for (int64_t n = 1; n <= 9; ++n) {
    for (int trial = 0; trial < 20; ++trial) {
      // Half the trials use small integers so that ties (and zero costs) are common.
      std::vector<double> costs(static_cast<size_t>(n));
      for (auto& c : costs) c = trial % 2 ? real(rng) : static_cast<double>(small(rng));
      for (int64_t p = 1; p <= n; ++p) {
        EXPECT_EQ(shardpipe::balance_partition(costs, p), brute_force(costs, p))
            << "n=" << n << " partitions=" << p << " trial=" << trial;
      }
    }
  }
}

TEST(BalancePartition, EqualCostsGiveEvenSizes) {
  std::vector<double> costs(10, 1.0);
  EXPECT_EQ(shardpipe::balance_partition(costs, 3), (Balance{3, 3, 4}));
  EXPECT_EQ(shardpipe::balance_partition(costs, 10), Balance(10, 1));
  EXPECT_EQ(shardpipe::balance_partition(costs, 1), Balance{10});
}

TEST(BalancePartition, HeavyItemStandsAlone) {
  std::vector<double> costs{1, 1, 1, 100, 1, 1};
  EXPECT_EQ(shardpipe::balance_partition(costs, 3), (Balance{3, 1, 2}));
}

TEST(BalancePartition, AllZeroCostsSplitEvenly) {
  std::vector<double> costs(7, 0.0);
  EXPECT_EQ(shardpipe::balance_partition(costs, 2), (Balance{3, 4}));
}

TEST(BalancePartition, RejectsBadArguments) {
  std::vector<double> costs{1, 2, 3};
  EXPECT_THROW(shardpipe::balance_partition(costs, 0), std::invalid_argument);
  EXPECT_THROW(shardpipe::balance_partition(costs, 4), std::invalid_argument);
  EXPECT_THROW(shardpipe::balance_partition({}, 1), std::invalid_argument);
  EXPECT_THROW(shardpipe::balance_partition({1.0, -1.0}, 1), std::invalid_argument);
  EXPECT_THROW(shardpipe::balance_partition({1.0, std::nan("")}, 1), std::invalid_argument);
  EXPECT_THROW(shardpipe::balance_partition({1.0, std::numeric_limits<double>::infinity()}, 1),
               std::invalid_argument);
}

}  // namespace
