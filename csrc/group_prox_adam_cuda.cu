// The "cuda" backend: the proximal Adam step fused into one pass, per tensor.
//
// Same maths as lomt_kernels/reference.py (see lomt_kernels/kernels/triton_group_adam.py for the
// formulas), float32 arithmetic whatever the storage dtype, and the same rule for non-finite
// values: a group whose sums (||z||^2; ||D z||^2 and sum (d z)^2 d) are not finite, and for "l1"
// an element whose z is not, is passed through (p = z). A tensor's storage is read as
// [A, B, K] with group b at [:, b, :] (lomt_kernels/grouping.py).
//
// Tiles. A block of kThreads threads owns a tile: `na` rows a of `nb` neighbouring groups, i.e.
// `na` contiguous runs of W = nb * nk elements (nk = K, or a chunk of K when nb == 1). Threads
// walk the tile in memory order, so loads and stores are coalesced even for K == 1 (in-channel
// groups of 1x1 and channels-last convs).
//
//  * One pass (the tile holds whole groups and fits in shared memory): pass 1 reads p, g, m, v,
//    writes m, v and stages z (and d for the weighted prox) in shared memory; pass 2 gives each
//    group to one warp, which reduces ||z|| (or runs the whole Newton solve, with warp shuffles
//    and no block barrier); pass 3 writes p = prox(z). 28 bytes of DRAM traffic per float32
//    param, the minimum.
//  * Two phases (a group bigger than shared memory, or for "group" a tile whose rows would be
//    shorter than kMinRun because few tall groups fit): phase 1 is the same kernel on chunks of
//    the group, writing z into p and, for "group", adding the chunk's sum z^2 into a per-group
//    float32 buffer with one atomic per group and block; for "group_weighted" a solve kernel (a
//    block per group) streams z and v once per Newton iteration; phase 2 re-reads z (and v)
//    and writes p. +8 bytes per param for "group"; +8 per Newton pass +12 for the weighted prox.
//    For 16-bit params z is rounded to the param dtype in between (up to one extra ulp).
//  * "none" and "l1" are elementwise: the tensor is one [1, 1, numel] row cut in kChunk tiles.
//
// One launch per tensor (per phase); launches are asynchronous on the current stream.

// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE
// headers): the build needs nvcc and the CUDA runtime, nothing else of the toolkit.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// At most this many groups per one-pass tile (bounds the per-group scratch).
constexpr int kMaxGroupsPerTile = 64;
// Shared memory a tile may stage: the default per-block limit (no opt-in needed) less the tile
// kernel's static per-group scratch, which counts against the same 48 KiB (a launch asking for
// more fails with "invalid argument", as the weighted prox's [2048, 512, 1, 1] tile once did).
constexpr int64_t kSmemBytes = 48 * 1024 - kMaxGroupsPerTile * sizeof(float);
// One-pass tiles take groups until they hold this many elements.
constexpr int64_t kTargetTile = 4096;
// Tile size of the elementwise path and of two-phase chunks.
constexpr int64_t kChunk = 4096;
// Groups per tile are raised until a row run holds this many elements (128 bytes of float32).
constexpr int64_t kMinRun = 32;
// The weighted prox's Newton solve (reference.WEIGHTED_PROX_MAX_ITER and RTOL for float32).
constexpr int kMaxIter = 30;
constexpr float kRtol = 1e-6f;

// Prox codes, as lomt_kernels.kernels.cuda passes them.
enum Prox : int { kNone = 0, kGroup = 1, kWeighted = 2, kL1 = 3 };

struct Layout {
  int64_t A, B, K;
};

// Tile extents: rows, groups, columns per group; `pitch` is the shared-memory row length
// (W rounded up to odd, so that a warp reading down a column hits 32 different banks).
struct Tile {
  int64_t ba, bg, bk, pitch;
};

