// Soft Proposal, backward pass: dE/dU given G = dE/dV (and dE/dM for the returned map).
//
// The distances are those of the scaled features s u (s = scale[b], see common.cuh), whose
// gradient is dE/d(s u) = dE/dU / s: every kernel below works with s dE/dM in place of dE/dM,
// which makes the distance share come out as dE/dU itself, and keeps it finite at any scale.
//
// sp_grad_m_{f32,f64}           gm[b, a] = s gp[b, a] + sum_k G[b, k, a] (s U[b, k, a]) (double):
//                               s dE/dM, the coupling's share plus the gradient of the returned map.
//                               1-D grid-stride over B * n, any 1-D block.
// sp_stationary_grad_deg        one block per image, M = deg / S: gdeg[b, a] = (gm_a - <gm, M>) / S,
//                               0 for the whole image when S == 0 (M is then uniform whatever
//                               the features). grid (min(B, 2^20)), block (SP_THREADS).
// sp_distance_vjp_{f32,f64}     acc[b, :, a] += sum_c C_ac (s u_a - s u_c) with, for the stationary mode,
//                               C_ac = (g_a + g_c) L~_ac / d_ac (g = gdeg, d of the scaled features),
//                               0 where d_ac == 0.
// sp_distance_vjp_pairs_{f32,f64}  the same with C_ac = P[b, a, c] L~_ac / d_ac, P symmetric
//                               (P = gW + gW^T of the k-step mode).
//                               Both: a block owns SP_TILE rows a of one image; for each tile
//                               of SP_TILE columns c it (1) computes d_ac by direct differences
//                               (sp_tile_squared_distances) and C_ac into shared memory, then
//                               (2) walks the channels again, SP_CHUNK at a time, one channel
//                               per thread row, summing C_ac (u_a - u_c) over the tile's c in T
//                               and adding it to acc (double, zeroed by the caller) in global
//                               memory. Only this block touches these rows of acc: no atomics.
//                               No (B, n, n) or (B, n, n, K) array; memory O(B K n).
//                               grid (ceil(n / SP_TILE), min(B, 65535)), block (SP_TX, SP_TY).
// sp_grad_finish_{f32,f64}      dU[b, k, a] = (T)(G[b, k, a] * M[b, a] + acc[b, k, a]) in double.
//                               1-D grid-stride over B * K * n, any 1-D block.
//
// Reference: reference/backward.py (_stationary_vjp, _distances_vjp); the k-step share of
// P (the walk's adjoint and the column normalisation) is done with torch in spn/cuda/function.py.

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sp_grad_m_body(const T* __restrict__ g, const T* __restrict__ u,
                                               const double* __restrict__ scale, const T* __restrict__ gp,
                                               double* __restrict__ gm, int batch, int channels, int n) {
    const long long total = (long long)batch * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long img = idx / n;
        const long long a = idx - img * n;
        const long long base = img * channels * n + a;
        const double scl = scale[img];
        double s = scl * (double)gp[idx];
        for (int k = 0; k < channels; ++k) {
            s += (double)g[base + (long long)k * n] * ((double)u[base + (long long)k * n] * scl);
        }
        gm[idx] = s;
    }
}

extern "C" __global__ void sp_grad_m_f32(const float* __restrict__ g, const float* __restrict__ u,
                                         const double* __restrict__ scale, const float* __restrict__ gp,
                                         double* __restrict__ gm, int batch, int channels, int n) {
    sp_grad_m_body<float>(g, u, scale, gp, gm, batch, channels, n);
}

