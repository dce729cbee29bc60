#include "qlora/core/threads.hpp"

#include <gtest/gtest.h>

#include "qlora/core/error.hpp"

namespace {

TEST(num_threads, set_and_restore_default) {
  const int default_threads = qlora::num_threads();
  EXPECT_GE(default_threads, 1);
  qlora::set_num_threads(3);
  EXPECT_EQ(qlora::num_threads(), 3);
  qlora::set_num_threads(0);
  EXPECT_EQ(qlora::num_threads(), default_threads);
}

TEST(num_threads, negative_rejected) {
  EXPECT_THROW(qlora::set_num_threads(-1), qlora::InvalidArgument);
}

}  // namespace
