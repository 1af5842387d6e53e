// Batch normalization (training mode, with the ReLU after it fused in) and a residual
// block's add + ReLU as XLA:CPU custom calls into oneDNN, beside its convolutions
// (onednn_conv.cc): XLA:CPU's own bf16 element-wise passes between the convolutions were
// several times slower than oneDNN's (docs/benchmarks.md, "bfloat16 on this CPU").
#include <cstring>
#include <stdexcept>
#include <unordered_map>

#include "onednn_common.h"

namespace clusiam_onednn {
namespace {

// Batch normalization in training mode with float32 scale, shift and statistics, the
// activations in their dtype (NHWC): the biased batch mean and variance come back for
// the running statistics. With `relu` the ReLU that follows is applied in the same pass
// (oneDNN's fuse_norm_relu), recording where the output is positive in a workspace the
// backward reads instead of a separate ReLU pass and its gradient pass.
dnnl::normalization_flags BnFlags(bool relu) {
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  return relu ? flags | dnnl::normalization_flags::fuse_norm_relu : flags;
}

dnnl::batch_normalization_forward::primitive_desc BnDesc(const Dims& src,
                                                         memory::data_type type,
                                                         float epsilon, bool relu) {
  return dnnl::batch_normalization_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, Nhwc(src, type), Nhwc(src, type), epsilon,
      BnFlags(relu));
}

memory Channels(ffi::AnyBuffer buffer) {
  return memory(memory::desc({buffer.dimensions()[0]}, memory::data_type::f32, Tag::a),
                Engine(), buffer.untyped_data());
}

memory Channels(ffi::Result<ffi::AnyBuffer>& buffer) {
  return memory(memory::desc({buffer->dimensions()[0]}, memory::data_type::f32, Tag::a),
                Engine(), buffer->untyped_data());
}

std::string BnKey(const char* kind, const Dims& src, memory::data_type type, float epsilon,
                  bool relu) {
  uint32_t bits;
  std::memcpy(&bits, &epsilon, sizeof bits);  // every epsilon its own key
  return Geometry{src, {}, {}, {}, {}, {}, type}.Key(kind) + ":" + std::to_string(bits) +
         (relu ? ":relu" : "");
}

// Runs a batch-norm plan on `args`, with the fused ReLU's workspace over the caller's
// buffer (sized by ClusiamBnReluWorkspaceBytes, checked against the plan's) if `relu`.
void RunBn(const Plan& plan, bool relu, size_t workspace_bytes, void* workspace,
           std::unordered_map<int, memory> args) {
  if (relu) {
    if (workspace_bytes < plan.kernel_desc.get_size())
      throw std::invalid_argument("batch norm workspace too small");
    args[DNNL_ARG_WORKSPACE] = memory(plan.kernel_desc, Engine(), workspace);
  }
  dnnl::stream stream(Engine());
  plan.primitive.execute(stream, args);
  stream.wait();
}

std::shared_ptr<Plan> BnForwardPlan(const Dims& src, memory::data_type type, float epsilon,
                                    bool relu) {
  return Cached(BnKey("bn_fwd", src, type, epsilon, relu), [&] {
    auto pd = BnDesc(src, type, epsilon, relu);
    return Plan{dnnl::batch_normalization_forward(pd), pd.workspace_desc(), nullptr};
  });
}

// (y, mean, variance, workspace) = batch_norm(x; scale, shift), y through ReLU if `relu`.
ffi::Error BnForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::AnyBuffer shift,
                         ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> mean,
                         ffi::Result<ffi::AnyBuffer> variance,
                         ffi::Result<ffi::AnyBuffer> workspace, float epsilon, int64_t relu,
                         int64_t threads) {
  if (auto e = Checked(x.element_type(), "oneDNN batch norm"); e.failure()) return e;
  Dims src = Nchw(x.dimensions());
  auto type = DnnlType(x.element_type());
  return Guarded(threads, [&] {
    auto plan = BnForwardPlan(src, type, epsilon, relu != 0);
    memory in(Nhwc(src, type), Engine(), x.untyped_data());
    memory out(Nhwc(src, type), Engine(), y->untyped_data());
    RunBn(*plan, relu != 0, workspace->size_bytes(), workspace->untyped_data(),
          {{DNNL_ARG_SRC, in}, {DNNL_ARG_DST, out}, {DNNL_ARG_SCALE, Channels(scale)},
           {DNNL_ARG_SHIFT, Channels(shift)}, {DNNL_ARG_MEAN, Channels(mean)},
           {DNNL_ARG_VARIANCE, Channels(variance)}});
  });
}

// (dx, dscale, dshift) of batch_norm (and the fused ReLU, from the workspace) at x, the
// batch's statistics included in dx.
ffi::Error BnBackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::AnyBuffer scale,
                          ffi::AnyBuffer mean, ffi::AnyBuffer variance,
                          ffi::AnyBuffer workspace, ffi::Result<ffi::AnyBuffer> dx,
                          ffi::Result<ffi::AnyBuffer> dscale,
                          ffi::Result<ffi::AnyBuffer> dshift, float epsilon, int64_t relu,
                          int64_t threads) {
  if (auto e = Checked(x.element_type(), "oneDNN batch norm"); e.failure()) return e;
  Dims src = Nchw(x.dimensions());
  auto type = DnnlType(x.element_type());
  return Guarded(threads, [&] {
    auto plan = Cached(BnKey("bn_bwd", src, type, epsilon, relu != 0), [&] {
      auto pd = dnnl::batch_normalization_backward::primitive_desc(
          Engine(), dnnl::prop_kind::backward, Nhwc(src, type), Nhwc(src, type),
          Nhwc(src, type), epsilon, BnFlags(relu != 0), BnDesc(src, type, epsilon, relu != 0));
      return Plan{dnnl::batch_normalization_backward(pd), pd.workspace_desc(), nullptr};
    });
    memory in(Nhwc(src, type), Engine(), x.untyped_data());
    memory diff_dst(Nhwc(src, type), Engine(), dy.untyped_data());
    memory diff_src(Nhwc(src, type), Engine(), dx->untyped_data());
    RunBn(*plan, relu != 0, workspace.size_bytes(), workspace.untyped_data(),
          {{DNNL_ARG_SRC, in}, {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_SCALE, Channels(scale)},
           {DNNL_ARG_MEAN, Channels(mean)}, {DNNL_ARG_VARIANCE, Channels(variance)},
           {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_DIFF_SCALE, Channels(dscale)},
           {DNNL_ARG_DIFF_SHIFT, Channels(dshift)}});
  });
}

