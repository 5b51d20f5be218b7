// Accuracy and speed of tanh_vec<float> (csrc/cpu/simd.h) against std::tanh in double.
// Build next to a copy of simd.h; see README.md in this folder.
#include "simd.h"
#include <cstdio>
#include <cmath>
#include <vector>
#include <cstdlib>
#include <chrono>
using namespace fused_ce::cpu;
static double ulp_err(float got, double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0 : 1e9;
  float wf = (float)want;
  double ulp = std::nextafter(std::fabs(wf), INFINITY) - std::fabs(wf);
  if (ulp == 0 || std::isinf(ulp)) ulp = 1e-45;
  return std::fabs((double)got - want) / ulp;
}
// The AVX-512 build's inline functions need main to allow AVX-512 too.
#if FUSED_CE_VECTOR_BYTES == 64
__attribute__((target("arch=x86-64-v4")))
#endif
int main() {
  constexpr int L = Simd<float>::kLanes;
  std::vector<float> xs;
  for (double e = -40; e <= 1.5; e += 0.0005) { xs.push_back((float)std::pow(10.0, e)); xs.push_back(-(float)std::pow(10.0, e)); }
  for (int i = 0; i < 2000000; ++i) xs.push_back((float)((rand() / (double)RAND_MAX) * 24 - 12));
  xs.push_back(0.0f); xs.push_back(-0.0f); xs.push_back(INFINITY); xs.push_back(-INFINITY); xs.push_back(NAN); xs.push_back(1e-45f);
  while (xs.size() % L) xs.push_back(0.5f);
  double worst = 0; float worst_x = 0;
  for (size_t i = 0; i < xs.size(); i += L) {
    VecF v; for (int l = 0; l < L; ++l) v[l] = xs[i + l];
    VecF r = tanh_vec<float>(v);
    for (int l = 0; l < L; ++l) {
      double e = ulp_err(r[l], std::tanh((double)xs[i + l]));
      if (e > worst) { worst = e; worst_x = xs[i + l]; }
      if (std::signbit(r[l]) != std::signbit(xs[i+l]) && !std::isnan(xs[i+l])) { printf("sign mismatch at %g -> %g\n", xs[i+l], r[l]); return 1; }
    }
  }
  VecF sp; sp[0] = INFINITY; sp[1] = -INFINITY; sp[2] = NAN; sp[3] = 0.0f; sp[4] = -0.0f; sp[5] = 9.5f; sp[6] = 10.5f; sp[7]=1e-40f;
  VecF rs = tanh_vec<float>(sp);
  printf("worst %.2f ulp at x=%g; inf->%g -inf->%g nan->%g 0->%g -0->%g 9.5->%.9g 10.5->%.9g 1e-40->%g\n", worst, worst_x, rs[0], rs[1], rs[2], rs[3], rs[4], rs[5], rs[6], rs[7]);
  // speed
  std::vector<float> buf(1 << 16); for (auto& b : buf) b = (rand() / (double)RAND_MAX) * 6 - 3;
  auto t0 = std::chrono::steady_clock::now(); VecF acc{};
  for (int rep = 0; rep < 2000; ++rep) for (size_t i = 0; i < buf.size(); i += L) { VecF v; std::memcpy(&v, &buf[i], sizeof v); acc += tanh_vec<float>(v); }
  auto t1 = std::chrono::steady_clock::now();
  printf("%.3f ns/element (acc %g)\n", std::chrono::duration<double, std::nano>(t1 - t0).count() / (2000.0 * buf.size()), acc[0]);
}
