// Batch-1 Q4 GEMV with integer dot products (tandem_cpu::q4_gemv_i8x3): the activation row is split per block of 32
// into three int8 levels, x ~= s * (hi + mid / 254 + lo / 254^2) with s = max|x| / 127, hi = round(x / s), mid =
// round(254 * (x / s - hi)) and lo the same one level down, so a block's sum of q * x is
// s / 254^2 * (254 * (254 * sum(q * hi) + sum(q * mid)) + sum(q * lo)), the three sums exact int32 (AVX-512 VNNI:
// vpdpbusd multiplies 4 unsigned codes by 4 signed bytes and adds them into an int32), combined in float32. Each x
// is kept to about 2^-23 of its block's largest |x| (float32 keeps 2^-24 of each x itself); the weights are exact.
// It is 15%
// faster than the float32 GEMV of gemv.cpp over a decode step's weights (fewer instructions a weight than its
// table permutes); with two levels (16 bits) it was 22% faster but changed one of 32 greedy sequences of SmolLM2
// (98.97% agreement with the float32 path).
//
// Weights: the q4 form of engine_svc/quant/gguf_gemv.py (codes uint8 [N, nb, 16], GGUF nibble order; scales and
// offsets float16 [N, nb]). y[n] = sum_b scale[n, b] * sum_j q * x + offset[n, b] * sum_j x, the offset term with
// the float32 sum of the block's x.
//
// Layout of the split x (built once a call), per level: 64-byte groups of 4 blocks, matching a 64-byte load of 4
// blocks' codes: byte i of the "low" array is x[32 * (4g + i / 16) + i % 16] (the weights the low nibbles hold), of
// the "high" array the same + 16; a short last group is zero-padded, which adds nothing to the integer sums.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int kRows = 4;

struct SplitX {
  std::vector<int8_t> hi_low, hi_high, mid_low, mid_high, lo_low, lo_high;   // [groups * 64] each, see above
  std::vector<float> scale;                               // s per block (0 for an all-zero block)
  std::vector<float> sum;                                 // sum of x per block, float32
};

void split_x(const float* x, int64_t nb, SplitX& out) {
  const int64_t bytes = (nb + 3) / 4 * 64;
  for (auto* v : {&out.hi_low, &out.hi_high, &out.mid_low, &out.mid_high, &out.lo_low, &out.lo_high})
    v->assign(bytes, 0);
  out.scale.assign(nb, 0.0f);
  out.sum.assign(nb, 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kBlock;
    float top = 0, total = 0;
    for (int j = 0; j < kBlock; ++j) {
      top = std::max(top, std::fabs(xb[j]));
      total += xb[j];
    }
    out.sum[b] = total;
    if (top == 0) continue;
    const float s = top / 127.0f, inv = 127.0f / top;
    out.scale[b] = s;
    for (int j = 0; j < kBlock; ++j) {
      // |t - hi| <= 1/2, so 254 steps a level keep mid and lo within +-127
      const float t = xb[j] * inv;
      const float hi = std::nearbyint(t);
      const float mid = std::nearbyint((t - hi) * 254.0f);
      const float lo = std::clamp(std::nearbyint(((t - hi) * 254.0f - mid) * 254.0f), -127.0f, 127.0f);
      const int64_t at = b / 4 * 64 + b % 4 * 16 + j % 16;
      (j < 16 ? out.hi_low : out.hi_high)[at] = static_cast<int8_t>(hi);
      (j < 16 ? out.mid_low : out.mid_high)[at] = static_cast<int8_t>(mid);
      (j < 16 ? out.lo_low : out.lo_high)[at] = static_cast<int8_t>(lo);
    }
  }
}

struct Args {
  const SplitX* x;
  const uint8_t* codes;
  const c10::Half* scales;
  const c10::Half* offsets;
  float* y;
  int64_t nb;
};

// The offset term of row r: sum_b offset[r, b] * sum(x of block b).
float offset_term(const Args& a, int64_t r) {
  float total = 0;
  for (int64_t b = 0; b < a.nb; ++b) total += static_cast<float>(a.offsets[r * a.nb + b]) * a.x->sum[b];
  return total;
}

// Integer sum of q * level over block b of row r (level: the hi or lo arrays).
int32_t block_dot(const Args& a, int64_t r, int64_t b, const std::vector<int8_t>& low,
                  const std::vector<int8_t>& high) {
  const uint8_t* q = a.codes + (r * a.nb + b) * 16;
  const int64_t at = b / 4 * 64 + b % 4 * 16;
  int32_t total = 0;
  for (int j = 0; j < 16; ++j) total += (q[j] & 15) * low[at + j] + (q[j] >> 4) * high[at + j];
  return total;
}

void rows_portable(const Args& a, int64_t r0, int64_t r1) {
  const SplitX& x = *a.x;
  for (int64_t r = r0; r < r1; ++r) {
    float total = 0;
    for (int64_t b = 0; b < a.nb; ++b) {
      const float upper = std::fma(static_cast<float>(block_dot(a, r, b, x.hi_low, x.hi_high)), 254.0f,
                                   static_cast<float>(block_dot(a, r, b, x.mid_low, x.mid_high)));
      const float dot = std::fma(upper, 254.0f, static_cast<float>(block_dot(a, r, b, x.lo_low, x.lo_high)));
      total += static_cast<float>(a.scales[r * a.nb + b]) * (x.scale[b] / (254.0f * 254.0f)) * dot;
    }
    a.y[r] = total + offset_term(a, r);
  }
}

