// What the oneDNN custom calls share (onednn_conv.cc, onednn_norm.cc; clusiam_jax/models/
// onednn.py builds and registers them): the engine, the cache of primitives, and the one
// thread that runs every call. Inline, so the library holds one of each.
#ifndef CLUSIAM_JAX_MODELS_ONEDNN_COMMON_H_
#define CLUSIAM_JAX_MODELS_ONEDNN_COMMON_H_

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace clusiam_onednn {

namespace ffi = xla::ffi;
using dnnl::memory;
using Dims = memory::dims;
using Tag = memory::format_tag;

inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

inline memory::data_type DnnlType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return memory::data_type::f32;
    case ffi::DataType::BF16: return memory::data_type::bf16;
    default: return memory::data_type::undef;
  }
}

// A primitive's geometry in oneDNN's logical order (N, C, H, W) / (O, I, KH, KW), its key.
struct Geometry {
  Dims src, wei, dst, strides, pad_l, pad_r;
  memory::data_type type;
  std::string Key(const char* kind) const {
    std::string key(kind);
    for (const Dims* d : {&src, &wei, &dst, &strides, &pad_l, &pad_r})
      for (auto v : *d) key += "," + std::to_string(v);
    return key + ":" + std::to_string(static_cast<int>(type));
  }
};

inline memory::desc Nhwc(const Dims& d, memory::data_type t) {
  return memory::desc(d, t, Tag::nhwc);
}

// An NHWC buffer's dimensions in oneDNN's logical order.
inline Dims Nchw(ffi::Span<const int64_t> nhwc) {
  return {nhwc[0], nhwc[3], nhwc[1], nhwc[2]};
}

// A primitive with the kernel-side reorder it needs (none when oneDNN takes HWIO).
struct Plan {
  dnnl::primitive primitive;  // convolution, pooling, normalization, ...
  memory::desc kernel_desc;   // the layout it wants for the kernel (else: its workspace)
  std::unique_ptr<dnnl::reorder> kernel_reorder;
};

inline std::mutex plans_mutex;
inline std::map<std::string, std::shared_ptr<Plan>> plans;
// The OpenMP threads of the call being run: a primitive keeps the team size it was
// built for, so the threads are part of its key.
inline int current_threads = 1;

template <typename Build>
std::shared_ptr<Plan> Cached(const std::string& key, Build build) {
  std::lock_guard<std::mutex> lock(plans_mutex);
  const std::string full_key = key + ":t" + std::to_string(current_threads);
  auto found = plans.find(full_key);
  if (found != plans.end()) return found->second;
  auto plan = std::make_shared<Plan>(build());
  plans[full_key] = plan;
  return plan;
}

inline ffi::Error Checked(ffi::DataType type, const char* what) {
  if (DnnlType(type) == memory::data_type::undef)
    return ffi::Error::InvalidArgument(std::string(what) + ": float32 or bfloat16 only");
  return ffi::Error::Success();
}

// One thread runs every oneDNN call, with its OpenMP team of `threads`: XLA:CPU calls
// from several pool threads at once, and OpenMP teams started from several of them
// deadlocked on a 2-core machine; XLA's calling thread sleeps until the call is done.
class Runner {
 public:
  Runner() : worker_([this] { Loop(); }) {}
  void Run(int threads, const std::function<void()>& job) {
    std::promise<void> done;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back([&] {
        omp_set_num_threads(threads);
        current_threads = threads;
        try {
          job();
          done.set_value();
        } catch (...) {
          done.set_exception(std::current_exception());
        }
      });
    }
    wake_.notify_one();
    done.get_future().get();
  }

 private:
  void Loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job();
    }
  }
  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::function<void()>> queue_;
  std::thread worker_;
};

inline Runner& TheRunner() {
  static Runner* runner = new Runner();  // never destroyed: its thread lives to exit
  return *runner;
}

template <typename F>
ffi::Error Guarded(int64_t threads, F body) {
  try {
    TheRunner().Run(static_cast<int>(threads), body);
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("oneDNN call: ") + e.what());
  }
}

// An FFI binding with N (>= 1) more buffer arguments / results: the handlers' signatures
// (a binding cannot be copied or moved, only extended, hence no N = 0).
template <int N, typename Binding>
auto Args(Binding binding) {
  static_assert(N >= 1);
  if constexpr (N == 1) {
    return std::move(binding).template Arg<ffi::AnyBuffer>();
  } else {
    return Args<N - 1>(std::move(binding).template Arg<ffi::AnyBuffer>());
  }
}

template <int N, typename Binding>
auto Rets(Binding binding) {
  static_assert(N >= 1);
  if constexpr (N == 1) {
    return std::move(binding).template Ret<ffi::AnyBuffer>();
  } else {
    return Rets<N - 1>(std::move(binding).template Ret<ffi::AnyBuffer>());
  }
}

}  // namespace clusiam_onednn

#endif  // CLUSIAM_JAX_MODELS_ONEDNN_COMMON_H_
