// Attention on the CPU: flash-style dense / varlen forward, decode over the paged KV cache, KV writes.
//
// Algorithm (FlashAttention's online softmax, all math in fp32): a task owns up to BM query rows and
// walks the keys in tiles of BN; per tile it computes the scores S = Q K^T, updates the running row max
// m and sum l, rescales its fp32 output accumulators and adds P V. Nothing of size seqlen_q x seqlen_k
// is ever stored: a thread's scratch is a few tens of KB and stays in L1/L2.
//
// Layout choices (measured on a 2-core AVX-512 machine, benchmarks/bench_attention.py):
//  - The QK^T micro-kernel broadcasts one query element and multiplies it with 64 keys at once, so it
//    needs the keys transposed (head_dim x keys, "packed"). Dense / varlen attention packs every K
//    tile once per call (a parallel pre-pass, shared by all query tiles and all heads of a GQA group),
//    converting fp16/bf16 to fp32 at the same time; values are converted to fp32 once likewise. Paged
//    decode has only group * seqlen_q query rows per key, so it packs each K tile on the fly
//    (a 16x16 in-register transpose) and reads V straight from the cache, converting in registers.
//  - Decode processes all query heads of a KV head together (rows = seqlen_q x group), so each cached
//    K/V row is read from memory once, and splits long contexts into chunks (flash-decoding) so that
//    batch 1 keeps every core busy; the partial results are merged in a second pass.
//  - Tasks are handed out dynamically (an atomic counter inside at::parallel_for), heaviest first, so
//    causal attention's uneven tiles balance. Every task's arithmetic depends only on the shapes, so
//    results are bit-identical for any thread count.
//
// Two builds of the tile kernels (attention_simd.inc) live in one binary, chosen once at run time:
// avx512 (AVX-512F/BW/VL/DQ intrinsics) and generic (plain loops the compiler vectorises for the
// baseline ISA). PLM_ENGINE_CPU_ISA=generic forces the generic one (to test it on an AVX-512 machine).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PLM_ATTN_X86_SIMD 1
#include <immintrin.h>
#endif

#include "attention.h"
#include "common/checks.h"

namespace plm_engine {
namespace {

constexpr int64_t BM = 64;  // query rows per task
constexpr int64_t BN = 64;  // keys per tile: 4 vectors of 16 lanes
constexpr int MR = 4;       // query rows per micro-kernel call (MR x 4 accumulator vectors)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- task arguments and scratch, shared by both builds ---------------------------------------------

// One sequence of a (possibly packed) batch: element offsets of its first row in q / k / out / lse.
struct Seq {
  int64_t q_off, k_off, v_off, out_off, lse_off, sq, sk;
  int64_t kt_off = 0, vf_off = 0;  // into the packed-K and fp32-V buffers
};

template <typename T>
struct FwdArgs {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  float* lse;
  float* kt;  // packed keys: per (seq, kv head) ceil(sk / BN) tiles of (d, BN) fp32
  float* vf;  // fp32 values per (seq, kv head): (sk, d); nullptr for fp32 inputs (v is read directly)
  int64_t h, hkv, d;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head;  // element strides
  int64_t out_row, lse_head;
  bool causal;
  float qscale;  // softmax scale * log2(e): scores come out in log2 units for exp2
};

int64_t n_tiles(int64_t sk) { return (sk + BN - 1) / BN; }

// Scratch layout of a dense/varlen or paged worker, in floats.
struct Scratch {
  float *q, *o, *s, *kt, *m, *l;
  static int64_t floats(int64_t d) { return 2 * BM * d + BM * BN + d * BN + 2 * BM; }
  Scratch(float* base, int64_t d)
      : q(base), o(q + BM * d), s(o + BM * d), kt(s + BM * BN), m(kt + d * BN), l(m + BM) {}
};

template <typename T>
struct PagedArgs {
  const T* q;
  const T* kc;
  const T* vc;
  const int32_t* block_table;
  const int32_t* seqlens;
  float* part;  // per (batch, kv head, row, split): d accumulators, then m and l
  int64_t sq, h, hkv, d, bs_log2, max_blocks, splits, chunk, rows_total, row_tiles;
  int64_t q_b, q_s, q_h;
  float qscale;
};

// ---- generic build: 16-lane arrays, plain loops ----------------------------------------------------

namespace generic {

struct Generic {
  struct V {
    float x[16];
  };
  static V zero() { return set1(0.f); }
  static V set1(float a) {
    V r;
    for (int i = 0; i < 16; ++i) r.x[i] = a;
    return r;
  }
  template <typename T>
  static V load(const T* p, int n = 16) {
    V r;
    for (int i = 0; i < 16; ++i) r.x[i] = i < n ? static_cast<float>(p[i]) : 0.f;
    return r;
  }
  static void store(float* p, V v, int n = 16) {
    for (int i = 0; i < n; ++i) p[i] = v.x[i];
  }
  static V add(V a, V b) {
    for (int i = 0; i < 16; ++i) a.x[i] += b.x[i];
    return a;
  }
  static V sub(V a, V b) {
    for (int i = 0; i < 16; ++i) a.x[i] -= b.x[i];
    return a;
  }
  static V mul(V a, V b) {
    for (int i = 0; i < 16; ++i) a.x[i] *= b.x[i];
    return a;
  }
  static V fmadd(V a, V b, V c) {
    for (int i = 0; i < 16; ++i) c.x[i] += a.x[i] * b.x[i];
    return c;
  }
  static float reduce_max(V a) {
    float m = a.x[0];
    for (int i = 1; i < 16; ++i) m = std::max(m, a.x[i]);
    return m;
  }
  static float reduce_add(V a) {
    float s = 0.f;
    for (int i = 0; i < 16; ++i) s += a.x[i];
    return s;
  }
  static V keep_first(V a, int n, float fill) {
    for (int i = n; i < 16; ++i) a.x[i] = fill;
    return a;
  }
  static V exp2(V a) {
    for (int i = 0; i < 16; ++i) a.x[i] = std::exp2(a.x[i]);
    return a;
  }
  static void transpose16(const V* a, V* out) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) out[j].x[i] = a[i].x[j];
  }
};

using Vec = Generic;
#include "attention_simd.inc"

}  // namespace generic

