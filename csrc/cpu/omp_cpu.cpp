// CPU Batch-OMP kernel: the Gram matrix once per call, then at::parallel_for over vectors, each thread coding its
// vectors in tiles (cpu/omp_tile.h) with one scratch buffer. Every vector's codes equal omp_core.h's host_encode.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../kernel_common.h"
#include "../omp_core.h"
#include "omp_tile.h"

namespace lasers {

namespace {

// Codes vectors [begin, end) in tiles of V (cpu/omp_tile.h) with one scratch buffer. A vector's codes do not depend
// on the tile it lands in (each equals host_encode's), so neither on the thread count nor on the chunking.
template <typename T, int W, int Regs>
LASERS_HOST_INLINE void encode_range_impl(const core::HostProblem<T>& p, const T* xs, int64_t* idx, T* coef,
                                          int64_t begin, int64_t end) {
  using Scratch = tile::TileScratch<T>;
  constexpr int V = tile::Shape<W, Regs>::V;
  std::vector<T> values(Scratch::values(V, p.K, p.M, p.S));
  std::vector<const T*> pointers(Scratch::pointers(p.S));
  const Scratch w = Scratch::carve(values.data(), pointers.data(), V, p.K, p.M, p.S);
  for (int64_t n = begin; n < end; n += V) {
    const int count = static_cast<int>(end - n < V ? end - n : V);
    tile::encode_tile<T, W, Regs>(p, xs + n * p.M, count, w, idx + n * p.S, coef + n * p.S);
  }
}

template <typename T>
using EncodeRange = void (*)(const core::HostProblem<T>&, const T*, int64_t*, T*, int64_t, int64_t);

// One instance per x86 SIMD level (AVX-512, AVX2+FMA, baseline), each compiled for its level with
// its lane count and register file, picked at run time: one build runs at full speed on any x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LASERS_X86_LEVELS 1
#define LASERS_ENCODE_LEVEL(NAME, TARGET, BYTES, REGS)                                                             \
  template <typename T>                                                                                           \
  TARGET void NAME(const core::HostProblem<T>& p, const T* xs, int64_t* idx, T* coef, int64_t begin, int64_t end) { \
    encode_range_impl<T, BYTES / sizeof(T), REGS>(p, xs, idx, coef, begin, end);                                  \
  }
LASERS_ENCODE_LEVEL(encode_range_avx512, __attribute__((target("arch=x86-64-v4"))), 64, 32)
LASERS_ENCODE_LEVEL(encode_range_avx2, __attribute__((target("arch=x86-64-v3"))), 32, 16)
#undef LASERS_ENCODE_LEVEL
#endif

template <typename T>
void encode_range_baseline(const core::HostProblem<T>& p, const T* xs, int64_t* idx, T* coef, int64_t begin,
                           int64_t end) {
  encode_range_impl<T, 16 / sizeof(T), 16>(p, xs, idx, coef, begin, end);
}

template <typename T>
EncodeRange<T> pick_encode_range() {
#ifdef LASERS_X86_LEVELS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return &encode_range_avx512<T>;
  if (__builtin_cpu_supports("x86-64-v3")) return &encode_range_avx2<T>;
#endif
  return &encode_range_baseline<T>;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LASERS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LASERS_SIMD_CLONES
#endif

// Gram row blocks p and B - 1 - p (B blocks of core::kGramRows rows) for p in [begin, end): core::host_gram_rows
// computes a block's part right of the diagonal, so a pair is the same work whatever p is, and threads taking ranges
// of pairs get equal shares. acc: kGramRows * kGramCols doubles.
template <typename T>
LASERS_HOST_INLINE void gram_pairs_impl(const T* ut, int64_t K, int64_t M, int64_t begin, int64_t end, double* acc,
                                        T* gram) {
  const int64_t blocks = (K + core::kGramRows - 1) / core::kGramRows;
  auto block = [&](int64_t q) {
    const int64_t a0 = q * core::kGramRows;
    core::host_gram_rows(ut, K, M, a0, a0 + core::kGramRows < K ? a0 + core::kGramRows : K, acc, gram);
  };
  for (int64_t p = begin; p < end; ++p) {
    block(p);
    if (blocks - 1 - p != p) block(blocks - 1 - p);
  }
}

LASERS_SIMD_CLONES void gram_pairs(const float* ut, int64_t K, int64_t M, int64_t begin, int64_t end, double* acc,
                                   float* gram) {
  gram_pairs_impl(ut, K, M, begin, end, acc, gram);
}

LASERS_SIMD_CLONES void gram_pairs(const double* ut, int64_t K, int64_t M, int64_t begin, int64_t end, double* acc,
                                   double* gram) {
  gram_pairs_impl(ut, K, M, begin, end, acc, gram);
}

// dictionary (K, M), float32 or float64, on the CPU. The preparation of omp_core.h (atom_norm, gram_entry): float64
// fma chains in a fixed order, so every device (the CUDA kernel prepares its own copy the same way) and every BLAS or
// TF32 setting gives the same matrices, and the CPU and CUDA kernels code against identical numbers.
PreparedDictionary prepare_dictionary_cpu(const at::Tensor& dictionary) {
  const at::Tensor d = dictionary.contiguous();
  const int64_t K = d.size(0), M = d.size(1);
  PreparedDictionary out{at::empty({M, K}, d.options()), at::empty({K, K}, d.options()), at::empty({K}, d.options())};
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "prepare_dictionary", [&] {
    const scalar_t* src = d.const_data_ptr<scalar_t>();
    scalar_t* ut = out.atoms_t.mutable_data_ptr<scalar_t>();
    scalar_t* inv = out.inv_norm.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < K; ++k) core::prepare_atom(src, K, M, k, ut, inv);
    scalar_t* gram = out.gram.mutable_data_ptr<scalar_t>();
    const int64_t blocks = (K + core::kGramRows - 1) / core::kGramRows;
    at::parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(core::kGramRows * core::kGramCols);
      gram_pairs(ut, K, M, begin, end, acc.data(), gram);
    });
  });
  return out;
}

template <typename T>
void batch_omp_cpu_impl(const at::Tensor& x, const at::Tensor& atoms_t, const at::Tensor& gram,
                        const at::Tensor& inv_norm, int64_t sparsity, double tol, at::Tensor& indices,
                        at::Tensor& coeffs) {
  core::HostProblem<T> p;
  p.atoms_t = atoms_t.const_data_ptr<T>();
  p.gram = gram.const_data_ptr<T>();
  p.inv_norm = inv_norm.const_data_ptr<T>();
  p.K = atoms_t.size(1);
  p.M = atoms_t.size(0);
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
  const PreparedDictionary d = prepare_dictionary_cpu(dictionary);
  const double tol_value = tol.has_value() ? *tol : -1.0;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_omp_cpu", [&] {
    batch_omp_cpu_impl<scalar_t>(xc, d.atoms_t, d.gram, d.inv_norm, sparsity, tol_value, indices, coeffs);
  });
  return {indices, coeffs};
}

// dictionary (K, M), float32 or float64, CPU: (atoms_t, gram, inv_norm) as the CPU kernel codes against them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_dictionary_op_cpu(const at::Tensor& dictionary) {
  check_dictionary(dictionary);
  const PreparedDictionary d = prepare_dictionary_cpu(dictionary);
  return {d.atoms_t, d.gram, d.inv_norm};
}

TORCH_LIBRARY_IMPL(lasers_ext, CPU, m) {
  m.impl("batch_omp", &batch_omp_cpu);
  m.impl("prepare_dictionary", &prepare_dictionary_op_cpu);
}

}  // namespace lasers
