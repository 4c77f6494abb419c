// Batch-1 GEMVs over GGUF blocks in float32 on the CPU: y[n] = sum_k w[n, k] * x[k], where w is exactly the float32
// weight the engine's F.linear path multiplies (q * scale + offset, computed in float32 from the file's fp16 scale
// and offset). Built and loaded at engine start by engine_svc/cpu_kernels (g++, cached), which documents the
// Python side; registered as torch ops tandem_cpu::q4_gemv / q8_gemv so inductor graphs can call them. (The q4
// GEMV with integer dot products, which rounds x, is gemv_i8x3.cpp.)
//
// Layout (engine_svc/quant/gguf_gemv.py, GemvBlocks), rows contiguous, K = 32 * nb:
//   q4: codes uint8 [N, nb, 16] (byte j of a block: weight j in the low nibble, weight 16 + j in the high one,
//       the GGUF order); scales, offsets float16 [N, nb];  w = q * scale + offset.
//   q8: codes int8 [N, nb, 32]; scales float16 [N, nb];   w = q * scale.
// Exactness: q * scale is exact in float32 (at most 4 + 11 or 8 + 11 significant bits), so fma(q, scale, offset)
// rounds once, as the float32 path's q * scale + offset does: every weight here equals that path's weight bit for
// bit. Only the order of the sum differs: each of 32 lanes (a block position) sums its products over the blocks in
// order, then the lanes are added (the float32 path's BLAS sums in its own order). The AVX-512 and the portable
// code sum in the same order, up to the final reduction of the lanes.
//
// AVX-512 (F, BW), chosen at run time: a q4 block's 16 possible weights are one register (the table
// T[j] = fma(j, scale, offset)); each weight is a lane permute of it by its 4-bit code (vpermps reads only the low
// 4 bits of an index, so the high nibble needs just a shift). kRows rows at a time share each load of x and give
// 2 * kRows independent accumulator chains to cover the FMA latency.
//
// One thread: a single-token step is a chain of small calls, and the gateway and tokenizer work on every token
// too; rows split over two threads (a helper claiming chunks of rows from an atomic counter, the caller never
// waiting for it to wake) measured 15.5 ms a token alone against 22 to 32 ms with the helper, on this 2-core
// machine type shared with other jobs: the scheduler put both threads on one core.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

namespace {

constexpr int64_t kBlock = 32;
constexpr int kRows = 4;                // rows the AVX-512 loop computes together
constexpr int kMaxBlocksOnStack = 256;  // K up to 8192 keeps one row's widened scales on the stack; larger K loops

struct Q4Args {
  static constexpr int64_t kCodeBytes = 16;   // a block's
  const float* x; const uint8_t* codes; const c10::Half* scales; const c10::Half* offsets; float* y; int64_t nb;
};
struct Q8Args {
  static constexpr int64_t kCodeBytes = 32;
  const float* x; const int8_t* codes; const c10::Half* scales; float* y; int64_t nb;
};

// ---------------------------------------------------------------------------------------------------------------
// Portable code: the same arithmetic in plain C++ (the compiler may vectorize the 32-lane loops).

template <typename Weight>
float dot_rows_portable(const float* x, int64_t nb, Weight weight) {
  float lane[kBlock] = {0};
  for (int64_t b = 0; b < nb; ++b)
    for (int j = 0; j < kBlock; ++j) lane[j] = std::fma(weight(b, j), x[b * kBlock + j], lane[j]);
  float lo = 0, hi = 0;   // lanes 0..15 and 16..31, as the AVX-512 code's two accumulators
  for (int j = 0; j < 16; ++j) { lo += lane[j]; hi += lane[16 + j]; }
  return lo + hi;
}

void q4_portable(const Q4Args& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* q = a.codes + r * a.nb * 16;
    const c10::Half* s = a.scales + r * a.nb;
    const c10::Half* o = a.offsets + r * a.nb;
    a.y[r] = dot_rows_portable(a.x, a.nb, [&](int64_t b, int j) {
      int code = j < 16 ? (q[b * 16 + j] & 15) : (q[b * 16 + j - 16] >> 4);
      return std::fma(static_cast<float>(code), static_cast<float>(s[b]), static_cast<float>(o[b]));
    });
  }
}

