// lomt::group_prox_adam_cpu: the proximal Adam step fused per tensor, on CPU tensors.
//
// The maths is lomt_kernels.reference.group_prox_adam's. Per element, in the compute type T
// (float for float32/float16/bfloat16 storage, double for float64), with s = lr / (1 - beta1^t)
// and c = sqrt(1 - beta2^t):
//
//   g <- g / grad_scale, negated for maximize;  g <- g + wd p (coupled)  or  p <- p (1 - lr wd)
//   m <- lerp(m, g, 1 - beta1),  v <- beta2 v + ((1 - beta2) g) g,  d = sqrt(v)/c + eps,
//   z = p - s m / d
//
// and then each tensor's prox ("none" for params of fewer than two dims):
//
//   "none":            p = z
//   "l1":              p = sign(z) max(|z| - lr lambda, 0)
//   "group":           p_G = max(0, 1 - tau/||z_G||) z_G
//   "group_weighted":  p_G = argmin_x 1/2 ||x - z_G||^2_D + tau ||x||, D = diag(d_G): zero iff
//                      ||D z_G|| <= tau, else x_j = theta z_j d_j / (theta d_j + tau) with theta
//                      the root of phi(theta) = (sum_j (z_j d_j / (theta d_j + tau))^2)^(-1/2) = 1,
//                      found by Newton's method from 0 (the first step in closed form),
//                      clamped at 0, stopped when 1 - phi <= rtol (1e-6 in float, 1e-12 in
//                      double), after an update shown to land there, or after 30 updates.
//
// with tau = lr lambda sqrt(n_G). A tensor's storage is read as a dense [A, B, K] array whose
// group b is [:, b, :] (group_layout below, lomt_kernels.grouping.GroupLayout), so n_G = A K.
//
// Non-finite values (the reference's rule): a prox acts only where its statistics are finite. A
// group whose ||z_G|| ("group"), or ||D z_G||^2 or sum_j d_j^3 z_j^2 ("group_weighted"), is NaN or
// inf, and an element whose z is ("l1"), is passed through, p = z, as plain Adam leaves it: a NaN
// never turns into exact zeros, which would read as sparsity. The test is on the group sums that
// the prox computes anyway.
//
// Memory order. The step is bound by memory bandwidth, and the cores stream memory fastest in
// address order (as torch.optim.Adam(fused=True) does); a strided pattern such as a column tile
// of a tensor reaches only part of that (benchmarks/RESULTS-cpu-kernel.md, "Memory order"). So
// every pass walks storage in address order:
//
// * Elementwise tensors (plain Adam, l1): one pass, 28 bytes per float32 param.
// * Out-channel groups (A = 1) are contiguous: the tensor is cut into tiles of whole groups
//   small enough that z is still in L2 for the rescale, so memory sees the same 28 bytes.
// * In-channel groups (A > 1) are strided (group b is a run of K elements in every row). Pass 1
//   is the Adam update over whole rows, writing z into p and adding each lane's z^2 into per-lane
//   sums one row long, reduced over each group's K lanes at the end (3x3 groups are summed in
//   registers instead, with AVX-512 or AVX2: see Block::reduce); pass 2 rescales z in place,
//   backwards, so that it starts with the lines pass 1 touched last, the likeliest to be still
//   cached. It re-reads z from cache for small tensors and mostly from memory for large ones:
//   up to 36 bytes per param.
// * The weighted prox makes one pass over z and d per Newton update (mostly 2) and a last one
//   to write x. These passes skip the vectors whose lanes all belong to zero groups (or, in a
//   Newton pass, to groups not in flight): they read neither z nor d there. For a large tensor,
//   pass 1 writes no d: the later passes recompute it from v (see d_at), so pass 1 moves Adam's
//   28 bytes. An update that a bound on phi'' shows to land within the tolerance ends the
//   iteration without a pass to confirm it (see newton_step).
//
// Code generation. A vector store may alias any memory, so the hot loops read constants and
// pointers only from locals of the per-band callback, with every helper inlined; a value read
// through a member or a captured reference would be reloaded after every store
// (benchmarks/RESULTS-cpu-kernel.md, "Code generation").
//
// Parallelism (at::parallel_for, so the extension is built with -fopenmp). A tensor of at least
// kCooperativeElements (plain or in-channel) is run by all threads at once, each pass split
// into one contiguous piece (row band) per thread, the bands' group sums added up between
// passes, so that one large tensor never leaves the other threads idle; everything else
// (smaller tensors, out-channel tiles) is handed out largest first from a shared counter. The
// first scheme is what keeps a model with few large tensors busy. A thread runs the same band
// in every pass (at::parallel_for splits statically), so the later passes re-read the z and d
// it wrote from its own core's caches, which smaller bands from a shared counter would lose
// (benchmarks/RESULTS-cpu-kernel.md, "Parallelism").

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace lomt {
namespace {

using at::vec::Vectorized;

// Out-channel tiles hold about this many elements: z (256 KiB in float) stays in L2 for pass 2.
constexpr int64_t kTileElements = 1 << 16;
// Elementwise and in-channel tensors from this size up are run by all threads at once.
constexpr int64_t kCooperativeElements = 1 << 19;
// Groups with at least this many contiguous elements (K) are summed segment by segment;
// shorter ones through per-lane partial sums.
constexpr int64_t kSegmentMinLength = 64;
// Newton updates allowed per group (lomt_kernels.reference.WEIGHTED_PROX_MAX_ITER).
constexpr int kNewtonMaxIter = 30;
// Rows of short groups the weighted prox's Newton passes sum at once (Block::reduce).
constexpr int kNewtonPassRows = 4;

enum class Prox { kNone, kGroup, kWeighted, kL1 };

Prox parse_prox(std::string_view name) {
  if (name == "none") return Prox::kNone;
  if (name == "group") return Prox::kGroup;
  if (name == "group_weighted") return Prox::kWeighted;
  if (name == "l1") return Prox::kL1;
  TORCH_CHECK(false, "group_prox_adam_cpu: unknown prox '", name,
              "': expected none, group, group_weighted or l1");
}

// Hyperparameters shared by every tensor of the call, in double as the Python side has them.
struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay;
  double grad_divisor;  // grad_scale, negated for maximize (division by -1 is exact negation)
  bool divide_grad;     // grad_scale given or maximize
};

// One tensor's step: its storage, [A, B, K] layout, prox and step-dependent scalars.
struct TensorStep {
  void* p;
  const void* g;
  void* m;
  void* v;
  at::ScalarType dtype;
  int64_t numel, A, B, K;
  Prox prox;
  double step_size;  // lr / (1 - beta1^t)
  double bc2_sqrt;   // sqrt(1 - beta2^t)
  double threshold;  // tau = lr lambda sqrt(A K) for group proxes, lr lambda for l1
};

// A unit of parallel work: groups [begin, end) of a grouped tensor (all of them when A > 1),
// or elements [begin, end) of an elementwise one.
struct WorkItem {
  int64_t tensor, begin, end;
  int64_t size() const { return end - begin; }
};

// --- loads and stores in the compute type -----------------------------------------------

template <typename T, typename S>
C10_ALWAYS_INLINE Vectorized<T> load(const S* ptr, int64_t count) {
  if constexpr (std::is_same_v<S, T>) {
    return Vectorized<T>::loadu(ptr, count);
  } else {
    __at_align__ T buf[Vectorized<T>::size()];
    for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<T>(ptr[i]);
    for (int64_t i = count; i < Vectorized<T>::size(); ++i) buf[i] = T(0);
    return Vectorized<T>::loadu(buf);
  }
}

template <typename T, typename S>
C10_ALWAYS_INLINE void store(S* ptr, const Vectorized<T>& x, int64_t count) {
  if constexpr (std::is_same_v<S, T>) {
    x.store(ptr, count);
  } else {
    __at_align__ T buf[Vectorized<T>::size()];
    x.store(buf);
    for (int64_t i = 0; i < count; ++i) ptr[i] = static_cast<S>(buf[i]);  // round to nearest even
  }
}

// Calls f(i, count) over [begin, end) a vector at a time: full vectors (count a constant the
// compiler folds into f), then one partial vector.
template <typename T, class F>
C10_ALWAYS_INLINE void for_vectors(int64_t begin, int64_t end, F&& f) {
  constexpr int64_t kVec = Vectorized<T>::size();
  int64_t i = begin;
  for (; i + kVec <= end; i += kVec) f(i, kVec);
  if (i < end) f(i, end - i);
}

// --- the Adam update --------------------------------------------------------------------

// The per-tensor constants of the Adam update, broadcast to vectors of the compute type.
template <typename T>
struct AdamConstants {
  using Vec = Vectorized<T>;
  Vec grad_divisor, wd, decay, lerp_weight, one_minus_lerp_weight, beta2, one_minus_beta2;
  Vec inv_bc2_sqrt, half_inv_bc2_sqrt, three_halves_inv_bc2_sqrt, eps, step_size;
  bool divide_grad, coupled_decay, decoupled_decay, lerp_from_start;

  AdamConstants(const Hyper& h, const TensorStep& t)
      : grad_divisor(T(h.grad_divisor)),
        wd(T(h.weight_decay)),
        decay(T(1 - h.lr * h.weight_decay)),
        lerp_weight(T(1 - h.beta1)),
        one_minus_lerp_weight(T(1) - T(1 - h.beta1)),
        beta2(T(h.beta2)),
        one_minus_beta2(T(1 - h.beta2)),
        // A multiplication where the reference divides by sqrt(1 - beta2^t): d moves by at most
        // an ulp, and the sqrt and the division by d are already the step's bottleneck.
        inv_bc2_sqrt(T(1 / t.bc2_sqrt)),
        half_inv_bc2_sqrt(inv_bc2_sqrt * Vec(T(0.5))),  // fast_denominator's
        three_halves_inv_bc2_sqrt(inv_bc2_sqrt * Vec(T(1.5))),
        eps(T(h.eps)),
        step_size(T(t.step_size)),
        divide_grad(h.divide_grad),
        coupled_decay(h.weight_decay != 0 && !h.decoupled_weight_decay),
        decoupled_decay(h.weight_decay != 0 && h.decoupled_weight_decay),
        // torch.lerp's two formulas, chosen by the weight as at::lerp does.
        lerp_from_start(std::abs(T(1 - h.beta1)) < T(0.5)) {}
};

template <typename T>
struct AdamResult {
  Vectorized<T> z, d;
};

// Adam's denominator d = sqrt(v) / sqrt(1 - beta2^t) + eps, from sqrt(v).
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> denominator(const AdamConstants<T>& c, const Vectorized<T>& sqrt_exp_avg_sq) {
  return sqrt_exp_avg_sq * c.inv_bc2_sqrt + c.eps;
}

#if defined(CPU_CAPABILITY_AVX512)
// The ISA's estimate of 1/sqrt(max(v, FLT_MIN)): within 2^-14 relative.
C10_ALWAYS_INLINE Vectorized<float> rsqrt_estimate(const Vectorized<float>& v) {
  return _mm512_rsqrt14_ps(_mm512_max_ps(v, _mm512_set1_ps(FLT_MIN)));
}
#elif defined(CPU_CAPABILITY_AVX2)
// The ISA's estimate of 1/sqrt(max(v, FLT_MIN)): within 1.5 * 2^-12 relative.
C10_ALWAYS_INLINE Vectorized<float> rsqrt_estimate(const Vectorized<float>& v) {
  return _mm256_rsqrt_ps(_mm256_max_ps(v, _mm256_set1_ps(FLT_MIN)));
}
#endif

// Adam's denominator d = sqrt(v) / sqrt(1 - beta2^t) + eps from v >= 0, for the weighted prox's
// passes after pass 1, which take it for every element. In float with AVX2, the square root is
// v y (3/2 - (v y) y / 2): y the reciprocal square root estimate after one Newton step, with
// the step's constants folded into 1 / sqrt(1 - beta2^t), so that d costs four multiply-adds.
// That is within 2.5e-7 relative of sqrt(v) / sqrt(1 - beta2^t) (measured over all float32 v in
// [2^-126, 2^20) with either estimate, at four bias corrections); the estimate's argument is
// raised to the smallest normal float so that v = 0 gives d = eps. The passes after pass 1 run
// at memory speed only with this: a correctly rounded root, or the Newton step without the
// folded constants, slows them (benchmarks/RESULTS-cpu-kernel.md, "Adam's denominator in the
// passes after pass 1"). Exact for double, and without AVX2.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_denominator(const AdamConstants<T>& c, const Vectorized<T>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const Vectorized<T> y = rsqrt_estimate(v);
    const Vectorized<T> vy = v * y;
    return at::vec::fmadd(vy, at::vec::fnmadd(vy * y, c.half_inv_bc2_sqrt, c.three_halves_inv_bc2_sqrt), c.eps);
  }
