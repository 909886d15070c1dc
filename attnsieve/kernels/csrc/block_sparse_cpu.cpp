// Block-sparse attention on CPU: one fused pass per query block, flash-style, in float32 or bf16.
//
// Each item (a query block of R rows) visits its key blocks in place: a small GEMM for the
// scores, token masks only on partial tiles, an online softmax kept in row-sized buffers (always
// float32), and a second small GEMM that adds the probabilities times the value block into a
// float32 output. Nothing is gathered and no score tensor outlives its tile. Items run in parallel
// (OpenMP, dynamic schedule); the GEMMs run single-threaded inside the parallel region.
//
// Two tile engines share that loop:
// - float32: MKL's sgemm (exported by torch's libtorch_cpu) reads q, k and v where they lie.
// - bfloat16: bf16 products with float32 accumulation on the CPU's bf16 matrix units. Where the
//   CPU has AMX tiles and every dimension is a multiple of 32, attnsieve's own tile kernels
//   (amx_gemm: one tile configuration for the whole call, groups of any key blocks summed inside
//   the accumulator tiles, the next group's blocks prefetched between tile products); elsewhere
//   oneDNN's batch-reduce GEMM as torch exposes it (at::native::cpublas::brgemm, the call torch's
//   own CPU flash-attention makes; AVX512-BF16 without AMX). B operands must be in a VNNI layout,
//   so every key block (transposed) and value block is packed once per call, O(T x D) work reused
//   by every query block that visits it; probabilities are rounded to bf16 before the P x V
//   product, as in torch's kernel.
//
// Built on first use by attnsieve/kernels/compiled.py (torch.utils.cpp_extension).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <omp.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

namespace cpublas = at::native::cpublas;
using bf16 = at::BFloat16;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Widest B panel oneDNN's packing takes (its output leading dimension is 16, 32, 48 or 64).
constexpr int kPanel = 64;

// C[R x bs] (row-major, leading dimension ldc) = A[R x D] (row-major) . B[bs x D]^T (row-major)
inline void scores_gemm(const float* a, const float* b, float* c, int R, int bs, int D, float alpha, int ldc) {
  const char t = 'T', n = 'N';
  const float beta = 0.0f;
  // column-major view: C^T (bs x R) = B (bs x D, i.e. B^T col-major transposed) . A^T (D x R)
  sgemm_(&t, &n, &bs, &R, &D, &alpha, b, &D, a, &D, &beta, c, &ldc);
}

// C[R x Dv] (row-major) (+)= P[R x W] (row-major) . V[W x Dv] (row-major)
inline void values_gemm(const float* p, const float* v, float* c, int R, int W, int Dv, bool add = true) {
  const char n = 'N';
  const float one = 1.0f, beta = add ? 1.0f : 0.0f;
  sgemm_(&n, &n, &Dv, &R, &W, &one, v, &Dv, p, &W, &beta, c, &Dv);
}

// Packs B = src[K x N] (row-major, leading dimension ld) into VNNI panels of kPanel columns (the
// last one N % kPanel wide), panel p at dst + p * kPanel * K. N must be a multiple of 16, K even.
inline void pack_panels(const bf16* src, int64_t K, int64_t N, int64_t ld, bf16* dst) {
  for (int64_t p0 = 0; p0 < N; p0 += kPanel) {
    const int64_t w = std::min<int64_t>(kPanel, N - p0);
    cpublas::pack(K, w, ld, w, at::kBFloat16, at::kBFloat16, src + p0, dst + p0 * K);
  }
}

// Packs B = src[K x N] (row-major, leading dimension ld; K even) into one VNNI operand of leading
// dimension N: dst[(k / 2) * 2N + 2n + k % 2] = src[k][n]. Operands of consecutive K ranges packed
// this way lie one after the other, so blocks packed back to back form one deeper operand.
inline void pack_vnni(const bf16* src, int64_t K, int64_t N, int64_t ld, bf16* dst) {
  for (int64_t k = 0; k < K; k += 2) {
    const bf16* r0 = src + k * ld;
    const bf16* r1 = r0 + ld;
    bf16* d = dst + k * N;
    for (int64_t n = 0; n < N; ++n) {
      d[2 * n] = r0[n];
      d[2 * n + 1] = r1[n];
    }
  }
}

// C[M x n] (+)= A[M x K] (row-major, lda) . B (packed by pack_panels from a K x N matrix), for the
// columns of the panels that cover the first n (default: all N) columns.
inline void packed_gemm(const bf16* a, int64_t lda, const bf16* bp, float* c, int64_t ldc, int64_t M, int64_t N,
                        int64_t K, bool add, int64_t n = -1) {
  if (n < 0) n = N;
  for (int64_t p0 = 0; p0 < n; p0 += kPanel) {
    const int64_t w = std::min<int64_t>(kPanel, N - p0);
    cpublas::brgemm(M, w, K, lda, w, ldc, add, a, bp + p0 * K, c + p0, true);
  }
}


// ---------------------------------------------------------------------------------------------
// Own AMX tile micro-kernels for the block kernel's two products (bf16 in, float32 accumulate).
// oneDNN's brgemm, as torch exposes it, takes one (A, B) pair per call and reloads the tile
// configuration whenever the call's shape differs from the previous one, which the score and the
// value products do every block; these kernels share one configuration (all eight tiles 16 rows
// x 64 bytes) for the whole call and sum a run of value blocks inside the tiles. 2 x 2 register
// blocking: four float32 accumulator tiles (32 x 32 outputs), two A tiles and two B tiles.
// Packed operand layout ("tile-major"): B = X^T or X in VNNI pairs, cut into 1 KB tiles of 16
// pair-rows x 16 columns; tile (panel p of 16 columns, chunk c of 32 depth) at ((p * (K / 32)) + c).
// Used where the CPU has AMX bf16 tiles, the kernel may use them (Linux grants the tile state),
// and every dimension is a multiple of 32; ATTNSIEVE_AMX=0 selects oneDNN's brgemm instead.
constexpr int kMaxGroupQueue = 16;  // blocks a prefetch queue holds (keys and values each)
// Lines requested per tile product step: about the next group's blocks over this group's steps
// (measured: 16 beat 0, 4, 8, 24 and 32 at 16k and 32k).
constexpr int kPrefetchLines = 16;
#if defined(__x86_64__) && defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define ATTNSIEVE_HAVE_AMX 1
struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_usable() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;  // AMX-BF16, AMX-TILE
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  }();
  return ok;
}

bool amx_enabled() {
  const char* e = std::getenv("ATTNSIEVE_AMX");
  return amx_usable() && !(e && e[0] == '0');
}

__attribute__((target("amx-tile"))) void amx_configure() {
  AmxConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// Packs src [N x K] (rows = output columns, e.g. a key block [bs x D], row-major, leading
// dimension ld) as the B operand of A . src^T in tile-major VNNI layout (K, N multiples of 32).
void pack_tiles_nk(const bf16* src, int64_t N, int64_t K, int64_t ld, bf16* dst) {
  const int64_t KC = K / 32;
#if defined(__AVX512F__)
  if (ld % 2 == 0) {  // a tile row gathers one 32-bit pair from each of 16 source rows
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(ld / 2)));
    for (int64_t p = 0; p < N / 16; ++p)
      for (int64_t c = 0; c < KC; ++c) {
        const int* base = reinterpret_cast<const int*>(src + p * 16 * ld + c * 32);
        bf16* t = dst + (p * KC + c) * 512;
        for (int i = 0; i < 16; ++i)
          _mm512_storeu_si512(t + i * 32, _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(i)), base, 4));
      }
    return;
  }
#endif
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; k += 2) {
      bf16* t = dst + ((n / 16) * KC + k / 32) * 512 + ((k % 32) / 2) * 32 + (n % 16) * 2;
      t[0] = src[n * ld + k];
      t[1] = src[n * ld + k + 1];
    }
}

// Packs src [K x N] (depth-major, e.g. a value block [bs x Dv]) as the B operand of A . src.
void pack_tiles_kn(const bf16* src, int64_t K, int64_t N, int64_t ld, bf16* dst) {
  const int64_t KC = K / 32;
#if defined(__AVX512BW__)
  {  // a tile row interleaves 16 columns of two consecutive source rows
    alignas(64) int16_t ix[32];
    for (int j = 0; j < 32; ++j) ix[j] = static_cast<int16_t>(j % 2 ? 32 + j / 2 : j / 2);
    const __m512i idx = _mm512_load_si512(ix);
    for (int64_t k = 0; k < K; k += 2) {
      const bf16* r0 = src + k * ld;
      const bf16* r1 = r0 + ld;
      for (int64_t p = 0; p < N / 16; ++p) {
        const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + p * 16)));
        const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + p * 16)));
        _mm512_storeu_si512(dst + (p * KC + k / 32) * 512 + ((k % 32) / 2) * 32, _mm512_permutex2var_epi16(a, idx, b));
      }
    }
    return;
  }
