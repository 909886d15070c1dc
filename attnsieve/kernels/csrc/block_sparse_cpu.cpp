// Block-sparse attention on CPU: one fused pass per query block, flash-style.
//
// Each item (a query block of R rows) visits its key blocks in place: a small GEMM for the
// scores (MKL's sgemm, exported by torch's libtorch_cpu), token masks only on partial tiles,
// an online softmax kept in registers-sized row buffers, and a second small GEMM that adds the
// probabilities times the value block into the output. Nothing is gathered and no score tensor
// outlives its tile. Items run in parallel (OpenMP, dynamic schedule); MKL runs single-threaded
// inside the parallel region.
//
// Built on first use by attnsieve/kernels/compiled.py (torch.utils.cpp_extension).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// C[R x bs] (row-major, ldc = bs) = A[R x D] (row-major) . B[bs x D]^T (row-major)
inline void scores_gemm(const float* a, const float* b, float* c, int R, int bs, int D, float alpha) {
  const char t = 'T', n = 'N';
  const float beta = 0.0f;
  // column-major view: C^T (bs x R) = B (bs x D, i.e. B^T col-major transposed) . A^T (D x R)
  sgemm_(&t, &n, &bs, &R, &D, &alpha, b, &D, a, &D, &beta, c, &bs);
}

// C[R x Dv] (row-major) += P[R x bs] (row-major) . V[bs x Dv] (row-major)
inline void values_gemm(const float* p, const float* v, float* c, int R, int bs, int Dv) {
  const char n = 'N';
  const float one = 1.0f;
  sgemm_(&n, &n, &Dv, &R, &bs, &one, v, &Dv, p, &bs, &one, c, &Dv);
}

// exp(x) for the softmax's x <= 0, to about 2 ulp, written so the compiler vectorises it (libm's
// expf does not vectorise without -ffast-math, which would also break -inf handling). Range
// reduction x = n ln2 + r with ln2 split in two parts, then a degree-6 polynomial for exp(r)
// (the classic Cephes coefficients) and 2^n from the exponent bits; x = -inf gives exactly 0.
inline float softmax_exp(float x) {
  const bool zero = x < -87.0f;
  const float xc = zero ? -87.0f : x;
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
  return zero ? 0.0f : e * two_n;
}

// Signed integers in the same order as the floats they encode (no NaNs here).
inline int32_t order_key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(float));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// One tile's step of the online softmax for one row: sr (w scores, masked ones -inf, at least one
// finite) becomes exp(sr - new max); the running max m, sum l and output row are rescaled.
inline void online_softmax_row(float* sr, int w, float& m, float& l, float* orow, int64_t Dv) {
  float mx = kNegInf;
  for (int c = 0; c < w; ++c) mx = std::max(mx, sr[c]);
  const float m_new = std::max(m, mx);
  const float corr = std::exp(m - m_new);  // 0 when m = -inf
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < w; ++c) {
    const float p = softmax_exp(sr[c] - m_new);
    sr[c] = p;
    sum += p;
  }
  if (corr != 1.0f) {
#pragma omp simd
    for (int64_t d = 0; d < Dv; ++d) orow[d] *= corr;
  }
  l = l * corr + sum;
  m = m_new;
}

// Final normalisation of an item's rows: out /= l, lse = m + log l; rows that saw no key get
// out 0 and lse -inf.
inline void finish_rows(float* on, float* lp, const float* m, const float* l, int64_t R, int64_t Dv) {
  for (int64_t r = 0; r < R; ++r) {
    float* orow = on + r * Dv;
    if (l[r] > 0.0f) {
      const float inv = 1.0f / l[r];
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
      lp[r] = m[r] + std::log(l[r]);
    } else {
      std::fill(orow, orow + Dv, 0.0f);
      lp[r] = kNegInf;
    }
  }
}

}  // namespace