#endif
  return denominator(c, v.sqrt());
}

// Updates m and v for `count` elements and returns z = p - s m / d and d; p is not written.
template <typename T, typename S>
C10_ALWAYS_INLINE AdamResult<T> adam(const AdamConstants<T>& c, const S* p, const S* g, S* m, S* v,
                          int64_t count) {
  auto x = load<T>(p, count);
  auto grad = load<T>(g, count);
  auto exp_avg = load<T>(m, count);
  auto exp_avg_sq = load<T>(v, count);
  if (c.divide_grad) grad = grad / c.grad_divisor;
  if (c.decoupled_decay) x = x * c.decay;
  if (c.coupled_decay) grad = grad + c.wd * x;
  exp_avg = c.lerp_from_start ? exp_avg + c.lerp_weight * (grad - exp_avg)
                              : grad - (grad - exp_avg) * c.one_minus_lerp_weight;
  exp_avg_sq = exp_avg_sq * c.beta2 + (c.one_minus_beta2 * grad) * grad;
  store(m, exp_avg, count);
  store(v, exp_avg_sq, count);
  auto d = denominator(c, exp_avg_sq.sqrt());
  return {x - c.step_size * exp_avg / d, d};
}

// sign(z) max(|z| - t, 0), NaN-propagating as the reference.
template <typename T>
inline Vectorized<T> soft_threshold(const Vectorized<T>& z, const Vectorized<T>& t) {
  const Vectorized<T> sign_bit(T(-0.0));
  auto shrunk = at::vec::maximum(z.abs() - t, Vectorized<T>(T(0)));
  return shrunk | (z & sign_bit);
}

// --- thread-local scratch ---------------------------------------------------------------