#ifdef PLM_ATTN_X86_SIMD
// ---- AVX-512 build ----------------------------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12 flags the _mm512_undefined_ps() placeholder inside its own conversion intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

// 16 fp32 lanes; fp16/bf16 travel as 256-bit halves and widen on load (bf16 is the top half of an fp32).
// Partial vectors use masked loads/stores, which never touch (or fault on) the masked-off memory.
struct Avx512 {
  using V = __m512;
  static __mmask16 mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V from_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static V load(const c10::BFloat16* p) { return from_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const c10::BFloat16* p, int n) { return from_bf16(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static V load(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V load(const c10::Half* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask(n), p)); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(float* p, V v, int n) { _mm512_mask_storeu_ps(p, mask(n), v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce_max(V a) { return _mm512_reduce_max_ps(a); }
  static float reduce_add(V a) { return _mm512_reduce_add_ps(a); }
  static V keep_first(V a, int n, float fill) { return _mm512_mask_blend_ps(mask(n), set1(fill), a); }
  // 2^x for x <= 0 (or -inf): x = k + f with k an integer and |f| <= 1/2; 2^f = e^(f ln 2) by its
  // degree-7 Taylor polynomial (relative error < 1e-8 on |f| <= 1/2, below fp32 rounding), and the
  // 2^k by scalef. Clamping at -150 maps -inf (and anything below fp32's range) to 0 without NaNs.
  static V exp2(V x) {
    x = _mm512_max_ps(x, set1(-150.f));
    const V k = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_mul_ps(_mm512_sub_ps(x, k), set1(kLn2));
    V p = set1(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, f, set1(1.f / 720.f));
    p = _mm512_fmadd_ps(p, f, set1(1.f / 120.f));
    p = _mm512_fmadd_ps(p, f, set1(1.f / 24.f));
    p = _mm512_fmadd_ps(p, f, set1(1.f / 6.f));
    p = _mm512_fmadd_ps(p, f, set1(0.5f));
    p = _mm512_fmadd_ps(p, f, set1(1.f));
    p = _mm512_fmadd_ps(p, f, set1(1.f));
    return _mm512_scalef_ps(p, k);
  }
  // 16x16 transpose in four shuffle stages: 32-bit and 64-bit interleaves inside 128-bit lanes, then
  // two 128-bit lane shuffles (a 4x4 transpose of lanes). After stage 2, u[4i + c] lane L holds
  // rows 4i..4i+3 at column 4L + c.
  static void transpose16(const V* a, V* out) {
    V t[16], u[16];
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d t0 = _mm512_castps_pd(t[4 * i]), t1 = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d t2 = _mm512_castps_pd(t[4 * i + 2]), t3 = _mm512_castps_pd(t[4 * i + 3]);
      u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
      u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
      u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
      u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int c = 0; c < 4; ++c) {
      const V y0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), y1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
      const V y2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), y3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
      out[c] = _mm512_shuffle_f32x4(y0, y2, 0x88);
      out[4 + c] = _mm512_shuffle_f32x4(y0, y2, 0xDD);
      out[8 + c] = _mm512_shuffle_f32x4(y1, y3, 0x88);
      out[12 + c] = _mm512_shuffle_f32x4(y1, y3, 0xDD);
    }
  }
};

using Vec = Avx512;
#include "attention_simd.inc"

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // PLM_ATTN_X86_SIMD

enum class Isa { kGeneric = 0, kAvx512 = 1 };

Isa detect_isa() {
  Isa best = Isa::kGeneric;
#ifdef PLM_ATTN_X86_SIMD
  // __builtin_cpu_supports also checks that the OS saves the AVX-512 register state.
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    best = Isa::kAvx512;
#endif
  // Same variable as the norm kernels; there is no separate AVX2 build here, so "avx2" means generic.
  if (const char* env = std::getenv("PLM_ENGINE_CPU_ISA"); env != nullptr && std::string(env) != "avx512")
    best = Isa::kGeneric;
  return best;
}

Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

// Calls the chosen build's version of a task function (dispatched once per task, not per tile).
#ifdef PLM_ATTN_X86_SIMD
#define PLM_ATTN_CALL(fn, ...) (isa() == Isa::kAvx512 ? avx512::fn(__VA_ARGS__) : generic::fn(__VA_ARGS__))
#else
#define PLM_ATTN_CALL(fn, ...) generic::fn(__VA_ARGS__)
#endif

// Runs fn(task, scratch) for task in [0, n) on all threads, handing tasks out dynamically in index
// order (callers order them heaviest first); each worker owns `scratch_floats` of fp32 scratch.
template <typename F>
void parallel_tasks(int64_t n, int64_t scratch_floats, const F& fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) fn(t, scratch.data());
  });
}