void q8_portable(const Q8Args& a, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* q = a.codes + r * a.nb * kBlock;
    const c10::Half* s = a.scales + r * a.nb;
    a.y[r] = dot_rows_portable(a.x, a.nb, [&](int64_t b, int j) {
      return static_cast<float>(q[b * kBlock + j]) * static_cast<float>(s[b]);
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// AVX-512 code (compiled for it whatever the build flags; called only where the CPU has it).

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// float16 [n] -> float32 [n] (n <= kMaxBlocksOnStack)
AVX512 inline void widen(const c10::Half* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) {
    __mmask16 m = n - i >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, src + i)));
  }
}

// Software prefetch of the rows kPrefetchGroups groups ahead, a few cache lines per block step: on this machine
// type the hardware prefetchers leave a GEMV over weights out of cache at a third of the memory bandwidth
// (measured on the Q8_0 lm_head, 49152 x 576: 4.9 ms without, 1.8 ms with).
constexpr int64_t kPrefetchGroups = 2;

struct Prefetch {
  const char* next;
  const char* end;
  int64_t per_step;
  AVX512 inline void step() {
    for (int64_t i = 0; i < per_step && next < end; ++i, next += 64) _mm_prefetch(next, _MM_HINT_T0);
  }
};

AVX512 inline void prefetch_lines(const void* begin, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(static_cast<const char*>(begin) + i, _MM_HINT_T0);
}

// R rows from row r: blocks [b0, b1) of each, accumulated into acc[2 * R] (lanes 0..15, 16..31 of a block).
template <int R>
AVX512 inline void q4_block_range(const Q4Args& a, int64_t r, int64_t b0, int64_t b1, __m512* acc, Prefetch& pf) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  float s[R][kMaxBlocksOnStack], o[R][kMaxBlocksOnStack];
  for (int i = 0; i < R; ++i) {
    widen(a.scales + (r + i) * a.nb + b0, b1 - b0, s[i]);
    widen(a.offsets + (r + i) * a.nb + b0, b1 - b0, o[i]);
  }
  for (int64_t b = b0; b < b1; ++b) {
    pf.step();
    const __m512 x0 = _mm512_loadu_ps(a.x + b * kBlock), x1 = _mm512_loadu_ps(a.x + b * kBlock + 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s[i][b - b0]), _mm512_set1_ps(o[i][b - b0]));
      const __m512i code = _mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.codes + ((r + i) * a.nb + b) * 16)));
      acc[2 * i] = _mm512_fmadd_ps(_mm512_permutexvar_ps(code, table), x0, acc[2 * i]);
      acc[2 * i + 1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(code, 4), table), x1,
                                       acc[2 * i + 1]);
    }
  }
}

template <int R>
AVX512 inline void q8_block_range(const Q8Args& a, int64_t r, int64_t b0, int64_t b1, __m512* acc, Prefetch& pf) {
  float s[R][kMaxBlocksOnStack];
  for (int i = 0; i < R; ++i) widen(a.scales + (r + i) * a.nb + b0, b1 - b0, s[i]);
  for (int64_t b = b0; b < b1; ++b) {
    pf.step();
    const __m512 x0 = _mm512_loadu_ps(a.x + b * kBlock), x1 = _mm512_loadu_ps(a.x + b * kBlock + 16);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int8_t* q = a.codes + ((r + i) * a.nb + b) * kBlock;
      const __m512 scale = _mm512_set1_ps(s[i][b - b0]);
      const __m512 w0 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))), scale);
      const __m512 w1 = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))),
          scale);
      acc[2 * i] = _mm512_fmadd_ps(w0, x0, acc[2 * i]);
      acc[2 * i + 1] = _mm512_fmadd_ps(w1, x1, acc[2 * i + 1]);
    }
  }
}

// Rows [r, r + R): prefetches the group kPrefetchGroups ahead (its codes spread over the block steps, its scales
// and offsets at once), then sums the blocks.
template <int R, typename Args, void (*Range)(const Args&, int64_t, int64_t, int64_t, __m512*, Prefetch&)>
AVX512 inline void rows_avx512(const Args& a, int64_t r) {
  const int64_t ahead = r + kPrefetchGroups * R;
  const int64_t code_bytes = R * a.nb * Args::kCodeBytes;
  const char* codes = reinterpret_cast<const char*>(a.codes) + ahead * a.nb * Args::kCodeBytes;
  Prefetch pf{codes, codes + code_bytes, (code_bytes / 64 + a.nb - 1) / a.nb + 1};
  prefetch_lines(a.scales + ahead * a.nb, R * a.nb * 2);
  if constexpr (std::is_same_v<Args, Q4Args>) prefetch_lines(a.offsets + ahead * a.nb, R * a.nb * 2);
  __m512 acc[2 * R];
  for (int i = 0; i < 2 * R; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; b += kMaxBlocksOnStack)
    Range(a, r, b, std::min(a.nb, b + kMaxBlocksOnStack), acc, pf);
  for (int i = 0; i < R; ++i)
    a.y[r + i] = _mm512_reduce_add_ps(acc[2 * i]) + _mm512_reduce_add_ps(acc[2 * i + 1]);
}

