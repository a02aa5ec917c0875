// The "cuda" backend: the proximal Adam step over every tensor of a param group and dtype in at
// most three launches, driven by tables that the host builds once per set of tensors.
//
// Same maths as lomt_kernels/reference.py (its docstring gives the formulas), float32 arithmetic
// whatever the storage dtype, and the same rule for non-finite values: a group whose sums
// (||z||^2; ||D z||^2 and sum (d z)^2 d) are not finite, and for "l1" an element whose z is not,
// is passed through (p = z). A tensor's storage is read as [A, B, K] with group b at [:, b, :]
// (lomt_kernels/grouping.py).
//
// Host path. lomt_kernels/kernels/device_table.py keeps, per set of tensors, a tensor table of
// element offsets from three anchors (p, m and v from the param anchor, g from the grad anchor,
// the step count from a float32 anchor) that it refreshes asynchronously when the grads move;
// lomt_kernels/kernels/cuda_plan.py cuts each tensor into tiles and lists the blocks of each
// launch as (tensor, tile) pairs. Each block reads its tensor's step count (the count before this
// step), lr, grad_scale and found_inf through device pointers and
// computes the bias corrections in float64, so a step never waits for the device; a nonzero
// found_inf makes every block return before it writes. The last block of a tensor, counted over
// the step's launches, stores the new step count and resets its counter.
//
// Tiles. A block of kThreads threads owns a tile: `na` rows a of `nb` neighbouring groups, i.e.
// `na` contiguous runs of W = nb * nk elements (nk = K, or a chunk of K when nb == 1). Threads
// walk the tile in memory order, so loads and stores are coalesced even for K == 1 (in-channel
// groups of 1x1 and channels-last convs).
//
//  * Launch 1 (every tensor): one-pass tiles hold whole groups in shared memory: Adam stages z
//    (and d for the weighted prox), one warp per group reduces ||z|| (or runs the whole Newton
//    solve with warp shuffles), and p = prox(z) is written: 28 bytes of DRAM traffic per float32
//    param. "none" and "l1" tensors are [1, 1, numel] rows cut in kChunk tiles. Tensors whose
//    groups do not fit (or, for "group", would give runs shorter than kMinRun) take their first
//    phase here: z is written into p and, for "group", each tile stores its per-group partial sums
//    z^2 in a slot of its own (no float atomics, so every run gives the same bits).
//  * Launch 2 (two-phase tensors only), one block per group: "group" adds its partial sums in a
//    fixed order; "group_weighted" solves for theta streaming z and v once per Newton iteration.
//  * Launch 3 (two-phase tensors only): p = prox(z) from z (in p) and the group's statistic.
//    For 16-bit params z is rounded to the param dtype in between (up to one extra ulp).

// Only c10's CUDA headers (not ATen/cuda/CUDAContext.h, which needs the cuBLAS and cuSPARSE
// headers): the build needs nvcc and the CUDA runtime, nothing else of the toolkit.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "group_prox_adam_cuda.h"

namespace {

// The plan's constants (THREADS, MAX_GROUPS_PER_TILE) live in lomt_kernels/kernels/cuda_plan.py,
// which sizes every tile and its shared memory; these two must agree with it.
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
// Every kernel is __launch_bounds__(kThreads, kBlocksPerSM): at most 64 registers a thread, so
// that two blocks fit in an SM's register file; the CI build checks that nothing spills.
constexpr int kBlocksPerSM = 2;
constexpr int kMaxGroupsPerTile = 64;
// The weighted prox's Newton solve (reference.WEIGHTED_PROX_MAX_ITER and RTOL for float32).
constexpr int kMaxIter = 30;
constexpr float kRtol = 1e-6f;

// Prox codes, as lomt_kernels.kernels.cuda_plan passes them.
enum Prox : int { kNone = 0, kGroup = 1, kWeighted = 2, kL1 = 3 };

// Columns of the int64 tensor table: device_table.py's shared ones, then cuda_plan.py's.
enum Column : int {
  kP = 0, kG, kM, kV, kStep, kAligned,
  kA, kB, kK, kTileA, kTileG, kTileK, kPitch, kProx, kOnePass, kPartial0, kStat0, kBlocks,
  kFields
};

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
  bool maximize, decoupled;
};

