// CPU Batch-OMP kernel: the prepared dictionary (from a cache across calls, the Gram matrix only where it pays), then
// at::parallel_for over vectors, each thread coding its vectors in tiles (cpu/omp_tile.h) with one scratch buffer.
// Every vector's codes equal omp_core.h's host_encode, in the Gram and the Gram-free form alike.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../kernel_common.h"
#include "../omp_core.h"
#include "omp_tile.h"

namespace lasers {

namespace {

template <typename T>
using EncodeRange = void (*)(const core::HostProblem<T>&, const T*, int64_t*, T*, int64_t, int64_t);

// One instance of the tile kernel per x86 SIMD level (AVX-512, AVX2+FMA, portable), each compiled for its level
// (cpu/omp_tile.h), picked at run time: one build runs at full speed on any x86-64 machine.
template <typename T>
EncodeRange<T> pick_encode_range() {
#ifdef LASERS_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return &tile::avx512::encode_range<T>;
  if (__builtin_cpu_supports("x86-64-v3")) return &tile::avx2::encode_range<T>;
#endif
  return &tile::portable::encode_range<T>;
}

template <typename T>
using GramRows = void (*)(const T*, int64_t, int64_t, int64_t, int64_t, T*);

template <typename T>
GramRows<T> pick_gram_rows() {
#ifdef LASERS_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return &tile::avx512::gram_rows<T>;
  if (__builtin_cpu_supports("x86-64-v3")) return &tile::avx2::gram_rows<T>;
#endif
  return &tile::portable::gram_rows<T>;
}

// The normalised atoms (atoms_t, inv_norm) of dictionary (K, M), float32 or float64, on the CPU: omp_core.h's
// preparation (atom_norm: float64 fma chains in a fixed order), so every device (the CUDA kernel prepares its own
// copy the same way) and every BLAS or TF32 setting gives the same numbers, and the CPU and CUDA kernels code against
// identical ones. The Gram matrix is added by add_gram (the Gram form) or never built (the Gram-free form).
PreparedDictionary prepare_atoms_cpu(const at::Tensor& dictionary) {
  const at::Tensor d = dictionary.contiguous();
  const int64_t K = d.size(0), M = d.size(1);
  PreparedDictionary out{at::empty({M, K}, d.options()), at::Tensor(), at::empty({K}, d.options())};
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "prepare_dictionary", [&] {
    const scalar_t* src = d.const_data_ptr<scalar_t>();
    scalar_t* ut = out.atoms_t.mutable_data_ptr<scalar_t>();
    scalar_t* inv = out.inv_norm.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) core::prepare_atom(src, K, M, k, ut, inv);
  });
  return out;
}

// prepared with its Gram matrix G_ab = gram_entry(atoms_t, a, b) (float64 chains, one rounding), rows in parallel
// (tasks of about 4M multiply-adds: a small matrix is built on the calling thread).
PreparedDictionary add_gram(PreparedDictionary prepared) {
  const int64_t M = prepared.atoms_t.size(0), K = prepared.atoms_t.size(1);
  prepared.gram = at::empty({K, K}, prepared.atoms_t.options());
  AT_DISPATCH_FLOATING_TYPES(prepared.atoms_t.scalar_type(), "prepare_gram", [&] {
    static const GramRows<scalar_t> gram_rows = pick_gram_rows<scalar_t>();
    const scalar_t* ut = prepared.atoms_t.const_data_ptr<scalar_t>();
    scalar_t* gram = prepared.gram.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / (K * M));
    at::parallel_for(0, K, grain, [&](int64_t begin, int64_t end) { gram_rows(ut, K, M, begin, end, gram); });
  });
  return prepared;
}

int64_t prepared_bytes(const PreparedDictionary& d) {
  int64_t bytes = d.atoms_t.nbytes() + d.inv_norm.nbytes();
  return d.gram.defined() ? bytes + static_cast<int64_t>(d.gram.nbytes()) : bytes;
}

// A Gram matrix larger than this is never built: the Gram-free form codes against the atoms alone.
constexpr int64_t kGramByteLimit = int64_t{1} << 30;

