// Soft Proposal, per-image scale: the exact power of two that the distance kernels multiply
// each image by (see common.cuh), so that squares of differences neither overflow nor
// underflow in float32 or float64, whatever the scale of the features.
//
// sp_unit_scale_{f32,f64}  scale[b] = 2^-e (double) where max_{k,a} |u[b, k, a]| = f 2^e, f in
//                          [1/2, 1): the image's largest |u| times scale[b] lies in [1/2, 1).
//                          e is clamped so that 2^-e is a normal number of T (float: 2^-126
//                          to 2^127; double: 2^-1022 to 2^1023), so (T)scale[b] is exact and
//                          so is every product u * scale that is normal. 1 for an all-zero
//                          image and for one with an infinite entry; NaN entries are passed
//                          over (they make the image's map NaN anyway).
//                          grid (min(B, 2^20)), block (SP_THREADS).
//
// Reference: spn/graph.py (unit_scale), the same factor for the torch path.

#include "common.cuh"

template <typename T>
__device__ __forceinline__ void sp_unit_scale_body(const T* __restrict__ u, double* __restrict__ scale, int batch,
                                                   long long per_image) {
    __shared__ double red[SP_THREADS];
    const int smallest = sizeof(T) == 4 ? -126 : -1022;  // exponents of T's smallest and largest normal powers of 2
    const int largest = sizeof(T) == 4 ? 127 : 1023;
    for (int img = blockIdx.x; img < batch; img += gridDim.x) {
        const T* x = u + (long long)img * per_image;
        double peak = 0.0;
        for (long long i = threadIdx.x; i < per_image; i += SP_THREADS) {
            const double v = fabs((double)x[i]);
            if (v > peak) peak = v;  // false for NaN
        }
        peak = sp_block_max(peak, red);
        if (threadIdx.x == 0) {
            double factor = 1.0;
            if (peak > 0.0 && peak - peak == 0.0) {  // nonzero and finite
                int e = 0;
                frexp(peak, &e);                  // peak = f 2^e, f in [1/2, 1)
                e = e < -largest ? -largest : e;  // 2^-e <= 2^largest
                e = e > -smallest ? -smallest : e;  // 2^-e >= 2^smallest
                factor = ldexp(1.0, -e);
            }
            scale[img] = factor;
        }
    }
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
sp_unit_scale_f32(const float* __restrict__ u, double* __restrict__ scale, int batch, long long per_image) {
    sp_unit_scale_body<float>(u, scale, batch, per_image);
}

extern "C" __global__ void __launch_bounds__(SP_THREADS)
sp_unit_scale_f64(const double* __restrict__ u, double* __restrict__ scale, int batch, long long per_image) {
    sp_unit_scale_body<double>(u, scale, batch, per_image);
}
