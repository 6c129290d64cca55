// Soft Proposal, stationary mode, forward: M = deg / sum(deg) without any n x n matrix.
//
// sp_degree_{f32,f64}     deg[b, a] = sum_c ||s u_a - s u_c|| * L~_ac for every location a of image b,
//                         s = scale[b] (sp_unit_scale: an exact power of two, see common.cuh),
//                         the distances by direct differences, tile by tile (SP_TILE x SP_TILE
//                         pairs, SP_CHUNK channels at a time in shared memory), the spatial
//                         weight from the indices; the sum over c in double, in a fixed order.
//                         grid (ceil(n / SP_TILE), min(B, 65535)), block (SP_TX, SP_TY).
// sp_normalize_{f32,f64}  m[b, a] = deg[b, a] / S_b, S_b = sum_a deg[b, a] (double), 1/n when S_b == 0;
//                         NaN in deg makes S_b and the whole map NaN. Written in T.
//                         grid (min(B, 2^20)), block (SP_THREADS).
//
// Reference: reference/graph.py (degrees), reference/walk.py (stationary_state).

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sp_degree_body(const T* __restrict__ u, const double* __restrict__ scale,
                                               double* __restrict__ deg, int batch, int channels, int n, int width,
                                               double inv_width) {
    __shared__ T ta[SP_CHUNK][SP_TILE];
    __shared__ T tc[SP_CHUNK][SP_TILE];
    __shared__ double partial[SP_TY][SP_REG][SP_TX];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int a0 = blockIdx.x * SP_TILE;
    for (int img = blockIdx.y; img < batch; img += gridDim.y) {
        const T* u_img = u + (long long)img * channels * n;
        double row[SP_REG];
#pragma unroll
        for (int i = 0; i < SP_REG; ++i) row[i] = 0.0;
        for (int c0 = 0; c0 < n; c0 += SP_TILE) {
            double d2[SP_REG][SP_REG];
            sp_tile_squared_distances(d2, ta, tc, u_img, (T)scale[img], channels, n, a0, c0);
#pragma unroll
            for (int i = 0; i < SP_REG; ++i) {
                const int a = a0 + ty + SP_TY * i;
#pragma unroll
                for (int j = 0; j < SP_REG; ++j) {
                    const int c = c0 + tx + SP_TX * j;
                    if (a < n && c < n) row[i] += sqrt(d2[i][j]) * sp_spatial_weight(a, c, width, inv_width);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < SP_REG; ++i) partial[ty][i][tx] = row[i];
        __syncthreads();
        if (tx == 0) {
            for (int i = 0; i < SP_REG; ++i) {
                const int a = a0 + ty + SP_TY * i;
                if (a < n) {
                    double s = 0.0;
                    for (int x = 0; x < SP_TX; ++x) s += partial[ty][i][x];
                    deg[(long long)img * n + a] = s;
                }
            }
        }
        __syncthreads();  // partial is written again for the next image
    }
}

template <typename T>
__device__ __forceinline__ void sp_normalize_body(const double* __restrict__ deg, T* __restrict__ m, int batch, int n) {
    __shared__ double red[SP_THREADS];
    for (int img = blockIdx.x; img < batch; img += gridDim.x) {
        const double* d = deg + (long long)img * n;
        T* out = m + (long long)img * n;
        double s = 0.0;
        for (int a = threadIdx.x; a < n; a += SP_THREADS) s += d[a];
        const double total = sp_block_sum(s, red);
        for (int a = threadIdx.x; a < n; a += SP_THREADS) out[a] = (T)(total == 0.0 ? 1.0 / n : d[a] / total);
    }
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_degree_f32(const float* __restrict__ u, const double* __restrict__ scale, double* __restrict__ deg, int batch,
              int channels, int n, int width, double inv_width) {
    sp_degree_body<float>(u, scale, deg, batch, channels, n, width, inv_width);
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_degree_f64(const double* __restrict__ u, const double* __restrict__ scale, double* __restrict__ deg, int batch,
              int channels, int n, int width, double inv_width) {
    sp_degree_body<double>(u, scale, deg, batch, channels, n, width, inv_width);
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
sp_normalize_f32(const double* __restrict__ deg, float* __restrict__ m, int batch, int n) {
    sp_normalize_body<float>(deg, m, batch, n);
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
sp_normalize_f64(const double* __restrict__ deg, double* __restrict__ m, int batch, int n) {
    sp_normalize_body<double>(deg, m, batch, n);
}
