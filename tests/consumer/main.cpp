// Calls into the installed library, so that a missing header, target or symbol in the
// package fails this build or run.
#include <cstdio>
#include <cstring>
#include <string>

#include <qlora/qlora.hpp>

int main() {
  const char* version = qlora::version_string();
  std::printf("qlora %s, CPU features: %s, kernels: %s\n", version,
              qlora::to_string(qlora::cpu_features()).c_str(),
              std::string(qlora::to_string(qlora::select_isa())).c_str());
  const float restored = qlora::fp16_to_fp32(qlora::fp32_to_fp16(0.5f));
  return (std::strlen(version) > 0 && restored == 0.5f) ? 0 : 1;
}
