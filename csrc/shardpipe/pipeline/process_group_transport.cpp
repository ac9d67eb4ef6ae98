#include "shardpipe/pipeline/process_group_transport.h"

#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <stdexcept>

#include "shardpipe/pipeline/stage_stream.h"

namespace shardpipe {
namespace {

// A header: what a message holds, or a failure record, or a rank's outcome of a phase; or, in
// its place, the prefix of a message as the receiver guessed it (kAsGuessed, then the
// layout's fingerprint), alone or with the tensors packed after it.
constexpr int64_t kWords = 128;
constexpr int64_t kData = 1, kFailure = 2, kOutcome = 3, kAsGuessed = 4;
constexpr int64_t kPrefixBytes = 2 * sizeof(int64_t);
// Tensors of at most this many bytes in all travel packed after the prefix when guessed right:
// one message instead of two or more, which on gloo costs far more than copying the bytes
// (130 us or more a message on loopback, 2 cores, against 12 us to copy 256 KiB). Each
// tensor starts at a multiple of 16 bytes, as c10::complex<double> wants.
constexpr int64_t kPackBytes = 256 * 1024;
constexpr int64_t kPackAlign = 16;
// The most tensors one message carries. A message's tags: its header's, then one per
// tensor where the receiver guessed the tensors' shapes (and posted their receives ahead),
// then one per tensor where it did not (the receives wait for the header).
constexpr int64_t kMaxTensors = 16;
constexpr int64_t kGuessedTags = 1, kUnguessedTags = 1 + kMaxTensors;
constexpr int64_t kTagsPerMessage = 1 + 2 * kMaxTensors;
// Header word 5: what the message holds beside its tensors.
constexpr int64_t kFlatTuple = 1;
// How many messages beyond the one it is taking a receiver has posted receives for, in a phase
// with backward messages. A receive posted ahead holds its tensors' memory, and a 1F1B-like
// schedule is there to bound how many micro-batches a stage holds; a forward-only phase
// (`pipe(x)` without autograd) frees each input once used, so there every receive is posted
// at once: a send whose receive is not posted yet waits a round trip for it (1 MiB hand-offs
// went from about 1.8x raw gloo to about 1.2x on the 2-core VM).
constexpr size_t kAhead = 3;
// Record fields, after the kind in word 0.
constexpr int64_t kTextStart = 9;
constexpr size_t kMaxText = (kWords - kTextStart) * sizeof(int64_t);

int tag_of(uint64_t sequence, int64_t part) {
  // Both ends count a channel's messages alike, so the tags agree; gloo matches on them.
  return static_cast<int>((sequence * kTagsPerMessage + part) % (1ull << 30));
}

// Whether a message may be shorter than the receive posted for it, so that a header carries
// only the words it uses. gloo's TCP transport (Linux) allows it and writes the message's own
// length; its libuv transport (macOS, Windows) reads the posted length whatever was sent, so
// there, and on any other backend, every header travels whole.
bool short_messages(c10d::ProcessGroup& group) {
#if defined(__linux__)
  const char* transport = std::getenv("GLOO_DEVICE_TRANSPORT");
  if (transport != nullptr && std::string(transport) != "TCP") return false;
  try {
    return group.getBackend(c10::DeviceType::CPU)->getBackendName() == "gloo";
  } catch (const std::exception&) {
    return false;  // no CPU backend: nothing travels anyway
  }
#else
  return false;
#endif
}

ProcessGroupTransport::ErrorText& error_text_hook() {
  static ProcessGroupTransport::ErrorText hook;
  return hook;
}

std::string text_of(std::exception_ptr error) {
  if (const auto& hook = error_text_hook()) {
    std::string text = hook(error);
    if (!text.empty()) return text;
  }
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  } catch (const std::exception& e) {
    return e.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

const char* phase_word(int64_t phase) {
  switch (phase) {
    case static_cast<int64_t>(Phase::kForward):
      return "forward";
    case static_cast<int64_t>(Phase::kBackward):
      return "backward";
    case static_cast<int64_t>(Phase::kWeight):
      return "weight";
  }
  return "?";
}

}  // namespace

ProcessGroupTransport::Layout ProcessGroupTransport::Layout::of(std::vector<int64_t> words) {
  Layout layout;
  const int64_t* w = words.data();
  const int64_t n = w[0];
  layout.tuple = (w[1] & kFlatTuple) != 0;
  layout.needs_grad.resize(static_cast<size_t>(n));
  int64_t bytes = 0;
  size_t at = 2;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t dtype = w[at++];
    layout.needs_grad[j] = w[at++] != 0;
    const int64_t dims = w[at++];
    std::vector<int64_t> shape(w + at, w + at + dims);
    at += dims;
    if (dtype < 0) continue;
    const int64_t start = (bytes + kPackAlign - 1) / kPackAlign * kPackAlign;
    bytes = start + c10::multiply_integers(shape) *
                        static_cast<int64_t>(c10::elementSize(static_cast<at::ScalarType>(dtype)));
    layout.offsets.push_back(start);
    layout.shapes.emplace_back(dtype, std::move(shape));
    layout.defined.push_back(static_cast<size_t>(j));
  }
  layout.packed = bytes <= kPackBytes;
  layout.packed_bytes = kPrefixBytes + bytes;
  layout.words = std::move(words);
  return layout;
}

int64_t ProcessGroupTransport::Layout::fingerprint(const Message& message) const {
  // FNV-1a over the message's place and its layout's words.
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](int64_t v) {
    h ^= static_cast<uint64_t>(v);
    h *= 1099511628211ull;
  };
  mix(static_cast<int64_t>(message.phase));
  mix(message.from_stage);
  mix(message.micro_batch);
  for (int64_t v : words) mix(v);
  return static_cast<int64_t>(h);
}

