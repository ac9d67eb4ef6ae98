#include "shardpipe/pipeline/backward_split.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <memory>
#include <unordered_map>
#include <unordered_set>

namespace shardpipe {
namespace {

using torch::autograd::Edge;
using torch::autograd::Node;
using NodePtr = decltype(Edge::function);

// For every node reachable from `roots`: whether it is parameter-only (every valid next edge
// leads to a parameter-only node; AccumulateGrad has none, a sink is never one). Iterative, so
// a deep stage cannot overflow the stack.
std::unordered_map<Node*, bool> parameter_only(const std::vector<Node*>& roots,
                                               const std::unordered_set<Node*>& sinks) {
  std::unordered_map<Node*, bool> only;
  struct Frame {
    Node* node;
    size_t next;
    bool only;
  };
  std::vector<Frame> stack;
  for (Node* root : roots) {
    if (only.count(root)) continue;
    stack.push_back({root, 0, sinks.count(root) == 0});
    while (!stack.empty()) {
      Frame& f = stack.back();
      if (f.next < f.node->num_outputs()) {
        const Edge& e = f.node->next_edge(f.next++);
        if (!e.is_valid()) continue;
        auto it = only.find(e.function.get());
        if (it != only.end()) {
          f.only = f.only && it->second;
        } else {
          // A DAG: a node not yet classified is not on the stack either.
          stack.push_back({e.function.get(), 0, sinks.count(e.function.get()) == 0});
        }
        continue;
      }
      const Frame done = f;
      stack.pop_back();
      only[done.node] = done.only;
      if (!stack.empty()) stack.back().only = stack.back().only && done.only;
    }
  }
  return only;
}

// Keeps the gradients flowing into a node as its apply will see them: after its tensor
// hooks, retain_grad and earlier pre-hooks ran (it is added last).
class RecordGradients : public torch::autograd::FunctionPreHook {
 public:
  explicit RecordGradients(std::shared_ptr<torch::autograd::variable_list> into)
      : into_(std::move(into)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    *into_ = grads;
    return grads;
  }

