// GEGLU's gate in the epilogue of a Hopper GEMM (sm_90a, CUTLASS 3). Built and loaded by gate_gemm.py.
//
// GEGLU computes a * gelu(g) with [a, g] = x W^T + b (W is 8C x C, its halves W_a and W_g). Unfused, one GEMM
// writes the 8C-wide [a, g] and a pointwise kernel reads it back for the product (~31 ms of a 0.39 s compiled
// UNet call on an H100, benchmarks/RESULTS.md, run 27). Here the halves are two GEMMs:
//   a   = x W_a^T + b_a                        (cuBLAS, by the caller)
//   out = a * gelu(x W_g^T + b_g)              (this kernel: a is read as the epilogue's source C)
// so the 8C-wide tensor is never written, and the gate runs in the epilogue of warp-specialised TMA kernels
// built from CUTLASS's collective builders and an epilogue visitor tree.
// gelu is the exact erf form (cutlass::epilogue::thread::GELU<float> calls erff), evaluated in fp32 on the fp32
// accumulator plus bias; a is the fp16 tensor the first GEMM wrote; the product is rounded to fp16 once. (The
// unfused path rounds g to fp16 before the gelu, so this is, if anything, nearer the fp32 result.)
//
// Plain C entry points, no PyTorch headers: loaded with ctypes, the .so (CUDA runtime linked statically) does
// not depend on the PyTorch build.

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

namespace {

using Half = cutlass::half_t;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
constexpr int kAlign = 8;  // 16 bytes of fp16

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule, class EpilogueTile>
struct Kernel {
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, Half, float, Stride<_0, _1, int64_t>, kAlign>;
  using AddBias = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, kRound>, fusion::Sm90AccFetch, Bias>;
  using Gelu = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::epilogue::thread::GELU, float, float, kRound>, AddBias>;
  // multiplies(C, gelu(plus(acc, bias))), C being the first half a
  using Gate = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, Half, float, kRound>,
                               fusion::Sm90SrcFetch<Half>, Gelu>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape, EpilogueTile, float, float, Half,
      cutlass::layout::RowMajor, kAlign, Half, cutlass::layout::RowMajor, kAlign, EpilogueSchedule,
      Gate>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Half, cutlass::layout::RowMajor, kAlign, Half,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  static int sm_count() {
    static int count = 0;
    if (count == 0) {
      int device = 0;
      cudaGetDevice(&device);
      count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    }
    return count;
  }

  // x: M x K row-major; w: N x K row-major (a Linear's weight); bias: N; a, out: M x N row-major.
  static int run(const void* x, const void* w, const void* bias, const void* a, void* out, int M, int N, int K,
                 int swizzle, int raster, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    using StrideA = typename GemmKernel::StrideA;
    using StrideB = typename GemmKernel::StrideB;
    using StrideC = typename GemmKernel::StrideC;
    using StrideD = typename GemmKernel::StrideD;
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {M, N, K, 1};
    args.mainloop.ptr_A = static_cast<Half const*>(x);
    args.mainloop.dA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    args.mainloop.ptr_B = static_cast<Half const*>(w);
    args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N, K, 1));
    args.epilogue.ptr_C = static_cast<Half const*>(a);
    args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, cute::make_shape(M, N, 1));
    args.epilogue.ptr_D = static_cast<Half*>(out);
    args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(M, N, 1));
    typename Bias::Arguments bias_args{static_cast<Half const*>(bias), Half(0), {_0{}, _1{}, int64_t(0)}};
    args.epilogue.thread = {{}, {{{}, bias_args, {}}, {}}, {}};
    args.hw_info.sm_count = sm_count();
    args.scheduler.max_swizzle_size = swizzle;
    args.scheduler.raster_order = static_cast<decltype(args.scheduler.raster_order)>(raster);  // 0 heuristic, 1 M, 2 N

    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PongEpi = cutlass::epilogue::TmaWarpSpecialized;
using Auto = cutlass::epilogue::collective::EpilogueTileAuto;
template <int M, int N, int K>
using S = Shape<Int<M>, Int<N>, Int<K>>;
using E128x64 = Shape<_128, _64>;

// The tile configurations; the index is the `config` argument of the entry point. Each was the fastest for one of
// SVD's GEGLU shapes on an H100 among ten tried (benchmarks/RESULTS.md, run 38): cooperative 128x256 for the
// first two levels (K = 320, 640), ping-pong 128x128 for the third (K = 1280).
using Config0 = Kernel<S<128, 256, 64>, S<2, 1, 1>, Coop, CoopEpi, E128x64>;
using Config1 = Kernel<S<256, 128, 64>, S<1, 2, 1>, Coop, CoopEpi, Auto>;
using Config2 = Kernel<S<128, 128, 64>, S<2, 1, 1>, Pong, PongEpi, Auto>;
using Config3 = Kernel<S<128, 128, 64>, S<1, 2, 1>, Pong, PongEpi, Auto>;
constexpr int kConfigs = 4;