#endif
  for (int64_t k = 0; k < K; k += 2)
    for (int64_t n = 0; n < N; ++n) {
      bf16* t = dst + ((n / 16) * KC + k / 32) * 512 + ((k % 32) / 2) * 32 + (n % 16) * 2;
      t[0] = src[k * ld + n];
      t[1] = src[(k + 1) * ld + n];
    }
}

// Cache lines to request ahead of use, a few at a time between tile products: the packed key and
// value blocks of an item's next group (scattered over the sequence, so the hardware prefetchers
// cannot guess them; asking for all of a group at once would stall on the fill buffers).
struct PrefetchQueue {
  const char* ptr[2 * kMaxGroupQueue] = {};
  int64_t left[2 * kMaxGroupQueue] = {};
  int n = 0, i = 0;
  void add(const void* p, int64_t bytes) {
    if (n < 2 * kMaxGroupQueue) {
      ptr[n] = static_cast<const char*>(p);
      left[n++] = bytes;
    }
  }
  void reset() { n = i = 0; }
  inline void step(int lines) {
    while (lines > 0 && i < n) {
      _mm_prefetch(ptr[i], _MM_HINT_T1);
      ptr[i] += 64;
      left[i] -= 64;
      --lines;
      if (left[i] <= 0) ++i;
    }
  }
};

// C[M x N] (float32, ldc) (+)= A[M x K] (bf16 row-major, lda) . B, B in tile-major layout spread
// over nb operands of depth Kb each (operand i at bp[i]: the packed blocks of a group, anywhere in
// memory), so K = nb * Kb. M, N, Kb multiples of 32. The tile configuration must be loaded.
__attribute__((target("amx-tile,amx-bf16"))) void amx_gemm(const bf16* a, int64_t lda, const bf16* const* bp,
                                                           int nb, int64_t Kb, float* c, int64_t ldc, int64_t M,
                                                           int64_t N, bool add, PrefetchQueue* pq = nullptr) {
  const int64_t KC = Kb / 32;
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      float* c0 = c + m0 * ldc + n0;
      float* c1 = c0 + 16 * ldc;
      if (add) {
        _tile_loadd(0, c0, ldc * 4);
        _tile_loadd(1, c0 + 16, ldc * 4);
        _tile_loadd(2, c1, ldc * 4);
        _tile_loadd(3, c1 + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      const bf16* a0 = a + m0 * lda;
      const bf16* a1 = a0 + 16 * lda;
      for (int i = 0; i < nb; ++i) {
        const bf16* p0 = bp[i] + (n0 / 16) * KC * 512;
        const bf16* p1 = p0 + KC * 512;
        const int64_t ko = i * Kb;
        for (int64_t kc = 0; kc < KC; ++kc) {
          _tile_loadd(4, a0 + ko + kc * 32, lda * 2);
          _tile_loadd(5, a1 + ko + kc * 32, lda * 2);
          _tile_loadd(6, p0 + kc * 512, 64);
          _tile_loadd(7, p1 + kc * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
          if (pq) pq->step(kPrefetchLines);
        }
      }
      _tile_stored(0, c0, ldc * 4);
      _tile_stored(1, c0 + 16, ldc * 4);
      _tile_stored(2, c1, ldc * 4);
      _tile_stored(3, c1 + 16, ldc * 4);
    }
  }
}
#else
bool amx_enabled() { return false; }
void amx_configure() {}
void amx_release() {}
void pack_tiles_nk(const bf16*, int64_t, int64_t, int64_t, bf16*) {}
void pack_tiles_kn(const bf16*, int64_t, int64_t, int64_t, bf16*) {}
struct PrefetchQueue {
  void add(const void*, int64_t) {}
  void reset() {}
};
void amx_gemm(const bf16*, int64_t, const bf16* const*, int, int64_t, float*, int64_t, int64_t, int64_t, bool,
              PrefetchQueue* = nullptr) {}
#endif

// exp(x) for the softmax's x <= 0, to about 2 ulp, written so the compiler vectorises it (libm's
// expf does not vectorise without -ffast-math, which would also break -inf handling). Range
// reduction x = n ln2 + r with ln2 split in two parts, then a degree-6 polynomial for exp(r)
// (the classic Cephes coefficients) and 2^n from the exponent bits; x = -inf gives exactly 0 and
// NaN gives NaN.
inline float softmax_exp(float x) {
  const bool zero = x < -87.0f;
  const bool nan = x != x;
  const float xc = (zero || nan) ? -87.0f : x;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return nan ? x : (zero ? 0.0f : e * two_n);
}

// Signed integers in the same order as the floats they encode (no NaNs here).
inline int32_t order_key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// One tile's step of the online softmax for one row: sr holds w scores (masked ones -inf), times
// `scale`; pr (which may alias sr) receives exp(score - new max) and the running max m, sum l
// and output row are rescaled. A NaN score (a NaN or infinite query or key the row attends)
// makes l NaN and the row comes out NaN, as in the reference; a row whose scores so far are all
// -inf gets weights 0 (an empty row).
#if defined(__AVX512F__)
// exp(x) for x <= 0 (or -inf; no NaN), 16 lanes: the scalar softmax_exp's steps.
inline __m512 exp_nonpos512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 zero = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 e = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~zero), _mm512_mul_ps(e, _mm512_castsi512_ps(bits)));
}

inline void store_p(float* dst, __mmask16 k, __m512 p) { _mm512_mask_storeu_ps(dst, k, p); }
inline void store_p(bf16* dst, __mmask16 k, __m512 p) {
#if defined(__AVX512BF16__)
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(p));
#else  // round to nearest even (no NaN reaches here)
  __m512i b = _mm512_castps_si512(p);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
#endif
  _mm256_mask_storeu_epi16(dst, k, h);
}

template <typename P>
inline void online_softmax_row(float* sr, P* pr, int w, float scale, float& m, float& l, float* orow, int64_t Dv) {
  const __m512 ninf = _mm512_set1_ps(kNegInf), vs = _mm512_set1_ps(scale);
  __m512 vmax = ninf;
  __mmask16 nan = 0;
  for (int c = 0; c < w; c += 16) {
    const __mmask16 k = c + 16 <= w ? 0xFFFF : static_cast<__mmask16>((1u << (w - c)) - 1);
    __m512 x = _mm512_mask_loadu_ps(ninf, k, sr + c);
    if (scale != 1.0f) {
      x = _mm512_mul_ps(x, vs);
      _mm512_mask_storeu_ps(sr + c, k, x);
    }
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, x);
  }
  const float m_new = std::max(m, _mm512_reduce_max_ps(vmax));
  if (nan || m_new == std::numeric_limits<float>::infinity()) {  // exp(inf - inf) is NaN in the reference
    for (int c = 0; c < w; ++c) pr[c] = P(0.0f);
    l = kNaN;
    return;
  }
  if (m_new == kNegInf) {  // every score so far -inf: weights 0
    for (int c = 0; c < w; ++c) pr[c] = P(0.0f);
    return;
  }
  const float corr = _mm512_cvtss_f32(exp_nonpos512(_mm512_set1_ps(m - m_new)));  // 0 when m = -inf
  const __m512 vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (int c = 0; c < w; c += 16) {
    const __mmask16 k = c + 16 <= w ? 0xFFFF : static_cast<__mmask16>((1u << (w - c)) - 1);
    const __m512 x = _mm512_mask_loadu_ps(ninf, k, sr + c);
    const __m512 p = exp_nonpos512(_mm512_sub_ps(x, vm));
    vsum = _mm512_add_ps(vsum, p);
    store_p(pr + c, k, p);
  }
  if (corr != 1.0f && m != kNegInf) {  // (m = -inf: nothing accumulated yet, the row may be unwritten)
    const __m512 vc = _mm512_set1_ps(corr);
    int64_t d = 0;
    for (; d + 16 <= Dv; d += 16) _mm512_storeu_ps(orow + d, _mm512_mul_ps(_mm512_loadu_ps(orow + d), vc));
    for (; d < Dv; ++d) orow[d] *= corr;
  }
  l = l * corr + _mm512_reduce_add_ps(vsum);
  m = m_new;
}
#else
template <typename P>
inline void online_softmax_row(float* sr, P* pr, int w, float scale, float& m, float& l, float* orow, int64_t Dv) {
  float mx = kNegInf;
  if (scale != 1.0f) {
#pragma omp simd
    for (int c = 0; c < w; ++c) sr[c] *= scale;
  }
  for (int c = 0; c < w; ++c) mx = std::max(mx, sr[c]);
  const float m_new = std::max(m, mx);
  float sum = 0.0f;
  if (m_new == kNegInf) {
    // every score so far -inf (or NaN): weights 0, and NaN scores stay NaN
    for (int c = 0; c < w; ++c) {
      const float p = sr[c] != sr[c] ? sr[c] : 0.0f;
      pr[c] = static_cast<P>(p);
      sum += p;
    }
    l += sum;
    return;
  }
  const float corr = std::exp(m - m_new);  // 0 when m = -inf
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < w; ++c) {
    const float p = softmax_exp(sr[c] - m_new);
    pr[c] = static_cast<P>(p);
    sum += p;
  }
  if (corr != 1.0f && m != kNegInf) {  // (m = -inf: nothing accumulated yet, the row may be unwritten)
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) orow[d] *= corr;
  }
  l = l * corr + sum;
  m = m_new;
}
#endif

