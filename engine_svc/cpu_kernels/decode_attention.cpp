// One sequence's single-token decode attention on the CPU, over one layer's paged float32 KV cache, as one op
// (tandem_cpu::decode_attention): it writes the new token's key and value at its slot, then attends the query
// heads to the sequence's keys. It replaces the torch backend's gather, SDPA and two index_copy_ calls for the
// batch-1 decode step (engine_svc/models/row_decode.py), about 70 µs of eager ops a layer on this machine type.
//
// Layout (engine_svc/attention): cache float32 [2, num_blocks, block_size, kv_heads, head_dim] (keys, then
// values); a token at position t lives in block block_table[t / block_size], row t % block_size; slot is
// block * block_size + row of the new token (position seq_len - 1). Query head h reads kv head h / (heads /
// kv_heads) (grouped-query attention). window > 0 keeps the last `window` positions (the query's and the
// window - 1 before it), as the torch backend's mask does.
//
// Arithmetic in float32: score = scale * q.k (each dot in 16 lanes, then summed), softmax with the maximum
// subtracted, the output the probability-weighted sum of values divided by the probabilities' sum. That is
// SDPA's arithmetic in another order of summation. AVX-512 where the CPU has it, else the same sums in portable
// C++ (the dot's lane array is the AVX-512 register; the output sums each position in order in both).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <vector>

namespace tandem_cpu {
bool use_avx512();   // gemv.cpp: the CPU has AVX-512 and tandem_cpu::use_portable has not turned it off
}  // namespace tandem_cpu

namespace {

constexpr int64_t kLanes = 16;

struct Shape {
  int64_t heads, kv_heads, head_dim, block_size;
};

// rows[i]: the float offset of position start + i's cache row (kv head 0) in the keys or the values.
void cache_rows(const int32_t* block_table, const Shape& s, int64_t start, int64_t end, int64_t* rows) {
  for (int64_t t = start; t < end; ++t)
    rows[t - start] = (static_cast<int64_t>(block_table[t / s.block_size]) * s.block_size + t % s.block_size) *
                      s.kv_heads * s.head_dim;
}

// scores[i] <- exp(scores[i] - max) over n; returns their sum.
inline float softmax_numerators(float* scores, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) top = std::max(top, scores[i]);
  float total = 0;
  for (int64_t i = 0; i < n; ++i) {
    scores[i] = std::exp(scores[i] - top);
    total += scores[i];
  }
  return total;
}

void attend_portable(const float* q, const float* keys, const float* values, const int64_t* rows,
                     const Shape& s, int64_t start, int64_t end, float scale, float* scores, float* out) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim;
  for (int64_t h = 0; h < s.heads; ++h) {
    const float* qh = q + h * d;
    for (int64_t t = start; t < end; ++t) {
      const float* k = keys + rows[t - start] + h / group * d;
      float lane[kLanes] = {0};
      for (int64_t i = 0; i < d; i += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) lane[j] = std::fma(qh[i + j], k[i + j], lane[j]);
      float dot = 0;
      for (int64_t j = 0; j < kLanes; ++j) dot += lane[j];
      scores[t - start] = dot * scale;
    }
    const float inv = 1.0f / softmax_numerators(scores, end - start);
    float* o = out + h * d;
    std::fill(o, o + d, 0.0f);
    for (int64_t t = start; t < end; ++t) {
      const float* v = values + rows[t - start] + h / group * d;
      for (int64_t i = 0; i < d; ++i) o[i] = std::fma(scores[t - start], v[i], o[i]);
    }
    for (int64_t i = 0; i < d; ++i) o[i] *= inv;
  }
}

#define AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma")))

