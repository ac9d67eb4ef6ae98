// The one place where C++ meets Python: the pybind11 module shardpipe._C. Operators are
// registered with the dispatcher by the core itself (csrc/shardpipe/ops.cpp); loading this
// module is what makes torch.ops.shardpipe.* appear. Here Python modules become the core's
// stage callables (the GIL is taken only around the Python call) and Python exceptions keep
// their type on their way through the engine's threads.
#include <pybind11/gil_safe_call_once.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <vector>

#include "shardpipe/pipeline/balance.h"
#include "shardpipe/pipeline/checkpoint.h"
#include "shardpipe/pipeline/cost_model.h"
#include "shardpipe/pipeline/engine.h"
#include "shardpipe/pipeline/executor.h"
#include "shardpipe/pipeline/placement.h"
#include "shardpipe/pipeline/process_group_transport.h"
#include "shardpipe/pipeline/schedule.h"
#include "shardpipe/tensor_parallel/collectives.h"
#include "shardpipe/tensor_parallel/linear_math.h"
#include "shardpipe/tensor_parallel/sharded_linear.h"

namespace py = pybind11;
using shardpipe::Activations;

namespace {

// Keeps a Python object alive from C++ and drops it under the GIL, whichever thread
// releases the last reference.
std::shared_ptr<py::object> hold(py::object obj) {
  return std::shared_ptr<py::object>(new py::object(std::move(obj)), [](py::object* p) {
    py::gil_scoped_acquire gil;
    delete p;
  });
}

// Thread states of engine threads that have ended, deleted under the GIL by the next caller:
// a thread that ends inside a join must not wait for the GIL, which the joining thread may
// hold.
std::mutex ended_states_mutex;
std::vector<PyThreadState*> ended_states;
std::atomic<bool> any_ended_states{false};  // read on every stage call; the lock only if set

// Gives the calling thread a Python thread state that outlives one call. Without it every
// GIL acquisition on an engine worker creates and destroys a thread state, which costs more
// than the rest of a small task.
class PersistentThreadState {
 public:
  PersistentThreadState() {
    PyGILState_Ensure();  // creates the thread state; never released, it stays
    saved_ = PyEval_SaveThread();
  }
  ~PersistentThreadState() {
    std::lock_guard<std::mutex> lock(ended_states_mutex);
    ended_states.push_back(saved_);
    any_ended_states = true;
  }

 private:
  PyThreadState* saved_;
};

// Makes the calling thread ready for a Python call: a kept thread state, the GIL is taken by
// the caller after this. A thread Python already knows (the caller's own, when the executor
// runs the tasks there) keeps the state it has. torch's autograd engine restores a Python
// error on the thread that ran a failed backward before rethrowing it as a C++ exception;
// with a kept thread state that indicator would outlive the failure, so it is cleared before
// the next call.
void keep_thread_state() {
  thread_local bool ready = false;
  if (ready) return;
  ready = true;
  if (PyGILState_GetThisThreadState() == nullptr) {
    thread_local PersistentThreadState state;
  }
}

void clear_stale_error() {
  if (PyErr_Occurred()) PyErr_Clear();
}

// Needs the GIL.
void delete_ended_thread_states() {
  if (!any_ended_states.load(std::memory_order_relaxed)) return;
  std::vector<PyThreadState*> ended;
  {
    std::lock_guard<std::mutex> lock(ended_states_mutex);
    ended.swap(ended_states);
    any_ended_states = false;
  }
  for (auto* state : ended) {
    PyThreadState_Clear(state);
    PyThreadState_Delete(state);
  }
}

// Carries the pending Python exception across C++ frames as torch's python_error, which
// torch's autograd engine and error translation restore with its original type.
[[noreturn]] void throw_python_error() {
  python_error error;
  error.persist();
  throw error;
}

// How Python values nest around their tensors. One bare tensor has no structure and a flat
// tuple of tensors (the common cases) stays in C++; anything else (lists, dicts, 1-tuples
// are tuples too, values that are not tensors) keeps torch.utils._pytree's description made
// by shardpipe._structure.
struct PyTreeStructure : shardpipe::Structure {
  explicit PyTreeStructure(py::object spec) : spec(hold(std::move(spec))) {}
  std::shared_ptr<py::object> spec;
};

using shardpipe::flat_tuple;

// Imported once and never released: a static py::object would be released at process exit,
// after the interpreter is gone (a crash on exit), and its guard could deadlock with the GIL.
py::module_& structure_module() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::module_> storage;
  return storage
      .call_once_and_store_result([] { return py::module_::import("shardpipe._structure"); })
      .get_stored();
}

