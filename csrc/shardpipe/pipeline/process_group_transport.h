#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "shardpipe/common/worker_thread.h"
#include "shardpipe/pipeline/local_transport.h"
#include "shardpipe/pipeline/receive_pool.h"

namespace shardpipe {

// The stages of a pipeline spread over the ranks of a torch.distributed process group, one
// worker (one task list of the Schedule) per rank. What crosses between ranks travels as c10d
// point-to-point messages, each channel (sending rank, receiving rank) in the order
// `channel_plan` gives, which both ends read from the same Schedule: deadlock-free by
// construction, and checked on paper (`check_channels`) before a schedule first runs.
//
// A message whose layout (per tensor its dtype, shape and whether its producer wants a
// gradient) differs from the last time it went is a header describing it followed by the
// tensors, so shapes and dtypes may change from micro-batch to micro-batch. Both ends keep
// each message's last layout, and one receiver thread per peer posts receives a few messages
// ahead of the tasks that need them, with that layout as the guess: a message as guessed
// then carries only a two-word prefix in place of the header, and a small one travels as a
// single message, prefix and tensors packed together (a sender whose layout differs sends
// the header in the prefix's place, empty messages for any tensor receives the guess posted,
// and the tensors on other tags). It receives into blocks of a ReceivePool and delivers into
// the step's slots.
//
// Everything travels through the group's CPU backend (gloo): a CUDA stage's tensors are
// copied to the host on its thread (after its stream made them) before they are sent, and
// onto the receiving stage's stream once received.
//
// Faults: a phase that fails on one rank still sends every message its peers expect, as a
// failure record in the header, so they stop waiting at once and the channels stay in step
// for the next phase; after each phase the ranks exchange their outcomes, so that either
// every rank returns or every rank raises (the peers naming the rank, stage and micro-batch
// that failed). Every wait is bounded by `timeout` of silence: it fails once nothing but
// failure records has reached or left this rank for `timeout` since it began, so receives
// posted long ahead in a long phase never fail while messages flow. Once a wait fails (a peer
// died, hangs or never came) the transport is broken and every later phase raises at once.
class ProcessGroupTransport : public LocalTransport {
 public:
  // Turns an exception into the text a peer reports ("ValueError: bad input"); the Python
  // bindings install one that names Python exception types.
  using ErrorText = std::function<std::string(std::exception_ptr)>;
  static void set_error_text(ErrorText text);

  // `group_name`: as Python names the group (`group.group_name`). The placement's workers
  // must equal the group's size.
  ProcessGroupTransport(const Placement& placement,
                        const std::vector<std::optional<c10::Stream>>& streams,
                        const std::string& group_name, std::chrono::milliseconds timeout);
  ~ProcessGroupTransport() override;

  bool runs_here(int worker) const override { return worker == rank_; }
  std::string place() const override { return "rank " + std::to_string(rank_) + ", "; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }
  // Bytes this rank has posted to its peers so far: headers, records and tensors (for
  // benchmarks: what a step costs on the wire beside the tensors themselves).
  uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }

  // Before a phase, on every rank. The first stage's rank, which splits the input, sends every
  // other rank the batch size, or a failure record when it cannot go on (`local`, rethrown
  // there once delivered); the others wait for it and raise naming that rank. Returns the
  // batch. Nobody waits for the other ranks here: one with its own reason not to go on fails
  // the phase instead (the engine passes it no `local`), as a bad target does.
  int64_t share_batch(int64_t batch, std::exception_ptr local);

  void begin(Step& step, const Schedule& schedule) override;
  void send_activations(Step& step, int stage, int i, const Activations& outputs,
                        StructurePtr structure, std::vector<bool> needs_grad) override;
  void send_gradients(Step& step, int stage, int i, const Activations& grads) override;
  // Sends what is still owed (as failure records when the phase failed), waits for every
  // receive and send, and exchanges the outcome (and a train_step's loss) with every rank.
  void finish(Step& step) override;

