// Shared pieces of the Soft Proposal kernels: block shape, the spatial kernel, and the
// tile of squared feature distances that the degree, weight and gradient kernels build on.
//
// Conventions for every kernel in this directory:
// * features u are contiguous (B, K, n), n = H * W, location a = row * W + column;
// * T is the input type (float or double); everything summed over locations, every
//   distance, spatial weight, degree, transfer matrix and walk state is double;
// * the distance kernels see each image multiplied by scale[b] (double, B), the exact power of
//   two of sp_unit_scale (scale.cu) that brings its largest |u| into [1/2, 1): squares of
//   differences can then neither overflow nor underflow in T for any finite input. M does not
//   depend on the scale; the degrees, weights and column sums are those of the scaled features,
//   and the backward kernels take dE/dM multiplied by the scale, which makes them return dE/dU;
// * offsets into arrays of B*K*n or B*n*n elements are long long;
// * images are covered by a grid-stride loop, so a grid dimension may be smaller than B;
// * every __syncthreads() is reached by all threads of the block (loop bounds that contain
//   one depend only on blockIdx and kernel arguments, never on threadIdx).
//
// spn/cuda/compile.py inlines this header where a .cu file includes it, and reads the
// `constexpr int SP_...` lines below (`constants()`), from which spn/cuda/function.py sizes
// its launches: keep them in the form `constexpr int NAME = number;`.

#ifndef SPN_COMMON_CUH
#define SPN_COMMON_CUH

constexpr int SP_TILE = 64;     // locations per tile: rows a and columns c of a pair tile
constexpr int SP_CHUNK = 16;    // channels per shared-memory chunk
constexpr int SP_TX = 16;       // tile kernels: threads along c (blockDim.x)
constexpr int SP_TY = 16;       // tile kernels: threads along a (blockDim.y)
constexpr int SP_THREADS = 256; // one-image reductions: blockDim.x (a power of 2)
constexpr int SP_LANES = 32;    // sp_walk_matvec: threads along a row (blockDim.x, a power of 2)
constexpr int SP_ROWS = 8;      // sp_walk_matvec: rows per block (blockDim.y)

constexpr int SP_REG = SP_TILE / SP_TX;  // pairs per thread along each side of a tile: 4

static_assert(SP_TILE == SP_TX * SP_REG && SP_TILE == SP_TY * SP_REG, "a tile is SP_REG x SP_REG pairs per thread");
static_assert(SP_CHUNK == SP_TY, "sp_distance_vjp gives each thread row one channel of a chunk");
static_assert((SP_THREADS & (SP_THREADS - 1)) == 0, "sp_block_sum needs a power of 2");
static_assert((SP_LANES & (SP_LANES - 1)) == 0, "sp_walk_matvec's row sum needs a power of 2");

__device__ __forceinline__ int sp_min(int x, int y) { return x < y ? x : y; }

// L~_ac = exp(-(r^2 - 1) / (2 eps^2)) for the squared grid distance r^2 of locations a and c,
// and 1 where r^2 <= 1 (the paper's kernel divided by its nearest-neighbour value; see
// reference/graph.py). inv_width = 1 / (2 eps^2), +inf when 2 eps^2 underflows: then every
// pair beyond the nearest neighbours weighs exp(-inf) = 0 (r^2 - 1 >= 1 there, never 0 * inf).
__device__ __forceinline__ double sp_spatial_weight(int a, int c, int width, double inv_width) {
    const int ya = a / width;
    const int yc = c / width;
    const double dy = (double)(ya - yc);
    const double dx = (double)((a - ya * width) - (c - yc * width));
    const double r2 = dy * dy + dx * dx;
    return r2 <= 1.0 ? 1.0 : exp(-(r2 - 1.0) * inv_width);
}