// Buffers a thread reuses from call to call; they only grow.
template <typename T>
struct Scratch {
  std::vector<T> z;      // z of the tile (or tensor) when it cannot live in p
  std::vector<T> d;      // its Adam denominators (weighted prox, unless d_at recomputes them)
  std::vector<T> lanes;  // per-lane partial sums, then per-lane theta or scale

  static Scratch& get() {
    thread_local Scratch scratch;
    return scratch;
  }
};

template <typename T>
T* sized(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// --- a block of a grouped tensor ---------------------------------------------------------

// Rows [a0, a1) of the groups [b0, b1) of one tensor. Lane j in [0, L), L = (b1 - b0) K, of
// row a is the storage element a B K + b0 K + j and belongs to the block's group j / K. The
// block's z and d scratch (when used) hold lane j of row a at a L + j.
template <typename S>
class Block {
 public:
  using T = at::opmath_type<S>;
  using Vec = Vectorized<T>;
  static constexpr int64_t kVec = Vec::size();

  Block(const TensorStep& t, int64_t a0, int64_t a1, int64_t b0, int64_t b1)
      : a0_(a0), a1_(a1), K_(t.K), nb_(b1 - b0), L_(nb_ * t.K), row_stride_(t.B * t.K),
        offset_(b0 * t.K), segments_(t.K >= kSegmentMinLength), p_(static_cast<S*>(t.p)),
        g_(static_cast<const S*>(t.g)), m_(static_cast<S*>(t.m)), v_(static_cast<S*>(t.v)) {}

  // Lane 0 of row a in each tensor and in the scratch, handed to the loops' callbacks as a local
  // value (see "Code generation" at the top).
  struct Row {
    S* p;
    const S* g;
    S* m;
    S* v;
    int64_t scratch;
  };

  int64_t lanes() const { return L_; }
  Row row(int64_t a) const {
    const int64_t offset = a * row_stride_ + offset_;
    return {p_ + offset, g_ + offset, m_ + offset, v_ + offset, a * L_};
  }

  // Calls f(row, j, count) -> std::array<Vec, N> for every vector of lanes [g_lo K, g_hi K) of
  // every row, and sets sums[i][b] (b in [g_lo, g_hi)) to the sum over the rows and over the
  // K lanes of group b of the i-th returned vector. Lanes past `count` in f's results are
  // ignored. `lanes` is scratch for N L values.
  //
  // Short groups are summed through per-lane sums one row long, which outgrow L1 for rows of
  // more than about 1,400 lanes (3x3 convs with 256 or more input channels, 1x1 convs with
  // 2,048). With kRows > 1 they are summed kRows rows at a time, so each vector of per-lane
  // sums is loaded and stored once per kRows rows. That pays in a pass that only reads (the
  // weighted prox's Newton passes, kRows == 4; 8 gains nothing more). A pass that also writes
  // (pass 1, kRows == 1) loses by it, since it would stream four arrays from kRows rows at
  // once; there the per-lane sums leave L1 while the row's four arrays stream through it (and
  // column chunks whose sums stay in L1 read strided rows, slowly). So pass 1 sums 3x3 groups
  // in registers instead (sum_3x3), with AVX-512 or AVX2; the Newton passes keep the per-lane
  // sums, which they run faster with (benchmarks/RESULTS-cpu-kernel.md, "Per-lane sums over
  // several rows, and 3x3 sums in registers").
  template <int N, int kRows = 1, class F>
  C10_ALWAYS_INLINE void reduce(int64_t g_lo, int64_t g_hi, T* lanes, const std::array<T*, N>& sums, F&& f) const {
    const int64_t K = K_, L = L_;
    if (segments_) {
      for (int i = 0; i < N; ++i) std::fill(sums[i] + g_lo, sums[i] + g_hi, T(0));
      for (int64_t a = a0_; a < a1_; ++a) {
        const Row r = row(a);
        for (int64_t b = g_lo; b < g_hi; ++b) {
          std::array<Vec, N> acc;
          acc.fill(Vec(T(0)));
          for_vectors<T>(b * K, (b + 1) * K, [&](int64_t j, int64_t count) {
            auto terms = f(r, j, count);
            for (int i = 0; i < N; ++i) {
              acc[i] = acc[i] + (count == kVec ? terms[i] : Vec::set(Vec(T(0)), terms[i], count));
            }
          });
          for (int i = 0; i < N; ++i) {
            sums[i][b] += at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, acc[i]);
          }
        }
      }
      return;
    }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if constexpr (kRows == 1 && std::is_same_v<T, float>) {
      if (K == 9) {
        const int64_t g_mid = g_lo + (g_hi - g_lo) / kVec * kVec;
        sum_3x3<N>(g_lo, g_mid, sums, f);
        if (g_mid == g_hi) return;
        g_lo = g_mid;  // fewer than kVec groups left: per-lane sums
      }
    }
#endif
    const int64_t j_lo = g_lo * K, j_hi = g_hi * K;
    for (int i = 0; i < N; ++i) std::fill(lanes + i * L + j_lo, lanes + i * L + j_hi, T(0));
    int64_t a = a0_;
    for (; a + kRows <= a1_; a += kRows) add_rows<kRows, N>(a, j_lo, j_hi, lanes, f);
    for (; a < a1_; ++a) add_rows<1, N>(a, j_lo, j_hi, lanes, f);
    for (int i = 0; i < N; ++i) {
      for (int64_t b = g_lo; b < g_hi; ++b) {
        const T* acc = lanes + i * L + b * K;
        sums[i][b] = std::accumulate(acc, acc + K, T(0));
      }
    }
  }

#if defined(CPU_CAPABILITY_AVX512)
  // reduce's sums for groups of K = 9 lanes (3x3 convs), in float, for the groups [g_lo, g_hi)
  // with g_hi - g_lo a multiple of 16, without per-lane sums. Sixteen groups are 144 lanes,
  // nine whole vectors (a chunk), so each row's terms are summed per group in registers: for y
  // the chunk's 144 terms (zero past it), the window sums w[n] = sum_{k<9} y[n + k] are built
  // by doubling (pairs y[n] + y[n + 1], then quads, eights, and y[n + 8]), and group g's sum is
  // w[9 g], moved from lane 9 g mod 16 of the chunk's vector 9 g / 16 to lane g. A vector's
  // window sums need the next vector's first lanes, so they are made three vectors after its
  // terms, keeping 9 registers per sum live.
  template <int N, class F>
  C10_ALWAYS_INLINE void sum_3x3(int64_t g_lo, int64_t g_hi, const std::array<T*, N>& sums, F& f) const {
    static_assert(std::is_same_v<T, float> && kVec == 16);
    const __m512i lane_of_group = _mm512_setr_epi32(0, 9, 2, 11, 4, 13, 6, 15, 8, 1, 10, 3, 12, 5, 14, 7);
    // Bit g of kGroupsIn[k] is set if vector k of a chunk holds lane 9 g.
    constexpr __mmask16 kGroupsIn[9] = {0x3, 0xc, 0x30, 0xc0, 0x100, 0x600, 0x1800, 0x6000, 0x8000};
    const __m512 zero = _mm512_setzero_ps();
    for (int i = 0; i < N; ++i) std::fill(sums[i] + g_lo, sums[i] + g_hi, T(0));
    for (int64_t a = a0_; a < a1_; ++a) {
      const Row r = row(a);
      for (int64_t b = g_lo; b < g_hi; b += 16) {
        // At step k: y0..y3 the terms of vectors k..k-3, pairs of k-1 (a0) and k-2 (a1),
        // quads of k-2 (q0) and k-3 (q1).
        std::array<__m512, N> y0, y1, y2, y3, a0, a1, q0, q1, chunk;
        for (int i = 0; i < N; ++i) y1[i] = y2[i] = y3[i] = a1[i] = q1[i] = chunk[i] = zero;
        for (int k = 0; k < 12; ++k) {
          if (k < 9) {
            const auto terms = f(r, 9 * b + k * kVec, kVec);
            for (int i = 0; i < N; ++i) y0[i] = terms[i];
          } else {
            y0.fill(zero);
          }
          for (int i = 0; i < N; ++i) {
            if (k >= 1) a0[i] = _mm512_add_ps(y1[i], shift_in<1>(y1[i], y0[i]));
            if (k >= 2) q0[i] = _mm512_add_ps(a1[i], shift_in<2>(a1[i], a0[i]));
            if (k >= 3) {
              const __m512 eights = _mm512_add_ps(q1[i], shift_in<4>(q1[i], q0[i]));
              const __m512 w = _mm512_add_ps(eights, shift_in<8>(y3[i], y2[i]));
              chunk[i] = _mm512_mask_permutexvar_ps(chunk[i], kGroupsIn[k - 3], lane_of_group, w);
            }
            y3[i] = y2[i];
            y2[i] = y1[i];
            y1[i] = y0[i];
            a1[i] = a0[i];
            q1[i] = q0[i];
          }
        }
        for (int i = 0; i < N; ++i) {
          _mm512_storeu_ps(sums[i] + b, _mm512_add_ps(_mm512_loadu_ps(sums[i] + b), chunk[i]));
        }
      }
    }
  }

  // Lanes [kShift, 16) of x followed by lanes [0, kShift) of next: lane n holds element n + kShift.
  template <int kShift>
  static C10_ALWAYS_INLINE __m512 shift_in(__m512 x, __m512 next) {
    return _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(next), _mm512_castps_si512(x), kShift));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // reduce's sums for groups of K = 9 lanes (3x3 convs), in float, for the groups [g_lo, g_hi)
  // with g_hi - g_lo a multiple of 8, without per-lane sums (the AVX2 counterpart of the above).
  // Eight groups are 72 lanes, nine whole vectors t_0..t_8 (a chunk), and group g is lanes
  // [g, 8) of t_g with lanes [0, g] of t_{g+1}. So w_g, lanes [g + 1, 8) of t_g with lanes
  // [0, g] of t_{g+1} (one blend), holds all of group g but lane g of t_g; e, lane g of t_g for
  // every g (one blend per vector), holds that. The chunk's group sums are e plus the sums of
  // w_0..w_7, from a tree of horizontal adds built as the w arrive. The blends take their masks
  // from tables, not immediates, so that the loop over a chunk's vectors stays a loop with one
  // call of f: unrolled into nine calls, f (pass 1's Adam update) is no longer inlined.
  template <int N, class F>
  C10_ALWAYS_INLINE void sum_3x3(int64_t g_lo, int64_t g_hi, const std::array<T*, N>& sums, F& f) const {
    static_assert(std::is_same_v<T, float> && kVec == 8);
    // Row k of kLaneIs (k < 8) is lane k; row k of kLanesFrom is lanes [k, 8).
    alignas(32) static constexpr int32_t kLaneIs[9][8] = {
        {-1, 0, 0, 0, 0, 0, 0, 0}, {0, -1, 0, 0, 0, 0, 0, 0}, {0, 0, -1, 0, 0, 0, 0, 0}, {0, 0, 0, -1, 0, 0, 0, 0},
        {0, 0, 0, 0, -1, 0, 0, 0}, {0, 0, 0, 0, 0, -1, 0, 0}, {0, 0, 0, 0, 0, 0, -1, 0}, {0, 0, 0, 0, 0, 0, 0, -1},
        {0, 0, 0, 0, 0, 0, 0, 0}};
    alignas(32) static constexpr int32_t kLanesFrom[9][8] = {
        {-1, -1, -1, -1, -1, -1, -1, -1}, {0, -1, -1, -1, -1, -1, -1, -1}, {0, 0, -1, -1, -1, -1, -1, -1},
        {0, 0, 0, -1, -1, -1, -1, -1}, {0, 0, 0, 0, -1, -1, -1, -1}, {0, 0, 0, 0, 0, -1, -1, -1},
        {0, 0, 0, 0, 0, 0, -1, -1}, {0, 0, 0, 0, 0, 0, 0, -1}, {0, 0, 0, 0, 0, 0, 0, 0}};
    const __m256 zero = _mm256_setzero_ps();
    for (int i = 0; i < N; ++i) std::fill(sums[i] + g_lo, sums[i] + g_hi, T(0));
    for (int64_t a = a0_; a < a1_; ++a) {
      const Row r = row(a);
      for (int64_t b = g_lo; b < g_hi; b += 8) {
        std::array<__m256, N> prev, e, w_even, pair, quad;
        for (int i = 0; i < N; ++i) prev[i] = e[i] = w_even[i] = pair[i] = quad[i] = zero;
        for (int k = 0; k < 9; ++k) {
          const auto terms = f(r, 9 * b + k * kVec, kVec);
          const __m256 lane_is = _mm256_load_ps(reinterpret_cast<const float*>(kLaneIs[k]));
          const __m256 lanes_from = _mm256_load_ps(reinterpret_cast<const float*>(kLanesFrom[k]));
          for (int i = 0; i < N; ++i) {
            const __m256 t = terms[i];
            e[i] = _mm256_blendv_ps(e[i], t, lane_is);
            const __m256 w = _mm256_blendv_ps(t, prev[i], lanes_from);  // w_{k-1}
            prev[i] = t;
            if (k == 0) continue;
            if (k % 2 == 1) {
              w_even[i] = w;
              continue;
            }
            const __m256 h = _mm256_hadd_ps(w_even[i], w);
            if (k % 4 == 2) {
              pair[i] = h;
              continue;
            }
            const __m256 q = _mm256_hadd_ps(pair[i], h);
            if (k == 4) {
              quad[i] = q;
              continue;
            }
            const __m256 total = _mm256_add_ps(
                _mm256_add_ps(_mm256_permute2f128_ps(quad[i], q, 0x20), _mm256_permute2f128_ps(quad[i], q, 0x31)), e[i]);
            _mm256_storeu_ps(sums[i] + b, _mm256_add_ps(_mm256_loadu_ps(sums[i] + b), total));
          }
        }
      }
    }
  }