// Needs the GIL.
shardpipe::StructurePtr structure_of(const py::object& spec) {
  if (spec.is_none()) return nullptr;
  if (spec.is(py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(&PyTuple_Type)))) {
    return flat_tuple();
  }
  return std::make_shared<PyTreeStructure>(spec);
}

// Needs the GIL.
py::object to_python(const Activations& xs, const shardpipe::StructurePtr& structure) {
  if (!structure) return xs.size() == 1 ? py::cast(xs[0]) : py::object(py::tuple(py::cast(xs)));
  if (structure == flat_tuple()) return py::tuple(py::cast(xs));
  const auto& spec = *static_cast<const PyTreeStructure&>(*structure).spec;
  return structure_module().attr("unflatten")(py::cast(xs), spec);
}

// Needs the GIL.
Activations from_python(const py::object& value, shardpipe::StructurePtr& structure) {
  if (THPVariable_Check(value.ptr())) {
    structure = nullptr;
    return {THPVariable_Unpack(value.ptr())};
  }
  if (PyTuple_CheckExact(value.ptr()) && PyTuple_GET_SIZE(value.ptr()) > 1) {
    Activations out;
    bool all = true;
    for (const auto& item : value) {
      if (!THPVariable_Check(item.ptr())) {
        all = false;
        break;
      }
      out.push_back(THPVariable_Unpack(item.ptr()));
    }
    if (all) {
      structure = flat_tuple();
      return out;
    }
  }
  py::tuple flat = structure_module().attr("flatten")(value);
  structure = structure_of(flat[1]);
  return flat[0].cast<Activations>();
}

shardpipe::StageFn python_stage(py::object module) {
  auto fn = hold(std::move(module));
  return [fn](const Activations& input, shardpipe::StructurePtr& structure) -> Activations {
    keep_thread_state();
    py::gil_scoped_acquire gil;
    clear_stale_error();
    delete_ended_thread_states();
    try {
      return from_python((*fn)(to_python(input, structure)), structure);
    } catch (py::error_already_set& e) {
      e.restore();
      throw_python_error();
    }
  };
}

// A list-returning method of the stage module (buffers, parameters), called under the GIL.
shardpipe::TensorsFn python_tensors(py::object module, const char* method) {
  auto fn = hold(std::move(module));
  return [fn, method]() -> std::vector<at::Tensor> {
    keep_thread_state();
    py::gil_scoped_acquire gil;
    clear_stale_error();
    try {
      std::vector<at::Tensor> out;
      for (const auto& b : fn->attr(method)()) out.push_back(THPVariable_Unpack(b.ptr()));
      return out;
    } catch (py::error_already_set& e) {
      e.restore();
      throw_python_error();
    }
  };
}

shardpipe::LossFn python_loss(py::object loss_fn) {
  auto fn = hold(std::move(loss_fn));
  return [fn](const Activations& outputs, const shardpipe::StructurePtr& structure,
              const Activations& targets) -> at::Tensor {
    keep_thread_state();
    py::gil_scoped_acquire gil;
    clear_stale_error();
    try {
      py::object loss = (*fn)(to_python(outputs, structure), to_python(targets, nullptr));
      if (!THPVariable_Check(loss.ptr())) {
        PyErr_Format(PyExc_TypeError, "loss_fn must return a Tensor, got %s",
                     Py_TYPE(loss.ptr())->tp_name);
        throw_python_error();
      }
      return THPVariable_Unpack(loss.ptr());
    } catch (py::error_already_set& e) {
      e.restore();
      throw_python_error();
    }
  };
}