// Final normalisation of one row: orow /= l, returns lse = m + log l; a row that saw no key gets
// 0 and lse -inf, a row that saw a NaN score gets NaN.
inline float finish_row(float* orow, float m, float l, int64_t Dv) {
  if (std::isnan(l) || std::isnan(m)) {
    std::fill(orow, orow + Dv, kNaN);
    return kNaN;
  }
  if (l > 0.0f) {
    const float inv = 1.0f / l;
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
    return m + std::log(l);
  }
  std::fill(orow, orow + Dv, 0.0f);
  return kNegInf;
}

// The same for an item's R rows, lse into lp.
inline void finish_rows(float* on, float* lp, const float* m, const float* l, int64_t R, int64_t Dv) {
  for (int64_t r = 0; r < R; ++r) lp[r] = finish_row(on + r * Dv, m[r], l[r], Dv);
}

// dst[0, n) = src[0, n) in dst's dtype (bf16: round to nearest even, vectorised where possible).
inline void write_row(float* dst, const float* src, int64_t n) { std::copy(src, src + n, dst); }
inline void write_row(bf16* dst, const float* src, int64_t n) {
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= n; d += 16) {
    const __m512 x = _mm512_loadu_ps(src + d);
    if (_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q)) break;  // NaN: the scalar conversion keeps it NaN
    store_p(dst + d, 0xFFFF, x);
  }
#endif
  for (; d < n; ++d) dst[d] = bf16(src[d]);
}

// Where the block kernel writes its results: out [B, H, Tq, Dv] (float32 or bf16, channels
// contiguous) and lse [B, H, Tq] float32, row r of item n = (b, s, j) being head s * Gs + r / bs
// at query j * bs + r % bs - lead (rows outside [0, Tq) are grid padding and are not written).
template <typename O>
struct RowSink {
  O* out;
  float* lse;
  int64_t os0, os1, os2, ls0, ls1, ls2;
  int64_t Hs, Gs, NQ, bs, lead, Tq, Dv;
  // normalised rows of item n (on: [R, Dv] accumulators) written out; see finish_row
  void write(int64_t n, float* on, const float* m, const float* l, int64_t R) const {
    const int64_t b = n / (Hs * NQ), s = (n / NQ) % Hs, j = n % NQ;
    for (int64_t r = 0; r < R; ++r) {
      const int64_t h = s * Gs + r / bs, t = j * bs + r % bs - lead;
      if (t < 0 || t >= Tq) continue;
      float* orow = on + r * Dv;
      lse[b * ls0 + h * ls1 + t * ls2] = finish_row(orow, m[r], l[r], Dv);
      write_row(out + b * os0 + h * os1 + t * os2, orow, Dv);
    }
  }
};

// Most key blocks one group (one softmax pass and one P x V product) covers.
constexpr int kMaxGroup = 64;

// Tile engines: the two small GEMMs of a run of g consecutive key blocks (W = g * bs keys).
// `scores` writes one block's S[R x bs] at S (leading dimension W), scaled afterwards by
// `post_scale` in the softmax pass; `values` adds P[R x W] . V[blk .. blk + g) into out[R x Dv]
// with one product of depth W (consecutive blocks lie next to each other in V's layout).
struct F32Tiles {
  using P = float;
  const float* q;
  const float* k;
  const float* v;
  int R, bs, D, Dv;
  float scale;
  float post_scale() const { return 1.0f; }  // sgemm applies the scale itself
  bool any_group() const { return false; }  // one product covers consecutive blocks only
  void queue(PrefetchQueue&, int64_t) const {}
  void scores(int64_t n, int64_t blk, float* S, int W, PrefetchQueue*) const { scores(n, blk, S, W); }
  void values(const float* p, const int64_t* blks, int W, float* on, bool add, PrefetchQueue*) const {
    values(p, blks, W, on, add);
  }
  void begin() const {}
  void end() const {}
  void scores(int64_t n, int64_t blk, float* S, int W) const {
    scores_gemm(q + n * R * D, k + blk * bs * D, S, R, bs, D, scale, W);
  }
  void values(const float* p, const int64_t* blks, int W, float* on, bool add) const {
    values_gemm(p, v + blks[0] * bs * Dv, on, R, W, Dv, add);
  }
};

struct BF16Tiles {
  using P = bf16;
  const bf16* q;
  const bf16* kp;  // [NB, D x bs packed]: each key block transposed and packed
  const bf16* vp;  // [NB, bs x Dv] value blocks in VNNI layout (pack_vnni), in block order
  int64_t NB;
  int R, bs, D, Dv;
  float scale;
  bool amx;  // own tile kernels and tile-major packing (amx_gemm) instead of oneDNN's brgemm
  float post_scale() const { return scale; }
  void scores(int64_t n, int64_t blk, float* S, int W, PrefetchQueue* pq = nullptr) const {
    if (amx) {
      const bf16* b = kp + blk * bs * D;
      amx_gemm(q + n * R * D, D, &b, 1, D, S, W, R, bs, false, pq);
    } else {
      packed_gemm(q + n * R * D, D, kp + blk * bs * D, S, W, R, bs, D, false);
    }
  }
  bool any_group() const { return amx; }  // amx_gemm sums blocks from anywhere
  void queue(PrefetchQueue& pq, int64_t blk) const {
    pq.add(kp + blk * bs * D, int64_t(bs) * D * 2);
    pq.add(vp + blk * bs * Dv, int64_t(bs) * Dv * 2);
  }
  void values(const bf16* p, const int64_t* blks, int W, float* on, bool add, PrefetchQueue* pq = nullptr) const {
    if (amx) {  // the group's blocks summed in the accumulator tiles
      const bf16* b[kMaxGroup];
      const int g = W / bs;
      for (int t = 0; t < g; ++t) b[t] = vp + blks[t] * bs * Dv;
      amx_gemm(p, W, b, g, bs, on, Dv, R, Dv, add, pq);
    } else {
      cpublas::brgemm(R, Dv, W, W, Dv, Dv, add, p, vp + blks[0] * bs * Dv, on, true);  // one product, all Dv columns
    }
  }
  void begin() const { if (amx) amx_configure(); }
  void end() const {
    if (amx) amx_release(); else cpublas::brgemm_release(true);
  }
};

// Most keys one group of blocks covers (torch's CPU flash kernel takes 512 keys at a time as
// well): fewer, deeper P x V products and one softmax rescale per group.
constexpr int kMaxRun = 512;
// The same for groups of any blocks (amx_gemm): 128 keys keep the scores, probabilities and
// output of a 64-row item in L1 / L2; measured faster than 64, 256 and 512 at 16k (both head
// shapes) and 32k.
constexpr int kMaxGroupKeys = 128;