#endif

  // Adds f(row, j, count)'s N terms for the rows [a, a + kRows) into the per-lane sums of lanes
  // [j_lo, j_hi) (N arrays of L values in `lanes`), loading and storing each vector of sums once.
  template <int kRows, int N, class F>
  C10_ALWAYS_INLINE void add_rows(int64_t a, int64_t j_lo, int64_t j_hi, T* lanes, F& f) const {
    const int64_t L = L_;
    std::array<Row, kRows> rows;
    for (int k = 0; k < kRows; ++k) rows[k] = row(a + k);
    for_vectors<T>(j_lo, j_hi, [&](int64_t j, int64_t count) {
      std::array<Vec, N> acc;
      for (int i = 0; i < N; ++i) acc[i] = Vec::loadu(lanes + i * L + j, count);
      for (const Row& r : rows) {
        auto terms = f(r, j, count);
        for (int i = 0; i < N; ++i) acc[i] = acc[i] + terms[i];
      }
      for (int i = 0; i < N; ++i) acc[i].store(lanes + i * L + j, count);
    });
  }

  // Calls f(row, j, count) for every vector of lanes [0, L) of every row, in reverse address
  // order: it follows a forward pass, so the lines that pass touched last, the likeliest to be
  // still in cache, come first.
  template <class F>
  C10_ALWAYS_INLINE void for_each_backwards(F&& f) const {
    const int64_t tail = L_ % kVec, full = L_ - tail;
    for (int64_t a = a1_ - 1; a >= a0_; --a) {
      const Row r = row(a);
      if (tail != 0) f(r, full, tail);
      for (int64_t j = full - kVec; j >= 0; j -= kVec) f(r, j, kVec);
    }
  }

  // lanes[j] = per_group[j / K] for j in [g_lo K, g_hi K).
  void expand(const T* per_group, int64_t g_lo, int64_t g_hi, T* lanes) const {
    for (int64_t b = g_lo; b < g_hi; ++b) std::fill(lanes + b * K_, lanes + (b + 1) * K_, per_group[b]);
  }

 private:
  int64_t a0_, a1_, K_, nb_, L_, row_stride_, offset_;
  bool segments_;
  S* p_;
  const S* g_;
  S* m_;
  S* v_;
};