at::Tensor ProcessGroupTransport::Record::encode(int64_t kind) const {
  at::Tensor header = at::zeros({kWords}, at::kLong);
  int64_t* w = header.data_ptr<int64_t>();
  w[0] = kind;
  w[1] = failed ? (lost ? 2 : 1) : 0;
  w[2] = origin;
  w[3] = stage;
  w[4] = micro_batch;
  w[5] = phase;
  w[6] = value;
  w[7] = dtype;
  const size_t n = std::min(text.size(), kMaxText);
  w[8] = static_cast<int64_t>(n);
  std::memcpy(w + kTextStart, text.data(), n);
  return header;
}

int64_t ProcessGroupTransport::Record::words() const {
  const int64_t n = static_cast<int64_t>(std::min(text.size(), kMaxText));
  return kTextStart + (n + static_cast<int64_t>(sizeof(int64_t)) - 1) / sizeof(int64_t);
}

ProcessGroupTransport::Record ProcessGroupTransport::Record::decode(const int64_t* w) {
  Record r;
  r.failed = w[1] != 0;
  r.lost = w[1] == 2;
  r.origin = w[2];
  r.stage = w[3];
  r.micro_batch = w[4];
  r.phase = w[5];
  r.value = w[6];
  r.dtype = w[7];
  const size_t n = std::min<size_t>(static_cast<size_t>(std::max<int64_t>(w[8], 0)), kMaxText);
  r.text.assign(reinterpret_cast<const char*>(w + kTextStart), n);
  return r;
}

std::string ProcessGroupTransport::Record::message() const {
  const std::string where = stage >= 0
                                ? "in stage " + std::to_string(stage) + ", micro-batch " +
                                      std::to_string(micro_batch) + " (" + phase_word(phase) + ")"
                                : "outside any stage";
  return "shardpipe: rank " + std::to_string(origin) + " failed " + where + ": " + text;
}

void ProcessGroupTransport::set_error_text(ErrorText text) { error_text_hook() = std::move(text); }

ProcessGroupTransport::ProcessGroupTransport(const Placement& placement,
                                             const std::vector<std::optional<c10::Stream>>& streams,
                                             const std::string& group_name,
                                             std::chrono::milliseconds timeout)
    : LocalTransport(placement, streams), timeout_(timeout) {
  try {
    group_ = c10d::resolve_process_group(group_name);
  } catch (const std::exception& e) {
    TORCH_CHECK_VALUE(false, "shardpipe: no process group named '", group_name, "' (", e.what(),
                      ")");
  }
  rank_ = group_->getRank();
  ranks_ = group_->getSize();
  // Every message goes through host memory, CUDA stages' too (NCCL would need a communicator
  // per direction to take receives posted ahead; see ARCHITECTURE).
  std::string cpu_backend;
  try {
    cpu_backend = group_->getBackend(c10::DeviceType::CPU)->getBackendName();
  } catch (const std::exception&) {
    // none for the CPU: refused below
  }
  TORCH_CHECK_VALUE(!cpu_backend.empty(), "shardpipe: group '", group_name, "' (backend ",
                    group_->getBackendName(),
                    ") has no CPU backend; a pipeline over ranks hands its tensors over through "
                    "gloo, also between GPUs: make the group with backend='cpu:gloo,cuda:nccl' "
                    "(what dist.init_process_group() without a backend makes) or 'gloo'");
  short_messages_ = short_messages(*group_);
  TORCH_CHECK_VALUE(placement.workers == ranks_, "shardpipe: the placement has ", placement.workers,
                    " workers but the group ", ranks_, " ranks");
  TORCH_CHECK_VALUE(timeout.count() > 0, "shardpipe: timeout must be positive");
}

ProcessGroupTransport::~ProcessGroupTransport() {
  // Nothing more will be waited for: what is still pending ends now, not at its deadline.
  {
    std::lock_guard<std::mutex> lock(waiting_mutex_);
    stopping_ = true;
    for (auto& [id, waiting] : waiting_) {
      waiting.aborted = true;
      try {
        waiting.work->abort();
      } catch (...) {
        // A backend that cannot abort: its wait ends at the group's own timeout.
      }
    }
  }
  watchdog_wake_.notify_all();
  receivers_.clear();
  if (watchdog_.joinable()) watchdog_.join();
}

void ProcessGroupTransport::note_progress() {
  last_progress_ns_.store(std::chrono::steady_clock::now().time_since_epoch().count());
}

