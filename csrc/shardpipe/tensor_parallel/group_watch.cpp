#include "shardpipe/tensor_parallel/group_watch.h"

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <algorithm>
#include <condition_variable>
#include <map>
#include <sstream>
#include <thread>
#include <utility>

namespace shardpipe {
namespace {

using std::chrono::milliseconds;

// How long a wait goes before it asks the store about the peers, and how often after that.
constexpr milliseconds kMoment{200};
// How long the census gives the peers to say they reached a collective.
constexpr milliseconds kGrace{500};
// The longest a store job may take before the watch goes on without it.
constexpr milliseconds kStoreLimit{1500};
constexpr milliseconds kDefaultTimeout{120000};

std::string reached_key(int rank) { return "shardpipe_tp/reached/" + std::to_string(rank); }
std::string note_key(int rank) { return "shardpipe_tp/note/" + std::to_string(rank); }

// Notes: "F <n> <text>": failed before starting collective n; "G <n> <text>": gave up on the
// group at collective n.
std::string note(char kind, uint64_t number, const std::string& text) {
  return std::string(1, kind) + " " + std::to_string(number) + " " + text;
}

std::string as_text(const std::vector<uint8_t>& bytes) { return {bytes.begin(), bytes.end()}; }
std::vector<uint8_t> as_bytes(const std::string& text) { return {text.begin(), text.end()}; }

uint64_t reached_by(c10d::Store& store, int rank) {
  const std::string key = reached_key(rank);
  if (!store.check({key})) return 0;
  return std::stoull(as_text(store.get(key)));
}

std::string seconds(milliseconds t) {
  std::ostringstream out;
  out << static_cast<double>(t.count()) / 1000.0 << " s";
  return out.str();
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string out = ranks.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < ranks.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(ranks[i]);
  }
  return out;
}

struct Registry {
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<GroupWatch>> watches;
  std::map<std::string, milliseconds> timeouts;
};

Registry& registry() {
  // Never destroyed: a store thread still blocked on an unreachable store at exit must not
  // be joined.
  static auto* r = new Registry;
  return *r;
}

struct Signal {
  std::mutex mutex;
  std::condition_variable cv;
  bool done = false;
  bool ok = false;
};

}  // namespace

std::shared_ptr<GroupWatch> GroupWatch::of(const std::string& group_name) {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  try {
    group = c10d::resolve_process_group(group_name);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, "shardpipe: no process group named '", group_name, "' (", e.what(),
                      ")");
  }
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto& watch = r.watches[group_name];
  if (!watch || watch->group_.get() != group.get()) {
    watch.reset(new GroupWatch(group_name, std::move(group)));
  }
  return watch;
}

void GroupWatch::set_timeout(const std::string& group_name, milliseconds timeout) {
  TORCH_CHECK_VALUE(timeout.count() > 0, "shardpipe: timeout must be positive");
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.timeouts[group_name] = timeout;
}

milliseconds GroupWatch::timeout_of(const std::string& group_name) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto found = r.timeouts.find(group_name);
  return found == r.timeouts.end() ? kDefaultTimeout : found->second;
}

GroupWatch::GroupWatch(std::string name, c10::intrusive_ptr<c10d::ProcessGroup> group)
    : name_(std::move(name)),
      group_(std::move(group)),
      store_(group_->getStore()),
      rank_(group_->getRank()),
      size_(group_->getSize()) {}

GroupWatch::~GroupWatch() = default;

bool GroupWatch::on_store(const std::function<void(c10d::Store&)>& job, milliseconds limit) {
  if (!store_) return false;
  auto signal = std::make_shared<Signal>();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!store_thread_) store_thread_ = std::make_unique<WorkerThread>("shardpipe_tpstore");
    store_thread_->post([signal, job, store = store_] {
      bool ok = true;
      try {
        job(*store);
      } catch (...) {
        ok = false;  // an unreachable store: the caller goes on without it
      }
      std::lock_guard<std::mutex> done(signal->mutex);
      signal->done = true;
      signal->ok = ok;
      signal->cv.notify_all();
    });
  }
  std::unique_lock<std::mutex> lock(signal->mutex);
  signal->cv.wait_for(lock, limit, [&] { return signal->done; });
  return signal->done && signal->ok;
}

uint64_t GroupWatch::start() {
  uint64_t number = 0;
  bool retract = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(!broken_, "shardpipe: rank ", rank_, "'s tensor-parallel layers over group '",
                name_, "' stopped after a fault (", broken_reason_,
                "); make a new process group to go on");
    number = ++started_;
    retract = failed_before_ == number;
  }
  // This rank failed before this collective and now starts it after all: the note must not
  // make a slow peer give up.
  if (retract) on_store([this](c10d::Store& s) { s.deleteKey(note_key(rank_)); }, kStoreLimit);
  return number;
}

void GroupWatch::note_failure(const std::string& text) {
  uint64_t number = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (broken_) return;  // its give-up note says more
    number = started_ + 1;
    failed_before_ = number;
  }
  const std::string value = note('F', number, "rank " + std::to_string(rank_) + " raised " + text);
  on_store([this, value](c10d::Store& s) { s.set(note_key(rank_), as_bytes(value)); }, kStoreLimit);
}