// A residual block's ending, relu(a + b), in one pass (oneDNN's binary add with a ReLU
// post-op); its gradient, g where the output is positive, from the output.
ffi::Error AddReluForwardImpl(ffi::AnyBuffer a, ffi::AnyBuffer b,
                              ffi::Result<ffi::AnyBuffer> out, int64_t threads) {
  if (auto e = Checked(a.element_type(), "oneDNN add-ReLU"); e.failure()) return e;
  Dims dims = Nchw(a.dimensions());
  auto type = DnnlType(a.element_type());
  return Guarded(threads, [&] {
    auto plan = Cached(Geometry{dims, {}, {}, {}, {}, {}, type}.Key("add_relu"), [&] {
      dnnl::post_ops relu;
      relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
      dnnl::primitive_attr attr;
      attr.set_post_ops(relu);
      auto pd = dnnl::binary::primitive_desc(Engine(), dnnl::algorithm::binary_add,
                                             Nhwc(dims, type), Nhwc(dims, type),
                                             Nhwc(dims, type), attr);
      return Plan{dnnl::binary(pd), {}, nullptr};
    });
    auto at = [&](void* data) { return memory(Nhwc(dims, type), Engine(), data); };
    dnnl::stream stream(Engine());
    plan->primitive.execute(stream, {{DNNL_ARG_SRC_0, at(a.untyped_data())},
                                {DNNL_ARG_SRC_1, at(b.untyped_data())},
                                {DNNL_ARG_DST, at(out->untyped_data())}});
    stream.wait();
  });
}

ffi::Error AddReluBackwardImpl(ffi::AnyBuffer out, ffi::AnyBuffer g,
                               ffi::Result<ffi::AnyBuffer> dz, int64_t threads) {
  if (auto e = Checked(out.element_type(), "oneDNN add-ReLU"); e.failure()) return e;
  Dims dims = Nchw(out.dimensions());
  auto type = DnnlType(out.element_type());
  return Guarded(threads, [&] {
    auto plan = Cached(Geometry{dims, {}, {}, {}, {}, {}, type}.Key("relu_bwd"), [&] {
      const auto relu = dnnl::algorithm::eltwise_relu_use_dst_for_bwd;
      auto hint = dnnl::eltwise_forward::primitive_desc(
          Engine(), dnnl::prop_kind::forward_training, relu, Nhwc(dims, type),
          Nhwc(dims, type), 0.f, 0.f);
      auto pd = dnnl::eltwise_backward::primitive_desc(Engine(), relu, Nhwc(dims, type),
                                                       Nhwc(dims, type), Nhwc(dims, type),
                                                       0.f, 0.f, hint);
      return Plan{dnnl::eltwise_backward(pd), {}, nullptr};
    });
    auto at = [&](void* data) { return memory(Nhwc(dims, type), Engine(), data); };
    dnnl::stream stream(Engine());
    plan->primitive.execute(stream, {{DNNL_ARG_DST, at(out.untyped_data())},
                                {DNNL_ARG_DIFF_DST, at(g.untyped_data())},
                                {DNNL_ARG_DIFF_SRC, at(dz->untyped_data())}});
    stream.wait();
  });
}

}  // namespace
}  // namespace clusiam_onednn

using namespace clusiam_onednn;

// Batch norm: (x, scale, shift) -> (y, mean, variance, workspace); backward: (x, dy,
// scale, mean, variance, workspace) -> (dx, dscale, dshift).
template <int kArgs, int kRets>
auto BnBinding() {
  return Rets<kRets>(Args<kArgs>(ffi::Ffi::Bind()))
      .template Attr<float>("epsilon")
      .template Attr<int64_t>("relu")
      .template Attr<int64_t>("threads");
}

// Add-ReLU: (a, b) -> out; backward: (out, g) -> dz.
auto AddReluBinding() {
  return Rets<1>(Args<2>(ffi::Ffi::Bind())).Attr<int64_t>("threads");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamBatchNormForward, BnForwardImpl, (BnBinding<3, 4>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamBatchNormBackward, BnBackwardImpl, (BnBinding<6, 3>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamAddReluForward, AddReluForwardImpl, AddReluBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamAddReluBackward, AddReluBackwardImpl, AddReluBinding());

// The bytes of the workspace a fused batch norm + ReLU of NHWC dims (n, h, w, c) needs
// (a bit per element on oneDNN 3.2's CPU kernels); -1 where oneDNN refuses the shape.
extern "C" int64_t ClusiamBnReluWorkspaceBytes(int64_t n, int64_t h, int64_t w, int64_t c,
                                               int64_t bf16) {
  try {
    auto type = bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    auto pd = BnDesc({n, c, h, w}, type, 1e-5f, true);
    return static_cast<int64_t>(pd.workspace_desc().get_size());
  } catch (const std::exception&) {
    return -1;
  }
}
