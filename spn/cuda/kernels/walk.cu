// Soft Proposal, k-step mode, forward: build the transfer matrix D once per image, then run
// the walk M <- D M for the whole batch on the device, one launch pair per step, no host
// synchronisation. D and M are double whatever the input type.
//
// sp_weights_{f32,f64}   w[b, a, c] = ||s u_a - s u_c|| * L~_ac (D' of the paper up to a constant),
//                        s = scale[b] (sp_unit_scale: an exact power of two, see common.cuh),
//                        direct differences tile by tile as in sp_degree; w is exactly symmetric.
//                        grid (ceil(n / SP_TILE) for c, ceil(n / SP_TILE) for a, min(B, 65535)),
//                        block (SP_TX, SP_TY).
// sp_normalize_columns   in place: s_bc = sum_a w[b, a, c] (kept in colsum[b, c]), then
//                        w[b, :, c] /= s_bc, or 1/n when s_bc == 0 (NaN stays NaN). One thread
//                        per column; at each row the threads read consecutive columns.
//                        1-D grid-stride over B * n columns, any 1-D block.
// sp_walk_matvec         out[b, a] = sum_c d[b, a, c] * states[b, t, c], a block of SP_ROWS rows,
//                        SP_LANES threads per row, summed in shared memory in a fixed order.
//                        grid (ceil(n / SP_ROWS), min(B, 65535)), block (SP_LANES, SP_ROWS).
// sp_walk_update         one block per image: new = out / sum(out), change = ||new - M_t||_2;
//                        states[b, t + 1] = new if the image is active, else M_t (frozen);
//                        an active image counts the step (steps[b] += 1) and, when
//                        tolerance > 0 and change < tolerance, becomes inactive (NaN never
//                        does). grid (min(B, 2^20)), block (SP_THREADS).
//
// states is (B, k + 1, n): state_stride = (k + 1) * n, step t reads slot t and writes t + 1.
// Reference: reference/graph.py (transfer_matrix), reference/walk.py (power_iteration),
// spn/walk.py (the same freezing rule, batched).

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sp_weights_body(const T* __restrict__ u, const double* __restrict__ scale,
                                                double* __restrict__ w, int batch, int channels, int n, int width,
                                                double inv_width) {
    __shared__ T ta[SP_CHUNK][SP_TILE];
    __shared__ T tc[SP_CHUNK][SP_TILE];
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int c0 = blockIdx.x * SP_TILE;
    const int a0 = blockIdx.y * SP_TILE;
    for (int img = blockIdx.z; img < batch; img += gridDim.z) {
        const T* u_img = u + (long long)img * channels * n;
        double* w_img = w + (long long)img * n * n;
        double d2[SP_REG][SP_REG];
        sp_tile_squared_distances(d2, ta, tc, u_img, (T)scale[img], channels, n, a0, c0);
#pragma unroll
        for (int i = 0; i < SP_REG; ++i) {
            const int a = a0 + ty + SP_TY * i;
#pragma unroll
            for (int j = 0; j < SP_REG; ++j) {
                const int c = c0 + tx + SP_TX * j;
                if (a < n && c < n) w_img[(long long)a * n + c] = sqrt(d2[i][j]) * sp_spatial_weight(a, c, width, inv_width);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_weights_f32(const float* __restrict__ u, const double* __restrict__ scale, double* __restrict__ w, int batch,
               int channels, int n, int width, double inv_width) {
    sp_weights_body<float>(u, scale, w, batch, channels, n, width, inv_width);
}

extern "C" __global__ void __launch_bounds__(SP_TX * SP_TY)
sp_weights_f64(const double* __restrict__ u, const double* __restrict__ scale, double* __restrict__ w, int batch,
               int channels, int n, int width, double inv_width) {
    sp_weights_body<double>(u, scale, w, batch, channels, n, width, inv_width);
}

extern "C" __global__ void sp_normalize_columns(double* __restrict__ w, double* __restrict__ colsum, int batch, int n) {
    const long long columns = (long long)batch * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < columns; idx += stride) {
        const long long img = idx / n;
        const int c = (int)(idx - img * n);
        double* col = w + img * n * n + c;
        double s = 0.0;
        for (int a = 0; a < n; ++a) s += col[(long long)a * n];
        colsum[idx] = s;
        if (s == 0.0) {
            const double uniform = 1.0 / n;
            for (int a = 0; a < n; ++a) col[(long long)a * n] = uniform;
        } else {
            for (int a = 0; a < n; ++a) col[(long long)a * n] = col[(long long)a * n] / s;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SP_LANES * SP_ROWS)
sp_walk_matvec(const double* __restrict__ d, const double* __restrict__ states, double* __restrict__ out, int batch,
               int n, long long state_stride, int t) {
    __shared__ double red[SP_ROWS][SP_LANES];
    const int lane = threadIdx.x;
    const int row = threadIdx.y;
    const int a = blockIdx.x * SP_ROWS + row;
    for (int img = blockIdx.y; img < batch; img += gridDim.y) {
        double s = 0.0;
        if (a < n) {
            const double* d_row = d + ((long long)img * n + a) * n;
            const double* m = states + (long long)img * state_stride + (long long)t * n;
            for (int c = lane; c < n; c += SP_LANES) s += d_row[c] * m[c];
        }
        red[row][lane] = s;
        __syncthreads();
        for (int half = SP_LANES / 2; half > 0; half >>= 1) {
            if (lane < half) red[row][lane] += red[row][lane + half];
            __syncthreads();
        }
        if (lane == 0 && a < n) out[(long long)img * n + a] = red[row][0];
        __syncthreads();  // red is written again for the next image
    }
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
sp_walk_update(const double* __restrict__ out, double* __restrict__ states, int* __restrict__ active,
               int* __restrict__ steps, int batch, int n, long long state_stride, int t, double tolerance) {
    __shared__ double red[SP_THREADS];
    for (int img = blockIdx.x; img < batch; img += gridDim.x) {
        const double* raw = out + (long long)img * n;
        const double* current = states + (long long)img * state_stride + (long long)t * n;
        double* next = states + (long long)img * state_stride + (long long)(t + 1) * n;
        double s = 0.0;
        for (int a = threadIdx.x; a < n; a += SP_THREADS) s += raw[a];
        const double total = sp_block_sum(s, red);
        double c2 = 0.0;
        for (int a = threadIdx.x; a < n; a += SP_THREADS) {
            const double diff = raw[a] / total - current[a];
            c2 += diff * diff;
        }
        const double change = sqrt(sp_block_sum(c2, red));
        const int live = active[img];
        for (int a = threadIdx.x; a < n; a += SP_THREADS) next[a] = live ? raw[a] / total : current[a];
        __syncthreads();  // every thread has read active[img] before thread 0 changes it
        if (threadIdx.x == 0 && live) {
            steps[img] += 1;
            if (tolerance > 0.0 && change < tolerance) active[img] = 0;
        }
    }
}
