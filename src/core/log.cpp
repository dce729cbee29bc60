#include "qlora/core/log.hpp"

#include <atomic>
#include <cstdio>
#include <mutex>

#include "qlora/core/error.hpp"

namespace qlora {
namespace {

std::atomic<LogLevel> g_level{LogLevel::off};
std::mutex g_sink_mutex;
LogSink g_sink;  // empty means the default stderr sink

}  // namespace

void set_log_level(LogLevel level) { g_level.store(level, std::memory_order_relaxed); }

LogLevel log_level() { return g_level.load(std::memory_order_relaxed); }

void set_log_sink(LogSink sink) {
  const std::lock_guard<std::mutex> lock(g_sink_mutex);
  g_sink = std::move(sink);
}

std::string_view to_string(LogLevel level) {
  switch (level) {
    case LogLevel::trace:
      return "trace";
    case LogLevel::debug:
      return "debug";
    case LogLevel::info:
      return "info";
    case LogLevel::warn:
      return "warn";
    case LogLevel::error:
      return "error";
    case LogLevel::off:
      return "off";
  }
  return "unknown";
}

LogLevel parse_log_level(std::string_view name) {
  for (LogLevel level : {LogLevel::trace, LogLevel::debug, LogLevel::info, LogLevel::warn,
                         LogLevel::error, LogLevel::off}) {
    if (name == to_string(level)) return level;
  }
  raise<InvalidArgument>(
      "[parse_log_level] unknown log level: got '{}', expected one of trace, debug, info, "
      "warn, error, off",
      name);
}

namespace detail {

void log_write(LogLevel level, std::string message) {
  const std::lock_guard<std::mutex> lock(g_sink_mutex);
  if (g_sink) {
    g_sink(level, message);
    return;
  }
  fmt::print(stderr, "qlora: {}: {}\n", to_string(level), message);
  std::fflush(stderr);
}

}  // namespace detail
}  // namespace qlora