// Names the stage and micro-batch in a Python exception's message, keeping its type; other
// exceptions are left to the executor's own annotation (null).
std::exception_ptr annotate(std::exception_ptr error, const std::string& where) {
  try {
    std::rethrow_exception(error);
  } catch (python_error& e) {
    py::gil_scoped_acquire gil;
    // A failed backward that autograd ran on this very thread (the executor runs the tasks
    // on the caller's thread) left this exception restored as the thread's pending error;
    // editing it needs a clear indicator, and whoever raises it restores it again.
    clear_stale_error();
    if (e.value) {
      py::handle value(e.value);
      std::string suffix = " [shardpipe: raised in " + where + "]";
      try {
        py::tuple args = value.attr("args");
        if (py::len(args) >= 1 && py::isinstance<py::str>(args[0])) {
          py::list edited(args);
          edited[0] = py::str(args[0]) + py::str(suffix);
          value.attr("args") = py::tuple(edited);
        } else if (py::hasattr(value, "add_note")) {
          value.attr("add_note")("shardpipe: raised in " + where);
        }
      } catch (py::error_already_set&) {
        // An exception type that refuses new args keeps its own message.
      }
      e.build_message();
    }
    return std::current_exception();
  } catch (...) {
    return nullptr;
  }
}

// What a peer rank reports of an error raised here: "ValueError: bad input" for a Python
// exception; empty for others (the transport then uses what()).
std::string error_text(std::exception_ptr error) {
  try {
    std::rethrow_exception(error);
  } catch (python_error& e) {
    py::gil_scoped_acquire gil;
    if (!e.type) return "";
    return py::handle(e.type).attr("__name__").cast<std::string>() + ": " + e.what();
  } catch (...) {
    return "";
  }
}

// The exception object `error` (or None) as the core carries it; needs the GIL.
std::exception_ptr as_exception(const py::object& error) {
  if (error.is_none()) return nullptr;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
  python_error e;
  e.persist();
  return std::make_exception_ptr(e);
}

// Runs `body` without the GIL and raises what it threw as the matching Python exception.
// The GIL is taken back in plain code, not in a destructor: a thread other than the main one
// that comes back while the interpreter is finalising is ended there by Python with a forced
// unwind, which a (noexcept) destructor would turn into std::terminate.
template <typename F>
auto without_gil(F&& body) -> decltype(body()) {
  std::exception_ptr error;
  std::optional<decltype(body())> result;
  PyThreadState* state = PyEval_SaveThread();
  try {
    result.emplace(body());
  } catch (...) {
    error = std::current_exception();
  }
  PyEval_RestoreThread(state);
  if (error) {
    torch::translate_exception_to_python(error);
    throw py::error_already_set();
  }
  return std::move(*result);
}