void ProcessGroupTransport::watch() {
  using Clock = std::chrono::steady_clock;
  std::unique_lock<std::mutex> lock(waiting_mutex_);
  while (!stopping_) {
    // Asleep while nothing is waited for (between steps); then a look every 50 ms.
    watchdog_wake_.wait(lock, [&] { return stopping_ || !waiting_.empty(); });
    watchdog_wake_.wait_for(lock, std::chrono::milliseconds(50), [&] { return stopping_; });
    const auto now = Clock::now();
    const Clock::time_point progress{Clock::duration(last_progress_ns_.load())};
    for (auto& [id, waiting] : waiting_) {
      if (waiting.aborted || now - std::max(waiting.since, progress) < timeout_) continue;
      waiting.aborted = true;
      try {
        waiting.work->abort();
      } catch (...) {
        // A backend that cannot abort: its wait ends at the group's own timeout.
      }
    }
  }
}

void ProcessGroupTransport::check_usable() const {
  if (!broken_) return;
  std::lock_guard<std::mutex> lock(broken_mutex_);
  TORCH_CHECK(false, "shardpipe: rank ", rank_, " can no longer reach its peers (it ",
              broken_reason_, "); make a new process group and pipeline");
}

void ProcessGroupTransport::mark_broken(const std::string& reason) {
  std::lock_guard<std::mutex> lock(broken_mutex_);
  if (!broken_) broken_reason_ = reason;
  broken_ = true;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupTransport::start(
    int peer, const std::function<c10::intrusive_ptr<c10d::Work>()>& post) {
  // Either way the channel is out of step with its peer now, so the transport is broken.
  try {
    return post();
  } catch (const c10::DistError& e) {
    mark_broken("lost its connection to rank " + std::to_string(peer));
    TORCH_CHECK(false, "shardpipe: rank ", rank_, " lost its connection to rank ", peer, ": ",
                e.what_without_backtrace());
  } catch (const c10::Error& e) {
    // The backend refused the operation itself (send() checks what users control first).
    mark_broken("could not post a message for rank " + std::to_string(peer));
    TORCH_CHECK(false, "shardpipe: rank ", rank_, " could not post a message for rank ", peer,
                " (a bug in shardpipe): ", e.what_without_backtrace());
  } catch (const std::exception& e) {
    // gloo refuses to start an operation on a connection an earlier timeout closed.
    mark_broken("lost its connection to rank " + std::to_string(peer));
    TORCH_CHECK(false, "shardpipe: rank ", rank_, " lost its connection to rank ", peer, ": ",
                e.what());
  }
}

void ProcessGroupTransport::wait(const c10::intrusive_ptr<c10d::Work>& work,
                                 const std::string& what, bool progress) {
  uint64_t id = 0;
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(waiting_mutex_);
    TORCH_CHECK(!stopping_, "shardpipe: rank ", rank_, "'s pipeline is closing");
    if (!watchdog_.joinable()) watchdog_ = std::thread([this] { watch(); });
    id = next_waiting_++;
    wake = waiting_.empty();  // else the watchdog is looking every 50 ms already
    waiting_[id] = {work, std::chrono::steady_clock::now()};
  }
  if (wake) watchdog_wake_.notify_all();
  bool completed = false;
  std::string error;
  try {
    completed = work->wait();
  } catch (const std::exception& e) {
    error = e.what();
  }
  bool aborted = false;
  {
    std::lock_guard<std::mutex> lock(waiting_mutex_);
    aborted = waiting_[id].aborted;
    waiting_.erase(id);
  }
  if (completed && !aborted && error.empty()) {
    if (progress) note_progress();
    return;
  }
  mark_broken(what);
  if (error.empty()) {
    error = c10::str("no message reached or left rank ", rank_, " for ",
                     static_cast<double>(timeout_.count()) / 1000.0, " s");
  }
  TORCH_CHECK(false, "shardpipe: rank ", rank_, " ", what, " within ",
              static_cast<double>(timeout_.count()) / 1000.0,
              " s of silence (the peer died, hangs or never came): ", error);
}

std::vector<ProcessGroupTransport::Record> ProcessGroupTransport::exchange(const Record& mine) {
  // Every rank sends its record to every other: on gloo a small point-to-point exchange costs
  // a third of an all-gather of the same bytes (measured on loopback, 2 ranks), and these
  // rounds run twice a step.
  const int tag = next_round_tag();
  at::Tensor header = sendable(mine.encode(kOutcome), mine.words());
  std::vector<at::Tensor> received(static_cast<size_t>(ranks_));
  std::vector<std::pair<int, c10::intrusive_ptr<c10d::Work>>> works;
  for (int r = 0; r < ranks_; ++r) {
    if (r == rank_) continue;
    std::vector<at::Tensor> out{header};
    works.emplace_back(r, start(r, [&] { return group_->send(out, r, tag); }));
    count_sent(header);
    received[r] = at::empty({kWords}, at::kLong);
    std::vector<at::Tensor> in{received[r]};
    works.emplace_back(r, start(r, [&] { return group_->recv(in, r, tag); }));
  }
  for (auto& [peer, work] : works) {
    wait(work, "did not hear from rank " + std::to_string(peer));
  }
  std::vector<Record> records;
  for (int r = 0; r < ranks_; ++r) {
    records.push_back(r == rank_ ? mine : Record::decode(received[r].data_ptr<int64_t>()));
  }
  return records;
}