// ---- The prepared-dictionary cache ------------------------------------------------------------------------------
// Evaluation, inference and repeated calls code against the same dictionary again and again: its prepared form
// (normalised atoms and, once worth it, the Gram matrix) is kept across calls while the dictionary tensor is
// unchanged. An entry is keyed on the tensor's storage (held weakly: a freed dictionary's entry is dropped at the
// next call), its data pointer, shape, strides and dtype, and its version counter, which every in-place change made
// through the tensor or a view of it advances (an optimiser step, copy_, an index assignment). Writes that bypass
// the version counter (through `.data`, as torch.autograd.gradcheck perturbs its inputs, or through memory shared
// with numpy) are caught too: an entry keeps a copy of the dictionary's values (K * M, small beside the K x K Gram
// matrix) and is used only when they are still the same bits, so a hit codes exactly what a fresh preparation would.
// Tensors created in inference mode have no version counter and are never cached. Bounded: entries beyond the byte
// budget are evicted, least recently used first; an entry larger than the budget is not kept. Thread-safe: one mutex
// around the table; the prepared tensors are immutable once published and shared by reference.
class DictionaryCache {
 public:
  struct Key {
    c10::weak_intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    std::vector<int64_t> sizes, strides;
    at::ScalarType dtype;
    uint32_t version;
  };

  static DictionaryCache& instance() {
    static DictionaryCache* cache = new DictionaryCache;  // never destroyed: no tensor freed after libtorch at exit
    return *cache;
  }

  // The key of dictionary, or nothing when it cannot be cached (inference tensors, a zero budget).
  std::optional<Key> key_of(const at::Tensor& d) {
    if (d.is_inference()) return std::nullopt;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (budget_ <= 0) return std::nullopt;
    }
    return Key{d.storage().getWeakStorageImpl(), d.const_data_ptr(), d.sizes().vec(), d.strides().vec(),
               d.scalar_type(), d.unsafeGetTensorImpl()->version_counter().current_version()};
  }

  // The entry for key whose values are still those of dictionary (counted as a hit or a miss). Entries of freed
  // storages and stale entries of the same tensor (another version, or other values) are dropped on the way.
  std::shared_ptr<const PreparedDictionary> find(const Key& key, const at::Tensor& dictionary) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::shared_ptr<const PreparedDictionary> found;
    for (auto it = entries_.begin(); it != entries_.end();) {
      const bool dead = it->key.storage.expired();
      const bool same_storage = !dead && it->key.storage._unsafe_get_target() == key.storage._unsafe_get_target();
      const bool same_tensor = same_storage && it->key.data == key.data && it->key.sizes == key.sizes &&
                               it->key.strides == key.strides && it->key.dtype == key.dtype;
      const bool stale = same_tensor && (it->key.version != key.version || !same_values(it->values, dictionary));
      if (dead || stale) {
        bytes_ -= it->bytes;
        it = entries_.erase(it);
        continue;
      }
      if (same_tensor) {
        it->last_use = ++clock_;
        found = it->prepared;
      }
      ++it;
    }
    ++(found ? hits_ : misses_);
    return found;
  }

  // Keeps prepared for key and dictionary's values (replacing the key's entry), evicting least recently used entries
  // beyond the budget.
  void store(Key key, const at::Tensor& dictionary, std::shared_ptr<const PreparedDictionary> prepared) {
    at::Tensor values = dictionary.contiguous().clone();
    const int64_t bytes = prepared_bytes(*prepared) + static_cast<int64_t>(values.nbytes());
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it)
      if (!it->key.storage.expired() &&
          it->key.storage._unsafe_get_target() == key.storage._unsafe_get_target() && it->key.data == key.data &&
          it->key.sizes == key.sizes && it->key.strides == key.strides && it->key.dtype == key.dtype) {
        bytes_ -= it->bytes;
        entries_.erase(it);
        break;
      }
    if (bytes > budget_) return;
    entries_.push_back(Entry{std::move(key), std::move(values), std::move(prepared), bytes, ++clock_});
    bytes_ += bytes;
    evict_to(budget_);
  }

  // [hits, misses, entries, bytes held, budget]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {hits_, misses_, static_cast<int64_t>(entries_.size()), bytes_, budget_};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
    bytes_ = hits_ = misses_ = 0;
  }

  // Sets the budget when bytes >= 0 (evicting to fit); returns the previous budget.
  int64_t budget(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t previous = budget_;
    if (bytes >= 0) {
      budget_ = bytes;
      evict_to(budget_);
    }
    return previous;
  }

 private:
  struct Entry {
    Key key;
    at::Tensor values;  // the dictionary's values when it was prepared (contiguous copy)
    std::shared_ptr<const PreparedDictionary> prepared;
    int64_t bytes;
    uint64_t last_use;
  };

  static bool same_values(const at::Tensor& values, const at::Tensor& dictionary) {
    const at::Tensor d = dictionary.contiguous();
    return values.nbytes() == d.nbytes() && std::memcmp(values.const_data_ptr(), d.const_data_ptr(), d.nbytes()) == 0;
  }

  void evict_to(int64_t limit) {  // mutex_ held
    while (bytes_ > limit && !entries_.empty()) {
      auto lru = std::min_element(entries_.begin(), entries_.end(),
                                  [](const Entry& a, const Entry& b) { return a.last_use < b.last_use; });
      bytes_ -= lru->bytes;
      entries_.erase(lru);
    }
  }

  std::mutex mutex_;
  std::vector<Entry> entries_;
  int64_t bytes_ = 0, hits_ = 0, misses_ = 0;
  int64_t budget_ = int64_t{1} << 30;  // bytes
  uint64_t clock_ = 0;
};