// --- the group proxes ---------------------------------------------------------------------

// Runs the passes of one tensor's group prox over the groups [b0, b1), all rows: by the
// calling thread alone (bands == 1), or split into row bands run by all threads, each pass's
// group sums added up over the bands before the per-group step that follows.
template <typename S>
class GroupProx {
 public:
  using T = at::opmath_type<S>;
  using Vec = Vectorized<T>;
  using Row = typename Block<S>::Row;

  GroupProx(const Hyper& h, const TensorStep& t, int64_t b0, int64_t b1, int64_t bands)
      : t_(t), c_(h, t), tau_(static_cast<T>(t.threshold)), nb_(b1 - b0),
        lanes_(Block<S>(t, 0, t.A, b0, b1).lanes()) {
    const int64_t rows_per_band = (t.A + bands - 1) / bands;
    for (int64_t a = 0; a < t.A; a += rows_per_band) {
      blocks_.emplace_back(t, a, std::min(t.A, a + rows_per_band), b0, b0 + nb_);
    }
    groups_.resize(6 * nb_);
  }

  // Each pass below runs one callback per row band (through at::parallel_for), which copies
  // what its hot loop reads into locals (see "Code generation" at the top).

  void group() {
    // z lives in p when p stores the compute type, else in the calling thread's scratch (which
    // the row bands of a tensor run by all threads share).
    T* const z = kInPlace ? nullptr : sized(Scratch<T>::get().z, t_.A * lanes_);
    T* sum_sq = groups_.data();
    over_rows<1>(0, nb_, {sum_sq}, [&](const Block<S>& blk, T* lanes, std::array<T*, 1> sums) {
      const AdamConstants<T> c = c_;
      T* const zs = z;
      blk.template reduce<1>(0, nb_, lanes, sums, [&](const Row& r, int64_t j, int64_t count) {
        auto [zv, d] = adam(c, r.p + j, r.g + j, r.m + j, r.v + j, count);
        store(z_at(zs, r, j), zv, count);
        return std::array<Vec, 1>{zv * zv};
      });
    });
    T* scale = groups_.data() + nb_;
    for (int64_t b = 0; b < nb_; ++b) {
      const T norm = std::sqrt(sum_sq[b]);
      scale[b] = !std::isfinite(norm) ? T(1) : norm > tau_ ? T(1) - tau_ / norm : T(0);
    }
    over_rows<0>(0, 0, {}, [&](const Block<S>& blk, T* lanes, std::array<T*, 0>) {
      T* const zs = z;
      blk.expand(scale, 0, nb_, lanes);
      blk.for_each_backwards([&](const Row& r, int64_t j, int64_t count) {
        store(r.p + j, Vec::loadu(z_at(zs, r, j), count) * Vec::loadu(lanes + j, count), count);
      });
    });
  }

  void weighted() {
    if constexpr (kInPlace) {
      if (blocks_.size() > 1) {
        weighted_passes<true>();
        return;
      }
    }
    weighted_passes<false>();
  }

 private:
  static constexpr bool kInPlace = std::is_same_v<S, T>;
  // Vec::zero_mask() of a vector of zeros.
  static constexpr int kAllLanes = (1 << Vec::size()) - 1;