struct Hyper {
  float step_size, sqrt_bc2, beta1c, beta2, beta2c, eps, weight_decay, decay, tau, l1_threshold;
  const float* grad_scale;  // nullptr: none
  bool maximize, decoupled;
};

// Where block `tile` sits: its first row, group and column, and its extents.
struct TileCoords {
  int64_t a0, b0, col0, na, nb, nk, W;

  __device__ TileCoords(const Layout& L, const Tile& t, int64_t tile) {
    const int64_t tiles_k = (L.K + t.bk - 1) / t.bk;
    const int64_t tiles_a = (L.A + t.ba - 1) / t.ba;
    const int64_t tk = tile % tiles_k;
    const int64_t ta = (tile / tiles_k) % tiles_a;
    const int64_t tb = tile / (tiles_k * tiles_a);
    a0 = ta * t.ba;
    b0 = tb * t.bg;
    const int64_t k0 = tk * t.bk;
    na = min(t.ba, L.A - a0);
    nb = min(t.bg, L.B - b0);
    nk = min(t.bk, L.K - k0);
    W = nb * nk;  // nb == 1 whenever nk < K, so a row's part of the tile is contiguous
    col0 = b0 * L.K + k0;
  }

  // Storage index of the tile's e-th element (memory order), and its row and column.
  __device__ int64_t index(const Layout& L, int64_t e, int64_t& row, int64_t& col) const {
    row = e / W;
    col = e - row * W;
    return (a0 + row) * (L.B * L.K) + col0 + col;
  }
};