 private:
  // A failure (or a success and its value) as it travels between ranks.
  struct Record {
    bool failed = false;
    // The sender lost a peer (its transport is broken): it takes no part in the outcome
    // exchange, so its receivers give it up too rather than wait a timeout for it.
    bool lost = false;
    int64_t origin = -1;  // the rank where it happened
    int64_t stage = -1;   // -1: not inside a task
    int64_t micro_batch = -1;
    int64_t phase = -1;
    int64_t value = 0;   // share_batch: the batch; finish: the loss, as a double's bits
    int64_t dtype = -1;  // finish: the loss's dtype (-1: no loss)
    std::string text;

    at::Tensor encode(int64_t kind) const;
    int64_t words() const;  // how many of the header's words it uses
    static Record decode(const int64_t* header);
    // What a peer raises: the failing rank, where it failed, and what it raised.
    std::string message() const;
  };
  struct Outgoing {
    std::vector<Message> messages;  // what the receiver expects, in order
    size_t next = 0;                // the next one to send
    uint64_t sequence = 0;          // messages sent on this channel since the start: the tags
  };
  struct Pending {
    c10::intrusive_ptr<c10d::Work> work;
    std::vector<at::Tensor> keep;  // alive until the send has finished
    int to = -1;                   // the receiving rank, for the error
  };

  // The dtype and shape of each defined tensor of a message, in order.
  using Shapes = std::vector<std::pair<int64_t, std::vector<int64_t>>>;
  // What a message holds, as its header's words from the fifth on describe it: the number of
  // tensors, whether they form a flat tuple, and per tensor its dtype (-1: undefined),
  // whether its producer wants its gradient, and its shape. Both ends of a channel keep each
  // message's last one; the receiver posts its receives with it as the guess.
  struct Layout {
    std::vector<int64_t> words;
    bool tuple = false;
    std::vector<bool> needs_grad;  // per tensor
    std::vector<size_t> defined;   // the positions of the defined tensors
    Shapes shapes;                 // theirs
    // Whether the message goes packed (prefix and tensors as one message, when its tensors'
    // bytes are few), and then where each defined tensor starts and the message's length.
    bool packed = false;
    std::vector<int64_t> offsets;
    int64_t packed_bytes = 0;

    static Layout of(std::vector<int64_t> words);
    // What a message as guessed carries in place of its header, to catch a disagreement
    // between the two ends' records (a bug) instead of filling the wrong shapes.
    int64_t fingerprint(const Message& message) const;
  };
  // A message's place in every phase that sends it: (phase, from stage, micro-batch).
  using MessageKey = std::tuple<int, int, int>;
  static MessageKey key_of(const Message& m) {
    return {static_cast<int>(m.phase), m.from_stage, m.micro_batch};
  }