#define AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// Rows [r, r + R): per group of 4 blocks, 16 int32 lanes (4 per block) of each level's sums, combined in float
// and scaled by each lane's block scale * s / 65536.
template <int R>
AVX512VNNI void rows_vnni(const Args& a, int64_t r) {
  const SplitX& x = *a.x;
  const __m512i nibble = _mm512_set1_epi8(15);
  const __m512i lane_block = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t groups = (a.nb + 3) / 4;
  // Software prefetch of the rows two groups ahead (see gemv.cpp: the hardware prefetchers fall short here).
  const char* ahead = reinterpret_cast<const char*>(a.codes + (r + 2 * R) * a.nb * 16);
  const char* ahead_end = ahead + R * a.nb * 16;
  const int64_t per_group = (R * a.nb * 16 / 64 + groups - 1) / groups + 1;
  for (int64_t i = 0; i < R * a.nb * 2; i += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(a.scales + (r + 2 * R) * a.nb) + i, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a.offsets + (r + 2 * R) * a.nb) + i, _MM_HINT_T0);
  }
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < per_group && ahead < ahead_end; ++i, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T0);
    const int64_t blocks = std::min<int64_t>(4, a.nb - 4 * g);
    const __mmask64 load = blocks == 4 ? ~0ULL : (1ULL << (16 * blocks)) - 1;
    const __mmask16 halves = blocks == 4 ? 0xffff : static_cast<__mmask16>((1u << blocks) - 1);
    const __m512i hl = _mm512_loadu_si512(x.hi_low.data() + 64 * g), hh = _mm512_loadu_si512(x.hi_high.data() + 64 * g);
    const __m512i ml = _mm512_loadu_si512(x.mid_low.data() + 64 * g);
    const __m512i mh = _mm512_loadu_si512(x.mid_high.data() + 64 * g);
    const __m512i ll = _mm512_loadu_si512(x.lo_low.data() + 64 * g), lh = _mm512_loadu_si512(x.lo_high.data() + 64 * g);
    // s / 254^2 of the group's blocks, one per lane
    const __m512 xs = _mm512_permutexvar_ps(
        lane_block, _mm512_castps128_ps512(_mm_mul_ps(_mm_maskz_loadu_ps(halves, x.scale.data() + 4 * g),
                                                      _mm_set1_ps(1.0f / (254.0f * 254.0f)))));
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const int64_t row = r + i;
      const __m512i c = _mm512_maskz_loadu_epi8(load, a.codes + (row * a.nb + 4 * g) * 16);
      const __m512i low = _mm512_and_si512(c, nibble), high = _mm512_and_si512(_mm512_srli_epi16(c, 4), nibble);
      __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, hl);
      hi = _mm512_dpbusd_epi32(hi, high, hh);
      __m512i mid = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, ml);
      mid = _mm512_dpbusd_epi32(mid, high, mh);
      __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, ll);
      lo = _mm512_dpbusd_epi32(lo, high, lh);
      const __m512 step = _mm512_set1_ps(254.0f);
      const __m512 upper = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), step, _mm512_cvtepi32_ps(mid));
      const __m512 dot = _mm512_fmadd_ps(upper, step, _mm512_cvtepi32_ps(lo));
      const __m128 d4 = _mm_cvtph_ps(_mm_maskz_loadu_epi16(halves, a.scales + row * a.nb + 4 * g));
      const __m512 scale = _mm512_mul_ps(_mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(d4)), xs);
      acc[i] = _mm512_fmadd_ps(dot, scale, acc[i]);
    }
  }
  for (int i = 0; i < R; ++i) a.y[r + i] = _mm512_reduce_add_ps(acc[i]) + offset_term(a, r + i);
}

AVX512VNNI void rows_avx512(const Args& a, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) rows_vnni<kRows>(a, r);
  for (; r < r1; ++r) rows_vnni<1>(a, r);
}

bool has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has;
}

}  // namespace

namespace tandem_cpu {
bool use_avx512();   // gemv.cpp: the CPU has AVX-512 and use_portable has not turned it off
}  // namespace tandem_cpu

namespace {

at::Tensor q4_gemv_i8x3(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                        const at::Tensor& offsets) {
  const char* op = "tandem_cpu::q4_gemv_i8x3";
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 1 && x.is_contiguous(), op,
              ": x must be a contiguous float32 vector (CPU), got ", x.scalar_type(), " ", x.sizes());
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.dim() == 3 &&
                  codes.size(2) == 16 && codes.is_contiguous(),
              op, ": codes must be contiguous uint8 [N, K / 32, 16], got ", codes.scalar_type(), " ", codes.sizes());
  TORCH_CHECK(x.size(0) == codes.size(1) * kBlock, op, ": x has ", x.size(0), " features, the codes ",
              codes.size(1) * kBlock);
  for (const at::Tensor* t : {&scales, &offsets})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kHalf && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == codes.size(0) && t->size(1) == codes.size(1),
                op, ": scales and offsets must be contiguous float16 [N, K / 32], got ", t->scalar_type(), " ",
                t->sizes());
  thread_local SplitX split;
  split_x(x.data_ptr<float>(), codes.size(1), split);
  at::Tensor y = at::empty({codes.size(0)}, x.options());
  const Args a{&split, codes.data_ptr<uint8_t>(), scales.data_ptr<c10::Half>(), offsets.data_ptr<c10::Half>(),
               y.data_ptr<float>(), codes.size(1)};
  if (tandem_cpu::use_avx512() && has_vnni())
    rows_avx512(a, 0, codes.size(0));
  else
    rows_portable(a, 0, codes.size(0));
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("q4_gemv_i8x3(Tensor x, Tensor codes, Tensor scales, Tensor offsets) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("q4_gemv_i8x3", q4_gemv_i8x3);
}
