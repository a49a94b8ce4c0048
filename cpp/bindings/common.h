// Shared helpers for the pybind11 bindings: run a kernel with the GIL released while the
// calling thread keeps watching for signals (Ctrl-C), and buffer validation that refuses
// silent copies.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <chrono>
#include <exception>
#include <future>
#include <string>
#include <thread>

#include "loramix/parallel.h"

namespace loramix::bind {
namespace py = pybind11;

// Runs f(Cancel&) on a helper thread with the GIL released. Every `period` the calling thread
// re-takes the GIL, runs PyErr_CheckSignals() and then tick(); if a handler raised
// (KeyboardInterrupt) or tick() threw, the kernel is asked to cancel, joined, and that error
// propagates. The kernel must poll cancel.requested() (parallel_for does between blocks).
template <class F, class Tick>
auto run_interruptible(F&& f, Tick&& tick, std::chrono::milliseconds period) -> decltype(f(std::declval<Cancel&>())) {
  using R = decltype(f(std::declval<Cancel&>()));
  Cancel cancel;
  std::packaged_task<R()> task([&] { return f(cancel); });
  std::future<R> fut = task.get_future();
  bool interrupted = false;
  std::exception_ptr tick_error;
  {
    py::gil_scoped_release release;
    std::thread th(std::move(task));
    while (fut.wait_for(period) != std::future_status::ready) {
      py::gil_scoped_acquire acquire;
      if (PyErr_CheckSignals() != 0) {
        interrupted = true;
      } else {
        try {
          tick();
        } catch (...) {
          tick_error = std::current_exception();
        }
      }
      if (interrupted || tick_error) {
        cancel.request();
        // Keep the Python error set; wait for the kernel to stop.
        {
          py::gil_scoped_release again;
          fut.wait();
        }
        break;
      }
    }
    th.join();
  }
  if (interrupted || tick_error) {
    try {
      fut.get();
    } catch (...) {
    }
    if (tick_error) std::rethrow_exception(tick_error);
    throw py::error_already_set();
  }
  return fut.get();
}

template <class F>
auto run_interruptible(F&& f) -> decltype(f(std::declval<Cancel&>())) {
  return run_interruptible(std::forward<F>(f), [] {}, std::chrono::milliseconds(50));
}

// A C-contiguous view of `arr` with dtype T, or a TypeError/ValueError that names `what`
// and says how to fix it. Never copies.
template <class T>
py::array_t<T, py::array::c_style> require_array(const py::handle& obj, const char* what) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(what) + ": expected a numpy array, got " +
                         std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(what) + ": expected dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(arr.dtype())) + " (convert with .astype() first)");
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(std::string(what) +
                          ": array is not C-contiguous (use numpy.ascontiguousarray first)");
  return py::array_t<T, py::array::c_style>::ensure(arr);
}

}  // namespace loramix::bind