// The probability-weighted sum of the values for one head, C 16-lane chunks of head_dim (C = head_dim / 16, or 0:
// any head_dim, through memory): each chunk sums the positions in order, as attend_portable does.
template <int C>
AVX512 inline void weighted_values(const float* values, const int64_t* rows, const float* p, int64_t n,
                                   int64_t d, float inv, float* o) {
  if constexpr (C == 0) {
    for (int64_t i = 0; i < d; i += kLanes) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t)
        acc = _mm512_fmadd_ps(_mm512_set1_ps(p[t]), _mm512_loadu_ps(values + rows[t] + i), acc);
      _mm512_storeu_ps(o + i, _mm512_mul_ps(acc, _mm512_set1_ps(inv)));
    }
  } else {
    __m512 acc[C];
    for (int c = 0; c < C; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m512 pt = _mm512_set1_ps(p[t]);
      for (int c = 0; c < C; ++c) acc[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(values + rows[t] + c * kLanes), acc[c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + c * kLanes, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
  }
}

// The same sums as attend_portable, with a 16-lane register for each lane array.
template <int C>
AVX512 void attend_avx512(const float* q, const float* keys, const float* values, const int64_t* rows,
                          const Shape& s, int64_t start, int64_t end, float scale, float* scores, float* out) {
  const int64_t group = s.heads / s.kv_heads, d = s.head_dim, n = end - start;
  for (int64_t h = 0; h < s.heads; ++h) {
    const float* qh = q + h * d;
    const int64_t head = h / group * d;
    for (int64_t t = 0; t < n; ++t) {
      const float* k = keys + rows[t] + head;
      __m512 lane = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += kLanes)
        lane = _mm512_fmadd_ps(_mm512_loadu_ps(qh + i), _mm512_loadu_ps(k + i), lane);
      scores[t] = _mm512_reduce_add_ps(lane) * scale;
    }
    const float inv = 1.0f / softmax_numerators(scores, n);
    weighted_values<C>(values + head, rows, scores, n, d, inv, out + h * d);
  }
}


at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor cache,
                            const at::Tensor& block_table, int64_t seq_len, int64_t slot, double scale,
                            int64_t window) {
  const char* op = "tandem_cpu::decode_attention";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k, &v, &cache})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(), op,
                ": q, k, v and the cache must be contiguous float32 CPU tensors");
  TORCH_CHECK(cache.dim() == 5 && cache.size(0) == 2, op, ": cache must be [2, blocks, block_size, kv_heads, "
              "head_dim], got ", cache.sizes());
  const Shape s{q.size(0), cache.size(3), cache.size(4), cache.size(2)};
  TORCH_CHECK(q.dim() == 2 && q.size(1) == s.head_dim && s.head_dim % kLanes == 0 && s.heads % s.kv_heads == 0,
              op, ": q must be [heads, head_dim] with head_dim a multiple of ", kLanes, " and heads a multiple of "
              "the cache's kv heads, got q ", q.sizes(), ", cache ", cache.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 2 && k.size(0) == s.kv_heads && k.size(1) == s.head_dim, op,
              ": k and v must be [kv_heads, head_dim] as the cache's, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 1 && block_table.is_contiguous(), op,
              ": block_table must be a contiguous int32 vector");
  const int64_t num_blocks = cache.size(1);
  TORCH_CHECK(seq_len >= 1 && seq_len <= block_table.size(0) * s.block_size, op, ": seq_len ", seq_len,
              " outside the block table's ", block_table.size(0) * s.block_size, " positions");
  TORCH_CHECK(slot >= 0 && slot < num_blocks * s.block_size, op, ": slot ", slot, " outside the cache");
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < (seq_len + s.block_size - 1) / s.block_size; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < num_blocks, op, ": block_table[", b, "] = ", table[b],
                " outside the cache's ", num_blocks, " blocks");

  const int64_t row_floats = s.kv_heads * s.head_dim;
  float* keys = cache.data_ptr<float>();
  float* values = keys + num_blocks * s.block_size * row_floats;
  std::memcpy(keys + slot * row_floats, k.data_ptr<float>(), row_floats * sizeof(float));
  std::memcpy(values + slot * row_floats, v.data_ptr<float>(), row_floats * sizeof(float));

  const int64_t start = window > 0 ? std::max<int64_t>(0, seq_len - window) : 0;
  thread_local std::vector<float> scores;
  thread_local std::vector<int64_t> rows;
  scores.resize(seq_len - start);
  rows.resize(seq_len - start);
  cache_rows(table, s, start, seq_len, rows.data());
  at::Tensor out = at::empty({s.heads, s.head_dim}, q.options());
  auto attend = !tandem_cpu::use_avx512()    ? attend_portable
                : s.head_dim == 4 * kLanes ? attend_avx512<4>
                : s.head_dim == 8 * kLanes ? attend_avx512<8>
                                           : attend_avx512<0>;
  attend(q.data_ptr<float>(), keys, values, rows.data(), s, start, seq_len, static_cast<float>(scale),
         scores.data(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tandem_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache, Tensor block_table, int seq_len, "
        "int slot, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(tandem_cpu, CPU, m) {
  m.impl("decode_attention", decode_attention);
}
