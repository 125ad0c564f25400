// The fiber scheduler behind emulator.h: one ucontext per CUDA thread of the running block.

#include "emulator.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <exception>
#include <sstream>
#include <vector>

namespace fdsm_emu {

uint3 thread_idx, block_idx;
dim3 block_dim, grid_dim;

namespace {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // dynamic shared memory without opt-in

enum class State { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;  // mmap'd, with a guard page below it
  State state = State::Done;
  std::source_location where;  // of the barrier or shuffle it waits at
  // Shuffle in flight: what this lane sent and what it reads back.
  Shuffle kind = Shuffle::Sync;
  int size = 0, arg = 0, width = kWarp;
  uint64_t sent = 0, received = 0;
};

unsigned g_grid_cap = 0;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_message;

std::vector<Fiber> g_fibers;
ucontext_t g_scheduler;
int g_current = -1;  // running fiber, -1 in the scheduler
const std::function<void()>* g_body = nullptr;
std::exception_ptr g_fault;

std::string where_str(const std::source_location& w) {
  std::string file = w.file_name();
  const size_t slash = file.rfind('/');
  if (slash != std::string::npos) file = file.substr(slash + 1);
  return file + ":" + std::to_string(w.line());
}

const char* kind_name(Shuffle k) {
  switch (k) {
    case Shuffle::Down:
      return "__shfl_down_sync";
    case Shuffle::Xor:
      return "__shfl_xor_sync";
    case Shuffle::Index:
      return "__shfl_sync";
    case Shuffle::Sync:
      return "__syncwarp";
  }
  return "?";
}

std::string thread_list(const std::vector<int>& ids) {
  std::ostringstream s;
  for (size_t i = 0; i < ids.size() && i < 8; ++i) s << (i ? ", " : "") << ids[i];
  if (ids.size() > 8) s << ", ... (" << ids.size() << " threads)";
  return s.str();
}

[[noreturn]] void fault(const std::string& what) {
  std::ostringstream s;
  s << "CUDA emulation: " << what << " (block (" << block_idx.x << ", " << block_idx.y << ", "
    << block_idx.z << "), blockDim (" << block_dim.x << ", " << block_dim.y << ", "
    << block_dim.z << "))";
  throw KernelFault(s.str());
}

void set_coordinates(int t) {
  thread_idx.x = t % block_dim.x;
  thread_idx.y = (t / block_dim.x) % block_dim.y;
  thread_idx.z = t / (block_dim.x * block_dim.y);
}

void trampoline() {
  try {
    (*g_body)();
  } catch (...) {
    g_fault = std::current_exception();
  }
  g_fibers[g_current].state = State::Done;
  // Returning resumes uc_link, the scheduler.
}

// Suspends the running fiber until the scheduler releases it.
void block_here(State state, const std::source_location& where) {
  if (g_current < 0) throw KernelFault("CUDA emulation: barrier called outside a kernel");
  Fiber& f = g_fibers[g_current];
  f.state = state;
  f.where = where;
  swapcontext(&f.context, &g_scheduler);
}

int n_threads() { return static_cast<int>(block_dim.x * block_dim.y * block_dim.z); }

int warp_size(int warp) { return std::min(kWarp, n_threads() - warp * kWarp); }

// Completes the exchange of a warp whose lanes all wait at the same shuffle.
void complete_exchange(int warp) {
  const int first = warp * kWarp, lanes = warp_size(warp);
  const Fiber& lead = g_fibers[first];
  for (int l = 0; l < lanes; ++l) {
    const Fiber& f = g_fibers[first + l];
    if (f.kind != lead.kind || f.where.line() != lead.where.line() ||
        std::strcmp(f.where.file_name(), lead.where.file_name()) != 0 || f.size != lead.size ||
        f.width != lead.width) {
      fault("lanes of warp " + std::to_string(warp) + " wait at different warp operations: " +
            kind_name(lead.kind) + " at " + where_str(lead.where) + " and " +
            kind_name(f.kind) + " at " + where_str(f.where));
    }
  }
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = g_fibers[first + l];
    const int segment = l / f.width * f.width;
    int src = l;
    switch (f.kind) {
      case Shuffle::Down:
        src = l % f.width + f.arg < f.width ? l + f.arg : l;
        break;
      case Shuffle::Xor:
        src = (l ^ f.arg) / f.width == l / f.width ? l ^ f.arg : l;
        break;
      case Shuffle::Index:
        src = segment + ((f.arg % f.width) + f.width) % f.width;
        break;
      case Shuffle::Sync:
        break;
    }
    f.received = g_fibers[first + src].sent;
  }
  for (int l = 0; l < lanes; ++l) g_fibers[first + l].state = State::Runnable;
}

// Called when no fiber can run: releases a barrier that every thread concerned has reached,
// or reports why none can be released.
void release_or_fault() {
  const int n = n_threads();
  bool released = false;
  for (int warp = 0; warp * kWarp < n; ++warp) {
    const int first = warp * kWarp, lanes = warp_size(warp);
    std::vector<int> waiting, exited;
    for (int l = 0; l < lanes; ++l) {
      const State s = g_fibers[first + l].state;
      if (s == State::AtWarp) waiting.push_back(first + l);
      if (s == State::Done) exited.push_back(first + l);
    }
    if (waiting.empty()) continue;
    if (static_cast<int>(waiting.size()) == lanes) {
      complete_exchange(warp);
      released = true;
    } else if (!exited.empty()) {
      const Fiber& f = g_fibers[waiting[0]];
      fault(std::string(kind_name(f.kind)) + " at " + where_str(f.where) + " in warp " +
            std::to_string(warp) + ": threads " + thread_list(exited) +
            " of the warp exited without reaching it");
    }
  }
  if (released) return;
  std::vector<int> at_barrier, at_warp, exited;
  for (int t = 0; t < n; ++t) {
    const State s = g_fibers[t].state;
    if (s == State::AtBarrier) at_barrier.push_back(t);
    if (s == State::AtWarp) at_warp.push_back(t);
    if (s == State::Done) exited.push_back(t);
  }
  if (!at_barrier.empty() && at_warp.empty()) {
    const Fiber& f = g_fibers[at_barrier[0]];
    if (!exited.empty()) {
      fault("__syncthreads() at " + where_str(f.where) + ": threads " + thread_list(exited) +
            " exited without reaching it");
    }
    for (int t : at_barrier) {
      const Fiber& g = g_fibers[t];
      if (g.where.line() != f.where.line() ||
          std::strcmp(g.where.file_name(), f.where.file_name()) != 0) {
        fault("threads wait at different __syncthreads(): " + where_str(f.where) + " and " +
              where_str(g.where));
      }
    }
    for (int t : at_barrier) g_fibers[t].state = State::Runnable;
    return;
  }
  const Fiber& b = g_fibers[at_barrier.empty() ? at_warp[0] : at_barrier[0]];
  const Fiber& w = g_fibers[at_warp[0]];
  fault("deadlock: threads " + thread_list(at_barrier) + " wait at __syncthreads() at " +
        where_str(b.where) + ", threads " + thread_list(at_warp) + " at " + kind_name(w.kind) +
        " at " + where_str(w.where));
}

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  return static_cast<char*>(p) + page;
}

