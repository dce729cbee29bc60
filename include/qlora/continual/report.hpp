// The forgetting report of a continual-learning run: held-out negative log-likelihood of every
// task after every stage, and the measures derived from it.
//
// Row 0 of the matrix is the base model with adapters off. Row i is the model after training
// task i (1-based), so task j (0-based) is trained in stage j + 1. L[i][j] is the
// token-weighted mean NLL in nats per token over task j's held-out tokens (lower is better);
// perplexity is exp(L). With T stages:
//
//   gain        G_j   = L[0][j] - L[j+1][j]
//   forgetting  F_j   = L[T][j] - min over stages l in [j+1, T-1] of L[l][j]   (0 for the last task)
//   retention   rho_j = 1 - F_j / G_j, NaN when G_j <= 1e-3
//   plasticity  P_j   = L[j][j] - L[j+1][j], the gain of stage j + 1 over the model before it
//   BWT               = mean over j < T-1 of (L[j+1][j] - L[T][j]); negative means forgetting
//   control drift D   = Lc[T] - Lc[0] for a held-out set that is never trained
//
// A cell that was never evaluated (a task that did not exist yet at that stage, apart from
// the row just before its stage) contains NaN.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace qlora::continual {

struct ForgettingReport {
  std::string method;                    ///< a label, for example "naive" or "replay"
  std::vector<std::string> tasks;        ///< in training order
  std::vector<std::int64_t> task_tokens;  ///< held-out tokens of each task
  std::vector<std::string> stages;       ///< row labels: "base", then one per trained task
  std::vector<std::vector<double>> nll;  ///< [stage][task]
  std::string control;                   ///< name of the never-trained set; empty when none
  std::int64_t control_tokens = 0;
  std::vector<double> control_nll;       ///< one per stage when `control` is set

  std::size_t n_stages() const { return stages.size(); }

  double gain(std::size_t task) const;
  double forgetting(std::size_t task) const;
  double retention(std::size_t task) const;
  double plasticity(std::size_t task) const;
  double backward_transfer() const;
  /// Mean over tasks of the last row; NaN until every task has been evaluated there.
  double average_nll() const;
  double control_drift() const;

  /// The matrix (NLL and perplexity) and the per-task measures as an aligned text table.
  std::string table() const;

  nlohmann::json to_json() const;
  /// Throws qlora::FormatError when the JSON does not describe a consistent report.
  static ForgettingReport from_json(const nlohmann::json& json);

  /// Writes to_json() atomically.
  void write_json(const std::filesystem::path& path) const;
  static ForgettingReport read_json(const std::filesystem::path& path);
};

}  // namespace qlora::continual
