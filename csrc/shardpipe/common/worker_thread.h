#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace shardpipe {

// A thread that runs the jobs posted to it, in order. The pipeline has one per worker slot
// (per stage, or per device when interleaving) and the sharded layers one per shard index,
// so that CPU work really runs at the same time. The thread carries `name` as its OS name
// (truncated to what the OS allows), so profilers and debuggers tell them apart.
// Jobs must not throw: their owners catch errors and record them where the caller looks.
class WorkerThread {
 public:
  explicit WorkerThread(std::string name);
  // Runs the jobs already posted, then joins the thread.
  ~WorkerThread();
  WorkerThread(const WorkerThread&) = delete;
  WorkerThread& operator=(const WorkerThread&) = delete;

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