// Which form codes this call. LASERS_CPU_GRAM=gram or =free forces one (for comparisons and tests); auto (the
// default) takes the Gram form when the Gram matrix is already prepared, or when the dictionary was seen before
// (a dictionary coded twice will likely be coded again: the matrix is built once and cached), or when the cost model
// says the matrix pays for itself within this call: building it costs K * K * M / 2 multiply-adds, the Gram-free
// form costs K * M more per chosen atom (N * S of them), so the Gram form wins when 2 * N * S >= K. A Gram matrix
// over kGramByteLimit is never built.
enum class GramMode { kAuto, kGram, kFree };

GramMode gram_mode() {
  const char* env = std::getenv("LASERS_CPU_GRAM");
  const std::string mode = env == nullptr ? "auto" : env;
  if (mode == "auto" || mode.empty()) return GramMode::kAuto;
  if (mode == "gram") return GramMode::kGram;
  if (mode == "free") return GramMode::kFree;
  TORCH_CHECK(false, message("LASERS_CPU_GRAM must be auto, gram or free, not '", mode, "'"));
  return GramMode::kAuto;
}

bool use_gram(GramMode mode, const PreparedDictionary* cached, int64_t N, int64_t K, int64_t S, int64_t value_bytes) {
  if (mode != GramMode::kAuto) return mode == GramMode::kGram;
  if (cached != nullptr && cached->gram.defined()) return true;
  if (K * K * value_bytes > kGramByteLimit) return false;
  return cached != nullptr || 2 * N * S >= K;
}

// The prepared dictionary for one call of N vectors at sparsity S (from the cache where possible), and whether the
// call codes in the Gram form (the matrix is then in it) or the Gram-free form.
struct CallPlan {
  std::shared_ptr<const PreparedDictionary> prepared;
  bool gram;
};

CallPlan plan_call(const at::Tensor& dictionary, int64_t N, int64_t S) {
  DictionaryCache& cache = DictionaryCache::instance();
  std::optional<DictionaryCache::Key> key = cache.key_of(dictionary);
  std::shared_ptr<const PreparedDictionary> cached = key ? cache.find(*key, dictionary) : nullptr;
  const bool gram = use_gram(gram_mode(), cached.get(), N, dictionary.size(0), S, dictionary.element_size());
  if (cached && (cached->gram.defined() || !gram)) return {cached, gram};
  PreparedDictionary prepared = cached ? *cached : prepare_atoms_cpu(dictionary);
  if (gram) prepared = add_gram(std::move(prepared));
  auto out = std::make_shared<const PreparedDictionary>(std::move(prepared));
  if (key) cache.store(std::move(*key), dictionary, out);
  return {out, gram};
}

