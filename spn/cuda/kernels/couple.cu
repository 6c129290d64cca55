// Soft Proposal Coupling: V = U * M (paper Eq. 3), and the detached gradient dU = G * M (Eq. 6).
//
// sp_couple_{f32,f64}   v[b, k, a] = x[b, k, a] * m[b, a] in T, the same product torch computes.
//                       1-D grid-stride over B * K * n (total), any 1-D block.
//
// Reference: reference/coupling.py (couple), reference/backward.py (detach=True).

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sp_couple_body(const T* __restrict__ x, const T* __restrict__ m, T* __restrict__ v,
                                               long long total, int channels, int n) {
    const long long per_image = (long long)channels * n;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const long long img = idx / per_image;
        const long long a = idx % n;
        v[idx] = x[idx] * m[img * n + a];
    }
}

extern "C" __global__ void sp_couple_f32(const float* __restrict__ x, const float* __restrict__ m,
                                         float* __restrict__ v, long long total, int channels, int n) {
    sp_couple_body<float>(x, m, v, total, channels, n);
}

extern "C" __global__ void sp_couple_f64(const double* __restrict__ x, const double* __restrict__ m,
                                         double* __restrict__ v, long long total, int channels, int n) {
    sp_couple_body<double>(x, m, v, total, channels, n);
}