int ProcessGroupTransport::next_round_tag() {
  return static_cast<int>((1ull << 30) + rounds_++ % (1ull << 29));
}

int64_t ProcessGroupTransport::share_batch(int64_t batch, std::exception_ptr local) {
  check_usable();
  const int tag = next_round_tag();
  const int first = placement_.worker_of(0);
  if (rank_ != first) {
    // Hidden behind the wait for the first stage's output, which comes after it.
    at::Tensor in = at::empty({kWords}, at::kLong);
    std::vector<at::Tensor> box{in};
    wait(start(first, [&] { return group_->recv(box, first, tag); }),
         "did not hear from rank " + std::to_string(first) +
             " (the first stage's) before the phase");
    const Record record = Record::decode(in.data_ptr<int64_t>());
    TORCH_CHECK(!record.failed, record.message());
    return record.value;
  }
  Record mine;
  mine.origin = rank_;
  mine.value = batch;
  if (local) {
    mine.failed = true;
    mine.text = text_of(local);
  }
  at::Tensor header = sendable(mine.encode(kOutcome), mine.words());
  std::vector<Pending> posted;
  for (int r = 0; r < ranks_; ++r) {
    if (r == rank_) continue;
    std::vector<at::Tensor> out{header};
    posted.push_back({start(r, [&] { return group_->send(out, r, tag); }), {header}, r});
    count_sent(header);
  }
  if (local) {
    // No phase follows to wait for these: they are delivered before the error is raised.
    try {
      for (auto& p : posted) {
        wait(p.work, "could not tell rank " + std::to_string(p.to) + " that it cannot go on");
      }
    } catch (...) {
      // The transport is broken now, which the next call reports; this call raises `local`.
    }
    std::rethrow_exception(local);
  }
  // Waited for with the phase's own sends, in finish.
  std::lock_guard<std::mutex> lock(sends_mutex_);
  for (auto& p : posted) sends_.push_back(std::move(p));
  return batch;
}

void ProcessGroupTransport::begin(Step& step, const Schedule& schedule) {
  auto found = plans_.find(&schedule);
  if (found == plans_.end()) {
    ChannelPlan plan = channel_plan(schedule);
    const std::string problem = check_channels(schedule, plan);
    TORCH_CHECK(problem.empty(),
                "shardpipe: the schedule's messages between ranks do not match: ", problem);
    bool forward_only = true;
    for (const auto& [channel, messages] : plan) {
      for (const auto& m : messages) forward_only = forward_only && m.phase == Phase::kForward;
    }
    found = plans_.emplace(&schedule, CheckedPlan{std::move(plan), forward_only}).first;
  }
  outgoing_.clear();
  const bool forward_only = found->second.forward_only;
  std::lock_guard<std::mutex> lock(receive_mutex_);
  for (const auto& [channel, messages] : found->second.channels) {
    const auto [from, to] = channel;
    if (from == rank_) {
      Outgoing& out = outgoing_[to];
      out.messages = messages;
      out.sequence = outgoing_sequence_[to];
      outgoing_sequence_[to] += messages.size();
    } else if (to == rank_) {
      auto& thread = receivers_[from];
      if (!thread) {
        thread = std::make_unique<WorkerThread>("shardpipe_rx" + std::to_string(from));
      }
      auto* known = &received_layouts_[from];
      const uint64_t sequence = incoming_sequence_[from];
      incoming_sequence_[from] += messages.size();
      ++receiving_;
      thread->post([this, &step, from, messages, sequence, known, forward_only] {
        receive_all(step, from, messages, sequence, forward_only ? messages.size() : kAhead,
                    *known);
        std::lock_guard<std::mutex> done(receive_mutex_);
        --receiving_;
        received_.notify_all();
      });
    }
  }
}

void ProcessGroupTransport::abort_all(const std::vector<c10::intrusive_ptr<c10d::Work>>& works) {
  for (const auto& work : works) {
    try {
      work->abort();
    } catch (...) {
      // A backend that cannot abort: the receive ends with the group.
    }
  }
}

