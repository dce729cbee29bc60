#include "qlora/continual/report.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include <fmt/format.h>

#include "qlora/core/error.hpp"
#include "qlora/io/mapped_file.hpp"

namespace qlora::continual {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
// Below this gain (nats per token) retention is undefined rather than a huge ratio.
constexpr double kMinGainForRetention = 1e-3;

// JSON has no NaN; an unevaluated cell is written as null.
nlohmann::json number_or_null(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr);
}

double number_from(const nlohmann::json& v) {
  return v.is_null() ? kNaN : v.get<double>();
}

std::string cell(double v, int precision = 4) {
  return std::isfinite(v) ? fmt::format("{:.{}f}", v, precision) : std::string("-");
}

}  // namespace

double ForgettingReport::gain(std::size_t task) const {
  if (task + 1 >= nll.size()) return kNaN;
  return nll[0][task] - nll[task + 1][task];
}

double ForgettingReport::forgetting(std::size_t task) const {
  const std::size_t last = nll.size() - 1;
  if (task + 1 > last) return kNaN;
  double best = nll[task + 1][task];
  for (std::size_t l = task + 1; l < last; ++l) best = std::min(best, nll[l][task]);
  return task + 1 == last ? 0.0 : nll[last][task] - best;
}

double ForgettingReport::retention(std::size_t task) const {
  const double g = gain(task);
  if (!(g > kMinGainForRetention)) return kNaN;
  return 1.0 - forgetting(task) / g;
}

double ForgettingReport::plasticity(std::size_t task) const {
  if (task + 1 >= nll.size()) return kNaN;
  return nll[task][task] - nll[task + 1][task];
}

double ForgettingReport::backward_transfer() const {
  const std::size_t last = nll.size() - 1;
  if (last < 2) return kNaN;
  double sum = 0.0;
  for (std::size_t j = 0; j + 1 < last; ++j) sum += nll[j + 1][j] - nll[last][j];
  return sum / static_cast<double>(last - 1);
}

double ForgettingReport::average_nll() const {
  if (nll.empty() || tasks.empty()) return kNaN;
  double sum = 0.0;
  for (double v : nll.back()) sum += v;
  return sum / static_cast<double>(tasks.size());
}

double ForgettingReport::control_drift() const {
  if (control_nll.size() < 2) return kNaN;
  return control_nll.back() - control_nll.front();
}

std::string ForgettingReport::table() const {
  std::string out;
  if (!method.empty()) out += fmt::format("method: {}\n", method);
  // The NLL matrix with perplexities, one row per stage.
  std::size_t label_width = 10;
  for (const std::string& s : stages) label_width = std::max(label_width, s.size() + 6);
  std::vector<std::string> columns = tasks;
  if (!control.empty()) columns.push_back(control + " (control)");
  std::size_t col_width = 18;
  for (const std::string& c : columns) col_width = std::max(col_width, c.size() + 2);

  out += fmt::format("{:<{}}", "after", label_width);
  for (const std::string& c : columns) out += fmt::format("{:>{}}", c, col_width);
  out += "\n";
  for (std::size_t i = 0; i < nll.size(); ++i) {
    out += fmt::format("{:<{}}", i == 0 ? std::string("base") : stages[i], label_width);
    for (std::size_t j = 0; j < columns.size(); ++j) {
      const double v = j < tasks.size() ? nll[i][j] : control_nll[i];
      const std::string text =
          std::isfinite(v) ? fmt::format("{:.4f} ({:.2f})", v, std::exp(v)) : std::string("-");
      out += fmt::format("{:>{}}", text, col_width);
    }
    out += "\n";
  }
  out += "NLL in nats per token, perplexity in brackets; held-out tokens:";
  for (std::size_t j = 0; j < tasks.size(); ++j) {
    out += fmt::format(" {} {}", tasks[j], task_tokens[j]);
    out += j + 1 < tasks.size() || !control.empty() ? "," : "";
  }
  if (!control.empty()) out += fmt::format(" {} {}", control, control_tokens);
  out += "\n\n";

  out += fmt::format("{:<{}}{:>11}{:>12}{:>11}{:>12}\n", "task", label_width, "gain",
                     "forgetting", "retention", "plasticity");
  for (std::size_t j = 0; j < tasks.size(); ++j) {
    out += fmt::format("{:<{}}{:>11}{:>12}{:>11}{:>12}\n", tasks[j], label_width, cell(gain(j)),
                       cell(forgetting(j)), cell(retention(j), 3), cell(plasticity(j)));
  }
  out += fmt::format("average NLL {}, backward transfer {}", cell(average_nll()),
                     cell(backward_transfer()));
  if (!control.empty()) out += fmt::format(", control drift {}", cell(control_drift()));
  out += "\n";
  return out;
}

