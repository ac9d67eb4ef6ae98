#include "shardpipe/pipeline/balance.h"

#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace shardpipe {
namespace {

void check_arguments(const std::vector<double>& costs, int64_t partitions) {
  const auto n = static_cast<int64_t>(costs.size());
  if (partitions < 1 || partitions > n) {
    throw std::invalid_argument("balance_partition: partitions must be between 1 and " +
                                std::to_string(n) + " (the number of costs), got " +
                                std::to_string(partitions));
  }
  for (size_t i = 0; i < costs.size(); ++i) {
    if (!std::isfinite(costs[i]) || costs[i] < 0.0) {
      throw std::invalid_argument(
          "balance_partition: costs must be finite and non-negative, "
          "got costs[" +
          std::to_string(i) + "] = " + std::to_string(costs[i]));
    }
  }
}

// Row-major table of (groups + 1) x (n + 1) entries, indexed [groups][start].
template <typename T>
class Table {
 public:
  Table(int64_t groups, int64_t n, T fill)
      : width_(n + 1), cells_(static_cast<size_t>((groups + 1) * (n + 1)), fill) {}
  T& at(int64_t groups, int64_t start) {
    return cells_[static_cast<size_t>(groups * width_ + start)];
  }

 private:
  int64_t width_;
  std::vector<T> cells_;
};

}  // namespace

std::vector<int64_t> balance_partition(const std::vector<double>& costs, int64_t partitions) {
  check_arguments(costs, partitions);
  const auto n = static_cast<int64_t>(costs.size());
  constexpr double kInfCost = std::numeric_limits<double>::infinity();
  constexpr int64_t kInfSquares = std::numeric_limits<int64_t>::max();

  // Both passes work on suffixes (items start..n-1 into `groups` groups) so that each group's
  // cost is accumulated from its first item onwards, the order the documentation promises.

  // Pass 1: bottleneck[g][s] = the smallest possible largest group cost.
  Table<double> bottleneck(partitions, n, kInfCost);
  bottleneck.at(0, n) = 0.0;
  for (int64_t g = 1; g <= partitions; ++g) {
    // A suffix of length n - s needs at least g items.
    for (int64_t s = n - g; s >= 0; --s) {
      double group = 0.0;
      double best = kInfCost;
      for (int64_t end = s + 1; end <= n - g + 1; ++end) {
        group += costs[end - 1];
        const double rest = bottleneck.at(g - 1, end);
        const double worst = group > rest ? group : rest;
        if (worst < best) best = worst;
      }
      bottleneck.at(g, s) = best;
    }
  }
  const double limit = bottleneck.at(partitions, 0);

  // Pass 2: squares[g][s] = the smallest sum of squared sizes among splits whose groups all
  // cost at most `limit` (integers, so the tie rules are exact).
  Table<int64_t> squares(partitions, n, kInfSquares);
  squares.at(0, n) = 0;
  for (int64_t g = 1; g <= partitions; ++g) {
    for (int64_t s = n - g; s >= 0; --s) {
      double group = 0.0;
      int64_t best = kInfSquares;
      for (int64_t end = s + 1; end <= n - g + 1; ++end) {
        group += costs[end - 1];
        if (group > limit) break;  // costs are non-negative: longer groups only cost more
        const int64_t rest = squares.at(g - 1, end);
        if (rest == kInfSquares) continue;
        const int64_t size = end - s;
        if (size * size + rest < best) best = size * size + rest;
      }
      squares.at(g, s) = best;
    }
  }

  // Walk forwards taking the shortest first group that keeps the optimum: this yields the
  // lexicographically smallest balance among the optimal ones.
  std::vector<int64_t> balance;
  balance.reserve(static_cast<size_t>(partitions));
  int64_t start = 0;
  for (int64_t g = partitions; g >= 1; --g) {
    const int64_t target = squares.at(g, start);
    double group = 0.0;
    int64_t end = start + 1;
    for (; end <= n - g + 1; ++end) {
      group += costs[end - 1];
      const int64_t rest = squares.at(g - 1, end);
      const int64_t size = end - start;
      if (group <= limit && rest != kInfSquares && size * size + rest == target) break;
    }
    balance.push_back(end - start);
    start = end;
  }
  return balance;
}

}  // namespace shardpipe