  // The weighted prox's passes; kRecomputeD says where the passes after pass 1 get d (d_at).
  template <bool kRecomputeD>
  void weighted_passes() {
    // z lives in p when p stores the compute type, else in scratch.
    auto& scratch = Scratch<T>::get();
    T* const z = kInPlace ? nullptr : sized(scratch.z, t_.A * lanes_);
    T* const d = kRecomputeD ? nullptr : sized(scratch.d, t_.A * lanes_);
    T* s1 = groups_.data();  // each pass's sums
    T* s2 = s1 + nb_;
    T* s3 = s2 + nb_;
    T* theta = s3 + nb_;
    T* in_flight = theta + nb_;  // 1 for a group whose theta was just updated, else 0
    T* flight_theta = in_flight + nb_;  // theta of the groups in flight, 0 for the others

    // Pass 1: Adam, and ||D z||^2 and sum (d z)^2 d, which give phi(0) = tau / ||D z|| and
    // phi'(0) = sum (d z)^2 d / ||D z||^3 without dividing by a tiny tau (see
    // reference.weighted_group_prox).
    over_rows<2>(0, nb_, {s1, s2}, [&](const Block<S>& blk, T* lanes, std::array<T*, 2> sums) {
      const AdamConstants<T> c = c_;
      T* const zs = z;
      T* const ds = d;
      blk.template reduce<2>(0, nb_, lanes, sums, [&](const Row& r, int64_t j, int64_t count) {
        auto [zv, dv] = adam(c, r.p + j, r.g + j, r.m + j, r.v + j, count);
        zv.store(z_at(zs, r, j), count);
        if constexpr (!kRecomputeD) dv.store(ds + r.scratch + j, count);
        auto dz = dv * zv;
        auto dz2 = dz * dz;
        return std::array<Vec, 2>{dz2, dz2 * dv};
      });
    });
    // The first Newton step, from 0, for every active group (||D z|| > tau); the zeroed groups
    // keep theta = 0, and the groups whose sums are not finite, passed through, take theta = inf
    // (x = z, the limit of the shrink). It is the last where 1 - phi(0) <= rtol: phi rises from
    // phi(0) to at most 1 at the step (see newton_step), so 1 - phi stays within rtol.
    int64_t moved = 0;
    for (int64_t b = 0; b < nb_; ++b) {
      const T dz_norm = std::sqrt(s1[b]);
      theta[b] = T(0);
      in_flight[b] = 0;
      if (!std::isfinite(s1[b]) || !std::isfinite(s2[b])) {
        theta[b] = std::numeric_limits<T>::infinity();
      } else if (dz_norm > tau_) {
        theta[b] = s1[b] * (dz_norm - tau_) / s2[b];
        if (T(1) - tau_ / dz_norm > kRtol) {
          in_flight[b] = 1;
          ++moved;
        }
      }
    }

    // Newton on phi(theta) = 1, each update from one pass over the span of the groups still in
    // flight. The first of these passes skips the sum that serves only to end the iteration
    // early: its steps are long, so it ends too few groups to narrow the next pass's span. A
    // higher-order model (a two-point Gauss rule for sum_j q_j^2 / (1 + delta r_j)^2, from two
    // more sums in pass 1 and in each Newton pass) reads fewer spans but costs pass 1 more than
    // it saves (benchmarks/RESULTS-cpu-kernel.md, "Newton passes: the early-exit sum and a
    // higher-order model").
    for (int update = 1; moved > 0 && update < kNewtonMaxIter; ++update) {
      int64_t g_lo = 0, g_hi = nb_;
      while (in_flight[g_lo] == 0) ++g_lo;
      while (in_flight[g_hi - 1] == 0) --g_hi;
      for (int64_t b = g_lo; b < g_hi; ++b) flight_theta[b] = in_flight[b] != 0 ? theta[b] : T(0);
      if (update == 1) {
        newton_pass<kRecomputeD, 2>(z, d, flight_theta, g_lo, g_hi, {s1, s2});
        moved = newton_step(s1, s2, nullptr, theta, in_flight);
      } else {
        newton_pass<kRecomputeD, 3>(z, d, flight_theta, g_lo, g_hi, {s1, s2, s3});
        moved = newton_step(s1, s2, s3, theta, in_flight);
      }
    }

    // x_j = theta z_j d_j / (theta d_j + tau), exactly zero for the groups left at theta = 0
    // and z_j for those at theta = inf. A vector of zero lanes only is stored without reading z
    // or d, since most groups of a sparse model's large convs are zero
    // (benchmarks/RESULTS-cpu-kernel.md, "Zero groups in the last pass").
    over_rows<0>(0, 0, {}, [&](const Block<S>& blk, T* lanes, std::array<T*, 0>) {
      const AdamConstants<T> c = c_;
      const Vec tau(tau_), zero(T(0)), infinity(std::numeric_limits<T>::infinity());
      T* const zs = z;
      T* const ds = d;
      blk.expand(theta, 0, nb_, lanes);
      blk.for_each_backwards([&](const Row& r, int64_t j, int64_t count) {
        auto th = Vec::loadu(lanes + j, count);
        if (th.zero_mask() == kAllLanes) {
          store(r.p + j, zero, count);
          return;
        }
        auto dv = d_at<kRecomputeD>(c, ds, r, j, count);
        auto zv = Vec::loadu(z_at(zs, r, j), count);
        auto x = zv * th * (dv / at::vec::fmadd(th, dv, tau));
        store(r.p + j, Vec::blendv(x & (th > zero), zv, th == infinity), count);
      });
    });
  }

  // One pass over the groups [g_lo, g_hi) at their theta: the sums sum q^2, sum q^2 r and (with
  // N = 3) sum q^2 r^2 with q_j = z_j r_j, r_j = d_j / (theta d_j + tau), so that phi =
  // (sum q^2)^(-1/2) and phi' = phi^3 sum q^2 r; the third bounds phi'' (see newton_step).
  // `theta` is 0 for the groups not in flight (whose sums are not used): a vector of such lanes
  // only adds nothing, without reading z or d: in a sparse model zero groups are most of the span
  // of the large convs' first Newton pass.
  template <bool kRecomputeD, int N>
  void newton_pass(T* z, T* d, const T* theta, int64_t g_lo, int64_t g_hi, const std::array<T*, N>& out) {
    over_rows<N>(g_lo, g_hi, out, [&](const Block<S>& blk, T* lanes, std::array<T*, N> sums) {
      const AdamConstants<T> c = c_;
      const Vec tau(tau_);
      T* const zs = z;
      T* const ds = d;
      T* theta_lanes = lanes + N * blk.lanes();
      blk.expand(theta, g_lo, g_hi, theta_lanes);
      blk.template reduce<N, kNewtonPassRows>(g_lo, g_hi, lanes, sums, [&](const Row& r, int64_t j, int64_t count) {
        auto th = Vec::loadu(theta_lanes + j, count);
        if (th.zero_mask() == kAllLanes) {
          std::array<Vec, N> nothing;
          nothing.fill(Vec(T(0)));
          return nothing;
        }
        auto dv = d_at<kRecomputeD>(c, ds, r, j, count);
        auto ratio = dv / at::vec::fmadd(th, dv, tau);
        auto q = Vec::loadu(z_at(zs, r, j), count) * ratio;
        auto q2 = q * q;
        auto q2r = q2 * ratio;
        if constexpr (N == 2) {
          return std::array<Vec, 2>{q2, q2r};
        } else {
          return std::array<Vec, 3>{q2, q2r, q2r * ratio};
        }
      });
    });
  }

  // Where lane j of row r keeps z: in p itself, or in the scratch z.
  static C10_ALWAYS_INLINE T* z_at(T* z, const Row& r, int64_t j) {
    if constexpr (kInPlace) {
      return r.p + j;
    } else {
      return z + r.scratch + j;
    }
  }

  // Lane j of row r's Adam denominator in the passes after pass 1. For a tensor of float params
  // run by all threads (kRecomputeD), whose z and v stream from memory, it is recomputed from
  // the v that pass 1 wrote, with fast_denominator: keeping d in a scratch instead costs a
  // write of 4 bytes per param (and the read for ownership) in pass 1, the pass that already
  // moves the most, and gains nothing in the later ones, which read 4 bytes of v instead of 4
  // of d. Otherwise d comes from the scratch that pass 1 filled: v was rounded to its storage
  // type, or one thread runs a tensor or tile small enough that the scratch stays in its
  // caches, where storing d costs less than recomputing it in every later pass
  // (benchmarks/RESULTS-cpu-kernel.md, "d kept in scratch or recomputed from v").
  template <bool kRecomputeD>
  static C10_ALWAYS_INLINE Vec d_at(const AdamConstants<T>& c, const T* d, const Row& r, int64_t j, int64_t count) {
    if constexpr (kRecomputeD) {
      return fast_denominator(c, Vec::loadu(r.v + j, count));
    } else {
      return Vec::loadu(d + r.scratch + j, count);
    }
  }

  // 1 - phi at or below which a group is done (reference.WEIGHTED_PROX_RTOL).
  static constexpr T kRtol = std::is_same_v<T, double> ? T(1e-12) : T(1e-6);