// Everything a launch reads besides its tables' contents: the anchors every offset counts from,
// the device scalars (nullptr: absent) and the host scalars.
template <typename T>
struct Args {
  T* p_anchor;
  const T* g_anchor;
  float* step_anchor;
  const int64_t* tensors;
  const int32_t* blocks;  // (tensor, tile or group) per block of this launch
  int32_t* counters;      // per tensor: blocks done this step (reset by the last)
  float* partials;
  float* stats;
  const float* lr_ptr;
  const float* grad_scale;
  const float* found_inf;
  float lr, lambda, beta1c, beta2, beta2c, eps, weight_decay;
  double log_beta1, log_beta2;
  bool maximize, decoupled;
};

// Where block `tile` sits: its first element, first group and extents. Extents within a tile
// (at most a tile's elements) are 32-bit, so the per-element index arithmetic is too; only the
// storage index is 64-bit.
struct TileCoords {
  int64_t first, row_len, b0;
  int32_t na, nb, nk, W;

  __device__ TileCoords(const Layout& L, const Tile& t, int64_t tile) {
    const int64_t tiles_k = (L.K + t.bk - 1) / t.bk;
    const int64_t tiles_a = (L.A + t.ba - 1) / t.ba;
    const int64_t tk = tile % tiles_k;
    const int64_t ta = (tile / tiles_k) % tiles_a;
    const int64_t tb = tile / (tiles_k * tiles_a);
    const int64_t a0 = ta * t.ba, k0 = tk * t.bk;
    b0 = tb * t.bg;
    na = static_cast<int32_t>(min(t.ba, L.A - a0));
    nb = static_cast<int32_t>(min(t.bg, L.B - b0));
    nk = static_cast<int32_t>(min(t.bk, L.K - k0));
    W = nb * nk;  // nb == 1 whenever nk < K, so a row's part of the tile is contiguous
    row_len = L.B * L.K;
    first = a0 * row_len + b0 * L.K + k0;
  }

  // Storage index of the tile's e-th element (memory order), and its row and column.
  __device__ __forceinline__ int64_t index(int32_t e, int32_t& row, int32_t& col) const {
    row = e / W;
    col = e - row * W;
    return first + row * row_len + col;
  }
};

// One block's tensor: its data, layout, tile, prox and hyperparameters for this step.
template <typename T>
struct Work {
  T* p;
  const T* g;
  T* m;
  T* v;
  Layout L;
  Tile tile;
  int prox;
  bool one_pass;
  int64_t partial0, stat0;
  float grad_scale;
  Hyper h;
};

// The tensor row `t` and this step's scalars, bias corrections and thresholds in float64 rounded
// once to float32, as the reference's Python scalars are (and as the Triton kernel does).
template <typename T>
__device__ __forceinline__ Work<T> load_work(const Args<T>& a, int32_t t) {
  const int64_t* row = a.tensors + t * kFields;
  Work<T> w;
  w.p = a.p_anchor + row[kP];
  w.g = a.g_anchor + row[kG];
  w.m = a.p_anchor + row[kM];
  w.v = a.p_anchor + row[kV];
  w.L = Layout{row[kA], row[kB], row[kK]};
  w.tile = Tile{row[kTileA], row[kTileG], row[kTileK], row[kPitch]};
  w.prox = static_cast<int>(row[kProx]);
  w.one_pass = row[kOnePass] != 0;
  w.partial0 = row[kPartial0];
  w.stat0 = row[kStat0];
  w.grad_scale = a.grad_scale ? *a.grad_scale : 1.f;
  const double lr = a.lr_ptr ? static_cast<double>(*a.lr_ptr) : static_cast<double>(a.lr);
  // This step's count: the stored one (the count before this step) plus one.
  const double step = static_cast<double>(a.step_anchor[row[kStep]] + 1.f);
  const double bc1 = 1.0 - exp(step * a.log_beta1);
  const double bc2 = 1.0 - exp(step * a.log_beta2);
  const double threshold = lr * static_cast<double>(a.lambda);
  const bool grouped = w.prox == kGroup || w.prox == kWeighted;
  w.h = Hyper{static_cast<float>(lr / bc1),
              static_cast<float>(sqrt(bc2)),
              a.beta1c,
              a.beta2,
              a.beta2c,
              a.eps,
              a.weight_decay,
              static_cast<float>(1.0 - lr * static_cast<double>(a.weight_decay)),
              static_cast<float>(grouped ? threshold * sqrt(static_cast<double>(w.L.A * w.L.K)) : 0.0),
              static_cast<float>(threshold),
              a.maximize,
              a.decoupled};
  return w;
}

