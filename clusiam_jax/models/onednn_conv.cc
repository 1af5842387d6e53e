// oneDNN convolutions as XLA:CPU custom calls (clusiam_jax/models/onednn.py builds and
// registers this file). Why: XLA:CPU in jaxlib 0.10.2 compiles every bfloat16
// convolution to a float32 one, so model.dtype=bfloat16 never reaches the CPU's bf16
// matrix units (AMX); oneDNN, the library PyTorch's CPU autocast uses, does.
//
// Layouts are the model's: activations NHWC, kernels HWIO, both row-major, float32 or
// bfloat16. Kernels enter in any layout oneDNN likes (format `any`, reordered from and
// to HWIO), activations stay NHWC (no reorder). Primitives are built once per shape and
// kept: building one costs more than running a small one.
#include "onednn_common.h"

namespace clusiam_onednn {
namespace {

// x: NHWC, w: HWIO, y: NHWC buffers' dimensions.
Geometry Describe(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                  ffi::Span<const int64_t> y, int64_t sh, int64_t sw, int64_t pt,
                  int64_t pb, int64_t pl, int64_t pr, ffi::DataType type) {
  return Geometry{{x[0], x[3], x[1], x[2]}, {w[3], w[2], w[0], w[1]},
                  {y[0], y[3], y[1], y[2]}, {sh, sw}, {pt, pl}, {pb, pr},
                  DnnlType(type)};
}

memory::desc Any(const Dims& d, memory::data_type t) { return memory::desc(d, t, Tag::any); }
memory::desc Hwio(const Dims& d, memory::data_type t) { return memory::desc(d, t, Tag::hwio); }

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Nhwc(g.src, g.type), Any(g.wei, g.type), Nhwc(g.dst, g.type), g.strides, g.pad_l,
      g.pad_r);
}

// The kernel in `plan`'s layout: a reorder of `user` (HWIO) into a scratch buffer, or
// `user` itself.
memory KernelIn(const Plan& plan, memory user, dnnl::stream& stream) {
  if (!plan.kernel_reorder) return user;
  memory inner(plan.kernel_desc, Engine());
  plan.kernel_reorder->execute(stream, user, inner);
  return inner;
}

Plan WithReorder(dnnl::primitive primitive, const memory::desc& wanted, const memory::desc& user,
                 bool to_user) {
  Plan plan{primitive, wanted, nullptr};
  if (wanted != user) {
    plan.kernel_reorder = to_user
        ? std::make_unique<dnnl::reorder>(dnnl::reorder::primitive_desc(
              Engine(), wanted, Engine(), user))
        : std::make_unique<dnnl::reorder>(dnnl::reorder::primitive_desc(
              Engine(), user, Engine(), wanted));
  }
  return plan;
}

// An NHWC activation buffer and the primitive argument it is.
struct Activation {
  int arg;
  Dims dims;
  void* data;
};

// Runs a forward or input-gradient plan: one activation and the HWIO kernel `w` in, the
// other activation out.
void RunWithKernel(const Plan& plan, const Geometry& g, const Activation& in, void* w,
                   const Activation& out) {
  dnnl::stream stream(Engine());
  memory input(Nhwc(in.dims, g.type), Engine(), in.data);
  memory output(Nhwc(out.dims, g.type), Engine(), out.data);
  memory wei = KernelIn(plan, memory(Hwio(g.wei, g.type), Engine(), w), stream);
  plan.primitive.execute(stream, {{in.arg, input}, {DNNL_ARG_WEIGHTS, wei}, {out.arg, output}});
  stream.wait();
}

// y = conv(x, w).
ffi::Error ConvForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                           int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr, int64_t threads) {
  if (auto e = Checked(x.element_type(), "oneDNN convolution"); e.failure()) return e;
  Geometry g = Describe(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl,
                        pr, x.element_type());
  return Guarded(threads, [&] {
    auto plan = Cached(g.Key("fwd"), [&] {
      auto pd = ForwardDesc(g);
      return WithReorder(dnnl::convolution_forward(pd), pd.weights_desc(),
                         Hwio(g.wei, g.type), false);
    });
    RunWithKernel(*plan, g, {DNNL_ARG_SRC, g.src, x.untyped_data()}, w.untyped_data(),
                  {DNNL_ARG_DST, g.dst, y->untyped_data()});
  });
}

