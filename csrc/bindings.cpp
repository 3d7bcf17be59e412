// Python bindings of the CUDA launchers: module spot_kernels._cuda. Only PYBIND11_MODULE lives
// here. Every argument is a plain number: device pointers and the cudaStream_t as integers
// (0 for a null pointer), sizes and strides in elements. A launch error raises RuntimeError
// with CUDA's message. No torch: spot_kernels/cuda.py turns tensors into these numbers.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "spot_kernels.h"

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "spot-kernels CUDA epilogues (torch-free; called by spot_kernels.cuda)";
  auto check = [](cudaError_t err, const char* what) {
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("spot_kernels._cuda.") + what + ": " +
                               cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  };
  auto ptr = [](std::uintptr_t p) { return reinterpret_cast<void*>(p); };
  auto stream = [](std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); };

  m.def("lse_forward",
        [=](int dtype, std::uintptr_t logits, int64_t rows, int64_t V, int64_t ld,
            std::uintptr_t bias, std::uintptr_t targets, float softcap, float inv_temp,
            int64_t ignore_index, std::uintptr_t logp, std::uintptr_t lse,
            std::uintptr_t entropy, std::uintptr_t s) {
          check(spot::lse_forward(dtype, ptr(logits), rows, V, ld, ptr(bias),
                                  static_cast<const int64_t*>(ptr(targets)), softcap, inv_temp,
                                  ignore_index, static_cast<float*>(ptr(logp)),
                                  static_cast<double*>(ptr(lse)), static_cast<float*>(ptr(entropy)),
                                  stream(s)),
                "lse_forward");
        },
        "Online logsumexp + target gather (+ entropy) over a [rows, V] logits chunk.");
  m.def("backward_epilogue",
        [=](int dtype, std::uintptr_t logits, int64_t rows, int64_t V, int64_t ld,
            std::uintptr_t bias, std::uintptr_t targets, std::uintptr_t lse_hi,
            std::uintptr_t lse_scale, std::uintptr_t target_q, std::uintptr_t grad,
            float softcap, float inv_temp, int64_t ignore_index, std::uintptr_t s) {
          check(spot::backward_epilogue(dtype, ptr(logits), rows, V, ld, ptr(bias),
                                        static_cast<const int64_t*>(ptr(targets)),
                                        static_cast<const float*>(ptr(lse_hi)),
                                        static_cast<const float*>(ptr(lse_scale)),
                                        static_cast<const float*>(ptr(target_q)),
                                        static_cast<const float*>(ptr(grad)), softcap, inv_temp,
                                        ignore_index, stream(s)),
                "backward_epilogue");
        },
        "In place: logits chunk -> dA = g (onehot - p) / T * softcap'.");
  m.def("segment_sum",
        [=](std::uintptr_t x, std::uintptr_t valid, std::uintptr_t cu, int cu_is_int64,
            int64_t S, int average, std::uintptr_t out, std::uintptr_t count, std::uintptr_t s) {
          check(spot::segment_sum(static_cast<const float*>(ptr(x)),
                                  static_cast<const uint8_t*>(ptr(valid)), ptr(cu), cu_is_int64, S,
                                  average, static_cast<float*>(ptr(out)),
                                  static_cast<float*>(ptr(count)), stream(s)),
                "segment_sum");
        },
        "Per-sequence sums (or means over counted tokens) over cu_seqlens.");
  m.def("bce_forward",
        [=](std::uintptr_t pi, std::uintptr_t rho, std::uintptr_t labels, int64_t S, float beta,
            float delta, std::uintptr_t delta_ptr, float inv_k, std::uintptr_t loss,
            std::uintptr_t coef, std::uintptr_t s) {
          check(spot::bce_forward(static_cast<const float*>(ptr(pi)),
                                  static_cast<const float*>(ptr(rho)),
                                  static_cast<const float*>(ptr(labels)), S, beta, delta,
                                  static_cast<const float*>(ptr(delta_ptr)), inv_k,
                                  static_cast<float*>(ptr(loss)), static_cast<float*>(ptr(coef)),
                                  stream(s)),
                "bce_forward");
        },
        "SPoT reward BCE loss (sum / K) and per-sequence coefficients dloss/dpi.");
  m.def("versions",
        []() {
          int driver = 0, runtime = 0;
          cudaDriverGetVersion(&driver);  // 0 when no driver is installed
          cudaRuntimeGetVersion(&runtime);
          return pybind11::make_tuple(driver, runtime);
        },
        "(CUDA driver version, CUDA runtime version the module was linked with), e.g. 13000.");
  m.attr("DTYPES") = pybind11::make_tuple("float32", "float16", "bfloat16");
  // Raised whenever a launcher's pointer types change, so that a module built from older
  // sources is refused instead of misreading buffers (2: the forward's lse is float64; 3: the
  // backward takes it as float32 hi and e^-lo; 4: and the target's 1 - p_t per row).
  m.attr("ABI") = 4;
#ifdef SPOT_CUDA_ARCHS
  m.attr("ARCHS") = SPOT_CUDA_ARCHS;  // the SASS targets, e.g. "80;86;89;90" (PTX for the last)
#else
  m.attr("ARCHS") = "";
#endif
}
