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

}  // namespace

extern "C" {

int img2vid_cutlass_configs() { return kConfigs; }

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