// Whether this step is skipped (GradScaler found an inf or NaN): then nothing is written.
template <typename T>
__device__ __forceinline__ bool skipped(const Args<T>& a) {
  return a.found_inf && *a.found_inf != 0.f;
}

// Counts this block as done with tensor `t`; the tensor's last block of the step (over every
// launch) adds one to its step count, once every block has read the old one, and resets the count.
template <typename T>
__device__ __forceinline__ void finish_block(const Args<T>& a, int32_t t) {
  __syncthreads();  // every thread of this block has read the old count
  if (threadIdx.x == 0) {
    const int64_t* row = a.tensors + t * kFields;
    __threadfence();
    if (atomicAdd(a.counters + t, 1) + 1 == row[kBlocks]) {
      a.step_anchor[row[kStep]] += 1.f;
      a.counters[t] = 0;
    }
  }
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float2 warp_sum(float2 x) {
  return make_float2(warp_sum(x.x), warp_sum(x.y));
}

// Sum over the block, returned to every thread. All threads must call it.
__device__ __forceinline__ float2 block_sum(float2 x) {
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
__device__ __forceinline__ float weighted_theta(Sums sums, float2 norms, float tau) {
  if (!isfinite(norms.x) || !isfinite(norms.y)) return INFINITY;
  if (!(sqrtf(norms.x) > tau)) return 0.f;
  float theta = norms.x * (sqrtf(norms.x) - tau) / norms.y;
#pragma unroll 1  // one iteration's code: unrolled copies would cost registers, not time
  for (int it = 1; it < kMaxIter; ++it) {
    const float2 s = sums(theta);
    const float phi = rsqrtf(s.x);
    if (1.f - phi <= kRtol) break;
    theta = fmaxf(theta + (1.f - phi) / (s.y * phi * phi * phi), 0.f);
  }
  return theta;
}

// Adam on one tile of `w`'s tensor, then: the elementwise prox (none, l1); or, ONE_PASS, the group
// prox of the tile's whole groups; or (two-phase launch 1) z written to p and, for kGroup, each
// group's partial sum z^2 stored in the tile's own slot of `partials`.
template <typename T, int PROX, bool ONE_PASS>
__device__ __forceinline__ void adam_prox_tile(const Work<T>& w, int32_t tile_index, float* partials) {
  constexpr bool kElementwise = PROX == kNone || PROX == kL1;
  constexpr bool kStageZ = PROX == kGroup || (PROX == kWeighted && ONE_PASS);
  constexpr bool kStageD = PROX == kWeighted && ONE_PASS;
  extern __shared__ float smem[];
  const Layout& L = w.L;
  const Tile& tile = w.tile;
  const Hyper& h = w.h;
  float* group_stat = smem;  // kMaxGroupsPerTile floats, then the staged tiles
  float* z_tile = smem + kMaxGroupsPerTile;
  float* d_tile = z_tile + tile.ba * tile.pitch;

  const TileCoords tc(L, tile, tile_index);
  const int32_t n = tc.na * tc.W, pitch = static_cast<int32_t>(tile.pitch);
  for (int32_t e = threadIdx.x; e < n; e += kThreads) {
    int32_t row, col;
    const int64_t i = tc.index(e, row, col);
    float d;
    const float z = adam_update(w.p, w.g, w.m, w.v, i, h, w.grad_scale, d);
    if (kElementwise) {
      w.p[i] = static_cast<T>(PROX == kL1 ? soft_threshold(z, h.l1_threshold) : z);
    } else if (!ONE_PASS) {
      w.p[i] = static_cast<T>(z);
    }
    if (kStageZ) z_tile[row * pitch + col] = z;
    if (kStageD) d_tile[row * pitch + col] = d;
  }
  if constexpr (kStageZ) {
    __syncthreads();
    // One warp per group: its elements are rows 0..na of columns [slot*nk, (slot+1)*nk).
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int32_t group_elems = tc.na * tc.nk, nk = tc.nk;
    for (int32_t slot = warp; slot < tc.nb; slot += kWarps) {
      auto at = [=](int32_t j) {
        const int32_t row = j / nk;
        return row * pitch + slot * nk + (j - row * nk);
      };
      if (PROX == kGroup) {
        float sum_sq = 0.f;
        for (int32_t j = lane; j < group_elems; j += 32) sum_sq += z_tile[at(j)] * z_tile[at(j)];
        sum_sq = warp_sum(sum_sq);
        if (lane == 0) {
          if (ONE_PASS) {
            group_stat[slot] = sum_sq;
          } else {
            partials[tile_index * tile.bg + slot] = sum_sq;
          }
        }
      } else {
        float2 norms = make_float2(0.f, 0.f);  // ||D z||^2, sum (d z)^2 d
        for (int32_t j = lane; j < group_elems; j += 32) {
          const float d = d_tile[at(j)], dz = d * z_tile[at(j)];
          norms.x += dz * dz;
          norms.y += dz * dz * d;
        }
        norms = warp_sum(norms);
        const float tau = h.tau;
        const float theta = weighted_theta(
            [=](float th) {
              float2 s = make_float2(0.f, 0.f);
              for (int32_t j = lane; j < group_elems; j += 32) {
                const float2 t = newton_terms(z_tile[at(j)], d_tile[at(j)], th, tau);
                s.x += t.x;
                s.y += t.y;
              }
              return warp_sum(s);
            },
            norms, tau);
        if (lane == 0) group_stat[slot] = theta;
      }
    }
    if constexpr (ONE_PASS) {
      __syncthreads();
      for (int32_t e = threadIdx.x; e < n; e += kThreads) {
        int32_t row, col;
        const int64_t i = tc.index(e, row, col);
        const float z = z_tile[row * pitch + col];
        const float stat = group_stat[col / nk];
        w.p[i] = static_cast<T>(PROX == kGroup ? group_shrink(z, stat, h.tau)
                                               : weighted_shrink(z, d_tile[row * pitch + col], stat, h.tau));
      }
    }
  }
}

// Launch 1: block j runs tile blocks[2j + 1] of tensor blocks[2j]. PROX is the launch's prox;
// a tensor of the launch takes it or "none" (lomt_kernels.kernels.prepare.tensor_prox).
template <typename T, int PROX>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) step_kernel(Args<T> a) {
  if (skipped(a)) return;
  const int32_t t = a.blocks[2 * blockIdx.x], tile = a.blocks[2 * blockIdx.x + 1];
  const Work<T> w = load_work(a, t);
  if (w.prox == kNone) {
    adam_prox_tile<T, kNone, true>(w, tile, nullptr);
  } else if constexpr (PROX == kL1) {
    adam_prox_tile<T, kL1, true>(w, tile, nullptr);
  } else if constexpr (PROX == kGroup || PROX == kWeighted) {
    if (w.one_pass) {
      adam_prox_tile<T, PROX, true>(w, tile, nullptr);
    } else {
      adam_prox_tile<T, PROX, false>(w, tile, a.partials + w.partial0);
    }
  }
  finish_block(a, t);
}

// Launch 2: block j finds the statistic of group blocks[2j + 1] of two-phase tensor blocks[2j]:
// for "group" the sum of its tiles' partial sums, added in a fixed order; for "group_weighted"
// theta (weighted_theta) from z (in p after launch 1) and v, streaming the group once for the
// norms and once per Newton iteration.
template <typename T, int PROX>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) stat_kernel(Args<T> a) {
  if (skipped(a)) return;
  const int32_t t = a.blocks[2 * blockIdx.x], b = a.blocks[2 * blockIdx.x + 1];
  const Work<T> w = load_work(a, t);
  const Layout& L = w.L;
  const Hyper& h = w.h;
  float stat;
  if constexpr (PROX == kGroup) {
    // The group's tiles are tb = b / bg over every row and column chunk; its slot is b % bg.
    const int64_t tiles_k = (L.K + w.tile.bk - 1) / w.tile.bk, tiles_a = (L.A + w.tile.ba - 1) / w.tile.ba;
    const int64_t first = (b / w.tile.bg) * tiles_a * tiles_k, slot = b % w.tile.bg;
    const float* partials = a.partials + w.partial0;
    float sum_sq = 0.f;
    for (int64_t j = threadIdx.x; j < tiles_a * tiles_k; j += kThreads) sum_sq += partials[(first + j) * w.tile.bg + slot];
    stat = block_sum(make_float2(sum_sq, 0.f)).x;
  } else {
    const int64_t n = L.A * L.K, K = L.K, row = L.B * L.K;
    const T* p = w.p;
    const T* v = w.v;
    const float sqrt_bc2 = h.sqrt_bc2, eps = h.eps, tau = h.tau;
    auto at = [=](int64_t j) { return (j / K) * row + b * K + j % K; };
    auto d_at = [=](int64_t i) { return sqrtf(static_cast<float>(v[i])) / sqrt_bc2 + eps; };
    float2 norms = make_float2(0.f, 0.f);  // ||D z||^2, sum (d z)^2 d
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      const int64_t i = at(j);
      const float d = d_at(i), dz = d * static_cast<float>(p[i]);
      norms.x += dz * dz;
      norms.y += dz * dz * d;
    }
    norms = block_sum(norms);
    stat = weighted_theta(
        [=](float th) {
          float2 s = make_float2(0.f, 0.f);
          for (int64_t j = threadIdx.x; j < n; j += kThreads) {
            const int64_t i = at(j);
            const float2 terms = newton_terms(static_cast<float>(p[i]), d_at(i), th, tau);
            s.x += terms.x;
            s.y += terms.y;
          }
          return block_sum(s);
        },
        norms, tau);
  }
  if (threadIdx.x == 0) a.stats[w.stat0 + b] = stat;
  finish_block(a, t);
}

