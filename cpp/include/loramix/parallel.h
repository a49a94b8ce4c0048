// Minimal fork-join parallelism with cooperative cancellation.
//
// Contract:
//  - parallel_for(n, grain, threads, cancel, fn) calls fn(begin, end, worker) on disjoint
//    blocks covering [0, n), handed out dynamically in blocks of `grain` items; `worker` is in
//    [0, threads). With threads <= 1 or n <= grain it runs inline on the calling thread.
//  - Work stops being handed out once `cancel` is set (by the caller, e.g. on Ctrl-C, or by a
//    worker that threw); parallel_for then throws Cancelled, or rethrows the first exception
//    a worker raised. Kernels that run long inside one block poll cancel->requested() too.
//  - No Python here: the bindings turn signals into cancel requests (bindings/common.h).
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace loramix {

struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("loramix: operation cancelled") {}
};

class Cancel {
 public:
  void request() noexcept { flag_.store(true, std::memory_order_relaxed); }
  bool requested() const noexcept { return flag_.load(std::memory_order_relaxed); }

 private:
  std::atomic<bool> flag_{false};
};

template <class F>
void parallel_for(std::size_t n, std::size_t grain, int threads, Cancel* cancel, F&& fn) {
  if (n == 0) return;
  if (grain == 0) grain = 1;
  const std::size_t blocks = (n + grain - 1) / grain;
  const int nt = static_cast<int>(std::max<std::size_t>(1, std::min<std::size_t>(blocks, threads > 0 ? threads : 1)));
  std::atomic<std::size_t> next{0};
  std::exception_ptr first_error;
  std::mutex err_mu;
  Cancel local_cancel;
  Cancel* c = cancel ? cancel : &local_cancel;

  auto worker = [&](int wid) {
    try {
      for (;;) {
        if (c->requested()) return;
        const std::size_t b = next.fetch_add(1, std::memory_order_relaxed);
        if (b >= blocks) return;
        const std::size_t begin = b * grain, end = std::min(n, begin + grain);
        fn(begin, end, wid);
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(err_mu);
      if (!first_error) first_error = std::current_exception();
      c->request();
    }
  };

  if (nt == 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    pool.reserve(nt - 1);
    for (int t = 1; t < nt; ++t) pool.emplace_back(worker, t);
    worker(0);
    for (auto& th : pool) th.join();
  }
  if (first_error) std::rethrow_exception(first_error);
  if (c->requested()) throw Cancelled();
}

}  // namespace loramix
