// The ragged CPU MoE kernel: every routed expert at its own width, no tile rounding, one call per
// layer (model_patches/vllm/ragged_pack.py builds the layout). Why its own kernel: vLLM's CPU
// grouped GEMM tiles the intermediate dim by 32, so an expert pruned from 64 to 40 neurons still
// costs 64, and every extra call or slot costs more than pruning saves on small layers. Here each
// expert's weights are packed exactly (2 n H + n H values for width n), so pruned neurons cost no
// bytes and no FLOPs.
//
// bf16: AVX512-BF16 `vdpbf16ps` on VNNI-paired weights (fp32 accumulation, the SiLU product rounded
// to bf16 before the down GEMM, as vLLM's kernel does); fp32: AVX-512 FMA. Built only on CPUs with
// avx512_bf16 (model_patches/vllm/cpu_ext.py); elsewhere the layer keeps vLLM's kernel.
//
// AMX (Sapphire Rapids and later): an expert with at least `amx_rows` pairs in the batch runs its
// bf16 GEMMs on AMX tiles (TDPBF16PS, 16 pairs x 16 outputs x 32 k per instruction) over the SAME
// packed layout: the VNNI k-pair rows of a gate/up block and the neuron-pair rows of a down block are
// already B tiles (loaded with their row stride). Few pairs stay on AVX-512 (a decode step reads each
// weight once either way; AMX wins where weights are reused across many rows, as in prefill). AMX
// needs the kernel's per-process permission (arch_prctl), asked once; without it, or with
// HEAPR_RAGGED_AMX=0, everything runs on AVX-512.
//
// Layout of expert e (n neurons, H hidden), in elements of the weight dtype, from w13_off[e] / w2_off[e]:
//   w13: neuron blocks of 16 (the last may be narrower, bw); block b holds, for each k-step, bw gate
//        then bw up values; bf16 k-steps are pairs (k, k+1) interleaved per neuron (VNNI), fp32 single k.
//   w2:  H blocks of 64 outputs (the last may be narrower, hw), block at h0 from offset h0 * n; in a
//        block, bf16: per neuron pair (i, i+1) the hw (w[h][i], w[h][i+1]) pairs, then an odd last
//        neuron's hw values; fp32: per neuron i its hw values.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t NB = 16;    // neurons per w13 block (one zmm of fp32 outputs)
constexpr int64_t PF = 1024;  // AVX-512 path: prefetch distance in weight elements (2 KiB of bf16)

// exp(x) for x <= 0 ... any x, Cephes-style: 2^n * p(r), |error| ~ 1 ulp in fp32
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365447504f));
  __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500E-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073E-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894E-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459E-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201E-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, fx);
}

inline __m512 silu_mul(__m512 g, __m512 u) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g)))), u);
}

inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
inline __mmask32 mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }

// bf16 <-> fp32 on raw 16-bit storage
inline __m512 load_bf16_ps(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline void store_ps_bf16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

// Everything one call needs, shared by the phases below.
struct Plan {
  int64_t T, H, K, E, P;              // tokens, hidden, top-k, experts, pairs (T*K)
  const int64_t* id;                  // [T*K]
  const float* wt;                    // [T*K]
  const int32_t* width;               // [E]
  const int64_t* w13_off;             // [E]
  const int64_t* w2_off;              // [E]
  std::vector<int64_t> start, order;  // pairs of expert e: order[start[e] .. start[e+1])
  int64_t act_stride;                 // row stride of the activation buffer (elements)
  int64_t amx_rows;                   // experts with at least this many pairs run on AMX (0: none)
};

// The activation buffer's rows are the pairs in sorted order (row s = pair order[s]), so that the
// rows of one expert are contiguous: an AMX A tile is 16 equally spaced rows.

// ---- gate/up GEMM + SiLU product: act[p][0..n) for MR pairs of one expert, one neuron block -------

template <int MR>
void gate_up_bf16(const Plan& pl, const uint16_t* x, const uint16_t* blk, int64_t bw, const int64_t* pairs,
                  int64_t s0, uint16_t* act, int64_t col) {
  const int64_t H2 = pl.H / 2;
  const __mmask32 m = mask32(2 * bw);
  __m512 g[MR], u[MR];
  const int32_t* xr[MR];
  for (int r = 0; r < MR; ++r) {
    g[r] = _mm512_setzero_ps();
    u[r] = _mm512_setzero_ps();
    xr[r] = reinterpret_cast<const int32_t*>(x + (pairs[r] / pl.K) * pl.H);
  }
  for (int64_t k2 = 0; k2 < H2; ++k2) {
    const uint16_t* w = blk + k2 * 4 * bw;
    _mm_prefetch(reinterpret_cast<const char*>(w + PF), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + PF + 32), _MM_HINT_T0);
    const __m512bh wg = (__m512bh)_mm512_maskz_loadu_epi16(m, w);
    const __m512bh wu = (__m512bh)_mm512_maskz_loadu_epi16(m, w + 2 * bw);
    for (int r = 0; r < MR; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xr[r][k2]);
      g[r] = _mm512_dpbf16_ps(g[r], xb, wg);
      u[r] = _mm512_dpbf16_ps(u[r], xb, wu);
    }
  }
  for (int r = 0; r < MR; ++r) store_ps_bf16(act + (s0 + r) * pl.act_stride + col, silu_mul(g[r], u[r]), mask16(bw));
}