// tile[kk][i] = u_img[k0 + kk][first + i] * scale, zero outside the K channels and n locations.
// scale is a power of two, so the product is exact (bar entries below 2^-126 of the image's
// largest, which become subnormal). Called by all threads of a (SP_TX, SP_TY) block;
// consecutive threads read consecutive locations.
template <typename T>
__device__ __forceinline__ void sp_load_chunk(T (*tile)[SP_TILE], const T* __restrict__ u_img, T scale, int channels,
                                              int n, int k0, int first) {
    const int tid = threadIdx.y * SP_TX + threadIdx.x;
    for (int e = tid; e < SP_CHUNK * SP_TILE; e += SP_TX * SP_TY) {
        const int kk = e / SP_TILE;
        const int i = e - kk * SP_TILE;
        const int k = k0 + kk;
        const int loc = first + i;
        tile[kk][i] = (k < channels && loc < n) ? u_img[(long long)k * n + loc] * scale : T(0);
    }
}

// Squared distances ||s u_a - s u_c||^2 (s = scale) by direct differences for the pairs of one tile that
// this thread owns: a = a0 + threadIdx.y + SP_TY * i, c = c0 + threadIdx.x + SP_TX * j.
// Each chunk of SP_CHUNK channels is summed in T, the chunks in double. A pair with a or c
// outside the image gets a meaningless value (the tiles are zero-filled there): callers skip it.
// d2[i][j] for (a, c) and for (c, a) are bitwise equal: (x - y)^2 == (y - x)^2.
// Uses ta, tc (shared) and synchronises the block; all threads must call it.
template <typename T>
__device__ __forceinline__ void sp_tile_squared_distances(double (&d2)[SP_REG][SP_REG], T (*ta)[SP_TILE],
                                                          T (*tc)[SP_TILE], const T* __restrict__ u_img, T scale,
                                                          int channels, int n, int a0, int c0) {
    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
#pragma unroll
    for (int i = 0; i < SP_REG; ++i) {
#pragma unroll
        for (int j = 0; j < SP_REG; ++j) d2[i][j] = 0.0;
    }
    for (int k0 = 0; k0 < channels; k0 += SP_CHUNK) {
        __syncthreads();  // everyone is done with the previous contents of ta, tc
        sp_load_chunk(ta, u_img, scale, channels, n, k0, a0);
        sp_load_chunk(tc, u_img, scale, channels, n, k0, c0);
        __syncthreads();
        T part[SP_REG][SP_REG];
#pragma unroll
        for (int i = 0; i < SP_REG; ++i) {
#pragma unroll
            for (int j = 0; j < SP_REG; ++j) part[i][j] = T(0);
        }
#pragma unroll
        for (int kk = 0; kk < SP_CHUNK; ++kk) {
            T x[SP_REG];
            T y[SP_REG];
#pragma unroll
            for (int i = 0; i < SP_REG; ++i) x[i] = ta[kk][ty + SP_TY * i];
#pragma unroll
            for (int j = 0; j < SP_REG; ++j) y[j] = tc[kk][tx + SP_TX * j];
#pragma unroll
            for (int i = 0; i < SP_REG; ++i) {
#pragma unroll
                for (int j = 0; j < SP_REG; ++j) {
                    const T diff = x[i] - y[j];
                    part[i][j] += diff * diff;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < SP_REG; ++i) {
#pragma unroll
            for (int j = 0; j < SP_REG; ++j) d2[i][j] += (double)part[i][j];
        }
    }
}

// The sum of v over the SP_THREADS threads of a 1-D block, returned to every thread, in a
// fixed order (deterministic). red: SP_THREADS doubles of shared memory. All threads must call it.
__device__ __forceinline__ double sp_block_sum(double v, double* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int s = SP_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s) red[tid] += red[tid + s];
        __syncthreads();
    }
    const double total = red[0];
    __syncthreads();  // red may be written again right after the return
    return total;
}

// The largest v over the SP_THREADS threads of a 1-D block, returned to every thread (v >= 0;
// a NaN is passed over). red: SP_THREADS doubles of shared memory. All threads must call it.
__device__ __forceinline__ double sp_block_max(double v, double* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int s = SP_THREADS / 2; s > 0; s >>= 1) {
        if (tid < s && red[tid + s] > red[tid]) red[tid] = red[tid + s];
        __syncthreads();
    }
    const double peak = red[0];
    __syncthreads();  // red may be written again right after the return
    return peak;
}

#endif  // SPN_COMMON_CUH
