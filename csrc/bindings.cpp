// The one place where C++ meets Python: the pybind11 module shardpipe._C. Operators are
// registered with the dispatcher by the core itself (csrc/shardpipe/ops.cpp); loading this
// module is what makes torch.ops.shardpipe.* appear. Here Python modules become the core's
// stage callables (the GIL is taken only around the Python call) and Python exceptions keep
// their type on their way through the engine's threads.
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <mutex>
#include <vector>

#include "shardpipe/balance.h"
#include "shardpipe/checkpoint.h"
#include "shardpipe/engine.h"
#include "shardpipe/schedule.h"

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
  }

 private:
  PyThreadState* saved_;
};

// Makes the calling thread ready for a Python call: a kept thread state, the GIL is taken by
// the caller after this. torch's autograd engine restores a Python error on the thread that
// ran a failed backward before rethrowing it as a C++ exception; with a kept thread state
// that indicator would outlive the failure, so it is cleared before the next call.
void keep_thread_state() { thread_local PersistentThreadState state; }

void clear_stale_error() {
  if (PyErr_Occurred()) PyErr_Clear();
}

// Needs the GIL.
void delete_ended_thread_states() {
  std::vector<PyThreadState*> ended;
  {
    std::lock_guard<std::mutex> lock(ended_states_mutex);
    ended.swap(ended_states);
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

py::object as_argument(const Activations& xs) {
  if (xs.size() == 1) return py::cast(xs[0]);
  return py::tuple(py::cast(xs));
}

Activations as_activations(const py::handle& result, const char* what) {
  if (THPVariable_Check(result.ptr())) return {THPVariable_Unpack(result.ptr())};
  if (py::isinstance<py::tuple>(result) || py::isinstance<py::list>(result)) {
    Activations out;
    for (const auto& item : result) {
      if (!THPVariable_Check(item.ptr())) {
        PyErr_Format(PyExc_TypeError,
                     "%s must return a Tensor or a tuple of Tensors, got a %s holding a %s", what,
                     Py_TYPE(result.ptr())->tp_name, Py_TYPE(item.ptr())->tp_name);
        throw_python_error();
      }
      out.push_back(THPVariable_Unpack(item.ptr()));
    }
    return out;
  }
  PyErr_Format(PyExc_TypeError, "%s must return a Tensor or a tuple of Tensors, got %s", what,
               Py_TYPE(result.ptr())->tp_name);
  throw_python_error();
}

shardpipe::StageFn python_stage(py::object module) {
  auto fn = hold(std::move(module));
  return [fn](const Activations& input) -> Activations {
    keep_thread_state();
    py::gil_scoped_acquire gil;
    clear_stale_error();
    delete_ended_thread_states();
    try {
      return as_activations((*fn)(as_argument(input)), "a pipeline stage");
    } catch (py::error_already_set& e) {
      e.restore();
      throw_python_error();
    }
  };
}

shardpipe::LossFn python_loss(py::object loss_fn) {
  auto fn = hold(std::move(loss_fn));
  return [fn](const Activations& outputs, const Activations& targets) -> at::Tensor {
    keep_thread_state();
    py::gil_scoped_acquire gil;
    clear_stale_error();
    try {
      py::object loss = (*fn)(as_argument(outputs), as_argument(targets));
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

// Names the stage and micro-batch in a Python exception's message, keeping its type.
std::exception_ptr annotate(std::exception_ptr error, const std::string& where) {
  try {
    std::rethrow_exception(error);
  } catch (python_error& e) {
    py::gil_scoped_acquire gil;
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
  } catch (c10::Error& e) {
    e.add_context("shardpipe: raised in " + where);
    return std::current_exception();
  } catch (...) {
    return error;
  }
}

// Runs `body` without the GIL and raises what it threw as the matching Python exception.
template <typename F>
auto without_gil(F&& body) -> decltype(body()) {
  std::exception_ptr error;
  std::optional<decltype(body())> result;
  {
    py::gil_scoped_release no_gil;
    try {
      result.emplace(body());
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) {
    torch::translate_exception_to_python(error);
    throw py::error_already_set();
  }
  return std::move(*result);
}

const char* phase_name(shardpipe::Phase p) {
  return p == shardpipe::Phase::kForward ? "forward" : "backward";
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "shardpipe's C++ core";
  shardpipe::Engine::set_error_annotator(&annotate);

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

  m.def("is_recomputing", &shardpipe::is_recomputing,
        "True while this thread recomputes a checkpointed forward.");

  m.def(
      "schedule",
      [](const std::string& kind, int stages, int micro_batches, int workers) {
        auto schedule = shardpipe::make_schedule(shardpipe::parse_schedule(kind), stages,
                                                 micro_batches, workers);
        py::list per_worker;
        for (const auto& tasks : schedule.per_worker) {
          py::list list;
          for (const auto& t : tasks)
            list.append(py::make_tuple(t.stage, t.micro_batch, phase_name(t.phase)));
          per_worker.append(list);
        }
        return per_worker;
      },
      "Per-worker task lists [(stage, micro_batch, 'forward'|'backward'), ...].");

  py::class_<shardpipe::Engine, std::shared_ptr<shardpipe::Engine>>(m, "Engine")
      .def(
          py::init([](std::vector<py::object> stages, std::vector<std::string> devices, int workers,
                      int64_t chunks, const std::string& schedule, const std::string& checkpoint) {
            std::vector<shardpipe::StageFn> fns;
            for (auto& s : stages) fns.push_back(python_stage(s));
            shardpipe::EngineOptions options;
            for (const auto& d : devices) options.devices.emplace_back(d);
            options.workers = workers;
            options.chunks = chunks;
            options.schedule = shardpipe::parse_schedule(schedule);
            options.checkpoint = shardpipe::parse_checkpoint(checkpoint);
            return shardpipe::Engine::create(std::move(fns), std::move(options));
          }),
          py::arg("stages"), py::arg("devices"), py::arg("workers"), py::arg("chunks"),
          py::arg("schedule"), py::arg("checkpoint"))
      .def(
          "forward",
          [](shardpipe::Engine& e, const Activations& inputs, const std::vector<bool>& batched) {
            return without_gil([&] { return e.forward(inputs, batched); });
          },
          py::arg("inputs"), py::arg("batched"))
      .def(
          "train_step",
          [](shardpipe::Engine& e, const Activations& inputs, const std::vector<bool>& batched,
             const Activations& targets, py::object loss_fn, bool sum_reduction) {
            auto loss = python_loss(std::move(loss_fn));
            return without_gil(
                [&] { return e.train_step(inputs, batched, targets, loss, sum_reduction); });
          },
          py::arg("inputs"), py::arg("batched"), py::arg("targets"), py::arg("loss_fn"),
          py::arg("sum_reduction"))
      .def("shutdown",
           [](shardpipe::Engine& e) {
             without_gil([&] {
               e.shutdown();
               return 0;
             });
           })
      .def("set_tracing", &shardpipe::Engine::set_tracing)
      .def("take_trace",
           [](shardpipe::Engine& e) {
             py::list events;
             for (const auto& ev : e.take_trace()) {
               events.append(py::make_tuple(ev.stage, ev.micro_batch, phase_name(ev.phase),
                                            ev.worker, ev.start_us, ev.end_us));
             }
             return events;
           })
      .def_property_readonly("stages", &shardpipe::Engine::stages)
      .def_property_readonly("workers", &shardpipe::Engine::workers);
}