// ---------------------------------------------------------------------------------------------------------------
// The whole GEGLU in one GEMM: W's two halves interleaved row by row (see interleave_rows in gate_gemm.py), so that
// each thread's accumulators hold a and g of the same output side by side, and an epilogue that writes
// a * gelu(g) straight from registers: half as many columns out as the GEMM computes, nothing read back.
//
// The SM90 wgmma accumulator layout gives each thread, per 8-column chunk c of the MMA atom, the columns 2q and
// 2q+1 (q = lane % 4) of rows r and r + 8. Within each group of 32 columns (chunks 4G..4G+3) the interleaved
// weight puts at column 8c' + 2q + p (c' = c - 4G) the row 16G + 4q + c' of W_a (p = 0) or W_g (p = 1), so the
// thread owns outputs 16G + 4q .. 16G + 4q + 3 of its rows: one 8-byte store each, and the four lanes of a row
// store 32 contiguous bytes.
struct GegluEpilogue {
  using EpilogueSchedule = cutlass::gemm::EpilogueDefault;
  using DispatchPolicy = EpilogueSchedule;
  using ElementC = void;
  using ElementD = Half;
  using ElementOutput = Half;
  using ElementAccumulator = float;
  using ElementCompute = float;
  using ElementScalar = float;
  using StrideC = Stride<int64_t, _1, int64_t>;
  using StrideD = Stride<int64_t, _1, int64_t>;
  using GmemTiledCopyC = void;
  using GmemTiledCopyD = void;
  using ThreadEpilogueOp = cutlass::epilogue::thread::LinearCombination<Half, 1, float, float>;  // a name only
  struct SharedStorage {};
  using TensorStorage = SharedStorage;

  struct Arguments {
    Half const* bias = nullptr;  // interleaved like the weight: 2N
    Half* out = nullptr;         // M x N row-major
    int64_t ld_out = 0;
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    return get<1>(problem_shape) % 32 == 0 && args.ld_out % 4 == 0;
  }

  CUTLASS_HOST_DEVICE
  GegluEpilogue(Params const& params_, SharedStorage const& = SharedStorage()) : params(params_) {}

  template <class ProblemShapeMNKL, class BlockShapeMNK, class BlockCoordMNKL, class FrgEngine, class FrgLayout,
            class TiledMma, class ResidueMNK>
  CUTLASS_DEVICE void operator()(ProblemShapeMNKL problem_shape_mnkl, BlockShapeMNK blk_shape_MNK,
                                 BlockCoordMNKL blk_coord_mnkl, cute::Tensor<FrgEngine, FrgLayout> const& accumulators,
                                 TiledMma tiled_mma, ResidueMNK, int thread_idx, char*) {
    constexpr int BM = size<0>(BlockShapeMNK{});
    constexpr int BN = size<1>(BlockShapeMNK{});
    int const M = get<0>(problem_shape_mnkl);
    auto [m_coord, n_coord, k_coord, l_coord] = blk_coord_mnkl;
    int const m0 = int(m_coord) * BM;
    int const n0 = int(n_coord) * BN;
    Tensor cD = make_identity_tensor(make_shape(Int<BM>{}, Int<BN>{}));  // tile-local (m, n)
    Tensor tCcD = tiled_mma.get_thread_slice(thread_idx).partition_C(cD);  // like the accumulators
    static_assert(decltype(size<0>(accumulators))::value % 16 == 0, "MMA atom N must be a multiple of 32");
    constexpr int kMma = decltype(size<0>(accumulators))::value;  // 4 per 8-column chunk
    cutlass::epilogue::thread::GELU<float> gelu;
    CUTLASS_PRAGMA_UNROLL
    for (int mm = 0; mm < size<1>(accumulators); ++mm) {
      CUTLASS_PRAGMA_UNROLL
      for (int nn = 0; nn < size<2>(accumulators); ++nn) {
        CUTLASS_PRAGMA_UNROLL
        for (int h = 0; h < 2; ++h) {  // rows r and r + 8
          CUTLASS_PRAGMA_UNROLL
          for (int G = 0; G < kMma / 16; ++G) {  // groups of 4 chunks = 32 columns
            int const v0 = 2 * h + 16 * G;
            auto const first = tCcD(v0, mm, nn);
            int const m = m0 + get<0>(first);
            int const n = n0 + get<1>(first);  // = 32 * group + 2q
            cutlass::Array<Half, 4> out;
            CUTLASS_PRAGMA_UNROLL
            for (int c = 0; c < 4; ++c) {
              int const v = v0 + 4 * c;
              float const a = accumulators(v, mm, nn) + float(params.bias[n + 8 * c]);
              float const g = accumulators(v + 1, mm, nn) + float(params.bias[n + 8 * c + 1]);
              out[c] = Half(a * gelu(g));
            }
            if (m < M) {
              int64_t const col = (n / 32) * 16 + 4 * ((n % 8) / 2);
              *reinterpret_cast<cutlass::Array<Half, 4>*>(params.out + m * params.ld_out + col) = out;
            }
          }
        }
      }
    }
  }

