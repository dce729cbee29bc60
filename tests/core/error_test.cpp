#include "qlora/core/error.hpp"

#include <stdexcept>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace {

using ::testing::HasSubstr;

TEST(error_raise, formats_message_and_type) {
  try {
    qlora::raise<qlora::InvalidArgument>("[op] bad block size: got {}, expected {}", 48, 64);
    FAIL() << "raise returned";
  } catch (const qlora::InvalidArgument& e) {
    EXPECT_STREQ(e.what(), "[op] bad block size: got 48, expected 64");
  }
}

TEST(error_raise, subclasses_derive_from_error) {
  EXPECT_THROW(qlora::raise<qlora::FormatError>("x"), qlora::Error);
  EXPECT_THROW(qlora::raise<qlora::IoError>("x"), qlora::Error);
  EXPECT_THROW(qlora::raise<qlora::NotImplemented>("x"), qlora::Error);
  EXPECT_THROW(qlora::raise("x"), std::runtime_error);
}

TEST(error_check_arg, throws_only_when_false) {
  EXPECT_NO_THROW(QLORA_CHECK_ARG(1 + 1 == 2, "[op] never"));
  const int rows = 0;
  EXPECT_THAT([&] { QLORA_CHECK_ARG(rows > 0, "[op] empty matrix: got rows={}", rows); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got rows=0")));
}

}  // namespace
