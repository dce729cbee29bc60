// A small levelled logger on fmt.
//
// The library is silent by default (level `off`); the CLI raises the level to `info`. Output
// goes to a sink that the application can replace, for example to route qlora's messages
// into its own logging. The library logs per load, evaluation or training step, never per
// kernel call. The level and the sink are process-wide; calls are thread-safe.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

namespace qlora {

enum class LogLevel { trace = 0, debug = 1, info = 2, warn = 3, error = 4, off = 5 };

/// Receives each message that passes the level filter, without a trailing newline.
using LogSink = std::function<void(LogLevel level, std::string_view message)>;

/// Sets the minimum level that reaches the sink. The default is `LogLevel::off`.
void set_log_level(LogLevel level);
LogLevel log_level();

/// Replaces the sink. An empty function restores the default, which writes
/// "qlora: <level>: <message>" lines to stderr.
void set_log_sink(LogSink sink);

/// Returns the lower-case name of `level` ("info", "warn", ...).
std::string_view to_string(LogLevel level);

/// Parses a level name as written by to_string; throws qlora::InvalidArgument for others.
LogLevel parse_log_level(std::string_view name);

namespace detail {
void log_write(LogLevel level, std::string message);
}  // namespace detail

/// Formats and logs a message at `level` when the level is enabled.
template <class... Args>
void log(LogLevel level, fmt::format_string<Args...> format, Args&&... args) {
  if (level < log_level()) return;
  detail::log_write(level, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace qlora

#define QLORA_LOG_DEBUG(...) ::qlora::log(::qlora::LogLevel::debug, __VA_ARGS__)
#define QLORA_LOG_INFO(...) ::qlora::log(::qlora::LogLevel::info, __VA_ARGS__)
#define QLORA_LOG_WARN(...) ::qlora::log(::qlora::LogLevel::warn, __VA_ARGS__)
#define QLORA_LOG_ERROR(...) ::qlora::log(::qlora::LogLevel::error, __VA_ARGS__)