const char* phase_name(shardpipe::Phase p) {
  switch (p) {
    case shardpipe::Phase::kForward:
      return "forward";
    case shardpipe::Phase::kBackward:
      return "backward";
    case shardpipe::Phase::kWeight:
      return "weight";
  }
  return "?";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "shardpipe's C++ core";
  shardpipe::Executor::set_error_annotator(&annotate);
  shardpipe::ProcessGroupTransport::set_error_text(&error_text);
  // Signal handlers run on the main thread only; elsewhere the check is a no-op.
  const auto main_thread =
      py::module_::import("threading").attr("main_thread")().attr("ident").cast<unsigned long>();
  shardpipe::Executor::set_interrupt_check([main_thread]() -> std::exception_ptr {
    if (PyThread_get_thread_ident() == main_thread) {
      py::gil_scoped_acquire gil;
      if (PyErr_CheckSignals() != 0) {
        python_error error;
        error.persist();
        return std::make_exception_ptr(error);
      }
    }
    return nullptr;
  });

  m.def(
      "cuda_compiled",
      []() {
#ifdef SHARDPIPE_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether this build of shardpipe compiled its CUDA sources.");

  // std::invalid_argument from the core arrives in Python as ValueError.
  m.def("balance_partition", &shardpipe::balance_partition, py::arg("costs"), py::arg("partitions"),
        "Group sizes splitting `costs` into `partitions` contiguous groups with the smallest "
        "largest group cost (ties: most even sizes, then lexicographically smallest).");

  // Tensor parallel: the C++ core's rules, for python/shardpipe/sharded_linear.py.
  m.def(
      "shard_sizes",
      [](int64_t total, int64_t shards) {
        try {
          return shardpipe::shard_sizes(total, shards);
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("total"), py::arg("shards"),
      "Sizes of `shards` pieces of `total` features, the first total % shards one larger "
      "(ValueError unless 1 <= shards <= total).");
  // A blocking collective: other Python threads may run meanwhile.
  m.def(
      "gather_shards",
      [](const at::Tensor& piece, int64_t dim, std::vector<int64_t> sizes,
         const std::string& group_name) {
        return shardpipe::gather_shards("gather_shards", piece, dim, std::move(sizes), group_name);
      },
      py::arg("piece"), py::arg("dim"), py::arg("sizes"), py::arg("group_name"),
      py::call_guard<py::gil_scoped_release>(),
      "The whole tensor from every rank's piece of it along `dim` (rank r's is sizes[r] "
      "wide), a new contiguous tensor; a collective over the group named group_name.");
  m.def(
      "set_collective_timeout",
      [](const std::string& group_name, double seconds) {
        if (!(seconds > 0)) throw py::value_error("timeout must be a positive number of seconds");
        shardpipe::GroupWatch::set_timeout(
            group_name, std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0)));
      },
      py::arg("group_name"), py::arg("seconds"),
      "How long the tensor-parallel collectives over the group named group_name wait for a "
      "peer before every rank raises, naming the rank at fault (default 120 s; one value per "
      "group).");
  m.def(
      "note_collective_failure",
      [](const std::string& group_name, const std::string& text) {
        shardpipe::GroupWatch::of(group_name)->note_failure(text);
      },
      py::arg("group_name"), py::arg("text"), py::call_guard<py::gil_scoped_release>(),
      "Tells the peers of the group named group_name that this rank's tensor-parallel layer "
      "raised `text` before its next collective, so that they stop waiting for it.");
  m.def(
      "collective_timeout",
      [](const std::string& group_name) {
        return static_cast<double>(shardpipe::GroupWatch::timeout_of(group_name).count()) / 1000.0;
      },
      py::arg("group_name"),
      "The timeout, in seconds, of the tensor-parallel collectives over the group named "
      "group_name (see set_collective_timeout).");
  m.def("_set_collective_overlap", &shardpipe::set_collective_overlap, py::arg("on"),
        "Private measurement switch (benchmarks, tests): False makes the process-group layers' "
        "backward wait for each collective at once instead of overlapping it with the weight "
        "gradient. Default True.");
  m.def("_collective_overlap", &shardpipe::collective_overlap,
        "Whether the process-group layers' backward overlaps its collectives (see "
        "_set_collective_overlap).");

  m.def("is_recomputing", &shardpipe::is_recomputing,
        "True while this thread recomputes a checkpointed forward.");

  m.def("schedule_names", &shardpipe::schedule_names, "The pipeline schedules, by name.");
  m.def("checkpoint_names", &shardpipe::checkpoint_names, "The checkpoint modes, by name.");

  // Placement: the C++ core's rule, asked by Pipeline (std::invalid_argument -> ValueError).
  m.def(
      "default_stage_count",
      [](const std::string& schedule, int devices, int64_t blocks, const std::string& what) {
        return shardpipe::default_stage_count(shardpipe::parse_schedule(schedule), devices, blocks,
                                              what);
      },
      py::arg("schedule"), py::arg("devices"), py::arg("blocks"), py::arg("what"),
      "Stages of a pipeline without a balance: one per device (two with 'interleaved' and "
      "'zbv').");
  m.def(
      "check_balance",
      [](const std::vector<int64_t>& balance, int64_t blocks, const std::string& what, int devices,
         const std::string& schedule) {
        shardpipe::check_balance(balance, blocks, what, devices,
                                 shardpipe::parse_schedule(schedule));
      },
      py::arg("balance"), py::arg("blocks"), py::arg("what"), py::arg("devices"),
      py::arg("schedule"), "Raises ValueError unless the balance fits the blocks and devices.");
  m.def(
      "place",
      [](const std::string& schedule, int stages, const std::vector<std::string>& devices) {
        std::vector<at::Device> parsed;
        for (const auto& d : devices) parsed.emplace_back(d);
        auto placement =
            shardpipe::Placement::make(shardpipe::parse_schedule(schedule), stages, parsed);
        std::vector<std::string> stage_devices;
        for (const auto& d : placement.stage_devices) stage_devices.push_back(d.str());
        return py::make_tuple(stage_devices, placement.workers);
      },
      py::arg("schedule"), py::arg("stages"), py::arg("devices"),
      "(device of each stage, number of workers) for `stages` stages on `devices`.");

  m.def(
      "worker_of_stage",
      [](const std::string& schedule, int stage, int workers) {
        return shardpipe::worker_of_stage(shardpipe::parse_schedule(schedule), stage, workers);
      },
      py::arg("schedule"), py::arg("stage"), py::arg("workers"),
      "The worker (over ranks: the rank) that runs `stage`.");

  // For benchmarks/pipeline_bench.py: a schedule's theory, in the trace's format.
  m.def(
      "schedule_timeline",
      [](const std::string& schedule, int stages, int micro_batches, int workers, double forward,
         double backward, double weight) {
        auto s = shardpipe::make_schedule(shardpipe::parse_schedule(schedule), stages,
                                          micro_batches, workers);
        py::list events;
        for (const auto& t : shardpipe::timeline(s, {forward, backward, weight})) {
          events.append(py::make_tuple(t.task.stage, t.task.micro_batch, phase_name(t.task.phase),
                                       t.worker, t.start, t.end));
        }
        return events;
      },
      py::arg("schedule"), py::arg("stages"), py::arg("micro_batches"), py::arg("workers"),
      py::arg("forward") = 1.0, py::arg("backward") = 1.0, py::arg("weight") = 1.0,
      "When each task of the schedule runs on paper, every task as soon as its dependencies and "
      "its worker allow, with the given costs (an unsplit backward costs backward + weight); "
      "tuples as Engine.take_trace gives them.");

  // For sp.autotune: the cost model's prediction of one configuration (cost_model.h). Each
  // block is {"resident_bytes": ..., "small": sample, "large": sample}, a sample a dict of
  // BlockSample's fields; the peak memory comes back per device, named as in `devices`.
  m.def(
      "predict_step",
      [](const std::vector<py::dict>& blocks, const std::string& schedule,
         const std::vector<int64_t>& balance, const std::vector<std::string>& devices,
         int64_t batch, int64_t chunks, const std::string& checkpoint, double task_overhead,
         double link_bandwidth, double link_latency, double compute_scale) {
        auto sample = [](const py::dict& d) {
          shardpipe::BlockSample s;
          s.rows = d["rows"].cast<int64_t>();
          s.forward = d["forward"].cast<double>();
          s.backward = d["backward"].cast<double>();
          s.weight = d["weight"].cast<double>();
          s.input_bytes = d["input_bytes"].cast<double>();
          s.output_bytes = d["output_bytes"].cast<double>();
          s.saved_bytes = d["saved_bytes"].cast<double>();
          return s;
        };
        std::vector<shardpipe::BlockProfile> profiles;
        for (const auto& b : blocks) {
          profiles.push_back({sample(b["small"].cast<py::dict>()),
                              sample(b["large"].cast<py::dict>()),
                              b["resident_bytes"].cast<double>()});
        }
        const auto kind = shardpipe::parse_schedule(schedule);
        const auto mode = shardpipe::parse_checkpoint(checkpoint);
        std::vector<at::Device> parsed;
        for (const auto& d : devices) parsed.emplace_back(d);
        const int stages = static_cast<int>(balance.size());
        const auto placement = shardpipe::Placement::make(kind, stages, parsed);
        shardpipe::PlanShape shape;
        shape.micro_batch_rows = shardpipe::chunk_rows(batch, chunks);
        const int m = static_cast<int>(shape.micro_batch_rows.size());
        shape.schedule = shardpipe::make_schedule(kind, stages, m, placement.workers);
        shape.balance = balance;
        std::vector<at::Device> distinct;
        for (const auto& d : placement.stage_devices) {
          auto it = std::find(distinct.begin(), distinct.end(), d);
          if (it == distinct.end()) it = distinct.insert(distinct.end(), d);
          shape.stage_device.push_back(static_cast<int>(it - distinct.begin()));
        }
        for (int i = 0; i < m; ++i)
          shape.checkpointed.push_back(shardpipe::is_checkpointed(mode, i, m));
        const auto prediction = shardpipe::predict(
            profiles, shape, {task_overhead, link_bandwidth, link_latency, compute_scale});
        py::dict memory;
        for (size_t d = 0; d < distinct.size(); ++d)
          memory[py::str(distinct[d].str())] = prediction.peak_memory[d];
        py::dict out;
        out["step_time"] = prediction.step_time;
        out["bubble"] = prediction.bubble;
        out["peak_memory"] = memory;
        out["micro_batches"] = m;
        return out;
      },
      py::arg("blocks"), py::arg("schedule"), py::arg("balance"), py::arg("devices"),
      py::arg("batch"), py::arg("chunks"), py::arg("checkpoint"), py::arg("task_overhead"),
      py::arg("link_bandwidth"), py::arg("link_latency"), py::arg("compute_scale") = 1.0,
      "Predicted step time (s), bubble and peak memory per device (bytes) of a train_step.");

  // For benchmarks/pipeline_bench.py: the engine's own cost per task, without Python.
  m.def(
      "_engine_overhead",
      [](int stages, int64_t chunks, const std::string& threads, int repeats, bool grad) {
        return without_gil([&] {
          std::vector<shardpipe::StageFn> identity(
              stages, [](const Activations& in, shardpipe::StructurePtr&) { return in; });
          shardpipe::EngineOptions options;
          options.devices.assign(stages, at::kCPU);
          options.chunks = chunks;
          auto engine = shardpipe::Engine::create(std::move(identity), options);
          engine->executor().set_threads(shardpipe::parse_threads(threads));
          auto x = at::randn({chunks, 4});
          at::AutoGradMode grad_mode(grad);
          if (grad) x.requires_grad_(true);
          auto run = [&] {
            auto out = engine->forward({{x}}, {true});
            if (grad) out.tensors[0].sum().backward();
          };
          run();
          run();
          std::vector<double> seconds;
          for (int r = 0; r < repeats; ++r) {
            auto start = std::chrono::steady_clock::now();
            run();
            seconds.push_back(
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
          }
          std::sort(seconds.begin(), seconds.end());
          const double tasks = static_cast<double>(stages) * chunks * (grad ? 2 : 1);
          return seconds[seconds.size() / 2] / tasks * 1e6;
        });
      },
      py::arg("stages"), py::arg("chunks"), py::arg("threads"), py::arg("repeats"), py::arg("grad"),
      "Median microseconds per task of a pipeline of C++ identity stages.");

  py::class_<shardpipe::Engine, std::shared_ptr<shardpipe::Engine>>(m, "Engine")
      .def(
          py::init([](std::vector<py::object> stages, std::vector<std::string> devices, int workers,
                      int64_t chunks, const std::string& schedule, const std::string& checkpoint,
                      bool check_finite, const std::string& group_name, double timeout,
                      const std::string& data_parallel_group) {
            std::vector<shardpipe::StageFn> fns;
            std::vector<shardpipe::StageTensors> tensors;
            for (auto& s : stages) {
              // None: a stage of another rank, which this process never runs.
              if (s.is_none()) {
                fns.emplace_back();
                tensors.emplace_back();
                continue;
              }
              fns.push_back(python_stage(s));
              tensors.push_back({python_tensors(s, "buffers"), python_tensors(s, "parameters")});
            }
            shardpipe::EngineOptions options;
            for (const auto& d : devices) options.devices.emplace_back(d);
            options.workers = workers;
            options.chunks = chunks;
            options.schedule = shardpipe::parse_schedule(schedule);
            options.checkpoint = shardpipe::parse_checkpoint(checkpoint);
            options.check_finite = check_finite;
            options.group_name = group_name;
            options.timeout = timeout;
            options.data_parallel_group = data_parallel_group;
            return without_gil([&] {
              return shardpipe::Engine::create(std::move(fns), std::move(options),
                                               std::move(tensors));
            });
          }),
          py::arg("stages"), py::arg("devices"), py::arg("workers"), py::arg("chunks"),
          py::arg("schedule"), py::arg("checkpoint"), py::arg("check_finite") = false,
          py::arg("group_name") = "", py::arg("timeout") = 120.0,
          py::arg("data_parallel_group") = "",
          "`group_name` non-empty: the stages span that process group's ranks, worker w on "
          "rank w; `stages` holds None for the other ranks' stages. `data_parallel_group` "
          "non-empty: the gradients are averaged over that group after every step.")
      .def(
          "forward",
          [](shardpipe::Engine& e, const Activations& inputs, const std::vector<bool>& batched,
             const py::object& spec, bool training, const py::object& refused) {
            shardpipe::Values values{inputs, structure_of(spec)};
            auto error = as_exception(refused);
            auto out = without_gil([&] { return e.forward(values, batched, training, error); });
            if (!e.runs_stage(e.stages() - 1)) return py::object(py::none());
            return to_python(out.tensors, out.structure);
          },
          py::arg("inputs"), py::arg("batched"), py::arg("spec"), py::arg("training"),
          py::arg("refused") = py::none(),
          "The output as the last stage returned it (tensors concatenated over micro-batches); "
          "over ranks None except on the last stage's rank. `refused`: an exception this rank "
          "met preparing its inputs, which makes every rank raise.")
      .def(
          "train_step",
          [](shardpipe::Engine& e, const Activations& inputs, const std::vector<bool>& batched,
             const py::object& spec, const Activations& targets, py::object loss_fn,
             bool sum_reduction, bool training, const py::object& refused) {
            auto loss = python_loss(std::move(loss_fn));
            shardpipe::Values values{inputs, structure_of(spec)};
            auto error = as_exception(refused);
            return without_gil([&] {
              return e.train_step(values, batched, targets, loss, sum_reduction, training, error);
            });
          },
          py::arg("inputs"), py::arg("batched"), py::arg("spec"), py::arg("targets"),
          py::arg("loss_fn"), py::arg("sum_reduction"), py::arg("training"),
          py::arg("refused") = py::none())
      .def("shutdown",
           [](shardpipe::Engine& e) {
             without_gil([&] {
               e.shutdown();
               return 0;
             });
           })
      .def("set_tracing", [](shardpipe::Engine& e, bool on) { e.set_tracing(on); })
      .def_property(
          "gradient_sync", &shardpipe::Engine::gradient_sync,
          [](shardpipe::Engine& e, bool on) { e.set_gradient_sync(on); },
          "With a data_parallel_group: whether steps average the gradients (off: no_sync).")
      .def_property(
          "threads",
          [](shardpipe::Engine& e) { return shardpipe::threads_name(e.executor().threads()); },
          [](shardpipe::Engine& e, const std::string& name) {
            e.executor().set_threads(shardpipe::parse_threads(name));
          },
          "Which threads run the tasks: 'auto', 'workers' or 'caller' (private: benchmarks and "
          "tests set it).")
      .def_property_readonly(
          "last_threads",
          [](shardpipe::Engine& e) { return shardpipe::threads_name(e.executor().last_threads()); })
      .def("take_trace",
           [](shardpipe::Engine& e) {
             py::list events;
             for (const auto& ev : e.executor().take_trace()) {
               events.append(py::make_tuple(ev.stage, ev.micro_batch, phase_name(ev.phase),
                                            ev.worker, ev.start_us, ev.end_us));
             }
             // A stage's gradient reduction (stage -1: the caller waiting for all of them),
             // from its buckets' start to when the caller saw it done.
             if (auto* reducer = e.reducer()) {
               for (const auto& r : reducer->take_times()) {
                 events.append(py::make_tuple(r.stage, -1, r.stage < 0 ? "reduce_wait" : "reduce",
                                              -1, r.issued_us, r.done_us));
               }
             }
             return events;
           })
      .def_property_readonly("bytes_sent", &shardpipe::Engine::bytes_sent,
                             "Over ranks: bytes this rank has sent its peers, headers and records "
                             "included (private: benchmarks read it).")
      .def_property_readonly("stages", &shardpipe::Engine::stages)
      .def_property_readonly("workers", &shardpipe::Engine::workers);
}
