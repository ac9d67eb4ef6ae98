#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace shardpipe {

// A thread that runs the jobs posted to it, in order. The pipeline has one per worker slot
// (per stage, or per device when interleaving), so CPU stages really run at the same time.
// Jobs must not throw: the engine catches a task's error and records it in the step.
class StageWorker {
 public:
  explicit StageWorker(std::string name);
  // Runs the jobs already posted, then joins the thread.
  ~StageWorker();
  StageWorker(const StageWorker&) = delete;
  StageWorker& operator=(const StageWorker&) = delete;

  void post(std::function<void()> job);
  const std::string& name() const { return name_; }
  bool is_current_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

 private:
  void loop();

  std::string name_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace shardpipe