extern "C" __global__ void sp_grad_m_f64(const double* __restrict__ g, const double* __restrict__ u,
                                         const double* __restrict__ scale, const double* __restrict__ gp,
                                         double* __restrict__ gm, int batch, int channels, int n) {
    sp_grad_m_body<double>(g, u, scale, gp, gm, batch, channels, n);
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
sp_stationary_grad_deg(const double* __restrict__ deg, const double* __restrict__ gm, double* __restrict__ gdeg,
                       int batch, int n) {
    __shared__ double red[SP_THREADS];
    for (int img = blockIdx.x; img < batch; img += gridDim.x) {
        const double* d = deg + (long long)img * n;
        const double* g = gm + (long long)img * n;
        double* out = gdeg + (long long)img * n;
        double s = 0.0;
        for (int a = threadIdx.x; a < n; a += SP_THREADS) s += d[a];
        const double total = sp_block_sum(s, red);  // the same value in every thread
        if (total == 0.0) {
            for (int a = threadIdx.x; a < n; a += SP_THREADS) out[a] = 0.0;
            continue;  // taken by the whole block or by none of it
        }
        double p = 0.0;
        for (int a = threadIdx.x; a < n; a += SP_THREADS) p += g[a] * (d[a] / total);
        const double dot = sp_block_sum(p, red);
        for (int a = threadIdx.x; a < n; a += SP_THREADS) out[a] = (g[a] - dot) / total;
    }
}

// PAIRS == false: coef is g (B, n) and C_ac = (g_a + g_c) L~_ac / d_ac.
// PAIRS == true:  coef is P (B, n, n) and C_ac = P_ac L~_ac / d_ac.
template <typename T, bool PAIRS>
__device__ __forceinline__ void sp_distance_vjp_body(const T* __restrict__ u, const double* __restrict__ scale,
                                                     const double* __restrict__ coef, double* __restrict__ acc,
                                                     int batch, int channels, int n, int width, double inv_width) {
    __shared__ T ta[SP_CHUNK][SP_TILE];
    __shared__ T tc[SP_CHUNK][SP_TILE];
    __shared__ T cs[SP_TILE][SP_TILE];  // cs[c - c0][a - a0] = C_ac
    if (channels <= 0) return;          // nothing to differentiate (the whole block returns)
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int a0 = blockIdx.x * SP_TILE;
    for (int img = blockIdx.y; img < batch; img += gridDim.y) {
        const T* u_img = u + (long long)img * channels * n;
        double* acc_img = acc + (long long)img * channels * n;
        const T scl = (T)scale[img];
        for (int c0 = 0; c0 < n; c0 += SP_TILE) {
            // (1) the coefficients of this tile, from distances by direct differences
            double d2[SP_REG][SP_REG];
            sp_tile_squared_distances(d2, ta, tc, u_img, scl, channels, n, a0, c0);
#pragma unroll
            for (int i = 0; i < SP_REG; ++i) {
                const int a = a0 + ty + SP_TY * i;
#pragma unroll
                for (int j = 0; j < SP_REG; ++j) {
                    const int c = c0 + tx + SP_TX * j;
                    double value = 0.0;
                    if (a < n && c < n) {
                        const double d = sqrt(d2[i][j]);
                        if (d != 0.0) {  // d == 0: no derivative, take 0; NaN goes on to NaN
                            const double g = PAIRS ? coef[((long long)img * n + a) * n + c]
                                                   : coef[(long long)img * n + a] + coef[(long long)img * n + c];
                            value = g * sp_spatial_weight(a, c, width, inv_width) / d;
                        }
                    }
                    cs[tx + SP_TX * j][ty + SP_TY * i] = (T)value;
                }
            }
            // (2) acc[:, a] += sum_c C_ac (u_a - u_c), channel k0 + ty of each chunk in thread row ty
            const int columns = sp_min(SP_TILE, n - c0);
            for (int k0 = 0; k0 < channels; k0 += SP_CHUNK) {
                __syncthreads();  // cs is complete; everyone is done with ta, tc
                sp_load_chunk(ta, u_img, scl, channels, n, k0, a0);
                sp_load_chunk(tc, u_img, scl, channels, n, k0, c0);
                __syncthreads();
                T x[SP_REG];
                T part[SP_REG];
#pragma unroll
                for (int i = 0; i < SP_REG; ++i) {
                    x[i] = ta[ty][tx + SP_TX * i];
                    part[i] = T(0);
                }
                for (int c = 0; c < columns; ++c) {
                    const T y = tc[ty][c];
#pragma unroll
                    for (int i = 0; i < SP_REG; ++i) part[i] += cs[c][tx + SP_TX * i] * (x[i] - y);
                }
                const int k = k0 + ty;
                if (k < channels) {
#pragma unroll
                    for (int i = 0; i < SP_REG; ++i) {
                        const int a = a0 + tx + SP_TX * i;
                        if (a < n) acc_img[(long long)k * n + a] += (double)part[i];
                    }
                }
            }
            // the next tile's sp_tile_squared_distances synchronises before it touches ta, tc,
            // and cs is written only after that
        }
    }
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_distance_vjp_f32(const float* __restrict__ u, const double* __restrict__ scale, const double* __restrict__ g,
                    double* __restrict__ acc, int batch, int channels, int n, int width, double inv_width) {
    sp_distance_vjp_body<float, false>(u, scale, g, acc, batch, channels, n, width, inv_width);
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_distance_vjp_f64(const double* __restrict__ u, const double* __restrict__ scale, const double* __restrict__ g,
                    double* __restrict__ acc, int batch, int channels, int n, int width, double inv_width) {
    sp_distance_vjp_body<double, false>(u, scale, g, acc, batch, channels, n, width, inv_width);
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_distance_vjp_pairs_f32(const float* __restrict__ u, const double* __restrict__ scale, const double* __restrict__ p,
                          double* __restrict__ acc, int batch, int channels, int n, int width, double inv_width) {
    sp_distance_vjp_body<float, true>(u, scale, p, acc, batch, channels, n, width, inv_width);
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_distance_vjp_pairs_f64(const double* __restrict__ u, const double* __restrict__ scale, const double* __restrict__ p,
                          double* __restrict__ acc, int batch, int channels, int n, int width, double inv_width) {
    sp_distance_vjp_body<double, true>(u, scale, p, acc, batch, channels, n, width, inv_width);
}

template <typename T>
__device__ __forceinline__ void sp_grad_finish_body(const T* __restrict__ g, const T* __restrict__ m,
                                                    const double* __restrict__ acc, T* __restrict__ du,
                                                    long long total, int channels, int n) {
    const long long per_image = (long long)channels * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long img = idx / per_image;
        const long long a = idx % n;
        du[idx] = (T)((double)g[idx] * (double)m[img * n + a] + acc[idx]);
    }
}

extern "C" __global__ void sp_grad_finish_f32(const float* __restrict__ g, const float* __restrict__ m,
                                              const double* __restrict__ acc, float* __restrict__ du,
                                              long long total, int channels, int n) {
    sp_grad_finish_body<float>(g, m, acc, du, total, channels, n);
}

extern "C" __global__ void sp_grad_finish_f64(const double* __restrict__ g, const double* __restrict__ m,
                                              const double* __restrict__ acc, double* __restrict__ du,
                                              long long total, int channels, int n) {
    sp_grad_finish_body<double>(g, m, acc, du, total, channels, n);
}
