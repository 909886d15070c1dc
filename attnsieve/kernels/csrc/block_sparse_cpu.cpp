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
          float mx = kNegInf;
          for (int c = 0; c < bs; ++c) mx = std::max(mx, sr[c]);
          const float m_new = std::max(m[r], mx);
          const float corr = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int c = 0; c < bs; ++c) {
            const float p = softmax_exp(sr[c] - m_new);
            sr[c] = p;
            sum += p;
          }
          if (corr != 1.0f) {
            float* orow = on + r * Dv;
#pragma omp simd
            for (int64_t d = 0; d < Dv; ++d) orow[d] *= corr;
          }
          l[r] = l[r] * corr + sum;
          m[r] = m_new;
        }
        values_gemm(S.data(), vp + blk * bs * Dv, on, static_cast<int>(R), bs, static_cast<int>(Dv));
      }
      for (int64_t r = 0; r < R; ++r) {
        float* orow = on + r * Dv;
        if (l[r] > 0.0f) {
          const float inv = 1.0f / l[r];
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) orow[d] *= inv;
          lp[n * R + r] = m[r] + std::log(l[r]);
        } else {
          std::fill(orow, orow + Dv, 0.0f);
          lp[n * R + r] = kNegInf;
        }
      }
      total_cells += cells;
    }
  }
  return {out, lse, at::full({}, total_cells, at::TensorOptions().dtype(at::kLong))};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("block_sparse_forward", &block_sparse_forward, "fused block-sparse attention over per-item key-block slots");
}