  // The Newton step of every group in flight, from a pass's sums at its theta > 0. A group whose
  // 1 - phi <= rtol is done. The others take the step delta = (1 - phi) / phi', which is the
  // last when (given s3) it provably lands within rtol, so that no pass over the tensor is spent
  // to confirm it; else they stay in flight. Returns how many stay in flight.
  //
  // The proof. With weights w_j = q_j^2 / s1, phi' = phi^3 s2 and phi'' = -3 phi Var_w(r) <= 0:
  // phi is concave and increasing, so from theta below the root the step stays below it, where
  // phi <= 1, and 1 - phi(theta + delta) = |phi''(xi)| delta^2 / 2 for some xi in the step.
  // Over the step r_j < 1/theta moves by at most rho r_j, rho = delta / theta, and each weight
  // grows by at most (1 + rho)^2, so Var at xi is at most (1 + rho)^2 (sqrt(Var_w(r)) + rho
  // sqrt(E_w r^2))^2 (Minkowski), all from this pass's sums. Var_w(r) = E_w r^2 - (E_w r)^2 is
  // raised by 8 ulps of E_w r^2 against cancellation. Ending the iteration here saves the pass
  // that would only confirm the last update (benchmarks/RESULTS-cpu-kernel.md, "Newton passes:
  // the early-exit sum and a higher-order model").
  int64_t newton_step(const T* s1, const T* s2, const T* s3, T* theta, T* in_flight) const {
    constexpr T kCancellation = 8 * std::numeric_limits<T>::epsilon();
    int64_t in_flight_count = 0;
    for (int64_t b = 0; b < nb_; ++b) {
      if (in_flight[b] == 0) continue;
      const T phi = T(1) / std::sqrt(s1[b]);
      const T gap = T(1) - phi;
      if (gap <= kRtol) {
        in_flight[b] = 0;
        continue;
      }
      const T delta = gap / (s2[b] * (phi * phi * phi));
      bool last = false;
      if (s3 != nullptr) {
        const T mean_r = s2[b] / s1[b], mean_r2 = s3[b] / s1[b];
        const T var_r = std::max(mean_r2 - mean_r * mean_r, T(0)) + kCancellation * mean_r2;
        const T rho = delta / theta[b];
        const T spread = (T(1) + rho) * (std::sqrt(var_r) + rho * std::sqrt(mean_r2)) * delta;
        last = T(1.5) * spread * spread <= kRtol;
      }
      theta[b] = std::max(theta[b] + delta, T(0));
      if (last) {
        in_flight[b] = 0;
      } else {
        ++in_flight_count;
      }
    }
    return in_flight_count;
  }

  // Runs f(block, lanes, sums) on every row band and adds the bands' sums[i][b] for b in
  // [g_lo, g_hi) into out[i][b] (set, not accumulated). `lanes` is the running thread's
  // scratch, large enough for four times the block's lanes.
  template <int N, class F>
  void over_rows(int64_t g_lo, int64_t g_hi, const std::array<T*, N>& out, F&& f) {
    if (blocks_.size() == 1) {
      f(blocks_[0], sized(Scratch<T>::get().lanes, 4 * lanes_), out);
      return;
    }
    const int64_t bands = static_cast<int64_t>(blocks_.size());
    band_sums_.assign(std::max<int64_t>(1, bands * N * nb_), T(0));
    at::parallel_for(0, bands, 1, [&](int64_t begin, int64_t end) {
      T* lanes = sized(Scratch<T>::get().lanes, 4 * lanes_);
      for (int64_t k = begin; k < end; ++k) {
        std::array<T*, N> sums;
        for (int i = 0; i < N; ++i) sums[i] = band_sums_.data() + (k * N + i) * nb_;
        f(blocks_[k], lanes, sums);
      }
    });
    for (int i = 0; i < N; ++i) {
      for (int64_t b = g_lo; b < g_hi; ++b) {
        T total = T(0);
        for (int64_t k = 0; k < bands; ++k) total += band_sums_[(k * N + i) * nb_ + b];
        out[i][b] = total;
      }
    }
  }

  const TensorStep& t_;
  const AdamConstants<T> c_;
  const T tau_;
  int64_t nb_, lanes_;
  std::vector<Block<S>> blocks_;
  std::vector<T> groups_;     // [6, nb] per-group sums and Newton state
  std::vector<T> band_sums_;  // [bands, N, nb] sums of each row band
};

// --- work items ---------------------------------------------------------------------------

// The elementwise step (plain Adam or l1) of elements [begin, end) of one tensor. Everything the
// loop reads is a local of this function (see "Code generation" above).
template <typename S>
void elementwise(const Hyper& h, const TensorStep& t, int64_t begin, int64_t end) {
  using T = at::opmath_type<S>;
  const AdamConstants<T> c(h, t);
  S* const p = static_cast<S*>(t.p);
  const S* const g = static_cast<const S*>(t.g);
  S* const m = static_cast<S*>(t.m);
  S* const v = static_cast<S*>(t.v);
  const Vectorized<T> threshold(static_cast<T>(t.threshold));
  if (t.prox == Prox::kL1) {
    for_vectors<T>(begin, end, [&](int64_t i, int64_t count) {
      store(p + i, soft_threshold(adam(c, p + i, g + i, m + i, v + i, count).z, threshold), count);
    });
  } else {
    for_vectors<T>(begin, end, [&](int64_t i, int64_t count) {
      store(p + i, adam(c, p + i, g + i, m + i, v + i, count).z, count);
    });
  }
}

template <typename S>
void run_item(const Hyper& h, const TensorStep& t, const WorkItem& item, int64_t bands) {
  if (t.prox == Prox::kGroup || t.prox == Prox::kWeighted) {
    GroupProx<S> prox(h, t, item.begin, item.end, bands);
    if (t.prox == Prox::kGroup) {
      prox.group();
    } else {
      prox.weighted();
    }
    return;
  }
  if (bands == 1) {
    elementwise<S>(h, t, item.begin, item.end);
    return;
  }
  // One contiguous piece per thread, whole vectors except the last.
  constexpr int64_t kVec = Vectorized<at::opmath_type<S>>::size();
  const int64_t piece = (item.size() + bands * kVec - 1) / (bands * kVec) * kVec;
  at::parallel_for(0, bands, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      elementwise<S>(h, t, std::min(item.end, item.begin + k * piece), std::min(item.end, item.begin + (k + 1) * piece));
    }
  });
}

void dispatch_item(const Hyper& h, const TensorStep& t, const WorkItem& item, int64_t bands) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.dtype, "group_prox_adam_cpu",
                                  [&] { run_item<scalar_t>(h, t, item, bands); });
}

// The [A, B, K] layout of p's groups in memory, as lomt_kernels.grouping.group_layout gives it:
// none where p's strides have one (the caller steps a contiguous copy).
std::optional<std::array<int64_t, 3>> group_layout(const at::Tensor& p, bool in_channel) {
  const int64_t n = p.size(0), c = p.size(1), numel = p.numel();
  if (p.is_contiguous()) {
    return in_channel ? std::array<int64_t, 3>{n, c, numel / (n * c)} : std::array<int64_t, 3>{1, n, numel / n};
  }
  if (p.dim() == 4 && p.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return in_channel ? std::array<int64_t, 3>{numel / c, c, 1} : std::array<int64_t, 3>{1, n, numel / n};
  }
  return std::nullopt;
}

// One param's tensors as the kernel steps them: the caller's, or copies in a layout the kernel
// takes where the param's storage has none for its prox (e.g. a transposed weight) or its grad
// or state have other strides. Copies of p, m and v are written back after the step.
struct Operands {
  at::Tensor p, g, m, v;

  Operands(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
           const at::Tensor& exp_avg_sq, bool has_layout)
      : p(has_layout ? param : param.contiguous()), g(like_p(grad)), m(like_p(exp_avg)), v(like_p(exp_avg_sq)) {}

  void write_back(const at::Tensor& param, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq) const {
    if (!p.is_same(param)) param.copy_(p);
    if (!m.is_same(exp_avg)) exp_avg.copy_(m);
    if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  }

 private:
  at::Tensor like_p(const at::Tensor& t) const {
    return t.strides() == p.strides() ? t : at::empty_like(p).copy_(t);
  }
};