int64_t tiles(const Layout& L, const Tile& t) {
  return ((L.B + t.bg - 1) / t.bg) * ((L.A + t.ba - 1) / t.ba) * ((L.K + t.bk - 1) / t.bk);
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float2 warp_sum(float2 x) {
  return make_float2(warp_sum(x.x), warp_sum(x.y));
}

// Sum over the block, returned to every thread. All threads must call it.
__device__ float2 block_sum(float2 x) {
  __shared__ float2 partial[kWarps];
  x = warp_sum(x);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = x;
  __syncthreads();
  x = lane < kWarps ? partial[lane] : make_float2(0.f, 0.f);
  return warp_sum(x);
}

// Adam for element i: updates m and v in place, returns z and sets d.
template <typename T>
__device__ __forceinline__ float adam_update(T* p, const T* g, T* m, T* v, int64_t i, const Hyper& h,
                                             float grad_scale, float& d) {
  float x = static_cast<float>(p[i]);
  float gr = static_cast<float>(g[i]) / grad_scale;
  if (h.maximize) gr = -gr;
  if (h.decoupled) {
    x *= h.decay;
  } else if (h.weight_decay != 0.f) {  // as Adam: 0 * x would make gr NaN where x is not finite
    gr += h.weight_decay * x;
  }
  float mm = static_cast<float>(m[i]);
  float vv = static_cast<float>(v[i]);
  mm += h.beta1c * (gr - mm);  // torch.lerp(m, g, 1 - beta1) for 1 - beta1 < 0.5
  vv = vv * h.beta2 + h.beta2c * gr * gr;
  m[i] = static_cast<T>(mm);
  v[i] = static_cast<T>(vv);
  d = sqrtf(vv) / h.sqrt_bc2 + h.eps;
  return x - h.step_size * mm / d;
}

// A non-finite z passes through (fmaxf would turn a NaN into 0).
__device__ __forceinline__ float soft_threshold(float z, float threshold) {
  return isfinite(z) ? copysignf(fmaxf(fabsf(z) - threshold, 0.f), z) : z;
}

__device__ __forceinline__ float group_shrink(float z, float sum_sq, float tau) {
  const float norm = sqrtf(sum_sq);
  if (!isfinite(norm)) return z;
  return norm > tau ? z * (1.f - tau / norm) : 0.f;
}

// x_j = d_j theta z_j / (d_j theta + tau); zero for theta == 0, z for theta == inf (a group
// passed through, the limit) and at tau == 0.
__device__ __forceinline__ float weighted_shrink(float z, float d, float theta, float tau) {
  return tau > 0.f && !isinf(theta) ? d * theta * z / (d * theta + tau) : z;
}

// The summands of phi(theta)^-2 and of -phi'(theta)/phi^3 for one element, a = tau / d.
__device__ __forceinline__ float2 newton_terms(float z, float d, float theta, float tau) {
  const float r = theta + tau / d;
  const float q = z / r;
  return make_float2(q * q, q * q / r);
}

// theta = ||x|| for the weighted prox of a group, from norms = (||D z||^2, sum (d z)^2 d):
// infinity if either is not finite (the group passes through), 0 if ||D z|| <= tau, else Newton
// on phi(theta) = 1 from 0, the first step in closed form, clamped at 0, stopped at
// 1 - phi <= kRtol or kMaxIter steps (as reference.weighted_group_prox). sums(theta) returns the
// group's sums of newton_terms; it and norms are the same in every participating thread, so all
// of them take the same branches.
template <typename Sums>
__device__ float weighted_theta(Sums sums, float2 norms, float tau) {
  if (!isfinite(norms.x) || !isfinite(norms.y)) return INFINITY;
  if (!(sqrtf(norms.x) > tau)) return 0.f;
  float theta = norms.x * (sqrtf(norms.x) - tau) / norms.y;
  for (int it = 1; it < kMaxIter; ++it) {
    const float2 s = sums(theta);
    const float phi = rsqrtf(s.x);
    if (1.f - phi <= kRtol) break;
    theta = fmaxf(theta + (1.f - phi) / (s.y * phi * phi * phi), 0.f);
  }
  return theta;
}

// Adam on one tile, then: the elementwise prox (none, l1); or, ONE_PASS, the group prox of the
// tile's whole groups; or (two-phase phase 1) z written to p and, for kGroup, each group's
// partial sum z^2 added to group_stats.
template <typename T, int PROX, bool ONE_PASS>
__global__ void __launch_bounds__(kThreads)
    adam_prox_tile_kernel(T* p, const T* g, T* m, T* v, Layout L, Tile tile, Hyper h, float* group_stats) {
  constexpr bool kElementwise = PROX == kNone || PROX == kL1;
  constexpr bool kStageZ = PROX == kGroup || (PROX == kWeighted && ONE_PASS);
  constexpr bool kStageD = PROX == kWeighted && ONE_PASS;
  extern __shared__ float smem[];
  __shared__ float group_stat[kMaxGroupsPerTile];
  float* z_tile = smem;
  float* d_tile = smem + tile.ba * tile.pitch;

  const TileCoords tc(L, tile, blockIdx.x);
  const float grad_scale = h.grad_scale ? *h.grad_scale : 1.f;
  const int64_t n = tc.na * tc.W;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    int64_t row, col;
    const int64_t i = tc.index(L, e, row, col);
    float d;
    const float z = adam_update(p, g, m, v, i, h, grad_scale, d);
    if (kElementwise) {
      p[i] = static_cast<T>(PROX == kL1 ? soft_threshold(z, h.l1_threshold) : z);
    } else if (!ONE_PASS) {
      p[i] = static_cast<T>(z);
    }
    if (kStageZ) z_tile[row * tile.pitch + col] = z;
    if (kStageD) d_tile[row * tile.pitch + col] = d;
  }
  if constexpr (!kStageZ) return;
  __syncthreads();

  // One warp per group: its elements are rows 0..na of columns [slot*nk, (slot+1)*nk).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t group_elems = tc.na * tc.nk;
  for (int64_t slot = warp; slot < tc.nb; slot += kWarps) {
    auto at = [&](int64_t j) {
      const int64_t row = j / tc.nk;
      return row * tile.pitch + slot * tc.nk + (j - row * tc.nk);
    };
    if (PROX == kGroup) {
      float sum_sq = 0.f;
      for (int64_t j = lane; j < group_elems; j += 32) sum_sq += z_tile[at(j)] * z_tile[at(j)];
      sum_sq = warp_sum(sum_sq);
      if (lane == 0) {
        if (ONE_PASS) {
          group_stat[slot] = sum_sq;
        } else {
          atomicAdd(group_stats + tc.b0 + slot, sum_sq);
        }
      }
    } else {
      float2 norms = make_float2(0.f, 0.f);  // ||D z||^2, sum (d z)^2 d
      for (int64_t j = lane; j < group_elems; j += 32) {
        const float d = d_tile[at(j)], dz = d * z_tile[at(j)];
        norms.x += dz * dz;
        norms.y += dz * dz * d;
      }
      norms = warp_sum(norms);
      const float theta = weighted_theta(
          [&](float th) {
            float2 s = make_float2(0.f, 0.f);
            for (int64_t j = lane; j < group_elems; j += 32) {
              const float2 t = newton_terms(z_tile[at(j)], d_tile[at(j)], th, h.tau);
              s.x += t.x;
              s.y += t.y;
            }
            return warp_sum(s);
          },
          norms, h.tau);
      if (lane == 0) group_stat[slot] = theta;
    }
  }
  if constexpr (!ONE_PASS) return;
  __syncthreads();

  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    int64_t row, col;
    const int64_t i = tc.index(L, e, row, col);
    const float z = z_tile[row * tile.pitch + col];
    const float stat = group_stat[col / tc.nk];
    p[i] = static_cast<T>(PROX == kGroup ? group_shrink(z, stat, h.tau)
                                         : weighted_shrink(z, d_tile[row * tile.pitch + col], stat, h.tau));
  }
}

