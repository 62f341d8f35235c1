// nvlm_C_smoke: the C++ consumer's view of the ops (CMake build, NVLM_KERNELS_BUILD_TESTS=ON).
// Calls nvlm_C::pixel_shuffle_fwd/_bwd through the dispatcher, as a C++ program linked with
// libnvlm_C would, and compares them with InternVL's reshape/permute sequence written in ATen.
// Exit code 0 when every case matches exactly.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>

namespace {

at::Tensor internvl_pixel_shuffle(const at::Tensor& x, int64_t r, bool v2) {
  const int64_t n = x.size(0), side = static_cast<int64_t>(std::llround(std::sqrt(double(x.size(1))))), c = x.size(2);
  at::Tensor g = x.reshape({n, side, side / r, c * r}).permute({0, 2, 1, 3}).reshape({n, side / r, side / r, c * r * r});
  if (v2) g = g.permute({0, 2, 1, 3});
  return g.reshape({n, -1, c * r * r}).contiguous();
}

}  // namespace

int main() {
  using Signature = at::Tensor(const at::Tensor&, int64_t, bool);
  auto forward = c10::Dispatcher::singleton().findSchemaOrThrow("nvlm_C::pixel_shuffle_fwd", "").typed<Signature>();
  auto backward = c10::Dispatcher::singleton().findSchemaOrThrow("nvlm_C::pixel_shuffle_bwd", "").typed<Signature>();
  int failures = 0;
  for (bool v2 : {true, false}) {
    for (int64_t channels : {8, 3200}) {
      at::Tensor vit_out = at::randn({3, 1025, channels});
      at::Tensor x = vit_out.narrow(1, 1, 1024);  // CLS dropped, read in place
      at::Tensor y = forward.call(x, 2, v2);
      at::Tensor back = backward.call(y, 2, v2);
      const bool ok = at::equal(y, internvl_pixel_shuffle(x, 2, v2)) && at::equal(back, x);
      std::printf("pixel_shuffle v%d C=%lld: %s\n", v2 ? 2 : 1, static_cast<long long>(channels), ok ? "ok" : "MISMATCH");
      failures += ok ? 0 : 1;
    }
  }
  return failures == 0 ? 0 : 1;
}
