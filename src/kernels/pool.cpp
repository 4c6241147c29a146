#include "pool.hpp"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

namespace kt {

void Team::barrier() {
  uint64_t gen = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == nthreads_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    generation_.store(gen + 1, std::memory_order_release);
    return;
  }
  // Spin briefly (phases are short), then yield so an oversubscribed machine still progresses.
  for (int spins = 0; generation_.load(std::memory_order_acquire) == gen; ++spins) {
    if (spins < 2000)
      _mm_pause();
    else
      std::this_thread::yield();
  }
}

void Job::wait() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [this] { return done_.load(std::memory_order_acquire); });
}

void Job::finish() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

Pool::Pool(int nthreads, std::vector<int> cpus) : cpus_(std::move(cpus)) {
  if (nthreads < 1)
    throw std::invalid_argument("threads: expected >= 1 worker threads, got " + std::to_string(nthreads));
  workers_.reserve(nthreads);
  try {
    for (int i = 0; i < nthreads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
  } catch (const std::exception& e) {
    // A vector of joinable threads must not be destroyed (std::terminate): stop those made.
    const size_t started = workers_.size();
    stop_and_join();
    throw std::runtime_error("threads: could not start worker thread " + std::to_string(started + 1) + " of the " +
                             std::to_string(nthreads) + " asked (" + e.what() + "); the " + std::to_string(started) +
                             " already started were stopped");
  }
}

Pool::~Pool() { stop_and_join(); }

void Pool::stop_and_join() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void Pool::submit(std::shared_ptr<Job> job) {
  job->team_ = std::make_unique<Team>(threads());
  std::lock_guard<std::mutex> lock(mutex_);
  queue_.push_back(std::move(job));
  if (!current_) start_next_locked();
}

void Pool::start_next_locked() {
  if (queue_.empty()) {
    current_.reset();
    // Workers that finished their share early wait for (stopping_ && !current_): wake them.
    if (stopping_) cv_.notify_all();
    return;
  }
  current_ = std::move(queue_.front());
  queue_.pop_front();
  ++generation_;
  cv_.notify_all();
}

void Pool::worker_loop(int tid) {
  if (!cpus_.empty()) {  // pinned before the first job: its pages (first touch) land on these CPUs' node
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int cpu : cpus_) CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof(set), &set);  // best effort: unpinned if refused
  }
  uint64_t seen = 0;
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [&] { return generation_ != seen || (stopping_ && !current_); });
      if (generation_ == seen) return;  // stopping with nothing left to run
      seen = generation_;
      job = current_;
    }
    Worker worker(*job->team_, tid);
    job->body_(worker);
    std::lock_guard<std::mutex> lock(mutex_);
    if (++finished_ == threads()) {
      finished_ = 0;
      job->finish();
      start_next_locked();
    }
  }
}

std::shared_ptr<Pool> Pool::shared(int nthreads, int slot, const std::vector<int>& cpus) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, std::vector<int>>, std::weak_ptr<Pool>> pools;
  std::lock_guard<std::mutex> lock(mutex);
  std::weak_ptr<Pool>& entry = pools[{nthreads, slot, cpus}];
  std::shared_ptr<Pool> pool = entry.lock();
  if (!pool) {
    pool = std::make_shared<Pool>(nthreads, cpus);
    entry = pool;
  }
  return pool;
}

}  // namespace kt
