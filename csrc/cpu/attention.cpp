// Attention on the CPU: flash-style dense / varlen forward and backward, decode over the paged KV
// cache, KV writes.
//
// Forward (FlashAttention's online softmax, all math in fp32): a task owns up to BM query rows and
// walks the keys in tiles of BN; per tile it computes the scores S = Q K^T, updates the running row max
// m and sum l, rescales its fp32 output accumulators and adds P V. Nothing of size seqlen_q x seqlen_k
// is ever stored: a thread's scratch is a few tens of KB and stays in L1/L2.
//
// Backward (FlashAttention-2, from the saved out and lse): a pre-pass packs Q^T / dO^T panels and
// computes D = rowsum(dO * O); pass 1 has one task per (sequence, kv head, key tile) that owns its
// dK / dV in fp32 and walks every query of the kv head's group; pass 2 has one task per (sequence,
// head, query tile) that owns its dQ and walks the keys, reading the dS tiles pass 1 stored or, past
// a memory budget, recomputing P and dP (two extra products; no float atomics or per-thread partial
// sums either way). Every output element is written by one task
// in a fixed order, so gradients are bit-identical for any thread count.
//
// Layout choices (benchmarks/bench_attention.py):
//  - The QK^T micro-kernel broadcasts one query element and multiplies it with a row of keys, so it
//    needs the keys transposed (head_dim x keys, "packed"). Dense / varlen attention packs every K
//    tile once per call (a parallel pre-pass, shared by all query tiles and all heads of a GQA group),
//    converting fp16/bf16 to fp32 at the same time; values are converted to fp32 once likewise. Paged
//    decode has only group * seqlen_q query rows per key, so it packs each K tile on the fly
//    (W x W in-register transposes) and reads V straight from the cache, converting in registers.
//  - Decode processes all query heads of a KV head together (rows = seqlen_q x group), so each cached
//    K/V row is read from memory once, and splits long contexts into chunks (flash-decoding) so that
//    batch 1 keeps every core busy; the partial results are merged in a second pass.
//  - T5's relative position bias (the *_rpb ops): per head, the bias of every relative position in
//    [-max_distance, max_distance] (table[bucket, head], precomputed once per call, in log2 units),
//    padded by BN on both sides with the end values (BiasArgs), so a tile row's BN biases are one
//    contiguous, unmasked window whatever the clamp does. The backward's pass 1 sums dS^T into a
//    padded row per (head, key tile) in the same coordinate, folds it onto relative positions, and a
//    final fixed-order pass adds those into the table's buckets: dtable is bit-identical for any
//    thread count too.
//  - Tasks are handed out dynamically (an atomic counter inside at::parallel_for), heaviest first, so
//    causal attention's uneven tiles balance. Every task's arithmetic depends only on the shapes, so
//    results are bit-identical for any thread count.
//
// The tile kernels (attention_kernels.inc) are written once against the vector policies of simd.h and
// compiled per instruction set (generic / avx2 / avx512, simd_instantiate.inc); cpu::cpu_isa() picks
// the build once per task (PLM_CPU_CALL).
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
#include <iterator>
#include <limits>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"
#include "common/dispatch.h"
#include "common/register.h"
#include "cpu/isa.h"
#include "cpu/simd.h"