// q: [N, R, D]; k: [NB, bs, D]; v: [NB, bs, Dv]  (float32, contiguous)
// slots: [N, K] int64 flat key-block index into k / v, -1 = unused slot
// kpos: [N, K] int64 absolute position of each slot's first key
// qpos: [N] int64 absolute position of each item's first query row; row r sits at qpos + r % bs
// row_mask: [N, R, K] bool or empty (restricts a row's softmax to some slots; cells still count)
// key_ok: [NB, bs] bool or empty; q_ok: [N, R] bool or empty
// window: < 0 for none; causal: keys after the query are excluded
// Returns out [N, R, Dv], lse [N, R] (float32) and the number of computed cells (int64 scalar).
std::vector<at::Tensor> block_sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& slots, const at::Tensor& kpos,
                                             const at::Tensor& qpos, const at::Tensor& row_mask,
                                             const at::Tensor& key_ok, const at::Tensor& q_ok, int64_t bs64,
                                             bool causal, int64_t window, double scale_d) {
  TORCH_CHECK(q.dtype() == at::kFloat && k.dtype() == at::kFloat && v.dtype() == at::kFloat, "float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(slots.is_contiguous() && kpos.is_contiguous() && qpos.is_contiguous(), "index tensors must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [N, R, D], k [NB, bs, D], v [NB, bs, Dv]");
  const int64_t N = q.size(0), R = q.size(1), D = q.size(2);
  const int64_t NB = k.size(0), Dv = v.size(2), K = slots.size(1);
  const int bs = static_cast<int>(bs64);
  TORCH_CHECK(k.size(1) == bs && v.size(1) == bs && k.size(2) == D && v.size(0) == NB, "k / v shapes");
  TORCH_CHECK(slots.size(0) == N && kpos.size(0) == N && kpos.size(1) == K && qpos.size(0) == N, "index shapes");
  const bool has_rm = row_mask.defined() && row_mask.numel() > 0;
  const bool has_kok = key_ok.defined() && key_ok.numel() > 0;
  const bool has_qok = q_ok.defined() && q_ok.numel() > 0;
  if (has_rm) TORCH_CHECK(row_mask.is_contiguous() && row_mask.size(0) == N && row_mask.size(1) == R && row_mask.size(2) == K, "row_mask shape");
  if (has_kok) TORCH_CHECK(key_ok.is_contiguous() && key_ok.size(0) == NB && key_ok.size(1) == bs, "key_ok shape");
  if (has_qok) TORCH_CHECK(q_ok.is_contiguous() && q_ok.size(0) == N && q_ok.size(1) == R, "q_ok shape");

  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * K; ++i) TORCH_CHECK(sl[i] < NB, "slot index out of range");

  auto out = at::zeros({N, R, Dv}, q.options());
  auto lse = at::empty({N, R}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* kps = kpos.data_ptr<int64_t>();
  const int64_t* qps = qpos.data_ptr<int64_t>();
  const bool* rm = has_rm ? row_mask.data_ptr<bool>() : nullptr;
  const bool* kok = has_kok ? key_ok.data_ptr<bool>() : nullptr;
  const bool* qok = has_qok ? q_ok.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float scale = static_cast<float>(scale_d);
  // Per key block: true when every key is real (no per-token key mask needed).
  std::vector<char> block_full(NB, 1);
  if (has_kok)
    for (int64_t b = 0; b < NB; ++b)
      for (int c = 0; c < bs; ++c)
        if (!kok[b * bs + c]) { block_full[b] = 0; break; }

  int64_t total_cells = 0;
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads) reduction(+ : total_cells)
  {
    std::vector<float> S(R * bs), m(R), l(R);
    std::vector<int64_t> row_q(R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      const float* qn = qp + n * R * D;
      float* on = op + n * R * Dv;
      bool q_full = true;
      int64_t q_last = -1, q_first = std::numeric_limits<int64_t>::max();
      for (int64_t r = 0; r < R; ++r) {
        row_q[r] = qps[n] + r % bs;
        m[r] = kNegInf;
        l[r] = 0.0f;
        const bool ok = !has_qok || qok[n * R + r];
        q_full &= ok;
        if (ok) { q_last = std::max(q_last, row_q[r]); q_first = std::min(q_first, row_q[r]); }
      }
      if (q_last < 0) { for (int64_t r = 0; r < R; ++r) lp[n * R + r] = kNegInf; continue; }
      int64_t cells = 0;
      for (int64_t s = 0; s < K; ++s) {
        const int64_t blk = sl[n * K + s];
        if (blk < 0) continue;
        const int64_t k0 = kps[n * K + s];
        // Tile classes: dead (no cell allowed for any real row), full (no token mask), partial.
        if (causal && k0 > q_last) continue;
        if (window >= 0 && q_first - (k0 + bs - 1) >= window) continue;
        const bool full = q_full && block_full[blk] && (!causal || k0 + bs - 1 <= q_first) &&
                          (window < 0 || q_last - k0 < window);
        const float* kb = kp + blk * bs * D;
        scores_gemm(qn, kb, S.data(), static_cast<int>(R), bs, static_cast<int>(D), scale);
        const bool* kmask = has_kok ? kok + blk * bs : nullptr;
        for (int64_t r = 0; r < R; ++r) {
          float* sr = S.data() + r * bs;
          int64_t allowed = bs;
          if (!full) {
            allowed = 0;
            const bool rok = !has_qok || qok[n * R + r];
            const int64_t qr = row_q[r];
            for (int c = 0; c < bs; ++c) {
              const int64_t kc = k0 + c;
              const bool ok = rok && (!kmask || kmask[c]) && (!causal || kc <= qr) && (window < 0 || qr - kc < window);
              allowed += ok;
              if (!ok) sr[c] = kNegInf;
            }
          }
          cells += allowed;
          const bool row_on = allowed > 0 && (!rm || rm[(n * R + r) * K + s]);
          if (!row_on) {
            std::fill(sr, sr + bs, 0.0f);
            continue;
          }
          online_softmax_row(sr, bs, m[r], l[r], on + r * Dv, Dv);
        }
        values_gemm(S.data(), vp + blk * bs * Dv, on, static_cast<int>(R), bs, static_cast<int>(Dv));
      }
      finish_rows(on, lp + n * R, m.data(), l.data(), R, Dv);
      total_cells += cells;
    }
  }
  return {out, lse, at::full({}, total_cells, at::TensorOptions().dtype(at::kLong))};
}