void check_operand(const at::Tensor& p, const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu(), "group_prox_adam_cpu: ", what, "[", i, "] is on ", t.device(),
              "; every tensor must be on the CPU");
  TORCH_CHECK(t.sizes() == p.sizes(), "group_prox_adam_cpu: ", what, "[", i, "] has shape ", t.sizes(),
              " but its param has ", p.sizes());
}

}  // namespace

// The op: the step of lomt_kernels.reference.group_prox_adam, with the same arguments. Params of
// fewer than two dims take plain Adam; `grouping` picks the groups of the others.
void group_prox_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList state_steps, std::string_view prox,
                         std::string_view grouping, double lr, double beta1, double beta2, double eps,
                         double weight_decay, bool decoupled_weight_decay, bool maximize, double lambda,
                         const std::optional<at::Tensor>& grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              "group_prox_adam_cpu: params, grads, exp_avgs, exp_avg_sqs and state_steps must have one "
              "entry per param");
  const Prox group_prox = lambda == 0 ? Prox::kNone : parse_prox(prox);
  TORCH_CHECK(grouping == "in_channel" || grouping == "out_channel", "group_prox_adam_cpu: unknown grouping '",
              grouping, "': expected in_channel or out_channel");
  const bool in_channel = grouping == "in_channel";

  Hyper h{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, 1.0, false};
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->device().is_cpu() && grad_scale->numel() == 1,
                "group_prox_adam_cpu: grad_scale must be a one-element CPU tensor");
    h.grad_divisor = grad_scale->item<double>();
    h.divide_grad = true;
  }
  if (maximize) {
    h.grad_divisor = -h.grad_divisor;
    h.divide_grad = true;
  }

  std::vector<TensorStep> steps;
  std::vector<WorkItem> items;
  std::vector<std::pair<size_t, Operands>> operands;  // by param index, for write-back
  steps.reserve(n);
  operands.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu(), "group_prox_adam_cpu: params[", i, "] is on ", p.device());
    check_operand(p, grads[i], "grads", i);
    check_operand(p, exp_avgs[i], "exp_avgs", i);
    check_operand(p, exp_avg_sqs[i], "exp_avg_sqs", i);
    if (p.numel() == 0) continue;
    const at::ScalarType dtype = p.scalar_type();
    TORCH_CHECK_TYPE(at::isFloatingType(dtype) && p.element_size() >= 2 && exp_avgs[i].scalar_type() == dtype &&
                         exp_avg_sqs[i].scalar_type() == dtype,
                     "the fused kernels take float64, float32, float16 and bfloat16 params with exp_avg and "
                     "exp_avg_sq of the param's dtype; got ", dtype, ", ", exp_avgs[i].scalar_type(), " and ",
                     exp_avg_sqs[i].scalar_type());
    TORCH_CHECK_TYPE(grads[i].scalar_type() == dtype, "this backend needs grads in the param's dtype; tensor ", i,
                     " has a ", dtype, " param and a ", grads[i].scalar_type(),
                     " grad (backend='torch' takes mixed dtypes)");
    TORCH_CHECK(state_steps[i].device().is_cpu() && state_steps[i].numel() == 1,
                "group_prox_adam_cpu: state_steps[", i, "] must be a one-element CPU tensor");

    const Prox tensor_prox = p.dim() >= 2 ? group_prox : Prox::kNone;
    const bool grouped = tensor_prox == Prox::kGroup || tensor_prox == Prox::kWeighted;
    std::optional<std::array<int64_t, 3>> layout;
    if (grouped) layout = group_layout(p, in_channel);
    const bool has_layout = grouped ? layout.has_value() : p.is_non_overlapping_and_dense();
    const Operands& x = operands.emplace_back(i, Operands(p, grads[i], exp_avgs[i], exp_avg_sqs[i], has_layout)).second;
    if (grouped && !layout) layout = group_layout(x.p, in_channel);

    const double step = state_steps[i].item<double>();
    TensorStep t{x.p.data_ptr(), x.g.const_data_ptr(), x.m.data_ptr(), x.v.data_ptr(), dtype, p.numel(), 1, 1,
                 p.numel(), tensor_prox, lr / (1 - std::pow(beta1, step)), std::sqrt(1 - std::pow(beta2, step)),
                 lr * lambda};
    if (grouped) {
      const auto [A, B, K] = *layout;
      t.A = A;
      t.B = B;
      t.K = K;
      t.threshold = lr * lambda * std::sqrt(static_cast<double>(t.A * t.K));
      if (t.threshold == 0) t.prox = Prox::kNone;  // with tau == 0 every prox is the identity
    }
    const int64_t index = static_cast<int64_t>(steps.size());
    if (t.prox == Prox::kGroup || t.prox == Prox::kWeighted) {
      // Strided (in-channel) groups: the whole tensor, in memory order. Contiguous ones: tiles.
      const int64_t per_tile = t.A > 1 ? t.B : std::max<int64_t>(1, kTileElements / t.K);
      for (int64_t b = 0; b < t.B; b += per_tile) items.push_back({index, b, std::min(t.B, b + per_tile)});
    } else {
      items.push_back({index, 0, t.numel});
    }
    steps.push_back(t);
  }

  const int64_t threads = at::get_num_threads();

  // Large elementwise and in-channel tensors first, each by all threads at once: one contiguous
  // piece (row band) per thread.
  const auto grouped = [&](const WorkItem& item) {
    return steps[item.tensor].prox == Prox::kGroup || steps[item.tensor].prox == Prox::kWeighted;
  };
  const auto elements = [&](const WorkItem& item) {
    const TensorStep& t = steps[item.tensor];
    return grouped(item) ? item.size() * t.A * t.K : item.size();
  };
  const auto cooperative = [&](const WorkItem& item) {
    return threads > 1 && (!grouped(item) || steps[item.tensor].A > 1) && elements(item) >= kCooperativeElements;
  };
  std::stable_sort(items.begin(), items.end(),
                   [&](const WorkItem& x, const WorkItem& y) { return elements(x) > elements(y); });
  const auto first_shared = std::stable_partition(items.begin(), items.end(), cooperative);
  for (auto it = items.begin(); it != first_shared; ++it) {
    const int64_t rows = grouped(*it) ? steps[it->tensor].A : it->size();
    dispatch_item(h, steps[it->tensor], *it, std::min(threads, rows));
  }

  // The rest largest first, each thread taking the next item until none are left.
  const WorkItem* rest = items.data() + (first_shared - items.begin());
  const int64_t num_rest = items.end() - first_shared;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, num_rest), 1, [&](int64_t, int64_t) {
    for (int64_t k = next.fetch_add(1); k < num_rest; k = next.fetch_add(1)) {
      dispatch_item(h, steps[rest[k].tensor], rest[k], 1);
    }
  });
  for (const auto& [i, x] : operands) x.write_back(params[i], exp_avgs[i], exp_avg_sqs[i]);
}

}  // namespace lomt

// A fragment: other extensions may define ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(lomt, m) {
  m.def(
      "group_prox_adam_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor[] state_steps, str prox, str grouping, float lr, "
      "float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
      "bool maximize, float lambda_, Tensor? grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(lomt, CPU, m) {
  m.impl("group_prox_adam_cpu", &lomt::group_prox_adam_cpu);
}