template <typename T>
void run_fwd(FwdArgs<T> a, std::vector<Seq>& seqs, const at::TensorOptions& fopts) {
  const int64_t d = a.d;
  int64_t kt_total = 0, vf_total = 0;
  for (Seq& sd : seqs) {
    sd.kt_off = kt_total;
    sd.vf_off = vf_total;
    kt_total += a.hkv * n_tiles(sd.sk) * d * BN;
    vf_total += a.hkv * sd.sk * d;
  }
  const at::Tensor kt = at::empty({kt_total}, fopts);
  at::Tensor vf;
  a.kt = kt.data_ptr<float>();
  a.vf = nullptr;
  if constexpr (!std::is_same_v<T, float>) {
    vf = at::empty({vf_total}, fopts);
    a.vf = vf.data_ptr<float>();
  }
  // Pre-pass: pack every K tile (and widen V) once.
  struct PackTask { int64_t seq, kvh, tile; };
  std::vector<PackTask> packs;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    for (int64_t kvh = 0; kvh < a.hkv; ++kvh)
      for (int64_t t = 0; t < n_tiles(seqs[s].sk); ++t) packs.push_back({s, kvh, t});
  parallel_tasks(static_cast<int64_t>(packs.size()), 0, [&](int64_t t, float*) {
    PLM_ATTN_CALL(pack_task, a, seqs[packs[t].seq], packs[t].kvh, packs[t].tile);
  });
  // Main pass: (sequence, head, query tile), the most keys first.
  struct Task { int64_t seq, head, i0, cost; };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    const Seq& sd = seqs[s];
    for (int64_t i0 = 0; i0 < sd.sq; i0 += BM) {
      const int64_t last = std::min(i0 + BM, sd.sq) - 1;
      const int64_t keys = a.causal ? std::clamp(last + sd.sk - sd.sq + 1, int64_t(0), sd.sk) : sd.sk;
      for (int64_t hh = 0; hh < a.h; ++hh) tasks.push_back({s, hh, i0, keys});
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  parallel_tasks(static_cast<int64_t>(tasks.size()), Scratch::floats(d), [&](int64_t t, float* scratch) {
    PLM_ATTN_CALL(fwd_task, a, seqs[tasks[t].seq], tasks[t].head, tasks[t].i0, scratch);
  });
}

template <typename F>
void dispatch_dtype(at::ScalarType st, const F& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "attention: unsupported dtype ", st);
  }
}