// Attention of each item (R query rows) over its own list of key tokens: the listed keys are
// copied into a tile buffer 64 at a time and run through the same tile loop (sgemm, per-cell
// masks, online softmax, sgemm). Cells are counted after the row mask (as the torch path does).
// q: [N, R, D]; k: [S, Tk, D]; v: [S, Tk, Dv] (S = B * Hkv sequences of keys); tokens: [N, M]
// positions (-1 unused, distinct within a list); item_seq: [N] row of k / v for each item;
// item_b: [N] batch row (for key_ok [B, Tk]); qpos: [N] position of each item's first row (row r
// sits at qpos + r % bs); row_mask: [N, R, M] or empty; q_ok: [N, R] or empty.
std::vector<at::Tensor> token_gather_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& tokens, const at::Tensor& item_seq,
                                             const at::Tensor& item_b, const at::Tensor& qpos,
                                             const at::Tensor& row_mask, const at::Tensor& key_ok,
                                             const at::Tensor& q_ok, int64_t bs, bool causal, int64_t window,
                                             double scale_d) {
  TORCH_CHECK(q.dtype() == at::kFloat && k.dtype() == at::kFloat && v.dtype() == at::kFloat, "float32 only");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && tokens.is_contiguous() &&
              item_seq.is_contiguous() && item_b.is_contiguous() && qpos.is_contiguous(), "contiguous inputs");
  const int64_t N = q.size(0), R = q.size(1), D = q.size(2);
  const int64_t S = k.size(0), Tk = k.size(1), Dv = v.size(2), M = tokens.size(1);
  TORCH_CHECK(k.size(2) == D && v.size(0) == S && v.size(1) == Tk && tokens.size(0) == N, "shapes");
  const bool has_rm = row_mask.numel() > 0, has_kok = key_ok.numel() > 0, has_qok = q_ok.numel() > 0;
  if (has_rm) TORCH_CHECK(row_mask.is_contiguous() && row_mask.size(0) == N && row_mask.size(1) == R && row_mask.size(2) == M, "row_mask shape");
  if (has_kok) TORCH_CHECK(key_ok.is_contiguous() && key_ok.size(1) == Tk, "key_ok shape");
  if (has_qok) TORCH_CHECK(q_ok.is_contiguous() && q_ok.size(0) == N && q_ok.size(1) == R, "q_ok shape");
  const int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t* sq = item_seq.data_ptr<int64_t>();
  const int64_t* ib = item_b.data_ptr<int64_t>();
  const int64_t* qps = qpos.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * M; ++i) TORCH_CHECK(tp[i] < Tk, "token position out of range");
  for (int64_t n = 0; n < N; ++n) TORCH_CHECK(sq[n] >= 0 && sq[n] < S, "item_seq out of range");
  auto out = at::zeros({N, R, Dv}, q.options());
  auto lse = at::empty({N, R}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
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
    std::vector<float> S_(R * TW), kb(TW * D), vb(TW * Dv), m(R), l(R);
    std::vector<int64_t> slot(TW), pos(TW);
#pragma omp for schedule(dynamic, 1)
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t r = 0; r < R; ++r) m[r] = kNegInf, l[r] = 0.0f;
      const int64_t* tn = tp + n * M;
      const float* ks = kp + sq[n] * Tk * D;
      const float* vs = vp + sq[n] * Tk * Dv;
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
        {
          const char tt = 'T', nn = 'N';
          const float beta = 0.0f;
          const int Ri = static_cast<int>(R), Di = static_cast<int>(D);
          sgemm_(&tt, &nn, &w, &Ri, &Di, &scale, kb.data(), &Di, qp + n * R * D, &Di, &beta, S_.data(), &w);
        }
        for (int64_t r = 0; r < R; ++r) {
          float* sr = S_.data() + r * w;
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
          cells += allowed;
          if (allowed == 0) {
            std::fill(sr, sr + w, 0.0f);
            continue;
          }
          online_softmax_row(sr, w, m[r], l[r], on + r * Dv, Dv);
        }
        {
          const char nn = 'N';
          const float one = 1.0f;
          const int Ri = static_cast<int>(R), Dvi = static_cast<int>(Dv);
          sgemm_(&nn, &nn, &Dvi, &Ri, &w, &one, vb.data(), &Dvi, S_.data(), &w, &one, on, &Dvi);
        }
      }
      finish_rows(on, lp + n * R, m.data(), l.data(), R, Dv);
      total_cells += cells;
    }
  }
  return {out, lse, at::full({}, total_cells, at::TensorOptions().dtype(at::kLong))};
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
std::vector<at::Tensor> block_topk_plan(const at::Tensor& q, const at::Tensor& summ, const at::Tensor& rows,
                                        const at::Tensor& cand, const at::Tensor& forced, const at::Tensor& budget,
                                        int64_t Hs, int64_t first_qb, int64_t lead, int64_t k_cap, bool minmax) {
  TORCH_CHECK(q.dtype() == at::kFloat && summ.dtype() == at::kFloat, "float32 only");
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
  const float* qp = q.data_ptr<float>();
  const float* sp = summ.data_ptr<float>();
  const bool* rp = rows.data_ptr<bool>();
  const bool* cp = cand.data_ptr<bool>();
  const bool* fp = forced.data_ptr<bool>();
  const int64_t* bp = budget.data_ptr<int64_t>();

  std::vector<std::vector<int64_t>> item_slots(N);
  std::vector<std::vector<uint8_t>> item_rows(N);
  const int threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> qbuf(R * C), bnd(R * NK);
    std::vector<int32_t> keys(NK);
    std::vector<uint8_t> sel(R * NK), uni(NK);
    std::vector<int64_t> cidx(NK);
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
            float* dst = qbuf.data() + r * C;
            const int64_t i = r % bs, h = s * Gs + r / bs, t = j * bs + i - lead;
            if (!rp[(b * NQ + j) * bs + i] || t < 0 || t >= Tq) {
              std::fill(dst, dst + C, 0.0f);
              continue;
            }
            const float* src = qp + b * qs0 + h * qs1 + t * qs2;
            if (minmax) {
              for (int64_t d = 0; d < D; ++d) {
                dst[d] = std::max(src[d], 0.0f);
                dst[D + d] = std::min(src[d], 0.0f);
              }
            } else {
              std::copy(src, src + D, dst);
            }
          }
          int64_t m_cand = 0;
          for (int64_t c = 0; c < jmax; ++c)
            if (cj[c] && !fj[c]) cidx[m_cand++] = c;
          const int64_t extra = k - nf;  // picks beyond the forced blocks
          if (extra > 0 && extra < m_cand) {
            const int ldb = static_cast<int>(jmax);
            const char t = 'T', nn = 'N';
            const float one = 1.0f, zero = 0.0f;
            const int Ri = static_cast<int>(R), Ci = static_cast<int>(C);
            sgemm_(&t, &nn, &ldb, &Ri, &Ci, &one, sp + ((b * Hkv + kvh) * NK) * C, &Ci, qbuf.data(), &Ci, &zero,
                   bnd.data(), &ldb);
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
            const float* br = bnd.data() + r * jmax;
            int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
            for (int64_t x = 0; x < m_cand; ++x) {
              const int32_t key = order_key(br[cidx[x]]);
              keys[x] = key;
              lo = std::min(lo, key);
              hi = std::max(hi, key);
            }
            // largest threshold t with at least `extra` keys >= t: the extra-th largest key itself
            while (lo < hi) {
              const int32_t mid = static_cast<int32_t>(lo + ((static_cast<int64_t>(hi) - lo + 1) >> 1));
              int32_t cnt = 0;  // 32-bit lanes: the count vectorises at full width
              const int32_t* kx = keys.data();
              const int32_t mc = static_cast<int32_t>(m_cand);
              for (int32_t x = 0; x < mc; ++x) cnt += kx[x] >= mid;
              if (cnt >= extra) lo = mid; else hi = mid - 1;
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward, "fused block-sparse attention over per-item key-block slots");
  m.def("token_gather_forward", &token_gather_forward, "attention of each item over its own list of key tokens");
  m.def("block_topk_plan", &block_topk_plan, "block-topk's per-query selection with its causal budget controller");
}