void ProcessGroupTransport::receive_all(Step& step, int from, std::vector<Message> messages,
                                        uint64_t sequence, size_t depth,
                                        std::map<MessageKey, Layout>& known) {
  // A message's receives, posted ahead: its header's (or, when its layout is guessed, the
  // prefix's, with the tensors after it if they go packed), and its tensors' where they are
  // guessed and do not.
  struct Posted {
    at::Tensor header;  // int64 words, or bytes where packed
    c10::intrusive_ptr<c10d::Work> header_work;
    std::optional<Layout> guess;
    std::vector<at::Tensor> guessed;
    std::vector<c10::intrusive_ptr<c10d::Work>> guessed_works;
  };
  std::deque<Posted> ahead;
  size_t posted = 0;
  // Receives for the next few messages stay posted while one is taken, so a sender that runs
  // ahead writes at once rather than wait for the receiver to ask.
  auto post_until = [&](size_t until) {
    for (; posted < std::min(until, messages.size()); ++posted) {
      Posted p;
      const uint64_t seq = sequence + posted;
      if (short_messages_) {
        auto found = known.find(key_of(messages[posted]));
        if (found != known.end()) p.guess = found->second;
      }
      // Where the tensors go packed, the first receive also holds a whole header in case
      // the guess is wrong.
      std::vector<at::Tensor> header{
          p.guess && p.guess->packed
              ? receive_pool_.empty(
                    {std::max<int64_t>(p.guess->packed_bytes, kWords * sizeof(int64_t))}, at::kByte)
              : at::empty({kWords}, at::kLong)};
      p.header = header[0];
      p.header_work = start(from, [&] { return group_->recv(header, from, tag_of(seq, 0)); });
      if (p.guess && !p.guess->packed) {
        for (size_t i = 0; i < p.guess->shapes.size(); ++i) {
          const auto& [dtype, shape] = p.guess->shapes[i];
          std::vector<at::Tensor> part{
              receive_pool_.empty(shape, static_cast<at::ScalarType>(dtype))};
          p.guessed.push_back(part[0]);
          p.guessed_works.push_back(start(from, [&] {
            return group_->recv(part, from, tag_of(seq, kGuessedTags + static_cast<int64_t>(i)));
          }));
        }
      }
      ahead.push_back(std::move(p));
    }
  };
  std::vector<c10::intrusive_ptr<c10d::Work>> left;  // posted, never waited for
  for (size_t k = 0; k < messages.size(); ++k) {
    const Message& expected = messages[k];
    const std::string what =
        "waited in vain for stage " + std::to_string(expected.from_stage) + "'s " +
        (expected.phase == Phase::kForward ? "output" : "input gradient") + " of micro-batch " +
        std::to_string(expected.micro_batch) + " from rank " + std::to_string(from);
    Posted p;
    try {
      post_until(k + 1 + depth);
      p = std::move(ahead.front());
      ahead.pop_front();
      // A failure record is not progress: a peer that gave up on a third rank must not restart
      // this rank's clock on the channels that still wait for that third rank.
      wait(p.header_work, what, /*progress=*/false);
      const auto* w = static_cast<const int64_t*>(p.header.data_ptr());
      if (w[0] == kFailure) {
        Record record = Record::decode(w);
        {
          std::lock_guard<std::mutex> lock(receive_mutex_);
          if (!peer_failure_) peer_failure_ = record;
        }
        if (record.lost) {
          mark_broken("learned that rank " + std::to_string(record.origin) +
                      " lost a peer: " + record.text);
          abort_all(p.guessed_works);
        } else {
          for (auto& work : p.guessed_works) wait(work, what, false);  // the sender's voids
        }
        step.fail(std::make_exception_ptr(std::runtime_error(record.message())),
                  place() + "waiting for rank " + std::to_string(from));
        continue;
      }
      note_progress();
      const bool as_guessed = w[0] == kAsGuessed;
      // Both ends keep the same record of what was sent, so they agree on the guess; a
      // disagreement is a bug, and it must not pass as data received into the wrong shapes.
      TORCH_CHECK(!as_guessed || (p.guess && w[1] == p.guess->fingerprint(expected)),
                  "shardpipe: rank ", rank_, " and rank ", from,
                  " disagree on the layout guessed for a message, or it came out of the "
                  "schedule's order (a bug in shardpipe)");
      TORCH_CHECK(as_guessed || (w[0] == kData && w[1] == static_cast<int64_t>(expected.phase) &&
                                 w[2] == expected.from_stage && w[3] == expected.micro_batch),
                  "shardpipe: rank ", rank_, " received a message from rank ", from,
                  " out of the schedule's order (a bug in shardpipe)");
      Layout layout;
      if (as_guessed) {
        layout = std::move(*p.guess);
      } else {
        int64_t end = 6;
        for (int64_t j = 0; j < w[4] && end < kWords; ++j) end += 3 + w[end + 2];
        TORCH_CHECK(end <= kWords, "shardpipe: rank ", rank_,
                    " received a malformed header from rank ", from, " (a bug in shardpipe)");
        layout = Layout::of(std::vector<int64_t>(w + 4, w + end));
        // Kept before anything else can fail, as the sender kept it once it sent the header.
        if (short_messages_) known[key_of(expected)] = layout;
      }
      Activations tensors(layout.needs_grad.size());
      if (as_guessed && layout.packed) {
        // Each tensor its own storage (kept alive by the message's): views of one buffer
        // would share a version counter, so an in-place change to one would count as a
        // change to the others saved for backward.
        auto* base = static_cast<uint8_t*>(p.header.data_ptr());
        for (size_t i = 0; i < layout.defined.size(); ++i) {
          const auto& [dtype, shape] = layout.shapes[i];
          tensors[layout.defined[i]] = at::from_blob(
              base + kPrefixBytes + layout.offsets[i], shape, [keep = p.header](void*) {},
              at::TensorOptions().dtype(static_cast<at::ScalarType>(dtype)));
        }
      } else if (as_guessed) {
        for (auto& work : p.guessed_works) wait(work, what);
        for (size_t i = 0; i < layout.defined.size(); ++i) {
          tensors[layout.defined[i]] = p.guessed[i];
        }
      } else {
        for (auto& work : p.guessed_works) wait(work, what);  // the sender's voids, if any
        std::vector<c10::intrusive_ptr<c10d::Work>> works;
        for (size_t i = 0; i < layout.defined.size(); ++i) {
          const auto& [dtype, shape] = layout.shapes[i];
          std::vector<at::Tensor> part{
              receive_pool_.empty(shape, static_cast<at::ScalarType>(dtype))};
          tensors[layout.defined[i]] = part[0];
          works.push_back(start(from, [&] {
            return group_->recv(part, from,
                                tag_of(sequence + k, kUnguessedTags + static_cast<int64_t>(i)));
          }));
        }
        for (auto& work : works) wait(work, what);
      }
      // Received into host memory; a CUDA stage's copy goes on its stream, which its tasks
      // then find ordered after it.
      const at::Device device = placement_.stage_devices[expected.to_stage];
      if (!device.is_cpu()) tensors = transfer(tensors, device, streams_[expected.to_stage]);
      StructurePtr structure = layout.tuple ? flat_tuple() : nullptr;
      std::vector<bool> needs_grad = std::move(layout.needs_grad);
      std::lock_guard<std::mutex> lock(step.mutex);
      Slot& slot = step.at(expected.to_stage, expected.micro_batch);
      if (expected.phase == Phase::kForward) {
        slot.input = std::move(tensors);
        slot.input_structure = std::move(structure);
        slot.input_has_grad = std::move(needs_grad);
        slot.has_input = true;
      } else {
        slot.grad = std::move(tensors);
        slot.has_grad = true;
      }
      step.notify_locked();
    } catch (...) {
      step.fail(std::current_exception(), place() + "receiving from rank " + std::to_string(from));
      if (!broken_) {
        // The sender follows the same plan, so this message's tensors (or empty messages)
        // still come: taken before their receives, and the memory posted for them, go.
        try {
          for (auto& work : p.guessed_works) wait(work, what, /*progress=*/false);
        } catch (...) {
          // Now broken: handled below.
        }
      }
      if (broken_) {  // the channel is lost: nothing more will come
        left = std::move(p.guessed_works);
        break;
      }
    }
  }
  for (auto& p : ahead) {  // posted ahead on a channel that broke
    left.push_back(p.header_work);
    left.insert(left.end(), p.guessed_works.begin(), p.guessed_works.end());
  }
  abort_all(left);
}