template <typename T>
FwdArgs<T> fwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                    bool causal, double scale) {
  FwdArgs<T> a{};
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<float>();
  a.h = q.size(-2);
  a.hkv = k.size(-2);
  a.d = q.size(-1);
  a.q_row = q.stride(-3);
  a.q_head = q.stride(-2);
  a.k_row = k.stride(-3);
  a.k_head = k.stride(-2);
  a.v_row = v.stride(-3);
  a.v_head = v.stride(-2);
  a.out_row = a.h * a.d;
  a.causal = causal;
  a.qscale = static_cast<float>(scale) * kLog2e;
  return a;
}

// ---- paged decode ----------------------------------------------------------------------------------

// Merges the splits of (batch bi, kv head kvh, row r) into the output row.
template <typename T>
void paged_merge(const PagedArgs<T>& a, T* out, int64_t t) {
  const int64_t d = a.d, group = a.h / a.hkv;
  const int64_t r = t % a.rows_total, kvh = (t / a.rows_total) % a.hkv, bi = t / a.rows_total / a.hkv;
  const float* part = a.part + ((bi * a.hkv + kvh) * a.rows_total + r) * a.splits * (d + 2);
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < a.splits; ++s) mx = std::max(mx, part[s * (d + 2) + d]);
  const int64_t i = r / group, head = kvh * group + r % group;
  T* dst = out + ((bi * a.sq + i) * a.h + head) * d;
  std::vector<float> acc(d, 0.f);
  float l = 0.f;
  if (mx != -std::numeric_limits<float>::infinity()) {
    for (int64_t s = 0; s < a.splits; ++s) {
      const float* p = part + s * (d + 2);
      if (p[d + 1] == 0.f) continue;
      const float wgt = std::exp2(p[d] - mx);
      l += p[d + 1] * wgt;
      for (int64_t c = 0; c < d; ++c) acc[c] += p[c] * wgt;
    }
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<T>(acc[c] * inv);
}

}  // namespace

std::tuple<Tensor, Tensor> attn_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  check_attn_args(q, k, v, 2);
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3), sk = k.size(1);
  Tensor out = at::empty({b, sq, h, d}, q.options());
  Tensor lse = at::empty({b, h, sq}, q.options().dtype(at::kFloat));
  std::vector<Seq> seqs;
  for (int64_t i = 0; i < b; ++i)
    seqs.push_back({i * q.stride(0), i * k.stride(0), i * v.stride(0), i * sq * h * d, i * h * sq, sq, sk});
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a = fwd_args<T>(q, k, v, out, lse, causal, scale);
    a.lse_head = sq;
    run_fwd(a, seqs, q.options().dtype(at::kFloat));
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor> attn_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                               double scale) {
  check_attn_args(q, k, v, 1);
  check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k);
  const int64_t tq = q.size(0), h = q.size(1), d = q.size(2), tk = k.size(0);
  const int32_t* cq = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* ck = cu_seqlens_k.data_ptr<int32_t>();
  const int64_t batch = cu_seqlens_q.numel() - 1;
  // Offsets are read on every row access: a bad one would read out of bounds, so check them all.
  TORCH_CHECK(cq[0] == 0 && ck[0] == 0 && cq[batch] == tq && ck[batch] == tk,
              "cu_seqlens must start at 0 and end at the packed lengths (", tq, ", ", tk, ")");
  Tensor out = at::empty({tq, h, d}, q.options());
  Tensor lse = at::empty({h, tq}, q.options().dtype(at::kFloat));
  std::vector<Seq> seqs;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t sq = cq[i + 1] - cq[i], sk = ck[i + 1] - ck[i];
    TORCH_CHECK(sq >= 0 && sk >= 0, "cu_seqlens must never decrease (sequence ", i, ")");
    TORCH_CHECK(sq <= max_seqlen_q && sk <= max_seqlen_k, "sequence ", i, " (", sq, ", ", sk,
                ") is longer than max_seqlen_q/k (", max_seqlen_q, ", ", max_seqlen_k, ")");
    seqs.push_back({cq[i] * q.stride(0), ck[i] * k.stride(0), ck[i] * v.stride(0), cq[i] * h * d, cq[i], sq, sk});
  }
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a = fwd_args<T>(q, k, v, out, lse, causal, scale);
    a.lse_head = tq;
    run_fwd(a, seqs, q.options().dtype(at::kFloat));
  });
  return {out, lse};
}