// The block kernel's loop over items and their slots, for either tile engine (see
// block_sparse_forward for the arguments). Consecutive live slots run as one group of up to
// kMaxRun keys (for an engine whose products need adjacent blocks, only slots naming consecutive
// key blocks); masks, row masks and cell counts stay per block.
template <typename Tiles, typename Sink>
int64_t block_sparse_loop(const Tiles& tiles, int64_t N, int64_t R, int64_t K, int64_t NB, int64_t Dv, int bs,
                          const int64_t* sl, const int64_t* kps, const int64_t* qps, const bool* rm, const bool* kok,
                          const bool* qok, bool causal, int64_t window, const Sink& sink) {
  using P = typename Tiles::P;
  constexpr bool kInPlace = std::is_same<P, float>::value;
  const bool any_group = tiles.any_group();
  std::vector<char> block_full(NB, 1);  // per key block: every key real (no per-token key mask needed)
  if (kok)
    for (int64_t b = 0; b < NB; ++b)
      for (int c = 0; c < bs; ++c)
        if (!kok[b * bs + c]) { block_full[b] = 0; break; }
  const float post = tiles.post_scale();
  const int max_run = std::min(kMaxGroup, std::max(1, (any_group ? kMaxGroupKeys : kMaxRun) / bs));
  int64_t total_cells = 0;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) reduction(+ : total_cells)
  {
    std::vector<float> S(R * bs * max_run), m(R), l(R), obuf(R * Dv);
    std::vector<P> Pbuf(kInPlace ? 0 : R * bs * max_run);
    std::vector<int64_t> row_q(R);
    std::vector<char> row_live(R);
    int64_t gb[kMaxGroup], gk[kMaxGroup], gs[kMaxGroup];  // the group's blocks, first keys, slots
    PrefetchQueue pq;
    tiles.begin();
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      float* on = obuf.data();  // written by the item's first P x V product (add = false)
      bool first = true;
      bool q_full = true;
      int64_t q_last = -1, q_first = std::numeric_limits<int64_t>::max();
      for (int64_t r = 0; r < R; ++r) {
        row_q[r] = qps[n] + r % bs;
        m[r] = kNegInf;
        l[r] = 0.0f;
        const bool ok = !qok || qok[n * R + r];
        q_full &= ok;
        if (ok) { q_last = std::max(q_last, row_q[r]); q_first = std::min(q_first, row_q[r]); }
      }
      if (q_last < 0) {  // no real query row: zeros and lse -inf (l = 0: the rows are filled)
        sink.write(n, on, m.data(), l.data(), R);
        continue;
      }
      // dead slot: no cell allowed for any real row
      auto dead = [&](int64_t s) {
        const int64_t blk = sl[n * K + s];
        if (blk < 0) return true;
        const int64_t k0 = kps[n * K + s];
        return (causal && k0 > q_last) || (window >= 0 && q_first - (k0 + bs - 1) >= window);
      };
      int64_t cells = 0;
      for (int64_t s = 0; s < K;) {
        if (dead(s)) { ++s; continue; }
        int g = 0;
        int64_t s_next = s;
        while (g < max_run && s_next < K) {
          if (dead(s_next)) {
            if (!any_group) break;
            ++s_next;
            continue;
          }
          const int64_t b = sl[n * K + s_next], k0 = kps[n * K + s_next];
          if (!any_group && g > 0 && (b != gb[0] + g || k0 != gk[0] + g * bs)) break;
          gb[g] = b;
          gk[g] = k0;
          gs[g] = s_next;
          ++g;
          ++s_next;
        }
        const int W = g * bs;
        pq.reset();  // the next group's blocks, fetched while this group computes
        {
          int got = 0;
          for (int64_t s2 = s_next; s2 < K && got < std::min(g, kMaxGroupQueue); ++s2)
            if (!dead(s2)) {
              tiles.queue(pq, sl[n * K + s2]);
              ++got;
            }
        }
        std::fill(row_live.begin(), row_live.end(), 0);
        for (int t = 0; t < g; ++t) {
          const int64_t b = gb[t], k0 = gk[t], st = gs[t];
          // Tile classes: full (no token mask) or partial.
          const bool full = q_full && block_full[b] && (!causal || k0 + bs - 1 <= q_first) &&
                            (window < 0 || q_last - k0 < window);
          tiles.scores(n, b, S.data() + t * bs, W, &pq);
          const bool* kmask = kok ? kok + b * bs : nullptr;
          for (int64_t r = 0; r < R; ++r) {
            float* sr = S.data() + r * W + t * bs;
            int64_t allowed = bs;
            if (!full) {
              const bool rok = !qok || qok[n * R + r];
              const int64_t qr = row_q[r];
              if (!kmask) {  // the allowed keys are one range [lo, hi) of the tile
                int64_t lo = 0, hi = rok ? bs : 0;
                if (causal) hi = std::min<int64_t>(hi, qr - k0 + 1);
                if (window >= 0) lo = std::max<int64_t>(lo, qr - k0 - window + 1);
                hi = std::max<int64_t>(hi, 0);
                lo = std::min(lo, hi);
                allowed = hi - lo;
                std::fill(sr, sr + lo, kNegInf);
                std::fill(sr + hi, sr + bs, kNegInf);
              } else {
                allowed = 0;
                for (int c = 0; c < bs; ++c) {
                  const int64_t kc = k0 + c;
                  const bool ok = rok && kmask[c] && (!causal || kc <= qr) && (window < 0 || qr - kc < window);
                  allowed += ok;
                  if (!ok) sr[c] = kNegInf;
                }
              }
            }
            cells += allowed;
            if (allowed > 0 && (!rm || rm[(n * R + r) * K + st])) {
              row_live[r] = 1;
            } else {
              std::fill(sr, sr + bs, kNegInf);  // this row skips this block (its cells still count)
            }
          }
        }
        P* pb = kInPlace ? reinterpret_cast<P*>(S.data()) : Pbuf.data();
        for (int64_t r = 0; r < R; ++r) {
          P* pr = pb + r * W;
          if (!row_live[r]) {
            std::fill(pr, pr + W, P(0.0f));
            continue;
          }
          online_softmax_row(S.data() + r * W, pr, W, post, m[r], l[r], on + r * Dv, Dv);
        }
        tiles.values(pb, gb, W, on, !first, &pq);
        first = false;
        s = s_next;
      }
      if (first) std::fill(obuf.begin(), obuf.end(), 0.0f);  // no product ran: rows are empty
      sink.write(n, on, m.data(), l.data(), R);
      total_cells += cells;
    }
    tiles.end();
  }
  return total_cells;
}

// Packs every key block transposed ([bs, D] -> D x bs) and the value blocks ([bs, Dv]) for the
// bf16 engine, in parallel. Value blocks are packed in VNNI layout with all Dv columns (one P x V
// product per run instead of one per 64-column panel), in block order, so a run of consecutive
// blocks is one packed operand of depth g * bs.
// Only the blocks some slot names are packed (a decoding step's band touches a few of them).
void pack_kv_blocks(const bf16* k, const bf16* v, int64_t NB, int bs, int64_t D, int64_t Dv, bf16* kp, bf16* vp,
                    const int64_t* slots, int64_t n_slots, bool amx) {
  std::vector<int64_t> used;
  {
    std::vector<char> mark(NB, 0);
    for (int64_t i = 0; i < n_slots; ++i)
      if (slots[i] >= 0) mark[slots[i]] = 1;
    for (int64_t b = 0; b < NB; ++b)
      if (mark[b]) used.push_back(b);
  }
  at::parallel_for(0, static_cast<int64_t>(used.size()), 1, [&](int64_t lo, int64_t hi) {
    std::vector<bf16> kt(D * bs);
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t b = used[u];
      const bf16* kb = k + b * bs * D;
      if (amx) {  // tile-major layouts of amx_gemm
        pack_tiles_nk(kb, bs, D, D, kp + b * bs * D);
        pack_tiles_kn(v + b * bs * Dv, bs, Dv, Dv, vp + b * bs * Dv);
        continue;
      }
      for (int c = 0; c < bs; ++c)
        for (int64_t d = 0; d < D; ++d) kt[d * bs + c] = kb[c * D + d];
      pack_panels(kt.data(), D, bs, bs, kp + b * bs * D);
      pack_vnni(v + b * bs * Dv, bs, Dv, Dv, vp + b * bs * Dv);
    }
  });
}

}  // namespace

// Whether the bf16 engine runs here: oneDNN packs bf16 B operands for the CPU's matrix units.
bool bf16_supported() { return cpublas::could_pack(at::kBFloat16); }

