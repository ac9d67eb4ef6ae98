#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "shardpipe/common/worker_thread.h"

namespace shardpipe {

// Keeps a peer's fault from leaving the tensor-parallel layers of a process group waiting for
// the group's own timeout (30 minutes on gloo), and names the rank at fault.
//
// Every rank starts the group's collectives in the same order, so a collective's number
// (`start`) is the same on every rank. A wait is bounded by the group's timeout. A wait that
// lasts longer than a moment tells the group's store "rank r reached collective n" and reads
// the peers' notes: a peer that failed before starting this collective, or gave up on the
// group, ends the wait at once, naming that rank and its error. A wait that expires, or whose
// connection broke (a peer died), names the ranks that never reached the collective.
// After such a fault the group is broken on this rank: its later collectives raise at once
// (their data could no longer be matched with the peers'), and the peers learn it the same
// way. An argument error on every rank alike breaks nothing.
//
// The store is the one the group was made with (torch.distributed's, shared by the ranks). Its
// I/O runs on a thread of the watch and every wait for it is bounded, so an unreachable store
// delays an error by at most a second or two and never hangs it.
class GroupWatch {
 public:
  using Clock = std::chrono::steady_clock;

  // The watch of the group Python names `group_name`: one per group and process. A group
  // made again under the same name gets a new watch.
  static std::shared_ptr<GroupWatch> of(const std::string& group_name);
  // How long a collective over `group_name` may wait for its peers (default 120 s). It
  // belongs to the group: every layer over the group shares it.
  static void set_timeout(const std::string& group_name, std::chrono::milliseconds timeout);
  static std::chrono::milliseconds timeout_of(const std::string& group_name);

  ~GroupWatch();
  GroupWatch(const GroupWatch&) = delete;
  GroupWatch& operator=(const GroupWatch&) = delete;

  c10d::ProcessGroup& group() { return *group_; }
  int rank() const { return rank_; }
  std::chrono::milliseconds timeout() const { return timeout_of(name_); }

  // Numbers the next collective; raises at once if the group broke on this rank.
  uint64_t start();
  // Waits for collective `number` (`what` says which: "the all-reduce of ..."), for at most
  // the timeout; raises naming the rank at fault when it cannot finish.
  void wait(c10d::Work& work, uint64_t number, const std::string& what);
  // An operator over the group failed on this rank (`text`: what it raised) before starting
  // its next collective: tells the peers, which may be waiting in that collective.
  void note_failure(const std::string& text);

 private:
  GroupWatch(std::string name, c10::intrusive_ptr<c10d::ProcessGroup> group);

  // What the peers' notes say about collective `number`: the first peer known to be at
  // fault and why, or an empty text.
  std::string peer_fault(uint64_t number);
  // Which ranks have not reached collective `number`, after giving them `grace` to say so,
  // as a culprit text, or an empty text.
  std::string missing(uint64_t number, std::chrono::milliseconds grace);
  [[noreturn]] void fail(uint64_t number, const std::string& what, const std::string& cause,
                         std::string culprit);
  // Runs `job` on the store thread and waits for it at most `limit`; false if it took longer
  // (or raised: the store is unreachable).
  bool on_store(const std::function<void(c10d::Store&)>& job, std::chrono::milliseconds limit);

  const std::string name_;
  const c10::intrusive_ptr<c10d::ProcessGroup> group_;
  const c10::intrusive_ptr<c10d::Store> store_;  // may be null: then no peer is named
  const int rank_;
  const int size_;
  std::atomic<uint64_t> started_{0};

  std::mutex mutex_;
  bool broken_ = false;
  std::string broken_reason_;
  // The collective this rank's last failure came before (0: none), to tell an argument error
  // every rank met alike from a peer's own fault.
  uint64_t failed_before_ = 0;
  std::unique_ptr<WorkerThread> store_thread_;
};

}  // namespace shardpipe