// Two-phase "group_weighted": one block per group finds theta (weighted_theta) from z
// (in p after phase 1) and v, streaming the group once for the norms and once per iteration.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    weighted_solve_kernel(const T* p, const T* v, Layout L, Hyper h, float* group_stats) {
  const int64_t b = blockIdx.x, n = L.A * L.K;
  auto at = [&](int64_t j) { return (j / L.K) * (L.B * L.K) + b * L.K + j % L.K; };
  auto d_at = [&](int64_t i) { return sqrtf(static_cast<float>(v[i])) / h.sqrt_bc2 + h.eps; };
  float2 norms = make_float2(0.f, 0.f);  // ||D z||^2, sum (d z)^2 d
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const int64_t i = at(j);
    const float d = d_at(i), dz = d * static_cast<float>(p[i]);
    norms.x += dz * dz;
    norms.y += dz * dz * d;
  }
  norms = block_sum(norms);
  const float theta = weighted_theta(
      [&](float th) {
        float2 s = make_float2(0.f, 0.f);
        for (int64_t j = threadIdx.x; j < n; j += kThreads) {
          const int64_t i = at(j);
          const float2 t = newton_terms(static_cast<float>(p[i]), d_at(i), th, h.tau);
          s.x += t.x;
          s.y += t.y;
        }
        return block_sum(s);
      },
      norms, h.tau);
  if (threadIdx.x == 0) group_stats[b] = theta;
}

// Two-phase phase 2: p = prox(z) from z (in p) and each group's stat (sum z^2, or theta).
template <typename T, int PROX>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(T* p, const T* v, Layout L, Tile tile, Hyper h, const float* group_stats) {
  const TileCoords tc(L, tile, blockIdx.x);
  const int64_t n = tc.na * tc.W;
  for (int64_t e = threadIdx.x; e < n; e += kThreads) {
    int64_t row, col;
    const int64_t i = tc.index(L, e, row, col);
    const float z = static_cast<float>(p[i]);
    const float stat = group_stats[tc.b0 + col / tc.nk];
    if (PROX == kGroup) {
      p[i] = static_cast<T>(group_shrink(z, stat, h.tau));
    } else {
      const float d = sqrtf(static_cast<float>(v[i])) / h.sqrt_bc2 + h.eps;
      p[i] = static_cast<T>(weighted_shrink(z, d, stat, h.tau));
    }
  }
}