// q: [N, R, D]; k: [NB, bs, D]; v: [NB, bs, Dv]  (all float32, or all bfloat16; contiguous)
// slots: [N, K] int64 flat key-block index into k / v, -1 = unused slot
// kpos: [N, K] int64 absolute position of each slot's first key
// qpos: [N] int64 absolute position of each item's first query row; row r sits at qpos + r % bs
// row_mask: [N, R, K] bool or empty (restricts a row's softmax to some slots; cells still count)
// key_ok: [NB, bs] bool or empty; q_ok: [N, R] bool or empty
// window: < 0 for none; causal: keys after the query are excluded
// out: [B, H, Tq, Dv] (q's dtype, channels contiguous), lse: [B, H, Tq] float32, written in place;
// items are (b, s, j) for Hs support heads (N = B * Hs * NQ), row r of an item is head
// s * (H / Hs) + r / bs at query j * bs + r % bs - lead.
// bf16 needs bs and Dv multiples of 16 and D even (bf16_supported() true).
// Returns the number of computed cells.
int64_t block_sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& slots,
                             const at::Tensor& kpos, const at::Tensor& qpos, const at::Tensor& row_mask,
                             const at::Tensor& key_ok, const at::Tensor& q_ok, int64_t bs64, bool causal,
                             int64_t window, double scale_d, at::Tensor out, at::Tensor lse, int64_t Hs,
                             int64_t lead) {
  const bool is_bf16 = q.dtype() == at::kBFloat16;
  TORCH_CHECK((q.dtype() == at::kFloat || is_bf16) && k.dtype() == q.dtype() && v.dtype() == q.dtype(),
              "q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(slots.is_contiguous() && kpos.is_contiguous() && qpos.is_contiguous(), "index tensors must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [N, R, D], k [NB, bs, D], v [NB, bs, Dv]");
  const int64_t N = q.size(0), R = q.size(1), D = q.size(2);
  const int64_t NB = k.size(0), Dv = v.size(2), K = slots.size(1);
  const int bs = static_cast<int>(bs64);
  TORCH_CHECK(k.size(1) == bs && v.size(1) == bs && k.size(2) == D && v.size(0) == NB, "k / v shapes");
  TORCH_CHECK(slots.size(0) == N && kpos.size(0) == N && kpos.size(1) == K && qpos.size(0) == N, "index shapes");
  TORCH_CHECK(out.dim() == 4 && lse.dim() == 3 && out.size(3) == Dv && out.stride(3) == 1 &&
              lse.dtype() == at::kFloat && (out.dtype() == at::kFloat || out.dtype() == at::kBFloat16),
              "out [B, H, Tq, Dv] (float32 or bf16), lse [B, H, Tq] float32");
  const int64_t B = out.size(0), H = out.size(1), Tq = out.size(2);
  TORCH_CHECK(Hs > 0 && H % Hs == 0 && N % (B * Hs) == 0 && (H / Hs) * bs == R, "item layout");
  if (is_bf16)
    TORCH_CHECK(bf16_supported() && bs % 16 == 0 && Dv % 16 == 0 && D % 2 == 0,
                "bf16 kernel needs bf16 matrix units, block size and value dim multiples of 16, even head dim");
  const bool has_rm = row_mask.defined() && row_mask.numel() > 0;
  const bool has_kok = key_ok.defined() && key_ok.numel() > 0;
  const bool has_qok = q_ok.defined() && q_ok.numel() > 0;
  if (has_rm) TORCH_CHECK(row_mask.is_contiguous() && row_mask.size(0) == N && row_mask.size(1) == R && row_mask.size(2) == K, "row_mask shape");
  if (has_kok) TORCH_CHECK(key_ok.is_contiguous() && key_ok.size(0) == NB && key_ok.size(1) == bs, "key_ok shape");
  if (has_qok) TORCH_CHECK(q_ok.is_contiguous() && q_ok.size(0) == N && q_ok.size(1) == R, "q_ok shape");

  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * K; ++i) TORCH_CHECK(sl[i] < NB, "slot index out of range");

  const bool* rm = has_rm ? row_mask.data_ptr<bool>() : nullptr;
  const bool* kok = has_kok ? key_ok.data_ptr<bool>() : nullptr;
  const bool* qok = has_qok ? q_ok.data_ptr<bool>() : nullptr;
  const float scale = static_cast<float>(scale_d);
  const int Ri = static_cast<int>(R), Di = static_cast<int>(D), Dvi = static_cast<int>(Dv);
  const int64_t* kp_ = kpos.data_ptr<int64_t>();
  const int64_t* qp_ = qpos.data_ptr<int64_t>();
  auto run = [&](const auto& tiles) -> int64_t {
    auto go = [&](auto* o) {
      RowSink<std::remove_pointer_t<decltype(o)>> sink{o, lse.data_ptr<float>(), out.stride(0), out.stride(1),
                                                       out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                                                       Hs, H / Hs, N / (B * Hs), bs, lead, Tq, Dv};
      return block_sparse_loop(tiles, N, R, K, NB, Dv, bs, sl, kp_, qp_, rm, kok, qok, causal, window, sink);
    };
    return out.dtype() == at::kBFloat16 ? go(out.data_ptr<bf16>()) : go(out.data_ptr<float>());
  };
  if (is_bf16) {
    // Packed copies live in buffers kept between calls (per calling thread): fresh allocations of
    // this size come from the OS and would page-fault on every call.
    thread_local std::vector<bf16> kpk, vpk;
    auto reserve = [](std::vector<bf16>& buf, int64_t n) {
      if (static_cast<int64_t>(buf.size()) < n || static_cast<int64_t>(buf.size()) > 4 * n + (1 << 20)) {
        std::vector<bf16>().swap(buf);
        buf.resize(n);
      }
    };
    reserve(kpk, NB * bs * D);
    reserve(vpk, NB * bs * Dv);
    const bool amx = amx_enabled() && bs % 32 == 0 && D % 32 == 0 && Dv % 32 == 0;
    pack_kv_blocks(k.data_ptr<bf16>(), v.data_ptr<bf16>(), NB, bs, D, Dv, kpk.data(), vpk.data(), sl, N * K, amx);
    return run(BF16Tiles{q.data_ptr<bf16>(), kpk.data(), vpk.data(), NB, Ri, bs, Di, Dvi, scale, amx});
  }
  return run(F32Tiles{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), Ri, bs, Di, Dvi, scale});
}

// Attention of each item (R query rows) over its own list of key tokens: the listed keys are
// copied into a tile buffer 64 at a time and run through the same tile loop (GEMM, per-cell
// masks, online softmax, GEMM). Cells are counted after the row mask (as the torch path does).
// In bf16 each gathered tile is packed for the matrix units (its width rounded up to 16 with
// keys that no row attends).
// q: [N, R, D]; k: [S, Tk, D]; v: [S, Tk, Dv] (S = B * Hkv sequences of keys; float32 or bf16);
// tokens: [N, M] positions (-1 unused, distinct within a list); item_seq: [N] row of k / v for
// each item; item_b: [N] batch row (for key_ok [B, Tk]); qpos: [N] position of each item's first
// row (row r sits at qpos + r % bs); row_mask: [N, R, M] or empty; q_ok: [N, R] or empty.
template <typename T>
std::vector<at::Tensor> token_gather_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& tokens, const at::Tensor& item_seq,
                                          const at::Tensor& item_b, const at::Tensor& qpos,
                                          const at::Tensor& row_mask, const at::Tensor& key_ok,
                                          const at::Tensor& q_ok, int64_t bs, bool causal, int64_t window,
                                          double scale_d) {
  constexpr bool kBF16 = std::is_same<T, bf16>::value;
  const int64_t N = q.size(0), R = q.size(1), D = q.size(2);
  const int64_t S = k.size(0), Tk = k.size(1), Dv = v.size(2), M = tokens.size(1);
  const bool has_rm = row_mask.numel() > 0, has_kok = key_ok.numel() > 0, has_qok = q_ok.numel() > 0;
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* sq = item_seq.data_ptr<int64_t>();
  const int64_t* ib = item_b.data_ptr<int64_t>();
  const int64_t* qps = qpos.data_ptr<int64_t>();
  auto fopt = q.options().dtype(at::kFloat);
  auto out = at::zeros({N, R, Dv}, fopt);
  auto lse = at::empty({N, R}, fopt);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* rm = has_rm ? row_mask.data_ptr<bool>() : nullptr;
  const bool* kok = has_kok ? key_ok.data_ptr<bool>() : nullptr;
  const bool* qok = has_qok ? q_ok.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  constexpr int TW = 64;  // keys per tile
  int64_t total_cells = 0;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) reduction(+ : total_cells)
  {
    std::vector<float> S_(R * TW), m(R), l(R);
    std::vector<T> kb(TW * D), vb(TW * Dv);
    std::vector<bf16> kt(kBF16 ? D * TW : 0), kpk(kBF16 ? D * TW : 0), vpk(kBF16 ? TW * Dv : 0), pb(kBF16 ? R * TW : 0);
    std::vector<int64_t> slot(TW), pos(TW);
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t r = 0; r < R; ++r) m[r] = kNegInf, l[r] = 0.0f;
      const int64_t* tn = tp + n * M;
      const T* ks = kp + sq[n] * Tk * D;
      const T* vs = vp + sq[n] * Tk * Dv;
      float* on = op + n * R * Dv;
      int64_t cells = 0;
      for (int64_t x0 = 0; x0 < M;) {
        int w = 0;  // gather the next (up to) TW listed keys that some row may attend
        for (; x0 < M && w < TW; ++x0) {
          const int64_t t = tn[x0];
          if (t < 0 || (kok && !kok[ib[n] * Tk + t])) continue;
          slot[w] = x0, pos[w] = t;
          std::copy(ks + t * D, ks + (t + 1) * D, kb.data() + w * D);
          std::copy(vs + t * Dv, vs + (t + 1) * Dv, vb.data() + w * Dv);
          ++w;
        }
        if (w == 0) continue;
        int wp = w;  // tile width the GEMMs see
        if constexpr (kBF16) {
          wp = (w + 15) / 16 * 16;
          std::fill(kb.begin() + w * D, kb.begin() + wp * D, T(0.0f));
          std::fill(vb.begin() + w * Dv, vb.begin() + wp * Dv, T(0.0f));
          for (int c = 0; c < wp; ++c)
            for (int64_t d = 0; d < D; ++d) kt[d * wp + c] = kb[c * D + d];
          pack_panels(kt.data(), D, wp, wp, kpk.data());
          pack_panels(vb.data(), wp, Dv, Dv, vpk.data());
          packed_gemm(qp + n * R * D, D, kpk.data(), S_.data(), wp, R, wp, D, false);
        } else {
          const char tt = 'T', nn = 'N';
          const float beta = 0.0f;
          const int Ri = static_cast<int>(R), Di = static_cast<int>(D);
          sgemm_(&tt, &nn, &w, &Ri, &Di, &scale, kb.data(), &Di, qp + n * R * D, &Di, &beta, S_.data(), &w);
        }
        for (int64_t r = 0; r < R; ++r) {
          float* sr = S_.data() + r * wp;
          const int64_t qr = qps[n] + r % bs;
          const bool rok = !qok || qok[n * R + r];
          int allowed = 0;
          for (int c = 0; c < w; ++c) {
            const int64_t kc = pos[c];
            const bool ok = rok && (!causal || kc <= qr) && (window < 0 || qr - kc < window) &&
                            (!rm || rm[(n * R + r) * M + slot[c]]);
            allowed += ok;
            if (!ok) sr[c] = kNegInf;
          }
          for (int c = w; c < wp; ++c) sr[c] = kNegInf;
          cells += allowed;
          if constexpr (kBF16) {
            bf16* pr = pb.data() + r * wp;
            if (allowed == 0) std::fill(pr, pr + wp, bf16(0.0f));
            else online_softmax_row(sr, pr, wp, scale, m[r], l[r], on + r * Dv, Dv);
          } else {
            if (allowed == 0) std::fill(sr, sr + w, 0.0f);
            else online_softmax_row(sr, sr, w, 1.0f, m[r], l[r], on + r * Dv, Dv);
          }
        }
        if constexpr (kBF16) {
          packed_gemm(pb.data(), wp, vpk.data(), on, Dv, R, Dv, wp, true);
        } else {
          const char nn = 'N';
          const float one = 1.0f;
          const int Ri = static_cast<int>(R), Dvi = static_cast<int>(Dv);
          sgemm_(&nn, &nn, &Dvi, &Ri, &w, &one, vb.data(), &Dvi, S_.data(), &w, &one, on, &Dvi);
        }
      }
      finish_rows(on, lp + n * R, m.data(), l.data(), R, Dv);
      total_cells += cells;
    }
    if constexpr (kBF16) cpublas::brgemm_release(true);
  }
  return {out, lse, at::full({}, total_cells, at::TensorOptions().dtype(at::kLong))};
}

