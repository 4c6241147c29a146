// Persistent worker pool. A job runs on every worker at once (SPMD, like an OpenMP parallel
// region): workers split phases with for_each (dynamic scheduling) and meet at barriers.
// Jobs run one after another in submission order; the submitter waits on the job, never spins.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kt {

class Team {
 public:
  explicit Team(int nthreads) : nthreads_(nthreads) {}
  int size() const { return nthreads_; }
  void barrier();
  // Runs fn(i) for i in [0, n) across the team, then a barrier. Every worker must call it,
  // in the same order (the phase counter tells the calls apart).
  // for_each where each worker claims its next index before running the current one: fn(i, next)
  // gets the index this worker runs after i (or -1), so it can prefetch that task's data.
  template <class F>
  void for_each_ahead(int tid_phase_slot, int64_t n, F&& fn) {
    std::atomic<int64_t>& next = counters_[tid_phase_slot % kPhases];
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;) {
      const int64_t j = next.fetch_add(1, std::memory_order_relaxed);
      fn(i, j < n ? j : int64_t(-1));
      i = j;
    }
    barrier();
  }
  template <class F>
  void for_each(int tid_phase_slot, int64_t n, F&& fn) {
    std::atomic<int64_t>& next = counters_[tid_phase_slot % kPhases];
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i);
    barrier();
  }

 private:
  static constexpr int kPhases = 64;
  int nthreads_;
  std::atomic<int> arrived_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> counters_[kPhases] = {};
};

// Per-worker view of a running job: its thread id and phase bookkeeping.
class Worker {
 public:
  Worker(Team& team, int tid) : team_(team), tid_(tid) {}
  int tid() const { return tid_; }
  int threads() const { return team_.size(); }
  template <class F>
  void for_each(int64_t n, F&& fn) {
    team_.for_each(phase_++, n, std::forward<F>(fn));
  }
  template <class F>
  void for_each_ahead(int64_t n, F&& fn) {
    team_.for_each_ahead(phase_++, n, std::forward<F>(fn));
  }
  void barrier() { team_.barrier(); }

 private:
  Team& team_;
  int tid_;
  int phase_ = 0;
};

// A unit of work for the pool. The body must not throw: everything that can fail (validation,
// allocation) happens before submission, in the caller's thread.
class Job {
 public:
  using Body = std::function<void(Worker&)>;
  explicit Job(Body body) : body_(std::move(body)) {}
  void wait();
  bool done() const { return done_.load(std::memory_order_acquire); }

 private:
  friend class Pool;
  Body body_;
  std::unique_ptr<Team> team_;
  std::atomic<bool> done_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  void finish();
};

class Pool {
 public:
  // cpus: the CPUs the workers are pinned to (empty: not pinned), e.g. one NUMA node's.
  // Throws std::invalid_argument for nthreads < 1, std::runtime_error when the OS refuses a
  // thread (the threads already started are stopped and joined first).
  explicit Pool(int nthreads, std::vector<int> cpus = {});
  // Runs every job submitted so far to its end, then joins the workers.
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;
  int threads() const { return int(workers_.size()); }
  void submit(std::shared_ptr<Job> job);
  void run(std::shared_ptr<Job> job) {
    submit(job);
    job->wait();
  }
  // One pool per (thread count, slot, CPUs), shared by every state that asks for it (so layers do
  // not oversubscribe the cores), kept alive by its users. Distinct slots give distinct pools that
  // run at the same time (one per partition of a partitioned state).
  static std::shared_ptr<Pool> shared(int nthreads, int slot = 0, const std::vector<int>& cpus = {});

 private:
  void worker_loop(int tid);
  std::vector<int> cpus_;
  void start_next_locked();
  void stop_and_join();
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;
  int finished_ = 0;
  bool stopping_ = false;
};

}  // namespace kt