template <typename T>
void batch_omp_cpu_impl(const at::Tensor& x, const PreparedDictionary& d, bool gram, int64_t sparsity, double tol,
                        at::Tensor& indices, at::Tensor& coeffs) {
  core::HostProblem<T> p;
  p.atoms_t = d.atoms_t.const_data_ptr<T>();
  p.gram = gram ? d.gram.const_data_ptr<T>() : nullptr;  // null: the Gram-free form
  p.inv_norm = d.inv_norm.const_data_ptr<T>();
  p.K = d.atoms_t.size(1);
  p.M = d.atoms_t.size(0);
  p.S = static_cast<int>(sparsity);
  p.tol = static_cast<T>(tol);
  p.th = core::default_thresholds<T>();

  const T* xs = x.const_data_ptr<T>();
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  T* coef = coeffs.mutable_data_ptr<T>();
  // A vector costs ~K * (M + S^2 / 2) multiply-adds: a few microseconds. Chunks of 256 amortise the scratch buffer.
  static const EncodeRange<T> encode_range = pick_encode_range<T>();
  at::parallel_for(0, x.size(0), /*grain_size=*/256,
                   [&](int64_t begin, int64_t end) { encode_range(p, xs, idx, coef, begin, end); });
}

}  // namespace

// x (N, M) and dictionary (K, M), float32 or float64, same dtype, CPU. Returns indices (N, S) int64 and
// coeffs (N, S) in x's dtype.
std::tuple<at::Tensor, at::Tensor> batch_omp_cpu(const at::Tensor& x, const at::Tensor& dictionary, int64_t sparsity,
                                                 std::optional<double> tol) {
  check_kernel_arguments(x, dictionary, sparsity, "CPU");
  TORCH_CHECK(x.device().is_cpu(), "batch_omp: expected CPU tensors");

  const int64_t N = x.size(0);
  auto indices = at::empty({N, sparsity}, x.options().dtype(at::kLong));
  auto coeffs = at::empty({N, sparsity}, x.options());
  if (N == 0) return {indices, coeffs};

  const at::Tensor xc = x.contiguous();
  const CallPlan plan = plan_call(dictionary, N, sparsity);
  const double tol_value = tol.has_value() ? *tol : -1.0;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_omp_cpu", [&] {
    batch_omp_cpu_impl<scalar_t>(xc, *plan.prepared, plan.gram, sparsity, tol_value, indices, coeffs);
  });
  return {indices, coeffs};
}

// dictionary (K, M), float32 or float64, CPU: (atoms_t, gram, inv_norm) as the CPU kernel codes against them
// (prepared afresh: the caller owns the tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_dictionary_op_cpu(const at::Tensor& dictionary) {
  check_dictionary(dictionary);
  const PreparedDictionary d = add_gram(prepare_atoms_cpu(dictionary));
  return {d.atoms_t, d.gram, d.inv_norm};
}

std::vector<int64_t> dictionary_cache_stats() { return DictionaryCache::instance().stats(); }
void dictionary_cache_clear() { DictionaryCache::instance().clear(); }
int64_t dictionary_cache_budget(int64_t bytes) { return DictionaryCache::instance().budget(bytes); }

TORCH_LIBRARY_IMPL(lasers_ext, CPU, m) {
  m.impl("batch_omp", &batch_omp_cpu);
  m.impl("prepare_dictionary", &prepare_dictionary_op_cpu);
}

// The CPU kernel's prepared-dictionary cache (see DictionaryCache): stats() -> [hits, misses, entries, bytes held,
// budget in bytes]; clear() drops every entry and zeroes the counters; budget(bytes) sets the byte budget when
// bytes >= 0 (0 turns caching off) and returns the previous one (budget(-1) only reads it).
TORCH_LIBRARY_FRAGMENT(lasers_ext, m) {
  m.def("_cpu_dictionary_cache_stats() -> int[]", &dictionary_cache_stats);
  m.def("_cpu_dictionary_cache_clear() -> ()", &dictionary_cache_clear);
  m.def("_cpu_dictionary_cache_budget(int bytes=-1) -> int", &dictionary_cache_budget);
}

}  // namespace lasers