std::vector<at::Tensor> token_gather_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& tokens, const at::Tensor& item_seq,
                                             const at::Tensor& item_b, const at::Tensor& qpos,
                                             const at::Tensor& row_mask, const at::Tensor& key_ok,
                                             const at::Tensor& q_ok, int64_t bs, bool causal, int64_t window,
                                             double scale_d) {
  const bool is_bf16 = q.dtype() == at::kBFloat16;
  TORCH_CHECK((q.dtype() == at::kFloat || is_bf16) && k.dtype() == q.dtype() && v.dtype() == q.dtype(),
              "q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && tokens.is_contiguous() &&
              item_seq.is_contiguous() && item_b.is_contiguous() && qpos.is_contiguous(), "contiguous inputs");
  const int64_t N = q.size(0), R = q.size(1), D = q.size(2);
  const int64_t S = k.size(0), Tk = k.size(1), Dv = v.size(2), M = tokens.size(1);
  TORCH_CHECK(k.size(2) == D && v.size(0) == S && v.size(1) == Tk && tokens.size(0) == N, "shapes");
  if (is_bf16)
    TORCH_CHECK(bf16_supported() && Dv % 16 == 0 && D % 2 == 0,
                "bf16 kernel needs bf16 matrix units, a value dim multiple of 16 and an even head dim");
  if (row_mask.numel() > 0) TORCH_CHECK(row_mask.is_contiguous() && row_mask.size(0) == N && row_mask.size(1) == R && row_mask.size(2) == M, "row_mask shape");
  if (key_ok.numel() > 0) TORCH_CHECK(key_ok.is_contiguous() && key_ok.size(1) == Tk, "key_ok shape");
  if (q_ok.numel() > 0) TORCH_CHECK(q_ok.is_contiguous() && q_ok.size(0) == N && q_ok.size(1) == R, "q_ok shape");
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* sq = item_seq.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * M; ++i) TORCH_CHECK(tp[i] < Tk, "token position out of range");
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(sq[n] >= 0 && sq[n] < S, "item_seq out of range");
  if (is_bf16)
    return token_gather_impl<bf16>(q, k, v, tokens, item_seq, item_b, qpos, row_mask, key_ok, q_ok, bs, causal,
                                   window, scale_d);
  return token_gather_impl<float>(q, k, v, tokens, item_seq, item_b, qpos, row_mask, key_ok, q_ok, bs, causal, window,
                                  scale_d);
}

// Quest-style per-query block selection for prefill with a causal budget controller (the
// compiled form of attnsieve.methods.block_topk's support; that file documents the method).
//
// q: [B, H, Tq, D] float32; summ: [B, Hkv, NK, C] (C = 2D: channel max then min, or C = D: mean)
// rows: [B, NQ, bs] bool (grid rows that are real queries); cand / forced: [B, NQ, NK] bool;
// budget: [B, NQ] int64 blocks per query. Items are (b, s, j) with s one of Hs support heads
// (Gs = H / Hs query heads stacked per item, rows head-major). Row r of item (b, s, j) is head
// s * Gs + r / bs at grid row j * bs + r % bs, i.e. query index j * bs + r % bs - lead.
// Each real row keeps the forced blocks plus its best-bounded candidates, k per query in all;
// k comes from the controller, which sees only earlier query blocks of the same (b, s).
// Returns slots [N, K] int64 (ascending, -1 padded) and row_mask [N, R, K] bool.
// In bf16 (q and summ both bf16) the bounds are bf16 products with float32 accumulation on the
// CPU's matrix units (each (b, KV head)'s summaries transposed and packed once); they differ from
// float32's only in the order of accumulation.
template <typename T>
std::vector<at::Tensor> block_topk_plan_impl(const at::Tensor& q, const at::Tensor& summ, const at::Tensor& rows,
                                             const at::Tensor& cand, const at::Tensor& forced,
                                             const at::Tensor& budget, int64_t Hs, int64_t first_qb, int64_t lead,
                                             int64_t k_cap, bool minmax) {
  constexpr bool kBF16 = std::is_same<T, bf16>::value;
  // q may be any strided view whose channels are contiguous (a model's [B, T, H, D] transposed)
  TORCH_CHECK(q.stride(3) == 1 && summ.is_contiguous() && rows.is_contiguous() && cand.is_contiguous() &&
              forced.is_contiguous() && budget.is_contiguous(), "inputs must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t Hkv = summ.size(1), NK = summ.size(2), C = summ.size(3);
  const int64_t NQ = rows.size(1), bs = rows.size(2);
  TORCH_CHECK(C == (minmax ? 2 * D : D), "summary width");
  TORCH_CHECK(H % Hs == 0 && Hs % Hkv == 0, "support heads");
  TORCH_CHECK(cand.size(0) == B && cand.size(1) == NQ && cand.size(2) == NK, "cand shape");
  const int64_t Gs = H / Hs, R = Gs * bs, N = B * Hs * NQ;
  const T* qp = q.data_ptr<T>();
  const T* sp = summ.data_ptr<T>();
  // bf16: summaries of each (b, KV head) as the packed B operand [C x NKp] (NKp = NK rounded up to
  // 32), for amx_gemm (tile-major) where it runs, else for oneDNN's brgemm (VNNI panels)
  const int64_t NKp = (NK + 31) / 32 * 32;
  const bool amx = kBF16 && amx_enabled() && C % 32 == 0 && R % 32 == 0;
  std::vector<bf16> spk(kBF16 ? B * Hkv * C * NKp : 0);
  if constexpr (kBF16) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t lo, int64_t hi) {
      std::vector<bf16> st(C * NKp);
      for (int64_t bh = lo; bh < hi; ++bh) {
        std::fill(st.begin(), st.end(), bf16(0.0f));
        if (amx) {  // rows = blocks [NKp x C], the padding blocks zero
          std::copy(sp + bh * NK * C, sp + (bh + 1) * NK * C, st.begin());
          pack_tiles_nk(st.data(), NKp, C, C, spk.data() + bh * C * NKp);
          continue;
        }
        for (int64_t c = 0; c < NK; ++c)
          for (int64_t x = 0; x < C; ++x) st[x * NKp + c] = sp[(bh * NK + c) * C + x];
        pack_panels(st.data(), C, NKp, NKp, spk.data() + bh * C * NKp);
      }
    });
  }
  const bool* rp = rows.data_ptr<bool>();
  const bool* cp = cand.data_ptr<bool>();
  const bool* fp = forced.data_ptr<bool>();
  const int64_t* bp = budget.data_ptr<int64_t>();

  std::vector<std::vector<int64_t>> item_slots(N);
  std::vector<std::vector<uint8_t>> item_rows(N);
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> qbuf(R * C);
    std::vector<float> bnd(R * NKp);
    std::vector<int32_t> keys(NK);
    std::vector<uint8_t> sel(R * NK), uni(NK);
    std::vector<int64_t> cidx(NK);
    if (amx) amx_configure();