  bool remote(int stage) const { return placement_.worker_of(stage) != rank_; }
  // The layout the receiver `to` guessed for `message`: the one it had last time, if any
  // (null if none); valid until the next send to `to`.
  const Layout* guess_for(int to, const Message& message) const;
  // Empty messages for the tensor receives a wrong guess posted, if any (sends_mutex_ held).
  void send_voids(int to, uint64_t sequence, const Layout* guess);
  static void abort_all(const std::vector<c10::intrusive_ptr<c10d::Work>>& works);
  void send(const Message& message, const Activations& tensors, const StructurePtr& structure,
            const std::vector<bool>& needs_grad);
  void send_record(int to, Outgoing& channel, const Record& record);
  // `header` as it goes: its first `words` where the backend lets a message be shorter than
  // its receive (the receiver always posts kWords), else whole.
  at::Tensor sendable(const at::Tensor& header, int64_t words) const;
  void count_sent(const at::Tensor& t);
  // Takes a phase's messages from `from`, in order, with receives posted for `depth` messages
  // beyond the one it is taking; `known`: what each message carried the last time it came
  // from there (the guesses), which only this peer's thread touches.
  void receive_all(Step& step, int from, std::vector<Message> messages, uint64_t sequence,
                   size_t depth, std::map<MessageKey, Layout>& known);
  Record failure_of(Step& step);
  // Every rank's record, in rank order (a collective of the group, bounded by the timeout).
  std::vector<Record> exchange(const Record& mine);
  // The tag of the next round of records (before or after a phase), alike on every rank:
  // above every channel's.
  int next_round_tag();
  // Starts a send or receive with `peer`; a refusal (a connection an earlier timeout closed)
  // raises naming the peer and breaks the transport.
  c10::intrusive_ptr<c10d::Work> start(int peer,
                                       const std::function<c10::intrusive_ptr<c10d::Work>()>& post);
  // Waits for `work` until it finishes or the watchdog aborts it after `timeout_` without
  // progress; raises naming `what` then. Its completion is progress unless `progress` is
  // false (a header, which the caller counts once it knows it is data).
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const std::string& what,
            bool progress = true);
  void note_progress();
  void watch();  // the watchdog thread's loop
  void check_usable() const;
  void mark_broken(const std::string& reason);

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int rank_ = 0;
  int ranks_ = 1;
  std::chrono::milliseconds timeout_;
  // Whether the backend takes a message shorter than its receive (short_messages()). Then
  // headers go as short as they are, and receivers guess a message's layout from the last
  // time it came, posting its receives ahead for it: a message as guessed needs no header,
  // and one guessed wrong still fits the receive posted for the packed one or the prefix.
  bool short_messages_ = false;
  // Per peer, each message's last layout as it went (sent_layouts_, by the senders) or came
  // (received_layouts_, by that peer's receiver thread): both ends keep the same.
  std::map<int, std::map<MessageKey, Layout>> sent_layouts_;
  std::map<int, std::map<MessageKey, Layout>> received_layouts_;
  std::atomic<uint64_t> bytes_sent_{0};
  // Set by whichever thread saw a wait expire; read by all.
  std::atomic<bool> broken_{false};
  mutable std::mutex broken_mutex_;
  std::string broken_reason_;

  struct CheckedPlan {
    ChannelPlan channels;
    bool forward_only;  // no backward messages: receivers post every receive at once
  };
  std::map<const Schedule*, CheckedPlan> plans_;  // checked once per schedule
  std::map<int, Outgoing> outgoing_;              // per receiving rank, for the running phase
  std::map<int, uint64_t> outgoing_sequence_;     // per receiving rank: messages sent so far
  std::map<int, uint64_t> incoming_sequence_;     // per sending rank: messages taken so far
  uint64_t rounds_ = 0;                           // records exchanged by every rank so far
  std::mutex sends_mutex_;
  std::vector<Pending> sends_;

  // One receiver thread per peer; `receiving_` counts the peers still taking this phase's
  // messages.
  std::map<int, std::unique_ptr<WorkerThread>> receivers_;

  // The watchdog: the works being waited for, each with when its wait began; it aborts
  // those that have seen no progress (a message received, posted or delivered: any peer)
  // for `timeout_` since then. gloo's own timeout would close every connection of the group
  // and count from the post, so waits pass none and leave the deadline to the watchdog.
  struct Waiting {
    c10::intrusive_ptr<c10d::Work> work;
    std::chrono::steady_clock::time_point since;
    bool aborted = false;
  };
  std::atomic<int64_t> last_progress_ns_{0};  // steady clock
  std::mutex waiting_mutex_;
  std::condition_variable watchdog_wake_;
  std::map<uint64_t, Waiting> waiting_;
  uint64_t next_waiting_ = 0;
  bool stopping_ = false;
  std::thread watchdog_;
  std::mutex receive_mutex_;
  std::condition_variable received_;
  int receiving_ = 0;
  std::optional<Record> peer_failure_;  // the first failure record a peer sent this phase
  ReceivePool receive_pool_;            // what the receiver threads receive into
};

}  // namespace shardpipe