// dx = the input gradient of conv(., w) at output gradient dy.
ffi::Error ConvBackwardDataImpl(ffi::AnyBuffer dy, ffi::AnyBuffer w,
                                ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw,
                                int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                                int64_t threads) {
  if (auto e = Checked(dy.element_type(), "oneDNN convolution"); e.failure()) return e;
  Geometry g = Describe(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb,
                        pl, pr, dy.element_type());
  return Guarded(threads, [&] {
    auto plan = Cached(g.Key("bwd_data"), [&] {
      auto pd = dnnl::convolution_backward_data::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Nhwc(g.src, g.type),
          Any(g.wei, g.type), Nhwc(g.dst, g.type), g.strides, g.pad_l, g.pad_r,
          ForwardDesc(g));
      return WithReorder(dnnl::convolution_backward_data(pd), pd.weights_desc(),
                         Hwio(g.wei, g.type), false);
    });
    RunWithKernel(*plan, g, {DNNL_ARG_DIFF_DST, g.dst, dy.untyped_data()}, w.untyped_data(),
                  {DNNL_ARG_DIFF_SRC, g.src, dx->untyped_data()});
  });
}

// dw (float32, HWIO) = the kernel gradient of conv(x, .) at output gradient dy.
ffi::Error ConvBackwardWeightsImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                                   ffi::Result<ffi::AnyBuffer> dw, int64_t sh, int64_t sw,
                                   int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                                   int64_t threads) {
  if (auto e = Checked(x.element_type(), "oneDNN convolution"); e.failure()) return e;
  if (dw->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("oneDNN kernel gradient: float32 output only");
  Geometry g = Describe(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb,
                        pl, pr, x.element_type());
  const auto f32 = memory::data_type::f32;
  return Guarded(threads, [&] {
    auto plan = Cached(g.Key("bwd_weights"), [&] {
      auto pd = dnnl::convolution_backward_weights::primitive_desc(
          Engine(), dnnl::algorithm::convolution_direct, Nhwc(g.src, g.type),
          Any(g.wei, f32), Nhwc(g.dst, g.type), g.strides, g.pad_l, g.pad_r,
          ForwardDesc(g));
      return WithReorder(dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(),
                         Hwio(g.wei, f32), true);
    });
    dnnl::stream stream(Engine());
    memory src(Nhwc(g.src, g.type), Engine(), x.untyped_data());
    memory diff_dst(Nhwc(g.dst, g.type), Engine(), dy.untyped_data());
    memory user_dw(Hwio(g.wei, f32), Engine(), dw->untyped_data());
    memory inner = plan->kernel_reorder ? memory(plan->kernel_desc, Engine()) : user_dw;
    plan->primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                {DNNL_ARG_DIFF_WEIGHTS, inner}});
    if (plan->kernel_reorder) plan->kernel_reorder->execute(stream, inner, user_dw);
    stream.wait();
  });
}

template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pb")
      .template Attr<int64_t>("pl")
      .template Attr<int64_t>("pr")
      .template Attr<int64_t>("threads");
}


// Max pooling (PyTorch's rule: the gradient goes to one maximum of each window) on NHWC.
dnnl::pooling_forward::primitive_desc PoolDesc(const Dims& src, const Dims& dst,
                                               memory::data_type type, const Dims& kernel,
                                               const Dims& strides, const Dims& pad_l,
                                               const Dims& pad_r) {
  return dnnl::pooling_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::pooling_max,
      Nhwc(src, type), Nhwc(dst, type), strides, kernel, Dims{0, 0}, pad_l, pad_r);
}