// The tile for a tensor, whether it is one pass, and its shared memory in bytes.
struct Plan {
  Tile tile;
  bool one_pass;
  int64_t smem_bytes;
};

Plan plan_tiles(const Layout& L, int prox) {
  if (prox == kNone || prox == kL1) return {{1, 1, kChunk, kChunk}, true, 0};
  const int64_t arrays = prox == kWeighted ? 2 : 1;  // z, and d for the weighted prox
  const int64_t capacity = kSmemBytes / (4 * arrays);  // floats per staged array
  const int64_t min_groups = std::min<int64_t>({L.B, kMaxGroupsPerTile, (kMinRun + L.K - 1) / L.K});
  if (L.A * (L.K | 1) <= capacity) {
    // Whole groups: enough for kTargetTile elements or kMinRun-long rows, as many as fit.
    const int64_t fit = std::max<int64_t>(1, (capacity / L.A - 1) / L.K);
    const int64_t want = std::max<int64_t>(min_groups, kTargetTile / (L.A * L.K));
    const int64_t nb = std::max<int64_t>(1, std::min<int64_t>({want, fit, L.B, kMaxGroupsPerTile}));
    // Tall groups leave room for few: "group" then takes two phases rather than short rows; the
    // weighted prox keeps them, since its two-phase solve reads each group alone, strided.
    if (prox == kWeighted || nb >= min_groups) {
      const Tile tile{L.A, nb, L.K, (nb * L.K) | 1};
      return {tile, true, arrays * 4 * tile.ba * tile.pitch};
    }
  }
  // Two phases: kChunk-element chunks of rows (and of K, one group at a time, if K is long).
  const int64_t bk = std::min(L.K, kChunk);
  const int64_t bg = bk < L.K ? 1 : min_groups;
  const int64_t ba = std::max<int64_t>(1, kChunk / (bg * bk));
  const Tile tile{ba, bg, bk, (bg * bk) | 1};
  return {tile, false, prox == kGroup ? 4 * tile.ba * tile.pitch : 0};
}

