#include "qlora/core/cpu.hpp"

#include <cstdlib>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/core/error.hpp"

namespace {

using ::testing::HasSubstr;

// Sets QLORA_ISA for one test and restores the previous value afterwards.
class ScopedIsaEnv {
 public:
  explicit ScopedIsaEnv(const char* value) {
    if (const char* old = std::getenv("QLORA_ISA")) old_ = old;
    had_old_ = std::getenv("QLORA_ISA") != nullptr;
    if (value != nullptr) {
      setenv("QLORA_ISA", value, 1);
    } else {
      unsetenv("QLORA_ISA");
    }
  }
  ~ScopedIsaEnv() {
    if (had_old_) {
      setenv("QLORA_ISA", old_.c_str(), 1);
    } else {
      unsetenv("QLORA_ISA");
    }
  }
  ScopedIsaEnv(const ScopedIsaEnv&) = delete;
  ScopedIsaEnv& operator=(const ScopedIsaEnv&) = delete;

 private:
  std::string old_;
  bool had_old_ = false;
};

TEST(cpu_features, consistent_with_architecture) {
  const qlora::CpuFeatures& f = qlora::cpu_features();
#if defined(__x86_64__)
  EXPECT_FALSE(f.neon);
  // Every x86 CPU with AVX-512 also has AVX2; the OS enables both or neither.
  if (f.avx512f) {
    EXPECT_TRUE(f.avx2);
  }
  if (f.avx512bw || f.avx512vl || f.avx512vnni) {
    EXPECT_TRUE(f.avx512f);
  }
#elif defined(__aarch64__)
  EXPECT_TRUE(f.neon);
  EXPECT_FALSE(f.avx2);
#endif
  EXPECT_FALSE(qlora::to_string(f).empty());
}

TEST(cpu_features, compiler_flags_imply_runtime_features) {
  // A test binary compiled for a feature can only run on a CPU that has it.
#if defined(__AVX2__)
  EXPECT_TRUE(qlora::cpu_features().avx2);
#endif
#if defined(__AVX512F__)
  EXPECT_TRUE(qlora::cpu_features().avx512f);
#endif
  SUCCEED();
}

TEST(isa_select, scalar_always_available) {
  EXPECT_TRUE(qlora::isa_available(qlora::Isa::scalar));
  const auto isas = qlora::available_isas();
  ASSERT_FALSE(isas.empty());
  EXPECT_EQ(isas.front(), qlora::Isa::scalar);
}

TEST(isa_select, default_is_fastest_available) {
  ScopedIsaEnv env(nullptr);
  EXPECT_EQ(qlora::select_isa(), qlora::available_isas().back());
}

TEST(isa_select, env_forces_scalar) {
  ScopedIsaEnv env("scalar");
  EXPECT_EQ(qlora::select_isa(), qlora::Isa::scalar);
}

TEST(isa_select, unknown_name_rejected) {
  ScopedIsaEnv env("sse9");
  EXPECT_THAT([] { (void)qlora::select_isa(); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  AllOf(HasSubstr("'sse9'"), HasSubstr("scalar, avx2, avx512, neon"))));
}

TEST(isa_select, unavailable_isa_lists_choices) {
  // NEON is never available on x86-64 and AVX2 never on aarch64.
#if defined(__aarch64__)
  ScopedIsaEnv env("avx2");
#else
  ScopedIsaEnv env("neon");
#endif
  EXPECT_THAT([] { (void)qlora::select_isa(); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  AllOf(HasSubstr("not available"), HasSubstr("scalar"))));
}

TEST(isa_parse, round_trips_names) {
  for (qlora::Isa isa :
       {qlora::Isa::scalar, qlora::Isa::avx2, qlora::Isa::avx512, qlora::Isa::neon}) {
    EXPECT_EQ(qlora::parse_isa(qlora::to_string(isa)), isa);
  }
}

}  // namespace