// Launch 3: block j writes p = prox(z) on tile blocks[2j + 1] of two-phase tensor blocks[2j],
// from z (in p) and each group's statistic (sum z^2, or theta).
template <typename T, int PROX>
__global__ void __launch_bounds__(kThreads, kBlocksPerSM) shrink_kernel(Args<T> a) {
  if (skipped(a)) return;
  const int32_t t = a.blocks[2 * blockIdx.x], tile = a.blocks[2 * blockIdx.x + 1];
  const Work<T> w = load_work(a, t);
  const TileCoords tc(w.L, w.tile, tile);
  const int32_t n = tc.na * tc.W;
  for (int32_t e = threadIdx.x; e < n; e += kThreads) {
    int32_t row, col;
    const int64_t i = tc.index(e, row, col);
    const float z = static_cast<float>(w.p[i]);
    const float stat = a.stats[w.stat0 + tc.b0 + col / tc.nk];
    if (PROX == kGroup) {
      w.p[i] = static_cast<T>(group_shrink(z, stat, w.h.tau));
    } else {
      const float d = sqrtf(static_cast<float>(w.v[i])) / w.h.sqrt_bc2 + w.h.eps;
      w.p[i] = static_cast<T>(weighted_shrink(z, d, stat, w.h.tau));
    }
  }
  finish_block(a, t);
}