at::Tensor ProcessGroupTransport::sendable(const at::Tensor& header, int64_t words) const {
  return short_messages_ ? header.narrow(0, 0, words) : header;
}

void ProcessGroupTransport::count_sent(const at::Tensor& t) {
  bytes_sent_.fetch_add(static_cast<uint64_t>(t.numel()) * t.element_size(),
                        std::memory_order_relaxed);
}

void ProcessGroupTransport::send(const Message& message, const Activations& tensors,
                                 const StructurePtr& structure,
                                 const std::vector<bool>& needs_grad) {
  const int to = placement_.worker_of(message.to_stage);
  const char* what = message.phase == Phase::kForward ? "output" : "input gradient";
  TORCH_CHECK_TYPE(!structure || structure == flat_tuple(), "shardpipe: stage ", message.from_stage,
                   "'s ", what, " goes to rank ", to,
                   "; only a Tensor or a flat tuple of Tensors can cross between ranks, and it "
                   "holds lists, dicts or values that are not tensors");
  TORCH_CHECK_TYPE(static_cast<int64_t>(tensors.size()) <= kMaxTensors, "shardpipe: stage ",
                   message.from_stage, "'s ", what, " holds ", tensors.size(), " tensors; at most ",
                   kMaxTensors, " can cross between ranks");
  Outgoing& channel = outgoing_.at(to);
  TORCH_CHECK(channel.next < channel.messages.size() && channel.messages[channel.next] == message,
              "shardpipe: rank ", rank_, " would send to rank ", to,
              " out of the schedule's order (a bug in shardpipe)");
  at::Tensor header = at::zeros({kWords}, at::kLong);
  int64_t* w = header.data_ptr<int64_t>();
  w[0] = kData;
  w[1] = static_cast<int64_t>(message.phase);
  w[2] = message.from_stage;
  w[3] = message.micro_batch;
  w[4] = static_cast<int64_t>(tensors.size());
  int64_t at = 6;
  for (size_t j = 0; j < tensors.size(); ++j) {
    const at::Tensor& t = tensors[j];
    const int64_t dims = t.defined() ? t.dim() : 0;
    TORCH_CHECK_VALUE(at + 3 + dims <= kWords, "shardpipe: stage ", message.from_stage, "'s ", what,
                      " has too many dimensions to cross between ranks");
    w[at++] = t.defined() ? static_cast<int64_t>(t.scalar_type()) : -1;
    w[at++] = j < needs_grad.size() && needs_grad[j];
    w[at++] = dims;
    for (int64_t d = 0; d < dims; ++d) w[at++] = t.size(d);
    if (!t.defined()) continue;
    // gloo sends a tensor's memory as it lies: only dense tensors have theirs in one piece.
    TORCH_CHECK_TYPE(t.layout() == at::kStrided && !t.is_quantized(), "shardpipe: stage ",
                     message.from_stage, "'s ", what, " ", j, " is a ",
                     t.is_quantized() ? "quantized" : c10::str(t.layout()),
                     " tensor; only dense (strided) tensors can cross between ranks");
    TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), "shardpipe: stage ", message.from_stage, "'s ",
                      what, " ", j, " is on ", t.device(),
                      "; only CPU and CUDA tensors can cross between ranks");
  }
  w[5] = structure ? kFlatTuple : 0;
  // The receiver guessed this message's layout from the last time it came (and posted its
  // receives ahead for it) when that is in the record both ends keep.
  std::vector<int64_t> words(w + 4, w + at);
  const Layout* guess = guess_for(to, message);
  const bool as_guessed = guess && guess->words == words;
  Layout changed;  // a layout the receiver did not guess, kept once sent
  if (!as_guessed) changed = Layout::of(std::move(words));
  const Layout& layout = as_guessed ? *guess : changed;
  std::vector<at::Tensor> data;
  bool on_cuda = false;
  for (size_t j : layout.defined) {
    data.push_back(tensors[j].detach());
    on_cuda = on_cuda || tensors[j].is_cuda();
  }
  // Tensors cross through the group's CPU backend (gloo): a CUDA stage's go through host
  // memory first, copied once its stream (current here, on the stage's thread) made them.
  if (on_cuda) data = transfer(data, at::kCPU, std::nullopt);
  at::Tensor first_part;  // the header, the prefix, or the prefix with the tensors packed
  if (as_guessed && layout.packed) {
    first_part = at::empty({layout.packed_bytes}, at::kByte);
    auto* base = static_cast<uint8_t*>(first_part.data_ptr());
    for (size_t i = 0; i < data.size(); ++i) {
      at::from_blob(base + kPrefixBytes + layout.offsets[i], data[i].sizes(), data[i].options())
          .copy_(data[i]);
    }
    data.clear();
  } else {
    first_part = as_guessed ? at::empty({2}, at::kLong) : sendable(header, at);
    for (auto& t : data) t = t.contiguous();  // gloo sends a contiguous tensor's memory
  }
  if (as_guessed) {
    auto* prefix = static_cast<int64_t*>(first_part.data_ptr());
    prefix[0] = kAsGuessed;
    prefix[1] = layout.fingerprint(message);
  }
  const uint64_t sequence = channel.sequence + channel.next;
  channel.next++;
  note_progress();  // this rank got on: its peers' silence is measured from here
  count_sent(first_part);
  for (const auto& t : data) count_sent(t);
  std::vector<at::Tensor> head{first_part};
  std::lock_guard<std::mutex> lock(sends_mutex_);
  auto first = start(to, [&] { return group_->send(head, to, tag_of(sequence, 0)); });
  sends_.push_back({first, {first_part}, to});
  if (!as_guessed) send_voids(to, sequence, guess);
  const int64_t base = as_guessed ? kGuessedTags : kUnguessedTags;
  for (size_t i = 0; i < data.size(); ++i) {
    std::vector<at::Tensor> one{data[i]};
    sends_.push_back({start(to,
                            [&] {
                              return group_->send(one, to,
                                                  tag_of(sequence, base + static_cast<int64_t>(i)));
                            }),
                      one, to});
  }
  if (short_messages_ && !as_guessed) sent_layouts_[to][key_of(message)] = std::move(changed);
  // Finished sends let go of their tensors now, not at the end of the phase.
  sends_.erase(std::remove_if(sends_.begin(), sends_.end(),
                              [](const Pending& p) { return p.work->isCompleted(); }),
               sends_.end());
}