// y = the maximum over each window of x.
ffi::Error PoolForwardImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t kh,
                           int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                           int64_t pl, int64_t pr, int64_t threads) {
  if (auto e = Checked(x.element_type(), "oneDNN max pooling"); e.failure()) return e;
  Dims src = Nchw(x.dimensions()), dst = Nchw(y->dimensions());
  auto type = DnnlType(x.element_type());
  return Guarded(threads, [&] {
    auto pd = PoolDesc(src, dst, type, {kh, kw}, {sh, sw}, {pt, pl}, {pb, pr});
    Geometry g{src, {kh, kw}, dst, {sh, sw}, {pt, pl}, {pb, pr}, type};
    auto plan = Cached(g.Key("pool_fwd"), [&] {
      return Plan{dnnl::pooling_forward(pd), pd.workspace_desc(), nullptr};
    });
    dnnl::stream stream(Engine());
    memory in(Nhwc(src, type), Engine(), x.untyped_data());
    memory out(Nhwc(dst, type), Engine(), y->untyped_data());
    memory workspace(plan->kernel_desc, Engine());
    plan->primitive.execute(stream, {{DNNL_ARG_SRC, in}, {DNNL_ARG_DST, out},
                                {DNNL_ARG_WORKSPACE, workspace}});
    stream.wait();
  });
}

// dx = dy routed to the maximum of each window of x (the forward is run again for its
// record of where the maxima are: one more pass over x, no workspace kept between calls).
ffi::Error PoolBackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer dy,
                            ffi::Result<ffi::AnyBuffer> dx, int64_t kh, int64_t kw,
                            int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                            int64_t pr, int64_t threads) {
  if (auto e = Checked(x.element_type(), "oneDNN max pooling"); e.failure()) return e;
  Dims src = Nchw(x.dimensions()), dst = Nchw(dy.dimensions());
  auto type = DnnlType(x.element_type());
  Geometry g{src, {kh, kw}, dst, {sh, sw}, {pt, pl}, {pb, pr}, type};
  return Guarded(threads, [&] {
    auto forward_pd = PoolDesc(src, dst, type, {kh, kw}, {sh, sw}, {pt, pl}, {pb, pr});
    auto forward = Cached(g.Key("pool_fwd"), [&] {
      return Plan{dnnl::pooling_forward(forward_pd), forward_pd.workspace_desc(), nullptr};
    });
    auto backward = Cached(g.Key("pool_bwd"), [&] {
      auto pd = dnnl::pooling_backward::primitive_desc(
          Engine(), dnnl::algorithm::pooling_max, Nhwc(src, type), Nhwc(dst, type),
          {sh, sw}, {kh, kw}, Dims{0, 0}, {pt, pl}, {pb, pr}, forward_pd);
      return Plan{dnnl::pooling_backward(pd), pd.workspace_desc(), nullptr};
    });
    dnnl::stream stream(Engine());
    memory in(Nhwc(src, type), Engine(), x.untyped_data());
    memory out(Nhwc(dst, type), Engine());
    memory workspace(forward->kernel_desc, Engine());
    forward->primitive.execute(stream, {{DNNL_ARG_SRC, in}, {DNNL_ARG_DST, out},
                                   {DNNL_ARG_WORKSPACE, workspace}});
    memory diff_dst(Nhwc(dst, type), Engine(), dy.untyped_data());
    memory diff_src(Nhwc(src, type), Engine(), dx->untyped_data());
    backward->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                    {DNNL_ARG_DIFF_SRC, diff_src},
                                    {DNNL_ARG_WORKSPACE, workspace}});
    stream.wait();
  });
}

template <typename Binding>
auto WithWindow(Binding binding) {
  return WithGeometry(std::move(binding).template Attr<int64_t>("kh").template Attr<int64_t>("kw"));
}

// The convolutions' signature: two NHWC/HWIO buffers in, one out, the geometry.
auto ConvBinding() { return WithGeometry(Rets<1>(Args<2>(ffi::Ffi::Bind()))); }

}  // namespace
}  // namespace clusiam_onednn

using namespace clusiam_onednn;

XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamConvForward, ConvForwardImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamConvBackwardData, ConvBackwardDataImpl, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamConvBackwardWeights, ConvBackwardWeightsImpl,
                              ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamMaxPoolForward, PoolForwardImpl,
                              WithWindow(Rets<1>(Args<1>(ffi::Ffi::Bind()))));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ClusiamMaxPoolBackward, PoolBackwardImpl,
                              WithWindow(Rets<1>(Args<2>(ffi::Ffi::Bind()))));