AVX512 void q4_avx512(const Q4Args& a, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows_avx512<kRows, Q4Args, q4_block_range<kRows>>(a, r);
  for (; r < r1; ++r) rows_avx512<1, Q4Args, q4_block_range<1>>(a, r);
}

AVX512 void q8_avx512(const Q8Args& a, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows_avx512<kRows, Q8Args, q8_block_range<kRows>>(a, r);
  for (; r < r1; ++r) rows_avx512<1, Q8Args, q8_block_range<1>>(a, r);
}

// ---------------------------------------------------------------------------------------------------------------
// Which code runs: AVX-512 where the CPU has it, unless tandem_cpu::use_portable(true) forced the portable code.

std::atomic<bool> force_portable{false};

}  // namespace

namespace tandem_cpu {
// Shared with decode_attention.cpp.
bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has && !force_portable.load(std::memory_order_relaxed);
}
}  // namespace tandem_cpu

namespace {

using tandem_cpu::use_avx512;

// ---------------------------------------------------------------------------------------------------------------
// The ops.

void check_common(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, at::ScalarType code_type,
                  int64_t code_bytes, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && scales.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(), op,
              ": x must be a contiguous float32 vector, got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(codes.scalar_type() == code_type && codes.dim() == 3 && codes.size(2) == code_bytes &&
                  codes.is_contiguous(),
              op, ": codes must be contiguous ", code_type, " [N, K / 32, ", code_bytes, "], got ",
              codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(x.size(0) == codes.size(1) * kBlock, op, ": x has ", x.size(0), " features, the codes ",
              codes.size(1) * kBlock);
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == codes.size(0) && scales.size(1) == codes.size(1),
              op, ": scales must be contiguous float16 [N, K / 32], got ", scales.scalar_type(), " ",
              scales.sizes());
}

at::Tensor q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& offsets) {
  check_common(x, codes, scales, at::kByte, 16, "tandem_cpu::q4_gemv");
  TORCH_CHECK(offsets.scalar_type() == at::kHalf && offsets.is_contiguous() && offsets.sizes() == scales.sizes(),
              "tandem_cpu::q4_gemv: offsets must be contiguous float16 shaped as the scales, got ",
              offsets.scalar_type(), " ", offsets.sizes());
  at::Tensor y = at::empty({codes.size(0)}, x.options());
  const Q4Args a{x.data_ptr<float>(), codes.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(),
                 offsets.data_ptr<c10::Half>(), y.data_ptr<float>(), codes.size(1)};
  use_avx512() ? q4_avx512(a, 0, codes.size(0)) : q4_portable(a, 0, codes.size(0));
  return y;
}

at::Tensor q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales) {
  check_common(x, codes, scales, at::kChar, kBlock, "tandem_cpu::q8_gemv");
  at::Tensor y = at::empty({codes.size(0)}, x.options());
  const Q8Args a{x.data_ptr<float>(), codes.data_ptr<int8_t>(), scales.data_ptr<c10::Half>(), y.data_ptr<float>(),
                 codes.size(1)};
  use_avx512() ? q8_avx512(a, 0, codes.size(0)) : q8_portable(a, 0, codes.size(0));
  return y;
}

// "avx512-vnni", "avx512" or "portable": the code the ops (these, q4_gemv_i8x3's and decode_attention's) run now.
std::string isa() {
  if (!use_avx512()) return "portable";
  return __builtin_cpu_supports("avx512vnni") ? "avx512-vnni" : "avx512";
}

void use_portable(bool portable) { force_portable.store(portable); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("q4_gemv(Tensor x, Tensor codes, Tensor scales, Tensor offsets) -> Tensor");
  m.def("q8_gemv(Tensor x, Tensor codes, Tensor scales) -> Tensor");
  m.def("isa() -> str", isa);
  m.def("use_portable(bool portable) -> ()", use_portable);
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("q4_gemv", q4);
  m.impl("q8_gemv", q8);
}