namespace plm_engine {
namespace {

constexpr int64_t BM = 64;  // query rows per task
constexpr int64_t BN = 64;  // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(BM == BN, "the backward's transposed tiles (keys x queries) reuse the BN-wide layout");

// ---- task arguments and scratch, shared by every build ---------------------------------------------

// One sequence of a (possibly packed) batch: element offsets of its first row in q / k / v / out / lse
// (out_off also addresses dout, which is laid out like out) and in the gradients.
struct Seq {
  int64_t q_off, k_off, v_off, out_off, lse_off, sq, sk;
  int64_t kt_off = 0, vf_off = 0;  // into the packed-K (and packed-V) and fp32-V buffers
  int64_t qt_off = 0, st_off = 0;  // backward: packed Q^T / dO^T panels, per-row lse2 / D
  int64_t dq_off = 0, dk_off = 0, dv_off = 0;
  int64_t ds_off = 0;  // backward: stored dS^T tiles
  int64_t db_off = 0;  // backward with a bias: per-(head, key tile) dS sums per relative position
};

// T5's relative position bias as the tile kernels read it (ext == nullptr: no bias). Per head, `len` =
// 2 * (md + BN) + 1 floats: ext[x + md + BN] = table[buckets[clamp(x, -md, md) + md], head] * log2(e)
// for the relative position x = key - query in [-(md + BN), md + BN]; rev the same at -x (the
// backward's transposed tiles, whose rows are keys).
struct BiasArgs {
  const float* ext = nullptr;
  const float* rev = nullptr;
  float* dpart = nullptr;  // backward: per (sequence, head, key tile), 2 * md + 1 dS sums (Seq::db_off)
  int64_t md = 0, len = 0;
  const int32_t* buckets = nullptr;  // backward: the bucket of each relative position, and
  float* dtable = nullptr;           // the (num_buckets, n_heads) gradient they are summed into
};

int64_t n_tiles(int64_t n) { return (n + BN - 1) / BN; }

// What the forward and the backward share: q, k, v and their layout, the mask and the scale.
template <typename T>
struct QkvArgs {
  const T* q;
  const T* k;
  const T* v;
  int64_t h, hkv, d;
  int64_t q_row, q_head, k_row, k_head, v_row, v_head;  // element strides
  int64_t lse_head;
  bool causal;
  float scale;
  float qscale;  // softmax scale * log2(e): scores come out in log2 units for exp2
  BiasArgs bias;
};

template <typename T>
struct FwdArgs : QkvArgs<T> {
  T* out;
  float* lse;
  float* kt;  // packed keys: per (seq, kv head) ceil(sk / BN) tiles of (d, BN) fp32
  float* vf;  // fp32 values per (seq, kv head): (sk, d), contiguous (see run_fwd)
  int64_t out_row;
};

// Scratch layout of a dense/varlen or paged forward worker, in floats.
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
  BiasArgs bias;
};

template <typename T>
struct BwdArgs : QkvArgs<T> {
  const T* dout;
  const T* out;
  const float* lse;
  T* dq;
  T* dk;
  T* dv;
  float* kt;     // packed K^T tiles per (seq, kv head, key tile), (d, BN)
  float* vt;     // packed V^T tiles, same layout
  float* qt;     // packed (Q * qscale)^T panels per (seq, head, query tile), (d, BN)
  float* dot;    // packed dO^T panels, same layout
  float* qf;     // Q (unscaled) and dO as contiguous fp32 rows, (BN, d) per panel of qt: the row operands
  float* dof;    //   of pass 1's two P^T-products (in place their rows lie h * d apart; see run_fwd's vf)
  float* kf;     // K as contiguous fp32 rows, (BN, d) per tile of kt: pass 2's row operand
  float* lse2;   // per (seq, head, query tile): BN values of lse * log2(e) (+inf: no visible key / padding)
  float* delta;  // same layout: D = rowsum(dO * O)
  float* ds;     // dS^T tiles (BN keys x BN queries) per (seq, head, key tile, query tile), or nullptr
  int64_t o_row, o_head, do_row, do_head;
  int64_t dq_row, dq_head, dk_row, dk_head, dv_row, dv_head;
};

// Pass 1 stores its dS^T tiles for pass 2 when they take at most this many MiB (h * sq * sk * 4 bytes,
// tiles padded): pass 2 is then one product (dQ = dS K) instead of three and needs no packed K^T / V^T.
// Longer sequences recompute them (same results, bit for bit). PLM_ENGINE_ATTN_BWD_DS_MIB overrides
// the budget (tests set 0 to cover the recompute path).
int64_t ds_budget_bytes() {
  const char* env = std::getenv("PLM_ENGINE_ATTN_BWD_DS_MIB");
  const int64_t mib = env != nullptr ? std::atoll(env) : 256;
  return mib * (int64_t(1) << 20);
}

// The backward's fp32 buffers (dS^T tiles, packed panels) are tens to hundreds of MiB, above glibc's
// mmap threshold: allocated afresh, every call would map them and the kernel would fault in and zero
// each page (about 11k page faults per call at s = 1024, 8 heads: several percent of the backward).
// One workspace is kept between calls instead, as torch's caching allocators do on GPUs: a call takes
// it (or allocates a larger one), and hands it back, keeping the larger of the two. Concurrent calls
// each get their own buffer; only one is kept. Its size stays within the dS budget plus the packed
// panels of the largest call so far.
class WorkspaceCache {
 public:
  // Buffers above max_keep floats are freed, not kept.
  explicit WorkspaceCache(int64_t max_keep = std::numeric_limits<int64_t>::max()) : max_keep_(max_keep) {}
  at::Tensor take(int64_t floats) {
    std::lock_guard<std::mutex> lock(mu_);
    if (kept_.defined() && kept_.numel() >= floats) return std::exchange(kept_, at::Tensor());
    kept_ = at::Tensor();  // freed before the larger one is allocated
    return at::empty({floats}, at::TensorOptions().dtype(at::kFloat));
  }
  void give(at::Tensor t) {
    std::lock_guard<std::mutex> lock(mu_);
    if (t.numel() <= max_keep_ && (!kept_.defined() || kept_.numel() < t.numel())) kept_ = std::move(t);
  }