void ProcessGroupTransport::send_record(int to, Outgoing& channel, const Record& record) {
  const Layout* guess = guess_for(to, channel.messages[channel.next]);
  const uint64_t sequence = channel.sequence + channel.next;
  channel.next++;
  at::Tensor header = sendable(record.encode(kFailure), record.words());
  count_sent(header);
  std::vector<at::Tensor> head{header};
  std::lock_guard<std::mutex> lock(sends_mutex_);
  sends_.push_back(
      {start(to, [&] { return group_->send(head, to, tag_of(sequence, 0)); }), {header}, to});
  send_voids(to, sequence, guess);
}

const ProcessGroupTransport::Layout* ProcessGroupTransport::guess_for(
    int to, const Message& message) const {
  auto channel = sent_layouts_.find(to);
  if (!short_messages_ || channel == sent_layouts_.end()) return nullptr;
  auto found = channel->second.find(key_of(message));
  return found == channel->second.end() ? nullptr : &found->second;
}

void ProcessGroupTransport::send_voids(int to, uint64_t sequence, const Layout* guess) {
  // Empty messages complete the receives posted for a wrong guess, which would otherwise stay
  // posted in the connection; gloo's TCP transport takes a message shorter than its receive.
  // A packed guess posted no tensor receives: the header fills its one receive.
  if (!guess || guess->packed) return;
  for (size_t i = 0; i < guess->shapes.size(); ++i) {
    std::vector<at::Tensor> none{at::empty({0}, at::kByte)};
    sends_.push_back({start(to,
                            [&] {
                              return group_->send(
                                  none, to,
                                  tag_of(sequence, kGuessedTags + static_cast<int64_t>(i)));
                            }),
                      none, to});
  }
}