#pragma omp for schedule(dynamic, 1)
    for (int64_t seq = 0; seq < B * Hs; ++seq) {
      const int64_t b = seq / Hs, s = seq % Hs, kvh = s * Hkv / Hs;
      float growth = 1.0f, debt = 0.0f;
      for (int64_t j = 0; j < NQ; ++j) {
        const int64_t n = seq * NQ + j;
        const bool* cj = cp + (b * NQ + j) * NK;
        const bool* fj = fp + (b * NQ + j) * NK;
        int64_t nf = 0, na = 0, jmax = 0;
        for (int64_t c = 0; c < NK; ++c) {
          na += cj[c];
          nf += fj[c];
          if (cj[c]) jmax = c + 1;
        }
        bool has_rows = false;
        for (int64_t i = 0; i < bs; ++i) has_rows |= rp[(b * NQ + j) * bs + i];
        const float bgt = static_cast<float>(bp[b * NQ + j]);
        int64_t k = static_cast<int64_t>(std::floor(std::max(bgt + debt, 0.0f) / growth));
        k = std::min(std::max(k, nf), na);
        k = std::min(k, k_cap);
        std::fill(uni.begin(), uni.begin() + jmax, 0);
        int64_t size = 0;
        if (has_rows && k > 0) {
          // bounds of every row against blocks [0, jmax)
          for (int64_t r = 0; r < R; ++r) {
            T* dst = qbuf.data() + r * C;
            const int64_t i = r % bs, h = s * Gs + r / bs, t = j * bs + i - lead;
            if (!rp[(b * NQ + j) * bs + i] || t < 0 || t >= Tq) {
              std::fill(dst, dst + C, T(0.0f));
              continue;
            }
            const T* src = qp + b * qs0 + h * qs1 + t * qs2;
            if (minmax) {
              if constexpr (kBF16) {  // split by the sign bit: exact
                const uint16_t* sb = reinterpret_cast<const uint16_t*>(src);
                uint16_t* db = reinterpret_cast<uint16_t*>(dst);
                int64_t d0 = 0;
#if defined(__AVX512BW__)
                for (; d0 + 32 <= D; d0 += 32) {  // 32 channels at a time, the sign bits as a mask
                  const __m512i x = _mm512_loadu_si512(sb + d0);
                  const __mmask32 neg = _mm512_movepi16_mask(x);
                  _mm512_storeu_si512(db + d0, _mm512_maskz_mov_epi16(static_cast<__mmask32>(~neg), x));
                  _mm512_storeu_si512(db + D + d0, _mm512_maskz_mov_epi16(neg, x));
                }
#endif
                for (int64_t d = d0; d < D; ++d) {
                  const uint16_t x = sb[d];
                  const bool neg = (x & 0x8000) != 0;
                  db[d] = neg ? 0 : x;
                  db[D + d] = neg ? x : 0;
                }
              } else {
                for (int64_t d = 0; d < D; ++d) {
                  dst[d] = std::max(src[d], 0.0f);
                  dst[D + d] = std::min(src[d], 0.0f);
                }
              }
            } else {
              std::copy(src, src + D, dst);
            }
          }
          int64_t m_cand = 0;
          for (int64_t c = 0; c < jmax; ++c)
            if (cj[c] && !fj[c]) cidx[m_cand++] = c;
          const int64_t extra = k - nf;  // picks beyond the forced blocks
          const int64_t ldb = kBF16 ? NKp : jmax;  // leading dimension of the bounds
          if (extra > 0 && extra < m_cand) {
            if constexpr (kBF16) {
              const bf16* sb = spk.data() + (b * Hkv + kvh) * C * NKp;
              if (amx)
                amx_gemm(reinterpret_cast<const bf16*>(qbuf.data()), C, &sb, 1, C, bnd.data(), NKp, R,
                         (jmax + 31) / 32 * 32, false);
              else
                packed_gemm(qbuf.data(), C, sb, bnd.data(), NKp, R, NKp, C, false, jmax);
            } else {
              const int ldi = static_cast<int>(jmax);
              const char t = 'T', nn = 'N';
              const float one = 1.0f, zero = 0.0f;
              const int Ri = static_cast<int>(R), Ci = static_cast<int>(C);
              sgemm_(&t, &nn, &ldi, &Ri, &Ci, &one, sp + ((b * Hkv + kvh) * NK) * C, &Ci, qbuf.data(), &Ci, &zero,
                     bnd.data(), &ldi);
            }
          }
          for (int64_t r = 0; r < R; ++r) {
            uint8_t* sr = sel.data() + r * jmax;
            std::fill(sr, sr + jmax, 0);
            const int64_t i = r % bs, t = j * bs + i - lead;
            if (!rp[(b * NQ + j) * bs + i] || t < 0 || t >= Tq) continue;
            for (int64_t c = 0; c < jmax; ++c) sr[c] = fj[c];
            if (extra <= 0) continue;
            if (extra >= m_cand) {
              for (int64_t x = 0; x < m_cand; ++x) sr[cidx[x]] = 1;
              continue;
            }
            const float* br = bnd.data() + r * ldb;
            int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
            for (int64_t x = 0; x < m_cand; ++x) {
              const int32_t key = order_key(br[cidx[x]]);
              keys[x] = key;
              lo = std::min(lo, key);
              hi = std::max(hi, key);
            }
            // largest threshold t with at least `extra` keys >= t: the extra-th largest key itself.
            // A probe that finds exactly `extra` keys >= mid ends the search: those keys are the
            // top `extra` (all keys >= t lie among them and there are no ties to break).
            bool exact = false;
            while (lo < hi) {
              const int32_t mid = static_cast<int32_t>(lo + ((static_cast<int64_t>(hi) - lo + 1) >> 1));
              int32_t cnt = 0;
              const int32_t* kx = keys.data();
              const int32_t mc = static_cast<int32_t>(m_cand);
              int32_t x0 = 0;
#if defined(__AVX512F__)
              const __m512i vmid = _mm512_set1_epi32(mid);
              for (; x0 + 16 <= mc; x0 += 16)
                cnt += __builtin_popcount(_mm512_cmpge_epi32_mask(_mm512_loadu_si512(kx + x0), vmid));
#endif
              for (int32_t x = x0; x < mc; ++x) cnt += kx[x] >= mid;
              if (cnt == extra) {
                lo = mid;
                exact = true;
                break;
              }
              if (cnt > extra) lo = mid; else hi = mid - 1;
            }
            if (exact) {
              for (int64_t x = 0; x < m_cand; ++x)
                if (keys[x] >= lo) sr[cidx[x]] = 1;
              continue;
            }
            int64_t above = 0;
            for (int64_t x = 0; x < m_cand; ++x) above += keys[x] > lo;
            int64_t ties = extra - above;  // blocks equal to the threshold, lowest index first
            for (int64_t x = 0; x < m_cand; ++x) {
              if (keys[x] > lo || (keys[x] == lo && ties-- > 0)) sr[cidx[x]] = 1;
            }
          }
          for (int64_t r = 0; r < R; ++r) {
            const uint8_t* sr = sel.data() + r * jmax;
            for (int64_t c = 0; c < jmax; ++c) uni[c] |= sr[c];
          }
          std::vector<int64_t>& us = item_slots[n];
          for (int64_t c = 0; c < jmax; ++c)
            if (uni[c]) us.push_back(c);
          size = static_cast<int64_t>(us.size());
          std::vector<uint8_t>& ur = item_rows[n];
          ur.resize(R * size);
          for (int64_t r = 0; r < R; ++r)
            for (int64_t x = 0; x < size; ++x) ur[r * size + x] = sel[r * jmax + us[x]];
        }
        const bool is_free = has_rows && bgt > nf && bgt < na;
        const float observed = std::max(static_cast<float>(size) / static_cast<float>(k), 1.0f);
        if (is_free && k > nf) growth = 0.5f * growth + 0.5f * observed;
        if (is_free) debt = std::max(debt + bgt - static_cast<float>(size), -bgt);
      }
    }
    if (amx) amx_release();
    else if constexpr (kBF16) cpublas::brgemm_release(true);
  }
  int64_t K = 1;
  for (const auto& us : item_slots) K = std::max<int64_t>(K, us.size());
  auto slots = at::full({N, K}, -1, at::TensorOptions().dtype(at::kLong));
  auto row_mask = at::zeros({N, R, K}, at::TensorOptions().dtype(at::kBool));
  int64_t* so = slots.data_ptr<int64_t>();
  bool* ro = row_mask.data_ptr<bool>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const auto& us = item_slots[n];
      const int64_t size = us.size();
      for (int64_t x = 0; x < size; ++x) so[n * K + x] = us[x];
      const auto& ur = item_rows[n];
      for (int64_t r = 0; r < R; ++r)
        for (int64_t x = 0; x < size; ++x) ro[(n * R + r) * K + x] = ur[r * size + x];
    }
  });
  return {slots, row_mask};
}