 private:
  const int64_t max_keep_;
  std::mutex mu_;
  at::Tensor kept_;
};

WorkspaceCache& bwd_workspace() {
  static WorkspaceCache cache;
  return cache;
}

// The forward's packed K and fp32 V (8 MiB at s = 2048, 8 heads) likewise: allocated afresh they cost
// 600-700 page faults per call at s = 1024..2048 (SDPA's forward: 0-120), a few percent of a 2-thread
// forward. At most 16 MiB is kept (s = 4096 at 8 kv heads, head_dim 64): past that the faults, linear
// in the length, are a small part of the quadratic work, and a prefill should not leave more resident.
WorkspaceCache& fwd_workspace() {
  static WorkspaceCache cache(int64_t(16) << 18);  // 16 MiB in floats
  return cache;
}

// A workspace of at least `floats` floats from `cache`, handed back when it goes out of scope.
class WorkspaceLease {
 public:
  WorkspaceLease(WorkspaceCache& cache, int64_t floats) : cache_(cache), buf_(cache.take(std::max<int64_t>(floats, 1))) {}
  ~WorkspaceLease() { cache_.give(std::move(buf_)); }
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  float* data() { return buf_.data_ptr<float>(); }

 private:
  WorkspaceCache& cache_;
  at::Tensor buf_;
};

// Scratch of a backward worker, in floats: two (BN, d) operand tiles, two (BN, BN) score tiles, two
// (BN, d) accumulators, and with a bias one padded row of dS sums (BiasArgs::len).
struct BwdScratch {
  float *x, *y, *s, *dp, *acc1, *acc2, *bacc;
  static int64_t floats(int64_t d, int64_t bias_len = 0) { return 4 * BN * d + 2 * BN * BN + bias_len; }
  BwdScratch(float* base, int64_t d)
      : x(base),
        y(x + BN * d),
        s(y + BN * d),
        dp(s + BN * BN),
        acc1(dp + BN * BN),
        acc2(acc1 + BN * d),
        bacc(acc2 + BN * d) {}
};

#define PLM_SIMD_KERNELS "cpu/attention_kernels.inc"
#include "cpu/simd_instantiate.inc"

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

// A unit of work: one (sequence, head, tile), and how many keys (or queries) it visits.
struct Task {
  int64_t seq, head, tile, cost;
};

// Every (sequence, head, query tile), the most keys first: the order parallel_tasks hands them out in.
// Among equals head by head, so the tasks running at any moment read one head's K / V tiles, which stay
// in L2 (at s = 1024 the packed K and fp32 V of all 8 heads take 4 MiB, of one 512 KiB); interleaving
// the heads made every task stream them from L3 again (forward and dQ pass 2-3% slower, backward 12%,
// fp32 at s = 1024 on one core).
std::vector<Task> query_tile_tasks(const std::vector<Seq>& seqs, int64_t h, bool causal) {
  std::vector<Task> tasks;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s) {
    const Seq& sd = seqs[s];
    for (int64_t hh = 0; hh < h; ++hh) {
      for (int64_t i0 = 0; i0 < sd.sq; i0 += BM) {
        const int64_t last = std::min(i0 + BM, sd.sq) - 1;
        const int64_t keys = causal ? std::clamp(last + sd.sk - sd.sq + 1, int64_t(0), sd.sk) : sd.sk;
        tasks.push_back({s, hh, i0, keys});
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  return tasks;
}

template <typename T>
void run_fwd(FwdArgs<T> a, std::vector<Seq>& seqs) {
  const int64_t d = a.d;
  int64_t kt_total = 0, vf_total = 0;
  for (Seq& sd : seqs) {
    sd.kt_off = kt_total;
    sd.vf_off = vf_total;
    kt_total += a.hkv * n_tiles(sd.sk) * d * BN;
    vf_total += a.hkv * sd.sk * d;
  }
  // V is copied to contiguous fp32 rows even for fp32 inputs: in place, a tile's rows lie h * d
  // elements apart, and for power-of-two strides (h * d * 4 = 2 KiB) its 64 rows fall into a few L1
  // sets and evict each other on every PV pass over the tile.
  const int64_t kt_padded = (kt_total + 15) / 16 * 16;  // vf starts 64-byte aligned
  WorkspaceLease ws(fwd_workspace(), kt_padded + vf_total);
  a.kt = ws.data();
  a.vf = ws.data() + kt_padded;
  // Pre-pass: pack every K tile (and copy / widen V) once.
  struct PackTask { int64_t seq, kvh, tile; };
  std::vector<PackTask> packs;
  for (int64_t s = 0; s < static_cast<int64_t>(seqs.size()); ++s)
    for (int64_t kvh = 0; kvh < a.hkv; ++kvh)
      for (int64_t t = 0; t < n_tiles(seqs[s].sk); ++t) packs.push_back({s, kvh, t});
  parallel_tasks(static_cast<int64_t>(packs.size()), 0, [&](int64_t t, float*) {
    PLM_CPU_CALL(pack_task, a, seqs[packs[t].seq], packs[t].kvh, packs[t].tile);
  });
  // Main pass: (sequence, head, query tile), the most keys first.
  const std::vector<Task> tasks = query_tile_tasks(seqs, a.h, a.causal);
  parallel_tasks(static_cast<int64_t>(tasks.size()), Scratch::floats(d), [&](int64_t t, float* scratch) {
    PLM_CPU_CALL(fwd_task, a, seqs[tasks[t].seq], tasks[t].head, tasks[t].tile, scratch);
  });
}

template <typename T>
void run_bwd(BwdArgs<T> a, std::vector<Seq>& seqs) {
  const int64_t d = a.d, group = a.h / a.hkv, nseq = static_cast<int64_t>(seqs.size());
  int64_t kt_total = 0, qt_total = 0, st_total = 0, ds_total = 0, db_total = 0;
  for (Seq& sd : seqs) {
    sd.kt_off = kt_total;
    sd.qt_off = qt_total;
    sd.st_off = st_total;
    sd.ds_off = ds_total;
    sd.db_off = db_total;
    db_total += a.h * n_tiles(sd.sk) * (2 * a.bias.md + 1);
    kt_total += a.hkv * n_tiles(sd.sk) * d * BN;
    qt_total += a.h * n_tiles(sd.sq) * d * BN;
    st_total += a.h * n_tiles(sd.sq) * BN;
    ds_total += a.h * n_tiles(sd.sk) * n_tiles(sd.sq) * BN * BN;
  }
  const bool store_ds = ds_total * static_cast<int64_t>(sizeof(float)) <= ds_budget_bytes();
  if (!store_ds) ds_total = 0;
  const int64_t kpack_total = store_ds ? 0 : kt_total;  // pass 2 needs no packed K^T / V^T then
  if (a.bias.ext == nullptr) db_total = 0;
  // Every buffer is carved from one workspace, each piece 64-byte aligned (pass 1 writes the dS^T tiles
  // with aligned non-temporal stores, whole tiles from the piece's base).
  const int64_t sizes[] = {kt_total, ds_total, kpack_total, kpack_total, qt_total, qt_total,
                           qt_total, qt_total,  st_total,   st_total,    db_total};
  int64_t total = 0;
  for (const int64_t n : sizes) total += (n + 15) / 16 * 16;
  WorkspaceLease ws(bwd_workspace(), total);
  float* pieces[std::size(sizes)];
  float* base = ws.data();
  for (size_t i = 0; i < std::size(sizes); ++i) {
    pieces[i] = base;
    base += (sizes[i] + 15) / 16 * 16;
  }
  a.kf = pieces[0];
  a.ds = store_ds ? pieces[1] : nullptr;
  a.kt = pieces[2];
  a.vt = pieces[3];
  a.qt = pieces[4];
  a.dot = pieces[5];
  a.qf = pieces[6];
  a.dof = pieces[7];
  a.lse2 = pieces[8];
  a.delta = pieces[9];
  TORCH_INTERNAL_ASSERT(reinterpret_cast<uintptr_t>(a.ds) % 64 == 0);
  // Every (sequence, head, key tile) slot is written by exactly one pass-1 task (keys no query sees
  // included: their tasks still run and write zeros), so no zero fill is needed.
  a.bias.dpart = a.bias.ext != nullptr ? pieces[10] : nullptr;
  // Pre-pass: K rows and K^T / V^T tiles (head = kv head) and Q^T / dO^T panels, Q / dO rows, lse2 and
  // D (head = -1 - head).
  std::vector<Task> prep;
  for (int64_t s = 0; s < nseq; ++s) {
    for (int64_t kvh = 0; kvh < a.hkv; ++kvh)
      for (int64_t t = 0; t < n_tiles(seqs[s].sk); ++t) prep.push_back({s, kvh, t, 0});
    for (int64_t hh = 0; hh < a.h; ++hh)
      for (int64_t t = 0; t < n_tiles(seqs[s].sq); ++t) prep.push_back({s, -1 - hh, t, 0});
  }
  parallel_tasks(static_cast<int64_t>(prep.size()), 0, [&](int64_t t, float*) {
    const Task& p = prep[t];
    if (p.head >= 0) PLM_CPU_CALL(bwd_pack_kv_task, a, seqs[p.seq], p.head, p.tile);
    else PLM_CPU_CALL(bwd_prep_task, a, seqs[p.seq], -1 - p.head, p.tile);
  });
  // Pass 1: dK, dV per (sequence, kv head, key tile), the most queries first.
  std::vector<Task> tasks;
  for (int64_t s = 0; s < nseq; ++s) {
    const Seq& sd = seqs[s];
    for (int64_t kvh = 0; kvh < a.hkv; ++kvh) {  // kv head by kv head: its Q / dO panels stay in L2
      for (int64_t j0 = 0; j0 < sd.sk; j0 += BN) {
        const int64_t queries = a.causal ? sd.sq - std::clamp(j0 - (sd.sk - sd.sq), int64_t(0), sd.sq) : sd.sq;
        tasks.push_back({s, kvh, j0, queries * group});
      }
    }
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  const int64_t bias_len = a.bias.ext != nullptr ? a.bias.len : 0;
  parallel_tasks(static_cast<int64_t>(tasks.size()), BwdScratch::floats(d, bias_len), [&](int64_t t, float* scratch) {
    PLM_CPU_CALL(bwd_dkdv_task, a, seqs[tasks[t].seq], tasks[t].head, tasks[t].tile, scratch);
  });
  // Pass 2: dQ per (sequence, head, query tile), the most keys first.
  tasks = query_tile_tasks(seqs, a.h, a.causal);
  parallel_tasks(static_cast<int64_t>(tasks.size()), BwdScratch::floats(d), [&](int64_t t, float* scratch) {
    if (store_ds) PLM_CPU_CALL(bwd_dq_stored_task, a, seqs[tasks[t].seq], tasks[t].head, tasks[t].tile, scratch);
    else PLM_CPU_CALL(bwd_dq_task, a, seqs[tasks[t].seq], tasks[t].head, tasks[t].tile, scratch);
  });
  if (a.bias.ext == nullptr) return;
  // dtable[bucket(p), head] += pass 1's sums for relative position p, over sequences and key tiles in
  // order: one head per task, so each table column has one writer.
  const int64_t width = 2 * a.bias.md + 1;
  at::parallel_for(0, a.h, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(width);
    for (int64_t hh = begin; hh < end; ++hh) {
      std::fill(sums.begin(), sums.end(), 0.f);
      for (const Seq& sd : seqs) {
        const int64_t nkt = n_tiles(sd.sk);
        for (int64_t t = 0; t < nkt; ++t) {
          const float* part = a.bias.dpart + sd.db_off + (hh * nkt + t) * width;
          for (int64_t p = 0; p < width; ++p) sums[p] += part[p];
        }
      }
      for (int64_t p = 0; p < width; ++p) a.bias.dtable[a.bias.buckets[p] * a.h + hh] += sums[p];
    }
  });
}

// The bias rows of one call (BiasArgs), and the buffers behind them.
struct BiasRows {
  at::Tensor ext, rev;
  BiasArgs args;

  BiasRows(const at::Tensor& table, const at::Tensor& buckets) {
    const int64_t nb = table.size(0), h = table.size(1), md = (buckets.numel() - 1) / 2;
    const int64_t len = 2 * (md + BN) + 1;
    ext = at::empty({h, len}, table.options());
    rev = at::empty({h, len}, table.options());
    const float* tab = table.data_ptr<float>();
    const int32_t* bk = buckets.data_ptr<int32_t>();
    float* e = ext.data_ptr<float>();
    float* r = rev.data_ptr<float>();
    for (int64_t hh = 0; hh < h; ++hh) {
      for (int64_t x = -(md + BN); x <= md + BN; ++x) {
        const int32_t b = bk[std::clamp(x, -md, md) + md];
        TORCH_CHECK(b >= 0 && b < nb, "position bias buckets must lie in [0, ", nb, "), got ", b);
        e[hh * len + x + md + BN] = tab[b * h + hh] * kLog2e;
        r[hh * len - x + md + BN] = e[hh * len + x + md + BN];
      }
    }
    args.ext = e;
    args.rev = r;
    args.md = md;
    args.len = len;
    args.buckets = bk;
  }
};


template <typename T>
void fill_qkv(QkvArgs<T>& a, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lse, bool causal,
              double scale) {
  a.q = q.data_ptr<T>();
  a.k = k.data_ptr<T>();
  a.v = v.data_ptr<T>();
  a.h = q.size(-2);
  a.hkv = k.size(-2);
  a.d = q.size(-1);
  a.q_row = q.stride(-3);
  a.q_head = q.stride(-2);
  a.k_row = k.stride(-3);
  a.k_head = k.stride(-2);
  a.v_row = v.stride(-3);
  a.v_head = v.stride(-2);
  a.lse_head = lse.stride(-2);  // (b, h, sq) dense, (h, total_q) packed
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.qscale = static_cast<float>(scale) * kLog2e;
}

template <typename T>
FwdArgs<T> fwd_args(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Tensor& lse, bool causal,
                    double scale) {
  FwdArgs<T> a{};
  fill_qkv<T>(a, q, k, v, lse, causal, scale);
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<float>();
  a.out_row = a.h * a.d;
  return a;
}

template <typename T>
BwdArgs<T> bwd_args(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                    const Tensor& lse, Tensor& dq, Tensor& dk, Tensor& dv, bool causal, double scale) {
  BwdArgs<T> a{};
  fill_qkv<T>(a, q, k, v, lse, causal, scale);
  a.dout = dout.data_ptr<T>();
  a.out = out.data_ptr<T>();
  a.lse = lse.data_ptr<float>();
  a.dq = dq.data_ptr<T>();
  a.dk = dk.data_ptr<T>();
  a.dv = dv.data_ptr<T>();
  a.o_row = out.stride(-3);
  a.o_head = out.stride(-2);
  a.do_row = dout.stride(-3);
  a.do_head = dout.stride(-2);
  a.dq_row = dq.stride(-3);
  a.dq_head = dq.stride(-2);
  a.dk_row = dk.stride(-3);
  a.dk_head = dk.stride(-2);
  a.dv_row = dv.stride(-3);
  a.dv_head = dv.stride(-2);
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

// The sequences of a call. Dense (cu_q == nullptr): sequence i is batch row i, with q.size(1) queries and
// k.size(1) keys. Packed: rows cu_q[i] .. cu_q[i + 1] of q and cu_k[i] .. cu_k[i + 1] of k and v, checked
// here since every row access reads them. A sequence's element offsets are its first row times stride(0):
// the batch stride of a dense tensor, the row stride of a packed one. lse is (b, h, sq) dense, (h, total_q)
// packed. The gradients, when given, are laid out like q, k, v.
std::vector<Seq> make_seqs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                           const Tensor* cu_q, const Tensor* cu_k, int64_t max_q, int64_t max_k,
                           const Tensor* dq = nullptr, const Tensor* dk = nullptr, const Tensor* dv = nullptr) {
  const bool packed = cu_q != nullptr;
  const int32_t* cq = packed ? cu_q->data_ptr<int32_t>() : nullptr;
  const int32_t* ck = packed ? cu_k->data_ptr<int32_t>() : nullptr;
  const int64_t batch = packed ? cu_q->numel() - 1 : q.size(0);
  if (packed) {
    TORCH_CHECK(cq[0] == 0 && ck[0] == 0 && cq[batch] == q.size(0) && ck[batch] == k.size(0),
                "cu_seqlens must start at 0 and end at the packed lengths (", q.size(0), ", ", k.size(0), ")");
  }
  std::vector<Seq> seqs;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t q0 = packed ? cq[i] : i, k0 = packed ? ck[i] : i;
    const int64_t sq = packed ? cq[i + 1] - q0 : q.size(1), sk = packed ? ck[i + 1] - k0 : k.size(1);
    if (packed) {
      TORCH_CHECK(sq >= 0 && sk >= 0, "cu_seqlens must never decrease (sequence ", i, ")");
      TORCH_CHECK(sq <= max_q && sk <= max_k, "sequence ", i, " (", sq, ", ", sk,
                  ") is longer than max_seqlen_q/k (", max_q, ", ", max_k, ")");
    }
    Seq sd{q0 * q.stride(0), k0 * k.stride(0), k0 * v.stride(0), q0 * out.stride(0),
           packed ? q0 * lse.stride(1) : q0 * lse.stride(0), sq, sk};
    if (dq != nullptr) {
      sd.dq_off = q0 * dq->stride(0);
      sd.dk_off = k0 * dk->stride(0);
      sd.dv_off = k0 * dv->stride(0);
    }
    seqs.push_back(sd);
  }
  return seqs;
}

std::tuple<Tensor, Tensor> attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* cu_q,
                                    const Tensor* cu_k, int64_t max_q, int64_t max_k, bool causal, double scale,
                                    const BiasArgs* bias = nullptr) {
  check_attn_args(q, k, v, cu_q != nullptr ? 1 : 2);
  if (cu_q != nullptr) check_varlen_args(q, k, *cu_q, *cu_k);
  const int64_t h = q.size(-2);
  const auto f32 = q.options().dtype(at::kFloat);
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = cu_q != nullptr ? at::empty({h, q.size(0)}, f32) : at::empty({q.size(0), h, q.size(1)}, f32);
  std::vector<Seq> seqs = make_seqs(q, k, v, out, lse, cu_q, cu_k, max_q, max_k);
  dispatch_float(q.scalar_type(), "attention (CPU)", [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a = fwd_args<T>(q, k, v, out, lse, causal, scale);
    if (bias != nullptr) a.bias = *bias;
    run_fwd(a, seqs);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attn_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                            const Tensor& out, const Tensor& lse, const Tensor* cu_q,
                                            const Tensor* cu_k, int64_t max_q, int64_t max_k, bool causal,
                                            double scale, const BiasArgs* bias = nullptr) {
  const bool packed = cu_q != nullptr;
  check_attn_args(q, k, v, packed ? 1 : 2);
  if (packed) check_varlen_args(q, k, *cu_q, *cu_k);
  const int64_t h = q.size(-2);
  const std::vector<int64_t> lse_shape =
      packed ? std::vector<int64_t>{h, q.size(0)} : std::vector<int64_t>{q.size(0), h, q.size(1)};
  check_attn_bwd_args(dout, out, lse, q, lse_shape);
  // dout and out share the per-sequence offsets, so both are made contiguous (like q's layout).
  const Tensor dO = dout.contiguous(), o = out.contiguous(), l = lse.contiguous();
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  std::vector<Seq> seqs = make_seqs(q, k, v, o, l, cu_q, cu_k, max_q, max_k, &dq, &dk, &dv);
  dispatch_float(q.scalar_type(), "attention (CPU)", [&](auto tag) {
    using T = decltype(tag);
    BwdArgs<T> a = bwd_args<T>(dO, q, k, v, o, l, dq, dk, dv, causal, scale);
    if (bias != nullptr) a.bias = *bias;
    run_bwd(a, seqs);
  });
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> cpu_attn_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale) {
  return attn_fwd(q, k, v, nullptr, nullptr, 0, 0, causal, scale);
}

std::tuple<Tensor, Tensor> cpu_attn_varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                               int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                               double scale) {
  return attn_fwd(q, k, v, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale);
}

std::tuple<Tensor, Tensor, Tensor> cpu_attn_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                const Tensor& v, const Tensor& out, const Tensor& lse, bool causal,
                                                double scale) {
  return attn_bwd(dout, q, k, v, out, lse, nullptr, nullptr, 0, 0, causal, scale);
}

std::tuple<Tensor, Tensor, Tensor> cpu_attn_varlen_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                       double scale) {
  return attn_bwd(dout, q, k, v, out, lse, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale);
}