std::string GroupWatch::peer_fault(uint64_t number) {
  uint64_t own_failure = 0;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    own_failure = failed_before_;
  }
  auto found = std::make_shared<std::string>();
  on_store(
      [this, number, own_failure, found](c10d::Store& s) {
        s.set(reached_key(rank_), as_bytes(std::to_string(number)));
        std::string gave_up;
        for (int r = 0; r < size_; ++r) {
          if (r == rank_ || !s.check({note_key(r)})) continue;
          std::istringstream in(as_text(s.get(note_key(r))));
          char kind = 0;
          uint64_t at = 0;
          in >> kind >> at;
          std::string text;
          std::getline(in >> std::ws, text);
          // A failure every rank met before the same collective (an argument error) is no
          // peer's fault.
          if (kind == 'F' && at == number && at != own_failure) {
            *found = text;  // the root of the fault: reported before any give-up
            return;
          }
          if (kind == 'G' && gave_up.empty()) {
            gave_up = "rank " + std::to_string(r) + " gave up on the group (" + text + ")";
          }
        }
        *found = gave_up;
      },
      kStoreLimit);
  return *found;
}

std::string GroupWatch::missing(uint64_t number, milliseconds grace) {
  // The last complete count of the store: the store may stop answering half-way (its host
  // rank exits once it has raised), and what a full pass saw before that still names the
  // rank that never came.
  struct Count {
    std::mutex mutex;
    std::vector<int> absent;
  };
  auto count = std::make_shared<Count>();
  const bool asked = on_store(
      [this, number, grace, count](c10d::Store& s) {
        s.set(reached_key(rank_), as_bytes(std::to_string(number)));
        const auto until = Clock::now() + grace;
        while (true) {
          std::vector<int> absent;
          for (int r = 0; r < size_; ++r) {
            if (r != rank_ && reached_by(s, r) < number) absent.push_back(r);
          }
          const bool all_came = absent.empty();
          {
            std::lock_guard<std::mutex> lock(count->mutex);
            count->absent = std::move(absent);
          }
          if (all_came || Clock::now() >= until) return;
          std::this_thread::sleep_for(milliseconds(50));
        }
      },
      grace + kStoreLimit);
  std::lock_guard<std::mutex> lock(count->mutex);
  if (count->absent.empty()) return "";
  if (asked) {
    return rank_list(count->absent) + " never reached it (failed, died, hangs or never came)";
  }
  return rank_list(count->absent) +
         " had not reached it when the store stopped answering (failed, died or hangs)";
}

void GroupWatch::fail(uint64_t number, const std::string& what, const std::string& cause,
                      std::string culprit) {
  // A rank that never reached the collective is the root of a fault; a peer's note (that it
  // failed, or gave up because of a third rank) comes next.
  if (culprit.empty()) culprit = missing(number, kGrace);
  if (culprit.empty()) culprit = peer_fault(number);
  std::string message = "shardpipe: rank " + std::to_string(rank_) + " of group '" + name_ +
                        "': " + what + " (collective " + std::to_string(number) + ") " + cause;
  if (!culprit.empty()) message += ": " + culprit;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!broken_) broken_reason_ = message;
    broken_ = true;
  }
  const std::string value = note('G', number, message);
  on_store([this, value](c10d::Store& s) { s.set(note_key(rank_), as_bytes(value)); }, kStoreLimit);
  TORCH_CHECK(false, message);
}

void GroupWatch::wait(c10d::Work& work, uint64_t number, const std::string& what) {
  const milliseconds limit = timeout();
  const auto deadline = Clock::now() + limit;
  auto signal = std::make_shared<Signal>();
  try {
    work.getFuture()->addCallback([signal](c10::ivalue::Future&) {
      std::lock_guard<std::mutex> lock(signal->mutex);
      signal->done = true;
      signal->cv.notify_all();
    });
  } catch (const c10::Error&) {
    // A backend whose work has no future: its own bounded wait, without the peers' notes.
    try {
      work.wait(limit);
    } catch (const std::exception& e) {
      fail(number, what, std::string("failed (") + e.what() + ")", "");
    }
    return;
  }
  auto look_at = Clock::now() + kMoment;
  std::unique_lock<std::mutex> lock(signal->mutex);
  while (!signal->done) {
    if (Clock::now() >= deadline) {
      lock.unlock();
      fail(number, what, "did not finish within " + seconds(limit), "");
    }
    if (signal->cv.wait_until(lock, std::min(deadline, look_at), [&] { return signal->done; })) {
      break;
    }
    if (Clock::now() >= look_at) {
      lock.unlock();
      std::string culprit = peer_fault(number);
      if (!culprit.empty()) fail(number, what, "was abandoned", culprit);
      look_at = Clock::now() + kMoment;
      lock.lock();
    }
  }
  lock.unlock();
  try {
    work.wait();
  } catch (const c10::Error& e) {
    fail(number, what, std::string("failed (") + e.what_without_backtrace() + ")", "");
  } catch (const std::exception& e) {
    fail(number, what, std::string("failed (") + e.what() + ")", "");
  }
}

}  // namespace shardpipe