template <int MR>
void gate_up_f32(const Plan& pl, const float* x, const float* blk, int64_t bw, const int64_t* pairs, int64_t s0,
                 float* act, int64_t col) {
  const __mmask16 m = mask16(bw);
  __m512 g[MR], u[MR];
  const float* xr[MR];
  for (int r = 0; r < MR; ++r) {
    g[r] = _mm512_setzero_ps();
    u[r] = _mm512_setzero_ps();
    xr[r] = x + (pairs[r] / pl.K) * pl.H;
  }
  for (int64_t k = 0; k < pl.H; ++k) {
    const float* w = blk + k * 2 * bw;
    const __m512 wg = _mm512_maskz_loadu_ps(m, w);
    const __m512 wu = _mm512_maskz_loadu_ps(m, w + bw);
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(xr[r][k]);
      g[r] = _mm512_fmadd_ps(xb, wg, g[r]);
      u[r] = _mm512_fmadd_ps(xb, wu, u[r]);
    }
  }
  for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(act + (s0 + r) * pl.act_stride + col, m, silu_mul(g[r], u[r]));
}

// ---- down GEMM: out[token of p][h0 .. h0 + 16 NV) += weight_p * act[p][0..n) . W2[h][0..n), MR pairs ---

template <int MR, int NV>
void down_bf16(const Plan& pl, const uint16_t* w2, int64_t n, int64_t h0, int64_t hw, const int64_t* pairs,
               int64_t s0, const uint16_t* act, float* out) {
  // w2 is this expert's H block at h0 (hw wide): hw (w[h][i], w[h][i+1]) pairs per neuron pair, contiguous
  __m512 acc[MR][NV];
  const int32_t* ar[MR];
  for (int r = 0; r < MR; ++r) {
    ar[r] = reinterpret_cast<const int32_t*>(act + (s0 + r) * pl.act_stride);
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const int64_t n2 = n / 2;
  for (int64_t i2 = 0; i2 < n2; ++i2) {
    const uint16_t* w = w2 + i2 * 2 * hw;
    for (int v = 0; v < NV; ++v) _mm_prefetch(reinterpret_cast<const char*>(w + PF + 32 * v), _MM_HINT_T0);
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(w + 32 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(ar[r][i2]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, wv[v]);
    }
  }
  if (n & 1) {  // the odd last neuron: its hw values stand alone after the pairs
    const uint16_t* w = w2 + n2 * 2 * hw;
    for (int r = 0; r < MR; ++r) {
      const uint32_t bits = static_cast<uint32_t>(act[(s0 + r) * pl.act_stride + n - 1]) << 16;
      float a;
      std::memcpy(&a, &bits, 4);
      const __m512 av = _mm512_set1_ps(a);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, load_bf16_ps(w + 16 * v, 0xFFFF), acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(pl.wt[pairs[r]]);
    float* o = out + (pairs[r] / pl.K) * pl.H + h0;
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(acc[r][v], s, _mm512_loadu_ps(o + 16 * v)));
  }
}

template <int MR, int NV>
void down_f32(const Plan& pl, const float* w2, int64_t n, int64_t h0, int64_t hw, const int64_t* pairs,
              int64_t s0, const float* act, float* out) {
  // w2 is this expert's H block at h0: hw values per neuron, contiguous
  __m512 acc[MR][NV];
  const float* ar[MR];
  for (int r = 0; r < MR; ++r) {
    ar[r] = act + (s0 + r) * pl.act_stride;
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* w = w2 + i * hw;
    __m512 wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(w + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(ar[r][i]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const __m512 s = _mm512_set1_ps(pl.wt[pairs[r]]);
    float* o = out + (pairs[r] / pl.K) * pl.H + h0;
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(acc[r][v], s, _mm512_loadu_ps(o + 16 * v)));
  }
}

// row blocks: up to 8 pairs per gate/up tile, 4 per down tile (register budget: 16 accumulators)
constexpr int64_t MR_UP = 8, MR_DOWN = 4, NV_DOWN = 4;

template <typename T>
void gate_up_rows(const Plan& pl, const T* x, const T* blk, int64_t bw, const int64_t* pairs, int64_t s0,
                  int64_t rows, T* act, int64_t col) {
#define HEAPR_UP(R)                                                                                   \
  case R:                                                                                             \
    if constexpr (std::is_same_v<T, uint16_t>) gate_up_bf16<R>(pl, x, blk, bw, pairs, s0, act, col);  \
    else gate_up_f32<R>(pl, x, blk, bw, pairs, s0, act, col);                                         \
    break;
  switch (rows) { HEAPR_UP(1) HEAPR_UP(2) HEAPR_UP(3) HEAPR_UP(4) HEAPR_UP(5) HEAPR_UP(6) HEAPR_UP(7) HEAPR_UP(8) }
#undef HEAPR_UP
}

template <typename T, int NV>
void down_rows_nv(const Plan& pl, const T* w2, int64_t n, int64_t h0, const int64_t* pairs, int64_t s0, int64_t rows,
                  const T* act, float* out) {
  const int64_t hw = 16 * NV;
#define HEAPR_DOWN(R)                                                                                 \
  case R:                                                                                             \
    if constexpr (std::is_same_v<T, uint16_t>) down_bf16<R, NV>(pl, w2, n, h0, hw, pairs, s0, act, out); \
    else down_f32<R, NV>(pl, w2, n, h0, hw, pairs, s0, act, out);                                       \
    break;
  switch (rows) { HEAPR_DOWN(1) HEAPR_DOWN(2) HEAPR_DOWN(3) HEAPR_DOWN(4) }
#undef HEAPR_DOWN
}

template <typename T>
void down_rows(const Plan& pl, const T* w2, int64_t n, int64_t h0, int64_t hv, const int64_t* pairs, int64_t s0,
               int64_t rows, const T* act, float* out) {
  switch (hv) {  // zmm vectors of output (16 each) left in this H block
    case 1: down_rows_nv<T, 1>(pl, w2, n, h0, pairs, s0, rows, act, out); break;
    case 2: down_rows_nv<T, 2>(pl, w2, n, h0, pairs, s0, rows, act, out); break;
    case 3: down_rows_nv<T, 3>(pl, w2, n, h0, pairs, s0, rows, act, out); break;
    default: down_rows_nv<T, 4>(pl, w2, n, h0, pairs, s0, rows, act, out); break;
  }
}

// ---- AMX tiles (bf16) ---------------------------------------------------------------------------
// One tile configuration for every phase: eight tiles of 16 rows x 64 bytes. Gate/up: accumulators
// of 16 pairs x 16 neurons (fp32), x rows of 16 pairs x 32 k, gate and up weights of 16 k-pair rows x
// 16 neurons (see gate_up_amx). Down: tmm0-3 the accumulators of the block's 16-
// output vectors, tmm4 the activations (16 pairs x 32 neurons), tmm5 the weights (16 neuron-pair rows
// x 16 outputs). Rows past an expert's last pair compute garbage that is never stored.

// pairs per expert from which AMX beats AVX-512 (`tools/bench_cpu_kernel.py --amx-rows 0 1 2 4 8`:
// 1 loses at 1-4 tokens, 8 at 16-64 tokens on the bundled shapes; 2 and 4 are level at Qwen3 shapes)
constexpr int64_t AMX_DEFAULT_ROWS = 2;

bool amx_permitted() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    const char* env = std::getenv("HEAPR_RAGGED_AMX");
    if (env && std::strcmp(env, "0") == 0) return false;
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

std::atomic<int64_t> g_amx_rows{-1};  // -1: not decided yet

int64_t amx_rows_now() {
  int64_t v = g_amx_rows.load();
  if (v < 0) {
    v = amx_permitted() ? AMX_DEFAULT_ROWS : 0;
    g_amx_rows.store(v);
  }
  return v;
}

// The weight bytes of the next step, AMX_PF bytes ahead of the tile loads: the hardware streamer
// alone left ~7 % of the time at 256 tokens (Qwen3 shapes) waiting on memory
constexpr int64_t AMX_PF = 4096;
inline void prefetch_ahead(const uint16_t* w, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(w) + AMX_PF;
  for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_begin() {
  // palette 1; bytes 16.. the tiles' row sizes (uint16), 48.. their row counts
  struct alignas(64) Config { unsigned char b[64]; } cfg = {};
  cfg.b[0] = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.b[16 + 2 * t] = 64;
    cfg.b[48 + t] = 16;
  }
  // not _tile_loadconfig: GCC 12's declares an 8-byte operand, so the stores above are dropped as dead
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

__attribute__((target("amx-tile,amx-bf16"))) void amx_end() { _tile_release(); }

// act rows [s, s + c) of one expert, neuron block at col (bw wide): silu(gate x) * up x, from the
// gathered x rows xg[s ..] (the expert's pairs in order, H contiguous bf16 each). Two row blocks (32
// pairs) per pass share each weight tile: tmm0/1 gate/up of the first 16 rows, tmm2/3 of the next,
// tmm4/5 their x rows, tmm6/7 the gate and up weights.
__attribute__((target("amx-tile,amx-bf16"))) void gate_up_amx(const Plan& pl, const uint16_t* xg,
                                                             const uint16_t* blk, int64_t bw, int64_t s, int64_t c,
                                                             uint16_t* act, int64_t col) {
  alignas(64) float cg[2][256], cu[2][256];
  const int64_t H = pl.H;
  for (int64_t r0 = 0; r0 < c; r0 += 32) {
    const bool two = c - r0 > 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* a = xg + (s + r0) * H;
    for (int64_t k = 0; k < H; k += 32) {
      // k-pair rows k/2 .. k/2 + 15 of the block: bw gate pairs then bw up pairs each (stride 4 bw
      // elements); a narrower block's extra columns read its up values or the next row, never stored
      const uint16_t* w = blk + (k / 2) * 4 * bw;
      prefetch_ahead(w, 128 * bw);
      _tile_loadd(4, a + k, H * 2);
      _tile_loadd(6, w, 8 * bw);
      _tile_loadd(7, w + 2 * bw, 8 * bw);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (two) {
        _tile_loadd(5, a + 16 * H + k, H * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, cg[0], 64);
    _tile_stored(1, cu[0], 64);
    if (two) {
      _tile_stored(2, cg[1], 64);
      _tile_stored(3, cu[1], 64);
    }
    const int64_t mr = std::min<int64_t>(32, c - r0);
    for (int64_t r = 0; r < mr; ++r)
      store_ps_bf16(act + (s + r0 + r) * pl.act_stride + col,
                    silu_mul(_mm512_load_ps(cg[r / 16] + 16 * (r % 16)), _mm512_load_ps(cu[r / 16] + 16 * (r % 16))), mask16(bw));
  }
}

// One expert's pairs, H block h0 (hv vectors of 16 outputs): out[token] += the router weight times
// act . W2^T; the neuron pairs past the last full 16 (and an odd last neuron) go through a zero-padded
// copy of their weight rows, against activation columns that are zero past the width
__attribute__((target("amx-tile,amx-bf16"))) void down_amx(const Plan& pl, const uint16_t* blk, int64_t n, int64_t h0,
                                                          int64_t hv, const int64_t* pairs, int64_t s, int64_t c,
                                                          const uint16_t* act, float* out) {
  const int64_t hw = 16 * hv, n2 = n / 2, full = n2 / 16;
  const bool tail = (n2 % 16) != 0 || (n & 1);
  alignas(64) uint16_t tb[4][16 * 32];
  if (tail) {
    std::memset(tb, 0, sizeof(tb));
    for (int64_t v = 0; v < hv; ++v) {
      for (int64_t i2 = full * 16; i2 < n2; ++i2) std::memcpy(tb[v] + (i2 - full * 16) * 32, blk + i2 * 2 * hw + 32 * v, 64);
      if (n & 1) {  // the odd neuron's values stand alone after the pairs: (w, 0) pairs
        const uint16_t* w = blk + n2 * 2 * hw + 16 * v;
        for (int q = 0; q < 16; ++q) tb[v][(n2 - full * 16) * 32 + 2 * q] = w[q];
      }
    }
  }
  alignas(64) float cb[4][256];
  const int64_t as = pl.act_stride * 2;
  for (int64_t r0 = 0; r0 < c; r0 += 16) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint16_t* a = act + (s + r0) * pl.act_stride;
    for (int64_t t = 0; t < full; ++t) {
      _tile_loadd(4, a + 32 * t, as);
      const uint16_t* w = blk + t * 32 * hw;  // 16 neuron-pair rows of 2 hw values
      prefetch_ahead(w, 64 * hw);
      _tile_loadd(5, w, 4 * hw);
      _tile_dpbf16ps(0, 4, 5);
      if (hv > 1) { _tile_loadd(5, w + 32, 4 * hw); _tile_dpbf16ps(1, 4, 5); }
      if (hv > 2) { _tile_loadd(5, w + 64, 4 * hw); _tile_dpbf16ps(2, 4, 5); }
      if (hv > 3) { _tile_loadd(5, w + 96, 4 * hw); _tile_dpbf16ps(3, 4, 5); }
    }
    if (tail) {
      _tile_loadd(4, a + 32 * full, as);
      _tile_loadd(5, tb[0], 64);
      _tile_dpbf16ps(0, 4, 5);
      if (hv > 1) { _tile_loadd(5, tb[1], 64); _tile_dpbf16ps(1, 4, 5); }
      if (hv > 2) { _tile_loadd(5, tb[2], 64); _tile_dpbf16ps(2, 4, 5); }
      if (hv > 3) { _tile_loadd(5, tb[3], 64); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, cb[0], 64);
    if (hv > 1) _tile_stored(1, cb[1], 64);
    if (hv > 2) _tile_stored(2, cb[2], 64);
    if (hv > 3) _tile_stored(3, cb[3], 64);
    const int64_t mr = std::min<int64_t>(16, c - r0);
    for (int64_t r = 0; r < mr; ++r) {
      const int64_t p = pairs[r0 + r];
      const __m512 sc = _mm512_set1_ps(pl.wt[p]);
      float* o = out + (p / pl.K) * pl.H + h0;
      for (int64_t v = 0; v < hv; ++v)
        _mm512_storeu_ps(o + 16 * v, _mm512_fmadd_ps(_mm512_load_ps(cb[v] + 16 * r), sc, _mm512_loadu_ps(o + 16 * v)));
    }
  }
}

// Which experts run on AMX in this call (bf16 only; hidden a multiple of 32, the tile's k).
template <typename T>
std::vector<char> amx_experts(const Plan& pl) {
  std::vector<char> use(pl.E, 0);
  if (!std::is_same_v<T, uint16_t> || pl.amx_rows <= 0 || pl.H % 32 != 0) return use;
  for (int64_t e = 0; e < pl.E; ++e) use[e] = pl.width[e] > 0 && pl.start[e + 1] - pl.start[e] >= pl.amx_rows;
  return use;
}

template <typename T>
void run(const Plan& pl, const T* x, const T* w13, const T* w2, T* act, T* xg, float* out) {
  const int64_t H = pl.H, E = pl.E;
  const int64_t HB = 16 * NV_DOWN;
  const int64_t hblocks = (H + HB - 1) / HB;
  const std::vector<char> amx = amx_experts<T>(pl);
  const bool any_amx = std::find(amx.begin(), amx.end(), 1) != amx.end();
  if (any_amx) {  // the AMX experts' x rows, gathered in pair order (an A tile is 16 equally spaced rows)
    at::parallel_for(0, pl.P, 64, [&](int64_t b, int64_t e_) {
      for (int64_t s = b; s < e_; ++s) {
        const int64_t p = pl.order[s];
        if (amx[pl.id[p]]) std::memcpy(xg + s * H, x + (p / pl.K) * H, H * sizeof(T));
      }
    });
  }
  // gate/up: one item per (expert, neuron block), looping over all of the expert's pairs, so a
  // weight block is read from memory once and reused from cache
  struct Item { int64_t e, j; };
  std::vector<Item> up_items;
  for (int64_t e = 0; e < E; ++e) {
    if (pl.start[e + 1] == pl.start[e] || pl.width[e] == 0) continue;
    for (int64_t j = 0; j < pl.width[e]; j += NB) up_items.push_back({e, j});
  }
  at::parallel_for(0, static_cast<int64_t>(up_items.size()), 1, [&](int64_t b, int64_t e_) {
    bool tiles = false;
    for (int64_t i = b; i < e_; ++i) {
      const Item& it = up_items[i];
      const int64_t bw = std::min(NB, pl.width[it.e] - it.j);
      const int64_t s = pl.start[it.e], c = pl.start[it.e + 1] - s;
      const int64_t* pairs = pl.order.data() + s;
      const T* blk = w13 + pl.w13_off[it.e] + it.j * 2 * H;
      if constexpr (std::is_same_v<T, uint16_t>) {
        if (amx[it.e]) {
          if (!tiles) amx_begin(), tiles = true;
          gate_up_amx(pl, xg, blk, bw, s, c, act, it.j);
          continue;
        }
      }
      for (int64_t r = 0; r < c; r += MR_UP)
        gate_up_rows<T>(pl, x, blk, bw, pairs + r, s + r, std::min(MR_UP, c - r), act, it.j);
    }
    if (tiles) amx_end();
  });
  // down: each thread owns a range of H blocks (their output columns: no races) and walks the
  // experts in id order, each expert's blocks in turn (its w2 is read front to back), adding its
  // pairs' outputs into the tokens' rows; every output sums in that order whatever the thread count
  at::parallel_for(0, hblocks, 1, [&](int64_t b, int64_t e_) {
    bool tiles = false;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t n = pl.width[e], s = pl.start[e], c = pl.start[e + 1] - s;
      if (n == 0 || c == 0) continue;
      const int64_t* pairs = pl.order.data() + s;
      for (int64_t hb = b; hb < e_; ++hb) {
        const int64_t h0 = hb * HB, hv = std::min(NV_DOWN, (H - h0) / 16);
        const T* blk = w2 + pl.w2_off[e] + h0 * n;  // H block h0 of the expert: (its width) x n values
        if constexpr (std::is_same_v<T, uint16_t>) {
          if (amx[e]) {
            if (!tiles) amx_begin(), tiles = true;
            down_amx(pl, blk, n, h0, hv, pairs, s, c, act, out);
            continue;
          }
        }
        for (int64_t r = 0; r < c; r += MR_DOWN)
          down_rows<T>(pl, blk, n, h0, hv, pairs + r, s + r, std::min(MR_DOWN, c - r), act, out);
      }
    }
    if (tiles) amx_end();
  });
}

// One chunk of tokens: x [T, H] contiguous, ids int64 [T, K], wts fp32 [T, K]; returns [T, H] in x's dtype.
at::Tensor ragged_chunk(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts, const at::Tensor& widths,
                        const at::Tensor& w13_off, const at::Tensor& w2_off, const at::Tensor& w13, const at::Tensor& w2,
                        int64_t max_width) {
  Plan pl;
  pl.T = x.size(0);
  pl.H = x.size(1);
  pl.K = ids.size(1);
  pl.E = widths.numel();
  pl.P = pl.T * pl.K;
  pl.id = ids.data_ptr<int64_t>();
  pl.wt = wts.data_ptr<float>();
  pl.width = widths.data_ptr<int32_t>();
  pl.w13_off = w13_off.data_ptr<int64_t>();
  pl.w2_off = w2_off.data_ptr<int64_t>();
  // counting sort of the pairs by expert, stable
  pl.start.assign(pl.E + 1, 0);
  for (int64_t p = 0; p < pl.P; ++p) {
    const int64_t e = pl.id[p];
    TORCH_CHECK(e >= 0 && e < pl.E, "expert id ", e, " out of range");
    ++pl.start[e + 1];
  }
  for (int64_t e = 0; e < pl.E; ++e) pl.start[e + 1] += pl.start[e];
  pl.order.resize(pl.P);
  {
    std::vector<int64_t> next(pl.start.begin(), pl.start.end() - 1);
    for (int64_t p = 0; p < pl.P; ++p) pl.order[next[pl.id[p]]++] = p;
  }
  pl.act_stride = std::max<int64_t>(32, (max_width + 31) / 32 * 32);
  pl.amx_rows = x.scalar_type() == at::kBFloat16 ? amx_rows_now() : 0;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor out = at::zeros({pl.T, pl.H}, f32);
  if (x.scalar_type() == at::kBFloat16) {
    const bool tiles = pl.amx_rows > 0;
    // AMX reads 16 rows and whole 32-neuron columns: 16 spare rows, and columns past a width are zero
    at::Tensor act = tiles ? at::zeros({pl.P + 16, pl.act_stride}, x.options()) : at::empty({pl.P, pl.act_stride}, x.options());
    at::Tensor xg = at::empty({tiles ? pl.P + 16 : 0, pl.H}, x.options());
    run<uint16_t>(pl, reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<const uint16_t*>(w13.data_ptr()),
                  reinterpret_cast<const uint16_t*>(w2.data_ptr()), reinterpret_cast<uint16_t*>(act.data_ptr()),
                  reinterpret_cast<uint16_t*>(xg.data_ptr()), out.data_ptr<float>());
    return out.to(at::kBFloat16);
  }
  at::Tensor act = at::empty({pl.P, pl.act_stride}, x.options());
  run<float>(pl, x.data_ptr<float>(), w13.data_ptr<float>(), w2.data_ptr<float>(), act.data_ptr<float>(), nullptr,
             out.data_ptr<float>());
  return out;
}

at::Tensor ragged_moe(const at::Tensor& x_in, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                      const at::Tensor& widths, const at::Tensor& w13_off, const at::Tensor& w2_off, const at::Tensor& w13,
                      const at::Tensor& w2, int64_t max_width) {
  TORCH_CHECK(x_in.dim() == 2 && topk_ids.dim() == 2 && topk_weights.sizes() == topk_ids.sizes() &&
              topk_ids.size(0) == x_in.size(0), "ragged_moe: shapes");
  TORCH_CHECK(x_in.scalar_type() == w13.scalar_type() && w13.scalar_type() == w2.scalar_type(), "ragged_moe: dtypes");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, "ragged_moe: bf16 or fp32 only");
  TORCH_CHECK(widths.scalar_type() == at::kInt && w13_off.scalar_type() == at::kLong && w2_off.scalar_type() == at::kLong &&
              w13_off.numel() == widths.numel() && w2_off.numel() == widths.numel(), "ragged_moe: widths and offsets");
  TORCH_CHECK(w13.is_contiguous() && w2.is_contiguous() && widths.is_contiguous() && w13_off.is_contiguous() &&
              w2_off.is_contiguous(), "ragged_moe: packed tensors must be contiguous");
  TORCH_CHECK(x_in.size(1) % 16 == 0, "ragged_moe: hidden size must be a multiple of 16");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), H = x.size(1), K = std::max<int64_t>(1, ids.size(1));
  // tokens per chunk: the per-pair buffers (gathered x rows, activations) stay bounded, 64 MiB /
  // (K H 4 B) tokens (a long prefill would otherwise allocate T * K * H values at once); every weight
  // block is read once per chunk
  const int64_t chunk = std::max<int64_t>(16, (int64_t(64) << 20) / (K * H * 4));
  if (T <= chunk) return ragged_chunk(x, ids, wts, widths, w13_off, w2_off, w13, w2, max_width);
  at::Tensor out = at::empty_like(x);
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t n = std::min(chunk, T - t0);
    out.narrow(0, t0, n).copy_(ragged_chunk(x.narrow(0, t0, n), ids.narrow(0, t0, n), wts.narrow(0, t0, n), widths,
                                            w13_off, w2_off, w13, w2, max_width));
  }
  return out;
}

}  // namespace

// The AMX threshold: experts with at least `rows` pairs in a call run on AMX; rows < 0 leaves it as
// is, 0 turns AMX off. Returns the threshold in force (0 where AMX is unavailable). For tests and benches.
int64_t ragged_amx_rows(int64_t rows) {
  if (rows >= 0) g_amx_rows.store(amx_permitted() ? rows : 0);
  return amx_rows_now();
}

TORCH_LIBRARY_FRAGMENT(heapr_cpu, m) {
  m.def("ragged_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor widths, Tensor w13_off, Tensor w2_off, "
        "Tensor w13, Tensor w2, int max_width) -> Tensor");
  m.def("ragged_amx_rows(int rows) -> int", &ragged_amx_rows);
}

TORCH_LIBRARY_IMPL(heapr_cpu, CPU, m) { m.impl("ragged_moe", &ragged_moe); }