 private:
  std::shared_ptr<torch::autograd::variable_list> into_;
};

}  // namespace

std::vector<at::Tensor> backward_inputs(const std::vector<at::Tensor>& outputs,
                                        const std::vector<at::Tensor>& grads,
                                        const std::vector<NodePtr>& sinks, WeightGradients& later) {
  std::vector<at::Tensor> input_grads(sinks.size());
  std::unordered_set<Node*> sink_set;
  for (const auto& s : sinks) {
    if (s) sink_set.insert(s.get());
  }
  torch::autograd::edge_list root_edges;
  std::vector<Node*> root_nodes;
  for (const auto& t : outputs) {
    root_edges.push_back(torch::autograd::impl::gradient_edge(t));
    root_nodes.push_back(root_edges.back().function.get());
  }
  const auto only = parameter_only(root_nodes, sink_set);

  // Outputs whose whole graph is parameter-only go to W as they are; the others run now.
  torch::autograd::edge_list now_roots;
  std::vector<at::Tensor> now_grads;
  for (size_t k = 0; k < root_edges.size(); ++k) {
    if (only.at(root_nodes[k])) {
      later.roots.push_back(root_edges[k]);
      later.grads.push_back(grads[k]);
    } else {
      now_roots.push_back(root_edges[k]);
      now_grads.push_back(grads[k]);
    }
  }
  if (now_roots.empty()) return input_grads;

  // The weight nodes: outside the parameter-only part, with an edge into it; and the rest.
  std::vector<NodePtr> weight_nodes, rest;
  std::unordered_set<Node*> seen;
  std::vector<NodePtr> stack;
  for (const auto& e : now_roots) {
    if (seen.insert(e.function.get()).second) stack.push_back(e.function);
  }
  while (!stack.empty()) {
    NodePtr node = std::move(stack.back());
    stack.pop_back();
    bool weight = false;
    for (const auto& e : node->next_edges()) {
      if (!e.is_valid()) continue;
      if (only.at(e.function.get())) {
        weight = true;
      } else if (seen.insert(e.function.get()).second) {
        stack.push_back(e.function);
      }
    }
    (weight ? weight_nodes : rest).push_back(std::move(node));
  }

  torch::autograd::edge_list wanted;
  std::vector<size_t> sink_index;
  for (size_t k = 0; k < sinks.size(); ++k) {
    if (!sinks[k]) continue;
    wanted.emplace_back(sinks[k], 0);
    sink_index.push_back(k);
  }
  const size_t first_weight = wanted.size();
  for (const auto& node : weight_nodes) {
    for (uint32_t slot = 0; slot < node->num_inputs(); ++slot) wanted.emplace_back(node, slot);
  }
  // A weight node's hooks must run once: in B, where the node runs for its input gradients.
  // The engine captures a running node's gradients before its hooks, so they are recorded
  // after them instead, and W runs without them.
  std::vector<std::shared_ptr<torch::autograd::variable_list>> recorded;
  std::vector<torch::autograd::FunctionPreHook*> recorders;
  for (const auto& node : weight_nodes) {
    recorded.push_back(std::make_shared<torch::autograd::variable_list>());
    auto hook = std::make_unique<RecordGradients>(recorded.back());
    recorders.push_back(hook.get());
    node->add_pre_hook(std::move(hook));
  }
  // Not accumulating, with outputs named, the engine runs only the nodes on a path to them,
  // and each node computes only the outputs whose edge is on such a path (a weight node's
  // parameter edges are not): B does none of W's work. keep_graph: W runs the weight nodes
  // again.
  auto captured = torch::autograd::Engine::get_default_engine().execute(
      now_roots, now_grads, /*keep_graph=*/true, /*create_graph=*/false,
      /*accumulate_grad=*/false, wanted);
  for (size_t k = 0; k < sink_index.size(); ++k) input_grads[sink_index[k]] = captured[k];
  size_t k = first_weight;
  for (size_t w = 0; w < weight_nodes.size(); ++w) {
    Node& node = *weight_nodes[w];
    auto& pre_hooks = node.pre_hooks();
    pre_hooks.erase(std::find_if(pre_hooks.begin(), pre_hooks.end(),
                                 [&](const auto& h) { return h.get() == recorders[w]; }));
    const bool ran = !recorded[w]->empty();
    if (ran) {
      node.tensor_pre_hooks().clear();
      node.retains_grad_hooks().clear();
      pre_hooks.clear();
    }
    for (uint32_t slot = 0; slot < node.num_inputs(); ++slot, ++k) {
      later.roots.push_back(wanted[k]);
      // A node the engine only captured at (it did not run) had its tensor hooks applied.
      later.grads.push_back(ran ? (*recorded[w])[slot] : std::move(captured[k]));
    }
  }
  // W must not flow back into the graph B went through: edges are reset in place
  // (set_next_edge would insist the node has no parent yet). What only B needed goes now, as
  // after a backward without keep_graph; the nodes themselves may live on (a weight node's
  // saved input holds its grad_fn) but hold nothing.
  for (const auto& node : weight_nodes) {
    for (auto& e : node->next_edges()) {
      if (e.is_valid() && !only.at(e.function.get())) e = Edge();
    }
  }
  for (const auto& node : rest) node->release_variables();
  return input_grads;
}

void backward_weights(WeightGradients& later) {
  WeightGradients taken = std::move(later);
  later = WeightGradients();
  if (taken.roots.empty()) return;
  torch::autograd::Engine::get_default_engine().execute(taken.roots, taken.grads,
                                                        /*keep_graph=*/false,
                                                        /*create_graph=*/false,
                                                        /*accumulate_grad=*/true, {});
}

}  // namespace shardpipe
