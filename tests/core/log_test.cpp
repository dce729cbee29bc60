#include "qlora/core/log.hpp"

#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/core/error.hpp"

namespace {

// Captures log messages for one test and restores the default level and sink afterwards.
class LogCapture {
 public:
  LogCapture() {
    qlora::set_log_sink([this](qlora::LogLevel level, std::string_view message) {
      messages.emplace_back(level, std::string(message));
    });
  }
  ~LogCapture() {
    qlora::set_log_sink({});
    qlora::set_log_level(qlora::LogLevel::off);
  }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;

  std::vector<std::pair<qlora::LogLevel, std::string>> messages;
};

TEST(log_level, silent_by_default) {
  EXPECT_EQ(qlora::log_level(), qlora::LogLevel::off);
  LogCapture capture;
  QLORA_LOG_ERROR("not shown {}", 1);
  EXPECT_TRUE(capture.messages.empty());
}

TEST(log_level, filters_below_level) {
  LogCapture capture;
  qlora::set_log_level(qlora::LogLevel::info);
  QLORA_LOG_DEBUG("hidden");
  QLORA_LOG_INFO("step {} loss {:.2f}", 3, 1.25);
  QLORA_LOG_WARN("careful");
  ASSERT_EQ(capture.messages.size(), 2u);
  EXPECT_EQ(capture.messages[0].first, qlora::LogLevel::info);
  EXPECT_EQ(capture.messages[0].second, "step 3 loss 1.25");
  EXPECT_EQ(capture.messages[1].first, qlora::LogLevel::warn);
}

TEST(log_level, parse_names) {
  EXPECT_EQ(qlora::parse_log_level("warn"), qlora::LogLevel::warn);
  EXPECT_EQ(qlora::parse_log_level(qlora::to_string(qlora::LogLevel::trace)),
            qlora::LogLevel::trace);
  EXPECT_THAT([] { (void)qlora::parse_log_level("loud"); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(::testing::HasSubstr("'loud'")));
}

}  // namespace