 private:
  Params params;
};

template <class TileShape, class ClusterShape, class MainloopSchedule>
struct FusedKernel {
  using Epilogue = cutlass::epilogue::collective::detail::Sm90TmaWarpSpecializedAdapter<GegluEpilogue>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Half, cutlass::layout::RowMajor, kAlign, Half,
      cutlass::layout::ColumnMajor, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAuto, MainloopSchedule>::CollectiveOp;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  // x: M x K; w: 2N x K interleaved; bias: 2N interleaved; out: M x N.
  static int run(const void* x, const void* w, const void* bias, void* out, int M, int N2, int K, void* workspace,
                 size_t workspace_bytes, cudaStream_t stream) {
    using StrideA = typename GemmKernel::StrideA;
    using StrideB = typename GemmKernel::StrideB;
    typename Gemm::Arguments args{};
    args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
    args.problem_shape = {M, N2, K, 1};
    args.mainloop.ptr_A = static_cast<Half const*>(x);
    args.mainloop.dA = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(M, K, 1));
    args.mainloop.ptr_B = static_cast<Half const*>(w);
    args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(N2, K, 1));
    args.epilogue.bias = static_cast<Half const*>(bias);
    args.epilogue.out = static_cast<Half*>(out);
    args.epilogue.ld_out = N2 / 2;
    args.hw_info.sm_count = Kernel<TileShape, ClusterShape, Coop, CoopEpi, Auto>::sm_count();
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
    return cudaGetLastError() == cudaSuccess ? 0 : 5;
  }
};

using Fused0 = FusedKernel<S<128, 256, 64>, S<2, 1, 1>, Coop>;
using Fused1 = FusedKernel<S<128, 128, 64>, S<2, 1, 1>, Pong>;
using Fused2 = FusedKernel<S<128, 256, 64>, S<1, 2, 1>, Coop>;
using Fused3 = FusedKernel<S<128, 128, 64>, S<1, 2, 1>, Pong>;
constexpr int kFusedConfigs = 4;

}  // namespace

extern "C" {

int img2vid_cutlass_configs() { return kConfigs; }
int img2vid_fused_configs() { return kFusedConfigs; }

// out (M x N) = GEGLU of x (M x K) with the interleaved weight w (2N x K) and bias (2N); as img2vid_geglu_gate_gemm.
int img2vid_geglu_fused(int config, const void* x, const void* w, const void* bias, void* out, int M, int N2, int K,
                        void* ws, size_t ws_bytes, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (config) {
    case 0:
      return Fused0::run(x, w, bias, out, M, N2, K, ws, ws_bytes, s);
    case 1:
      return Fused1::run(x, w, bias, out, M, N2, K, ws, ws_bytes, s);
    case 2:
      return Fused2::run(x, w, bias, out, M, N2, K, ws, ws_bytes, s);
    case 3:
      return Fused3::run(x, w, bias, out, M, N2, K, ws, ws_bytes, s);
    default:
      return -1;
  }
}

// out = a * gelu(x w^T + bias), all fp16 and row-major: x M x K, w N x K (a Linear's weight), bias N, a and out
// M x N. swizzle: the tile scheduler's swizzle (1, 2, 4, 8); raster: 0 heuristic, 1 along M, 2 along N.
// Returns 0 on success, 1 if this configuration cannot run the shape, 2-5 on other failures, -1 for no such config.
int img2vid_geglu_gate_gemm(int config, const void* x, const void* w, const void* bias, const void* a, void* out,
                            int M, int N, int K, int swizzle, int raster, void* ws, size_t ws_bytes, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#define IMG2VID_CASE(i) \
  case i:               \
    return Config##i::run(x, w, bias, a, out, M, N, K, swizzle, raster, ws, ws_bytes, s);
  switch (config) {
    IMG2VID_CASE(0)
    IMG2VID_CASE(1)
    IMG2VID_CASE(2)
    IMG2VID_CASE(3)
    default:
      return -1;
  }
#undef IMG2VID_CASE
}
}