Tensor paged_attn(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                  const Tensor& cache_seqlens, double scale, const BiasArgs* bias) {
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
  dispatch_float(q.scalar_type(), "attention (CPU)", [&](auto tag) {
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
    if (bias != nullptr) a.bias = *bias;
    // Tasks are (batch, kv head, row tile, split) in index order: every task of a batch row costs
    // about the same, so no sorting is needed.
    parallel_tasks(base * splits, Scratch::floats(d), [&](int64_t t, float* scratch) {
      PLM_CPU_CALL(paged_task, a, t, scratch);
    });
    T* o = out.data_ptr<T>();
    at::parallel_for(0, b * hkv * rows_total, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) paged_merge(a, o, t);
    });
  });
  return out;
}

Tensor cpu_paged_attn(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                      const Tensor& cache_seqlens, double scale) {
  return paged_attn(q, k_cache, v_cache, block_table, cache_seqlens, scale, nullptr);
}

std::tuple<Tensor, Tensor> cpu_attn_rpb_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& table,
                                            const Tensor& buckets, bool causal, double scale) {
  check_bias_args(table, buckets, q);
  const BiasRows bias(table, buckets);
  return attn_fwd(q, k, v, nullptr, nullptr, 0, 0, causal, scale, &bias.args);
}

std::tuple<Tensor, Tensor> cpu_attn_varlen_rpb_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& table, const Tensor& buckets,
                                                   const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
                                                   double scale) {
  check_bias_args(table, buckets, q);
  const BiasRows bias(table, buckets);
  return attn_fwd(q, k, v, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, &bias.args);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_attn_rpb_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& out, const Tensor& lse,
                                                            const Tensor& table, const Tensor& buckets, bool causal,
                                                            double scale) {
  check_bias_args(table, buckets, q);
  BiasRows bias(table, buckets);
  Tensor dtable = at::zeros_like(table);
  bias.args.dtable = dtable.data_ptr<float>();
  auto [dq, dk, dv] = attn_bwd(dout, q, k, v, out, lse, nullptr, nullptr, 0, 0, causal, scale, &bias.args);
  return {dq, dk, dv, dtable};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> cpu_attn_varlen_rpb_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const Tensor& table, const Tensor& buckets, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, double scale) {
  check_bias_args(table, buckets, q);
  BiasRows bias(table, buckets);
  Tensor dtable = at::zeros_like(table);
  bias.args.dtable = dtable.data_ptr<float>();
  auto [dq, dk, dv] = attn_bwd(dout, q, k, v, out, lse, &cu_seqlens_q, &cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               causal, scale, &bias.args);
  return {dq, dk, dv, dtable};
}

Tensor cpu_paged_attn_rpb(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_table,
                          const Tensor& cache_seqlens, const Tensor& table, const Tensor& buckets, double scale) {
  check_bias_args(table, buckets, q);
  const BiasRows bias(table, buckets);
  return paged_attn(q, k_cache, v_cache, block_table, cache_seqlens, scale, &bias.args);
}

void cpu_write_kv_cache(const Tensor& k, const Tensor& v, Tensor k_cache, Tensor v_cache, const Tensor& slot_mapping) {
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

}  // namespace
}  // namespace plm_engine

PLM_REGISTER_KERNELS(CPU, cpu, attn_fwd, attn_bwd, attn_varlen_fwd, attn_varlen_bwd, paged_attn, write_kv_cache,
                               attn_rpb_fwd, attn_rpb_bwd, attn_varlen_rpb_fwd, attn_varlen_rpb_bwd, paged_attn_rpb)
