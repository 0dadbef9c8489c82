// The blocked CPU Batch-OMP kernel: a tile of vectors coded together, bit-identical to core::host_encode (the
// per-vector reference of omp_core.h) for every vector, whatever tile it lands in, in the Gram form and the
// Gram-free form alike.
//
// Torch-free, so the native tests (csrc/tests/test_omp_tile.cpp) compare it with host_encode bit for bit. The body
// (tile_kernel.inc) is compiled once per SIMD level, each instance in its own namespace and compiled for its level
// (`#pragma GCC target`), with that level's primitives (tile_isa.inc, explicit intrinsics):
//   lasers::tile::avx512    x86-64-v4: 8 vectors per tile; K-wide passes in zmm registers
//   lasers::tile::avx2      x86-64-v3: 4 vectors per tile; ymm
//   lasers::tile::portable  any CPU and compiler: 4 vectors per tile; scalar K-wide passes
// cpu/omp_cpu.cpp picks the level at run time; the tests run every level the CPU has.
//
// What blocking changes, and what it does not (the arithmetic contract of omp_core.h):
//   * alpha0 of the whole tile is one register-blocked micro-kernel (V vectors x 2W atoms): each atom row loaded
//     serves all V vectors. Per (vector, atom) it is still the fma chain over m ascending.
//   * the selection steps run step-major over the tile. At step s every vector of the tile does the same S x S work
//     (Cholesky row, forward step, residual, back substitution) with its own numbers: it runs with one vector per
//     SIMD lane, each lane doing host_encode's operations in host_encode's order, so the latency-bound chain is paid
//     once per tile instead of once per vector. Vectors that stopped are lanes whose results are never read.
//   * the correlation update alpha = alpha0 - G_T gamma and the lowest-index argmax of |alpha| are one pass over the
//     atoms: per SIMD lane the running maximum and the index where it was first reached, then a masked minimum over
//     the lanes that hold the maximum. alpha is not stored (it is recomputed, with the same bits, in the rare case
//     where an already chosen atom wins at noise level).
//   * Gram-free form (HostProblem::gram null): the Gram row of each chosen atom is computed when it is chosen
//     (gram_row: gram_entry's float64 chain, the numbers prepare_dictionary stores), K * M multiply-adds per chosen
//     atom instead of K * K * M / 2 for the whole matrix: cheaper when N * S is small against K, and the only form
//     when K x K does not fit in memory. The codes are those of the Gram form, bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "../omp_core.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LASERS_X86_LEVELS 1
#include <immintrin.h>
#endif

#ifdef LASERS_X86_LEVELS
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_* placeholders under -Wmaybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace lasers {
namespace tile {
namespace avx512 {
#define LASERS_TILE_ISA 3
#include "tile_isa.inc"
#include "tile_kernel.inc"
#undef LASERS_TILE_ISA
}  // namespace avx512
}  // namespace tile
}  // namespace lasers
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace lasers {
namespace tile {
namespace avx2 {
#define LASERS_TILE_ISA 2
#include "tile_isa.inc"
#include "tile_kernel.inc"
#undef LASERS_TILE_ISA
}  // namespace avx2
}  // namespace tile
}  // namespace lasers
#pragma GCC pop_options
#pragma GCC diagnostic pop
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte lanes of the portable build: inlined, never passed across an ABI
namespace lasers {
namespace tile {
namespace portable {
#define LASERS_TILE_ISA 0
#include "tile_isa.inc"
#include "tile_kernel.inc"
#undef LASERS_TILE_ISA
}  // namespace portable
}  // namespace tile
}  // namespace lasers
#pragma GCC diagnostic pop