Tensor paged_attn_cpu(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                      const Tensor& cache_seqlens, double scale) {
  check_paged_args(q, k_cache, v_cache, block_table, cache_seqlens);
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3), hkv = k_cache.size(2);
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), max_blocks = block_table.size(1);
  Tensor out = at::empty({b, sq, h, d}, q.options());
  if (out.numel() == 0) return out;
  // Cache addresses come from these values: check them here too (Python checks them for users).
  const int32_t* lens = cache_seqlens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(lens[i] >= sq && lens[i] <= max_blocks * bs, "cache_seqlens[", i, "] = ", lens[i],
                " must lie in [seqlen_q=", sq, ", max_blocks * block_size=", max_blocks * bs, "]");
    for (int64_t j = 0; j * bs < lens[i]; ++j)
      TORCH_CHECK(table[i * max_blocks + j] >= 0 && table[i * max_blocks + j] < nb, "block_table[", i, ", ", j,
                  "] = ", table[i * max_blocks + j], " is outside [0, ", nb, ")");
    max_len = std::max<int64_t>(max_len, lens[i]);
  }
  const int64_t rows_total = sq * (h / hkv), row_tiles = (rows_total + BM - 1) / BM;
  // Split long contexts so that there are >= 32 tasks (for any core count up to 32), but keep >= 256
  // keys per split. Depends on the shapes and lengths only, never on the thread count.
  const int64_t base = b * hkv * row_tiles;
  const int64_t splits = std::max<int64_t>(1, std::min((32 + base - 1) / base, (max_len + 255) / 256));
  const int64_t chunk = ((max_len + splits - 1) / splits + BN - 1) / BN * BN;
  Tensor part = at::empty({b * hkv * rows_total * splits * (d + 2)}, q.options().dtype(at::kFloat));
  dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    PagedArgs<T> a{};
    a.q = q.data_ptr<T>();
    a.kc = k_cache.data_ptr<T>();
    a.vc = v_cache.data_ptr<T>();
    a.block_table = table;
    a.seqlens = lens;
    a.part = part.data_ptr<float>();
    a.sq = sq;
    a.h = h;
    a.hkv = hkv;
    a.d = d;
    a.bs_log2 = 0;
    while ((int64_t(1) << a.bs_log2) < bs) ++a.bs_log2;
    a.max_blocks = max_blocks;
    a.splits = splits;
    a.chunk = chunk;
    a.rows_total = rows_total;
    a.row_tiles = row_tiles;
    a.q_b = q.stride(0);
    a.q_s = q.stride(1);
    a.q_h = q.stride(2);
    a.qscale = static_cast<float>(scale) * kLog2e;
    // Tasks are (batch, kv head, row tile, split) in index order: every task of a batch row costs
    // about the same, so no sorting is needed.
    parallel_tasks(base * splits, Scratch::floats(d), [&](int64_t t, float* scratch) {
      PLM_ATTN_CALL(paged_task, a, t, scratch);
    });
    T* o = out.data_ptr<T>();
    at::parallel_for(0, b * hkv * rows_total, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) paged_merge(a, o, t);
    });
  });
  return out;
}

void write_kv_cache_cpu(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping) {
  check_write_kv_args(k, v, k_cache, v_cache, slot_mapping);
  const Tensor kk = k.to(k_cache.scalar_type()), vv = v.to(k_cache.scalar_type());
  const Tensor slots = slot_mapping.to(at::kLong);
  const int64_t n = k.size(0), hkv = k.size(1), d = k.size(2);
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < n; ++t)
    TORCH_CHECK(sl[t] < n_slots, "slot_mapping[", t, "] = ", sl[t], " is out of range for a cache of ", n_slots,
                " slots");
  const int64_t elt = k_cache.element_size();
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const char* kp = static_cast<const char*>(kk.data_ptr());
  const char* vp = static_cast<const char*>(vv.data_ptr());
  const int64_t ks0 = kk.stride(0), ks1 = kk.stride(1), vs0 = vv.stride(0), vs1 = vv.stride(1);
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (sl[t] < 0) continue;  // padding token
      for (int64_t hh = 0; hh < hkv; ++hh) {
        const int64_t dst = (sl[t] * hkv + hh) * d * elt;
        std::memcpy(kc + dst, kp + (t * ks0 + hh * ks1) * elt, d * elt);
        std::memcpy(vc + dst, vp + (t * vs0 + hh * vs1) * elt, d * elt);
      }
    }
  });
}

}  // namespace plm_engine

TORCH_LIBRARY_IMPL(plm_engine, CPU, m) {
  m.impl("attn_fwd", &plm_engine::attn_fwd_cpu);
  m.impl("attn_varlen_fwd", &plm_engine::attn_varlen_fwd_cpu);
  m.impl("paged_attn", &plm_engine::paged_attn_cpu);
  m.impl("write_kv_cache", &plm_engine::write_kv_cache_cpu);
}