template <typename T, int PROX, bool ONE_PASS>
void launch_tile_kernel(T* p, const T* g, T* m, T* v, const Layout& L, const Plan& plan, const Hyper& h,
                        float* stats, cudaStream_t stream) {
  adam_prox_tile_kernel<T, PROX, ONE_PASS>
      <<<tiles(L, plan.tile), kThreads, plan.smem_bytes, stream>>>(p, g, m, v, L, plan.tile, h, stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int PROX>
void step_tensor(T* p, const T* g, T* m, T* v, const Layout& L, const Hyper& h, const at::Tensor& param,
                 cudaStream_t stream) {
  const Plan plan = plan_tiles(L, PROX);
  if (plan.one_pass) {
    launch_tile_kernel<T, PROX, true>(p, g, m, v, L, plan, h, nullptr, stream);
    return;
  }
  if constexpr (PROX == kGroup || PROX == kWeighted) {
    at::Tensor stats = at::zeros({L.B}, param.options().dtype(at::kFloat));
    float* s = stats.data_ptr<float>();
    launch_tile_kernel<T, PROX, false>(p, g, m, v, L, plan, h, s, stream);
    if (PROX == kWeighted) {
      weighted_solve_kernel<T><<<L.B, kThreads, 0, stream>>>(p, v, L, h, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    shrink_kernel<T, PROX><<<tiles(L, plan.tile), kThreads, 0, stream>>>(p, v, L, plan.tile, h, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void step_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m, const at::Tensor& v, const Layout& L,
                 int prox, const Hyper& h, cudaStream_t stream) {
  T* pp = p.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  T* mp = m.data_ptr<T>();
  T* vp = v.data_ptr<T>();
  switch (prox) {
    case kNone: return step_tensor<T, kNone>(pp, gp, mp, vp, L, h, p, stream);
    case kGroup: return step_tensor<T, kGroup>(pp, gp, mp, vp, L, h, p, stream);
    case kWeighted: return step_tensor<T, kWeighted>(pp, gp, mp, vp, L, h, p, stream);
    case kL1: return step_tensor<T, kL1>(pp, gp, mp, vp, L, h, p, stream);
    default: TORCH_CHECK(false, "group_prox_adam_cuda: unknown prox code ", prox);
  }
}

}  // namespace

// One proximal Adam step for each tensor (see lomt_kernels/kernels/cuda.py, which computes the
// layouts, per-tensor proxes and bias corrections, and makes every tensor dense).
void group_prox_adam_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                          const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                          const std::vector<int64_t>& layouts, const std::vector<int64_t>& proxes,
                          const std::vector<double>& step_sizes, const std::vector<double>& sqrt_bc2s, double lr,
                          double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                          bool maximize, double lambda, const std::optional<at::Tensor>& grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && layouts.size() == 3 * n &&
                  proxes.size() == n && step_sizes.size() == n && sqrt_bc2s.size() == n,
              "group_prox_adam_cuda: argument lists of different lengths");
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (grad_scale) {
    TORCH_CHECK(grad_scale->is_cuda() && grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
                "grad_scale must be a one-element float32 CUDA tensor");
  }
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    TORCH_CHECK(p.is_cuda() && grads[t].device() == p.device() && exp_avgs[t].device() == p.device() &&
                    exp_avg_sqs[t].device() == p.device(),
                "group_prox_adam_cuda: tensor ", t, " is not on one CUDA device");
    TORCH_CHECK(grads[t].scalar_type() == p.scalar_type() && exp_avgs[t].scalar_type() == p.scalar_type() &&
                    exp_avg_sqs[t].scalar_type() == p.scalar_type(),
                "group_prox_adam_cuda: tensor ", t, ": grad and state must have the param's dtype");
    const Layout L{layouts[3 * t], layouts[3 * t + 1], layouts[3 * t + 2]};
    TORCH_CHECK(L.A * L.B * L.K == p.numel(), "group_prox_adam_cuda: layout of tensor ", t, " does not match");
    if (p.numel() == 0) continue;
    const int prox = static_cast<int>(proxes[t]);
    const float tau = static_cast<float>(lr * lambda * std::sqrt(static_cast<double>(L.A * L.K)));
    const Hyper h{static_cast<float>(step_sizes[t]),
                  static_cast<float>(sqrt_bc2s[t]),
                  static_cast<float>(1.0 - beta1),
                  static_cast<float>(beta2),
                  static_cast<float>(1.0 - beta2),
                  static_cast<float>(eps),
                  static_cast<float>(weight_decay),
                  static_cast<float>(1.0 - lr * weight_decay),
                  tau,
                  static_cast<float>(lr * lambda),
                  grad_scale ? grad_scale->data_ptr<float>() : nullptr,
                  maximize,
                  decoupled_weight_decay};
    switch (p.scalar_type()) {
      case at::kFloat: step_tensor<float>(p, grads[t], exp_avgs[t], exp_avg_sqs[t], L, prox, h, stream); break;
      case at::kHalf: step_tensor<at::Half>(p, grads[t], exp_avgs[t], exp_avg_sqs[t], L, prox, h, stream); break;
      case at::kBFloat16:
        step_tensor<at::BFloat16>(p, grads[t], exp_avgs[t], exp_avg_sqs[t], L, prox, h, stream);
        break;
      default: TORCH_CHECK(false, "group_prox_adam_cuda: float32, float16 or bfloat16 params, got ", p.scalar_type());
    }
  }
}