void ProcessGroupTransport::send_activations(Step& step, int stage, int i,
                                             const Activations& outputs, StructurePtr structure,
                                             std::vector<bool> needs_grad) {
  if (!remote(stage + 1)) {
    LocalTransport::send_activations(step, stage, i, outputs, std::move(structure),
                                     std::move(needs_grad));
    return;
  }
  send({Phase::kForward, stage, stage + 1, i}, outputs, structure, needs_grad);
}

void ProcessGroupTransport::send_gradients(Step& step, int stage, int i, const Activations& grads) {
  if (!remote(stage - 1)) {
    LocalTransport::send_gradients(step, stage, i, grads);
    return;
  }
  send({Phase::kBackward, stage, stage - 1, i}, grads, nullptr, {});
}

ProcessGroupTransport::Record ProcessGroupTransport::failure_of(Step& step) {
  std::lock_guard<std::mutex> lock(step.mutex);
  Record record;
  record.failed = true;
  record.origin = rank_;
  if (step.failed_task) {
    record.stage = step.failed_task->stage;
    record.micro_batch = step.failed_task->micro_batch;
    record.phase = static_cast<int64_t>(step.failed_task->phase);
    record.text = text_of(step.error);
    return record;
  }
  std::lock_guard<std::mutex> peers(receive_mutex_);
  if (peer_failure_) return *peer_failure_;
  record.text = step.error ? text_of(step.error) : "cancelled";
  return record;
}

void ProcessGroupTransport::finish(Step& step) {
  bool failed;
  {
    std::lock_guard<std::mutex> lock(step.mutex);
    failed = static_cast<bool>(step.error);
  }
  // The peers wait for every message of the plan: what was not sent goes as a failure record.
  if (failed) {
    Record record = failure_of(step);
    record.lost = broken_;
    for (auto& [to, channel] : outgoing_) {
      try {
        while (channel.next < channel.messages.size()) send_record(to, channel, record);
      } catch (...) {
        // That peer is out of reach (the transport is broken now): it cannot be told.
        channel.next = channel.messages.size();
      }
    }
  }
  {
    std::unique_lock<std::mutex> lock(receive_mutex_);
    received_.wait(lock, [&] { return receiving_ == 0; });
  }
  std::vector<Pending> sends;
  {
    std::lock_guard<std::mutex> lock(sends_mutex_);
    sends.swap(sends_);
  }
  for (auto& pending : sends) {
    try {
      if (!broken_) {
        wait(pending.work, "could not deliver a message to rank " + std::to_string(pending.to));
      }
    } catch (...) {
      step.fail(std::current_exception(), place() + "sending");
    }
  }
  sends.clear();
  {
    std::lock_guard<std::mutex> lock(receive_mutex_);
    peer_failure_.reset();
  }
  if (broken_) {
    try {
      check_usable();
    } catch (...) {
      step.fail(std::current_exception(), place() + "after the phase");
    }
    return;
  }

  // Everyone returns or everyone raises: the outcomes (and the loss) go to every rank.
  Record mine;
  {
    std::lock_guard<std::mutex> lock(step.mutex);
    failed = static_cast<bool>(step.error);
  }
  if (failed) {
    mine = failure_of(step);
  } else {
    mine.origin = rank_;
    const int last = placement_.stages() - 1;
    if (step.fused && !remote(last)) {
      // The losses were made on the last stage's stream; reading them on another would race.
      StreamsGuard on_stage({streams_[last]});
      at::Tensor total = at::stack(step.losses).sum();
      const double value = total.item<double>();
      std::memcpy(&mine.value, &value, sizeof(value));
      mine.dtype = static_cast<int64_t>(total.scalar_type());
    }
  }
  std::vector<Record> records;
  try {
    records = exchange(mine);
  } catch (...) {
    step.fail(std::current_exception(), place() + "exchanging the outcome");
    return;
  }
  const Record* origin = nullptr;
  for (const auto& r : records) {
    if (r.failed && (!origin || r.origin < origin->origin)) origin = &r;
    if (!r.failed && r.dtype >= 0) {
      double value;
      std::memcpy(&value, &r.value, sizeof(value));
      step.shared_loss = at::scalar_tensor(value, static_cast<at::ScalarType>(r.dtype));
    }
  }
  if (origin && !failed) {
    step.fail(std::make_exception_ptr(std::runtime_error(origin->message())),
              place() + "after the phase");
  }
}

}  // namespace shardpipe