// The step's launches, in stream order: launch k has launch_blocks[k] blocks, whose (tensor,
// tile or group) pairs follow those of the launches before it in `blocks`.
template <typename T, int PROX>
void launch_prox(Args<T> a, const std::vector<int64_t>& launch_blocks, int64_t smem_bytes, cudaStream_t stream) {
  const int32_t* blocks = a.blocks;
  if (launch_blocks[0] > 0) {
    step_kernel<T, PROX><<<launch_blocks[0], kThreads, smem_bytes, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if constexpr (PROX == kGroup || PROX == kWeighted) {
    if (launch_blocks[1] > 0) {
      a.blocks = blocks + 2 * launch_blocks[0];
      stat_kernel<T, PROX><<<launch_blocks[1], kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (launch_blocks[2] > 0) {
      a.blocks = blocks + 2 * (launch_blocks[0] + launch_blocks[1]);
      shrink_kernel<T, PROX><<<launch_blocks[2], kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

template <typename T>
void launch(const Args<T>& a, int64_t prox, const std::vector<int64_t>& launch_blocks, int64_t smem_bytes,
            cudaStream_t stream) {
  switch (prox) {
    case kNone: return launch_prox<T, kNone>(a, launch_blocks, smem_bytes, stream);
    case kGroup: return launch_prox<T, kGroup>(a, launch_blocks, smem_bytes, stream);
    case kWeighted: return launch_prox<T, kWeighted>(a, launch_blocks, smem_bytes, stream);
    case kL1: return launch_prox<T, kL1>(a, launch_blocks, smem_bytes, stream);
    default: TORCH_CHECK(false, "group_prox_adam_cuda: unknown prox code ", prox);
  }
}

const float* optional_float(const std::optional<at::Tensor>& t, const at::Tensor& like, const char* name) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->device() == like.device(), "group_prox_adam_cuda: ",
              name, " must be a one-element float32 tensor on ", like.device(), ", got ", t->scalar_type(), " ",
              t->sizes(), " on ", t->device());
  return t->data_ptr<float>();
}

}  // namespace

// One proximal Adam step over the tensors of a plan (see lomt_kernels/kernels/cuda.py, which
// builds the tables and keeps them; every pointer is an offset from an anchor's data pointer).
void group_prox_adam_cuda(const at::Tensor& p_anchor, const at::Tensor& g_anchor, const at::Tensor& step_anchor,
                          const at::Tensor& tensors, const at::Tensor& blocks, const at::Tensor& counters,
                          const at::Tensor& partials, const at::Tensor& stats,
                          const std::vector<int64_t>& launch_blocks, int64_t smem_bytes, int64_t prox,
                          const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, double lr, double lambda, double beta1,
                          double beta2, double eps, double weight_decay, bool decoupled_weight_decay, bool maximize) {
  TORCH_CHECK(launch_blocks.size() == 3, "group_prox_adam_cuda: launch_blocks must hold three counts");
  TORCH_CHECK(p_anchor.is_cuda() && g_anchor.scalar_type() == p_anchor.scalar_type(),
              "group_prox_adam_cuda: CUDA params with grads of the param's dtype");
  TORCH_CHECK(tensors.scalar_type() == at::kLong && tensors.size(1) == kFields && blocks.scalar_type() == at::kInt &&
                  counters.scalar_type() == at::kInt && step_anchor.scalar_type() == at::kFloat &&
                  partials.scalar_type() == at::kFloat && stats.scalar_type() == at::kFloat,
              "group_prox_adam_cuda: tables of unexpected types or width");
  const c10::cuda::CUDAGuard guard(p_anchor.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto scalars = [&](auto* anchor) {
    using T = std::remove_pointer_t<decltype(anchor)>;
    return Args<T>{anchor,
                   g_anchor.data_ptr<T>(),
                   step_anchor.data_ptr<float>(),
                   tensors.data_ptr<int64_t>(),
                   blocks.data_ptr<int32_t>(),
                   counters.data_ptr<int32_t>(),
                   partials.data_ptr<float>(),
                   stats.data_ptr<float>(),
                   optional_float(lr_tensor, p_anchor, "lr"),
                   optional_float(grad_scale, p_anchor, "grad_scale"),
                   optional_float(found_inf, p_anchor, "found_inf"),
                   static_cast<float>(lr),
                   static_cast<float>(lambda),
                   static_cast<float>(1.0 - beta1),
                   static_cast<float>(beta2),
                   static_cast<float>(1.0 - beta2),
                   static_cast<float>(eps),
                   static_cast<float>(weight_decay),
                   beta1 > 0 ? std::log(beta1) : -INFINITY,
                   beta2 > 0 ? std::log(beta2) : -INFINITY,
                   maximize,
                   decoupled_weight_decay};
  };
  switch (p_anchor.scalar_type()) {
    case at::kFloat: return launch(scalars(p_anchor.data_ptr<float>()), prox, launch_blocks, smem_bytes, stream);
    case at::kHalf: return launch(scalars(p_anchor.data_ptr<at::Half>()), prox, launch_blocks, smem_bytes, stream);
    case at::kBFloat16:
      return launch(scalars(p_anchor.data_ptr<at::BFloat16>()), prox, launch_blocks, smem_bytes, stream);
    default:
      TORCH_CHECK(false, "group_prox_adam_cuda: float32, float16 or bfloat16 params, got ", p_anchor.scalar_type());
  }
}