void run_block() {
  const int n = n_threads();
  if (static_cast<int>(g_fibers.size()) < n) g_fibers.resize(n);
  for (int t = 0; t < n; ++t) {
    Fiber& f = g_fibers[t];
    if (f.stack == nullptr) f.stack = new_stack();
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &g_scheduler;
    makecontext(&f.context, trampoline, 0);
    f.state = State::Runnable;
  }
  for (;;) {
    bool ran = false, live = false;
    for (int t = 0; t < n; ++t) {
      if (g_fibers[t].state != State::Runnable) continue;
      g_current = t;
      set_coordinates(t);
      swapcontext(&g_scheduler, &g_fibers[t].context);
      g_current = -1;
      if (g_fault) std::rethrow_exception(std::exchange(g_fault, nullptr));
      ran = true;
    }
    for (int t = 0; t < n && !live; ++t) live = g_fibers[t].state != State::Done;
    if (!live) return;
    if (!ran) release_or_fault();
  }
}

void set_error(cudaError_t error, const std::string& message) {
  g_last_error = error;
  g_last_message = message;
}

}  // namespace

void set_grid_cap(unsigned cap) { g_grid_cap = cap; }

cudaError_t get_last_error() {
  return std::exchange(g_last_error, cudaSuccess);
}

std::string last_error_message() { return g_last_message; }

void syncthreads(const std::source_location& where) { block_here(State::AtBarrier, where); }

uint64_t warp_exchange(Shuffle kind, unsigned mask, uint64_t bits, int size, int arg, int width,
                       const std::source_location& where) {
  if (g_current < 0) throw KernelFault("CUDA emulation: warp operation outside a kernel");
  const int warp = g_current / kWarp;
  if (mask != 0xffffffffu) {
    fault(std::string(kind_name(kind)) + " at " + where_str(where) + " with partial mask 0x" +
          [&] {
            std::ostringstream s;
            s << std::hex << mask;
            return s.str();
          }() +
          ": only full warps are emulated");
  }
  if (warp_size(warp) != kWarp) {
    fault(std::string(kind_name(kind)) + " at " + where_str(where) +
          " with a full mask in warp " + std::to_string(warp) + ", which has only " +
          std::to_string(warp_size(warp)) + " threads");
  }
  if (width < 1 || width > kWarp || (width & (width - 1)) != 0) {
    fault(std::string(kind_name(kind)) + " at " + where_str(where) + ": width " +
          std::to_string(width) + " is not a power of two in [1, 32]");
  }
  Fiber& f = g_fibers[g_current];
  f.kind = kind;
  f.size = size;
  f.arg = arg;
  f.width = width;
  f.sent = bits;
  block_here(State::AtWarp, where);
  return f.received;
}

void run_grid(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body) {
  if (g_current >= 0) throw KernelFault("CUDA emulation: kernel launch inside a kernel");
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  std::string bad;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > 1024 || block.z > 64) {
    bad = "block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
          std::to_string(block.z) + ") must have 1 to 1024 threads (z <= 64)";
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u ||
             grid.y > 65535 || grid.z > 65535) {
    bad = "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
          std::to_string(grid.z) + ") must be in [1, 2^31-1] x [1, 65535] x [1, 65535]";
  } else if (shared_bytes > kMaxSharedBytes) {
    bad = std::to_string(shared_bytes) + " bytes of dynamic shared memory exceed " +
          std::to_string(kMaxSharedBytes);
  }
  if (!bad.empty()) {
    set_error(cudaErrorInvalidConfiguration,
              std::string("invalid launch configuration of ") + kernel + ": " + bad);
    return;
  }
  if (g_grid_cap != 0) {
    grid.x = std::min(grid.x, g_grid_cap);
    grid.y = std::min(grid.y, g_grid_cap);
    grid.z = std::min(grid.z, g_grid_cap);
  }
  grid_dim = grid;
  block_dim = block;
  g_body = &body;
  try {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          block_idx = uint3{x, y, z};
          run_block();
        }
      }
    }
  } catch (...) {
    g_body = nullptr;
    g_current = -1;
    throw;
  }
  g_body = nullptr;
}

}  // namespace fdsm_emu