// Quest's key-block summaries in one pass: k [B, Hkv, T, D] (channels contiguous, T a multiple of
// bs) -> [B, Hkv, T / bs, 2D] in k's dtype, each block's channel maximum then its channel minimum
// (the bound's operand order). A NaN key makes both NaN, as torch's amax / amin do. Exact in any
// dtype: min and max only select values.
template <typename T>
void block_minmax_impl(const at::Tensor& k, int64_t bs, at::Tensor& out) {
  const int64_t B = k.size(0), H = k.size(1), NK = k.size(2) / bs, D = k.size(3);
  const int64_t s0 = k.stride(0), s1 = k.stride(1), s2 = k.stride(2);
  const T* kp = k.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * H * NK, 16, [&](int64_t lo, int64_t hi) {
    std::vector<float> mx(D), mn(D);
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t b = i / (H * NK), h = i / NK % H, c = i % NK;
      const T* src = kp + b * s0 + h * s1 + c * bs * s2;
#if defined(__AVX512BW__)
      if constexpr (std::is_same<T, bf16>::value) {
        if (D % 32 == 0) {  // bf16 compared as sign-magnitude integers turned into ordered ones
          T* dst = op + i * 2 * D;
          const __m512i mag = _mm512_set1_epi16(0x7fff), inf = _mm512_set1_epi16(0x7f80);
          for (int64_t d = 0; d < D; d += 32) {
            __m512i hi_ = _mm512_set1_epi16(-32768), lo_ = _mm512_set1_epi16(32767);
            __mmask32 nan = 0;
            for (int64_t r = 0; r < bs; ++r) {
              const __m512i x = _mm512_loadu_si512(src + r * s2 + d);
              nan |= _mm512_cmpgt_epu16_mask(_mm512_and_si512(x, mag), inf);
              const __m512i key = _mm512_xor_si512(x, _mm512_and_si512(_mm512_srai_epi16(x, 15), mag));
              hi_ = _mm512_max_epi16(hi_, key);
              lo_ = _mm512_min_epi16(lo_, key);
            }
            // back to bf16 bits (the map is its own inverse); NaN channels become NaN
            hi_ = _mm512_xor_si512(hi_, _mm512_and_si512(_mm512_srai_epi16(hi_, 15), mag));
            lo_ = _mm512_xor_si512(lo_, _mm512_and_si512(_mm512_srai_epi16(lo_, 15), mag));
            const __m512i qnan = _mm512_set1_epi16(0x7fc0);
            _mm512_storeu_si512(dst + d, _mm512_mask_mov_epi16(hi_, nan, qnan));
            _mm512_storeu_si512(dst + D + d, _mm512_mask_mov_epi16(lo_, nan, qnan));
          }
          continue;
        }
      }
#endif
      for (int64_t d = 0; d < D; ++d) mx[d] = mn[d] = static_cast<float>(src[d]);
      for (int64_t r = 1; r < bs; ++r) {
        const T* row = src + r * s2;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(row[d]);
          const bool nan = v != v;
          mx[d] = (nan || v > mx[d]) ? v : mx[d];
          mn[d] = (nan || v < mn[d]) ? v : mn[d];
        }
      }
      T* dst = op + i * 2 * D;
      for (int64_t d = 0; d < D; ++d) {
        dst[d] = static_cast<T>(mx[d]);
        dst[D + d] = static_cast<T>(mn[d]);
      }
    }
  });
}

at::Tensor block_minmax(const at::Tensor& k, int64_t bs) {
  TORCH_CHECK(k.dim() == 4 && k.stride(3) == 1 && bs > 0 && k.size(2) % bs == 0,
              "k [B, H, T, D] with contiguous channels and T a multiple of bs");
  auto out = at::empty({k.size(0), k.size(1), k.size(2) / bs, 2 * k.size(3)}, k.options());
  if (k.dtype() == at::kBFloat16) {
    block_minmax_impl<bf16>(k, bs, out);
  } else {
    TORCH_CHECK(k.dtype() == at::kFloat, "k must be float32 or bfloat16");
    block_minmax_impl<float>(k, bs, out);
  }
  return out;
}

// block-topk's causal budget controller alone (the Python loop in methods/block_topk.py is its
// reference): per sequence (b, s) and query block j in order, k from the budget, the debt and the
// union growth measured on earlier blocks; the same float32 arithmetic as the reference. Used when
// the planner's tensors live on a GPU: the sequential loop runs here on small tensors copied once.
at::Tensor block_topk_controller(const at::Tensor& union_size, const at::Tensor& budget,
                                 const at::Tensor& n_forced, const at::Tensor& n_avail, const at::Tensor& has_rows) {
  TORCH_CHECK(union_size.dim() == 4 && union_size.dtype() == at::kInt && union_size.is_contiguous(),
              "union_size must be contiguous int32 [B, Hs, NQ, k_cap + 1]");
  const int64_t B = union_size.size(0), Hs = union_size.size(1), NQ = union_size.size(2), W = union_size.size(3);
  TORCH_CHECK(budget.dtype() == at::kLong && n_forced.dtype() == at::kLong && n_avail.dtype() == at::kLong &&
                  budget.is_contiguous() && n_forced.is_contiguous() && n_avail.is_contiguous() &&
                  budget.numel() == B * NQ && n_forced.numel() == B * NQ && n_avail.numel() == B * NQ,
              "budget, n_forced and n_avail must be contiguous int64 [B, NQ]");
  TORCH_CHECK(has_rows.dtype() == at::kBool && has_rows.is_contiguous() && has_rows.numel() == B * Hs * NQ,
              "has_rows must be contiguous bool [B, Hs, NQ]");
  auto k_out = at::empty({B, Hs, NQ}, at::TensorOptions().dtype(at::kLong));
  const int32_t* up = union_size.data_ptr<int32_t>();
  const int64_t *bp = budget.data_ptr<int64_t>(), *fp = n_forced.data_ptr<int64_t>(), *ap = n_avail.data_ptr<int64_t>();
  const bool* hp = has_rows.data_ptr<bool>();
  int64_t* ko = k_out.data_ptr<int64_t>();
  at::parallel_for(0, B * Hs, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t seq = lo; seq < hi; ++seq) {
      const int64_t b = seq / Hs;
      float growth = 1.0f, debt = 0.0f;
      for (int64_t j = 0; j < NQ; ++j) {
        const float bgt = static_cast<float>(bp[b * NQ + j]);
        const int64_t nf = fp[b * NQ + j], na = ap[b * NQ + j];
        int64_t k = static_cast<int64_t>(std::floor(std::max(bgt + debt, 0.0f) / growth));
        k = std::min(std::min(std::max(k, nf), na), W - 1);
        ko[seq * NQ + j] = k;
        const float size = static_cast<float>(up[(seq * NQ + j) * W + std::max<int64_t>(k - 1, 0)]);
        const bool is_free = hp[seq * NQ + j] && bgt > nf && bgt < na;
        const float observed = std::max(size / static_cast<float>(k), 1.0f);
        if (is_free && k > nf) growth = 0.5f * growth + 0.5f * observed;
        if (is_free) debt = std::max(debt + bgt - size, -bgt);
      }
    }
  });
  return k_out;
}

std::vector<at::Tensor> block_topk_plan(const at::Tensor& q, const at::Tensor& summ, const at::Tensor& rows,
                                        const at::Tensor& cand, const at::Tensor& forced, const at::Tensor& budget,
                                        int64_t Hs, int64_t first_qb, int64_t lead, int64_t k_cap, bool minmax) {
  if (q.dtype() == at::kBFloat16) {
    TORCH_CHECK(summ.dtype() == at::kBFloat16 && bf16_supported() && q.size(3) % 2 == 0,
                "bf16 planner needs bf16 summaries, bf16 matrix units and an even head dim");
    return block_topk_plan_impl<bf16>(q, summ, rows, cand, forced, budget, Hs, first_qb, lead, k_cap, minmax);
  }
  TORCH_CHECK(q.dtype() == at::kFloat && summ.dtype() == at::kFloat, "q and summ must be float32 or bfloat16");
  return block_topk_plan_impl<float>(q, summ, rows, cand, forced, budget, Hs, first_qb, lead, k_cap, minmax);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward, "fused block-sparse attention over per-item key-block slots");
  m.def("token_gather_forward", &token_gather_forward, "attention of each item over its own list of key tokens");
  m.def("block_topk_plan", &block_topk_plan, "block-topk's per-query selection with its causal budget controller");
  m.def("block_topk_controller", &block_topk_controller, "block-topk's causal budget controller alone (GPU planners)");
  m.def("block_minmax", &block_minmax, "per key block: channel max then channel min (Quest's summaries)");
  m.def("amx_tiles", &amx_enabled, "whether the bf16 engine runs its own AMX tile kernels (else oneDNN's brgemm)");
  m.def("bf16_supported", &bf16_supported, "whether the bf16 engine (oneDNN packing for bf16 matrix units) runs here");
}