nlohmann::json ForgettingReport::to_json() const {
  nlohmann::json matrix = nlohmann::json::array();
  for (const auto& row : nll) {
    nlohmann::json r = nlohmann::json::array();
    for (double v : row) r.push_back(number_or_null(v));
    matrix.push_back(std::move(r));
  }
  nlohmann::json measures = nlohmann::json::array();
  for (std::size_t j = 0; j < tasks.size(); ++j) {
    measures.push_back({{"task", tasks[j]},
                        {"gain", number_or_null(gain(j))},
                        {"forgetting", number_or_null(forgetting(j))},
                        {"retention", number_or_null(retention(j))},
                        {"plasticity", number_or_null(plasticity(j))}});
  }
  nlohmann::json json = {{"method", method},
                         {"tasks", tasks},
                         {"task_tokens", task_tokens},
                         {"stages", stages},
                         {"nll", std::move(matrix)},
                         {"measures", std::move(measures)},
                         {"average_nll", number_or_null(average_nll())},
                         {"backward_transfer", number_or_null(backward_transfer())}};
  if (!control.empty()) {
    nlohmann::json c = nlohmann::json::array();
    for (double v : control_nll) c.push_back(number_or_null(v));
    json["control"] = {{"name", control},
                       {"tokens", control_tokens},
                       {"nll", std::move(c)},
                       {"drift", number_or_null(control_drift())}};
  }
  return json;
}

ForgettingReport ForgettingReport::from_json(const nlohmann::json& json) {
  ForgettingReport r;
  try {
    if (json.contains("method")) r.method = json.at("method").get<std::string>();
    r.tasks = json.at("tasks").get<std::vector<std::string>>();
    r.task_tokens = json.at("task_tokens").get<std::vector<std::int64_t>>();
    r.stages = json.at("stages").get<std::vector<std::string>>();
    for (const auto& row : json.at("nll")) {
      std::vector<double> values;
      for (const auto& v : row) values.push_back(number_from(v));
      r.nll.push_back(std::move(values));
    }
    if (json.contains("control")) {
      const auto& c = json.at("control");
      r.control = c.at("name").get<std::string>();
      r.control_tokens = c.at("tokens").get<std::int64_t>();
      for (const auto& v : c.at("nll")) r.control_nll.push_back(number_from(v));
    }
  } catch (const nlohmann::json::exception& e) {
    raise<FormatError>("[ForgettingReport::from_json] missing or mistyped field: {}", e.what());
  }
  bool consistent = r.task_tokens.size() == r.tasks.size() && r.nll.size() == r.stages.size() &&
                    (r.control.empty() || r.control_nll.size() == r.stages.size());
  for (const auto& row : r.nll) consistent = consistent && row.size() == r.tasks.size();
  if (!consistent) {
    raise<FormatError>("[ForgettingReport::from_json] inconsistent sizes: {} tasks, {} token "
                       "counts, {} stages, {} NLL rows, {} control values",
                       r.tasks.size(), r.task_tokens.size(), r.stages.size(), r.nll.size(),
                       r.control_nll.size());
  }
  return r;
}

void ForgettingReport::write_json(const std::filesystem::path& path) const {
  write_text_file_atomic(path, to_json().dump(2) + "\n");
}

ForgettingReport ForgettingReport::read_json(const std::filesystem::path& path) {
  const std::string text = read_text_file(path, "ForgettingReport::read_json");
  try {
    return from_json(nlohmann::json::parse(text));
  } catch (const nlohmann::json::parse_error& e) {
    raise<FormatError>("[ForgettingReport::read_json] {}: invalid JSON: {}", path.string(),
                       e.what());
  }
}

}  // namespace qlora::continual
