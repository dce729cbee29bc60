// Continual learning on real text: SmolLM2-135M-Instruct with an NF4 base learns two
// categories of Debian's `fortunes` one after the other (songs-poems, then computers), with
// `wisdom` as the never-trained control. Stage A is trained once and saved. Stage B then runs
// once per method from that saved state:
//   naive   One shared adapter carried on to task B (sequential LoRA).
//   replay  The same, with a quarter of every batch drawn from a buffer of task A's windows.
//   per-task  A new adapter for B, trained alone and serving task B alone (task id known).
//   olora   A new adapter for B, trained with O-LoRA's penalty against A's adapter. It is
//           evaluated with both adapters summed, and with the task id known (A alone for A).
// The checks are the exact guarantees and the effect sizes as ratios to the naive run (never
// absolute NLLs, which move whenever the kernels change). The tables are printed for the log.
//
// Needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-model) and the `fortunes`
// package; skips without them. QLORA_CONTINUAL_STEPS=N overrides the steps per stage.
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "qlora/continual/learner.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/model/load.hpp"
#include "qlora/train/data.hpp"

namespace {

namespace fs = std::filesystem;
using qlora::continual::ContinualConfig;
using qlora::continual::ContinualLearner;
using qlora::continual::ContinualTask;
using qlora::continual::ForgettingReport;

const fs::path kModelPath =
    fs::path(QLORA_SOURCE_DIR) / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
const fs::path kFortunes = "/usr/share/games/fortunes";

// A budget sized for CI: 128-token windows, 4 per step, 2,048 held-out tokens per set.
constexpr std::int64_t kSeqLen = 128;
constexpr std::int64_t kBatch = 4;
constexpr std::int64_t kDefaultSteps = 32;
constexpr std::int64_t kEvalTokens = 2048;
constexpr std::int64_t kReplayWindows = 64;
constexpr double kReplayFraction = 0.25;
constexpr float kOloraLambda = 0.5f;
constexpr int kThreads = 2;

// Effect sizes, in nats per token and as ratios to the naive run.
constexpr double kMinGain = 0.05;            // the stages must teach something measurable
constexpr double kMaxNaiveRetention = 0.7;   // naive must lose at least 30% of A's gain
constexpr double kReplayForgettingRatio = 0.5;
constexpr double kReplayPlasticityRatio = 0.8;
constexpr double kControlDriftMargin = 0.02;

std::int64_t steps_per_stage() {
  const char* text = std::getenv("QLORA_CONTINUAL_STEPS");
  return text != nullptr ? std::atoll(text) : kDefaultSteps;
}

std::string env_or(const char* name, const char* fallback) {
  const char* text = std::getenv(name);
  return text != nullptr ? text : fallback;
}

ContinualTask load_task(const std::string& category, const qlora::Tokenizer& tokenizer,
                        bool held_out_only = false) {
  qlora::DataOptions data;
  data.text_separator = "%";
  data.eval_fraction = 0.1;
  std::vector<qlora::Document> train, eval;
  auto docs = qlora::load_documents(kFortunes / category, tokenizer, data);
  if (held_out_only) {
    eval = std::move(docs);
  } else {
    qlora::split_documents(std::move(docs), data, train, eval);
  }
  eval = qlora::first_documents_by_hash(std::move(eval), kEvalTokens);
  const std::int32_t pad = tokenizer.pad_id() >= 0 ? tokenizer.pad_id() : tokenizer.eos_id();
  return {category, qlora::pack_documents(train, kSeqLen, pad),
          qlora::pack_documents(eval, kSeqLen, pad)};
}

ContinualConfig base_config(const std::string& method) {
  ContinualConfig config;
  config.method = method;
  config.lora.rank = 16;
  config.lora.alpha = 32.0f;
  config.lora.dropout = 0.0f;
  config.train.batch_size = kBatch;
  config.train.max_steps = steps_per_stage();
  config.train.lr = std::stof(env_or("QLORA_CONTINUAL_LR", "1e-3"));
  config.train.warmup_steps = 4;
  config.train.seed = 7;
  config.replay = {.capacity = kReplayWindows, .batch_fraction = 0.0, .seed = 7};
  config.seed = 7;
  return config;
}

void remove_adapters(qlora::LlamaModel& model, const std::vector<std::string>& names) {
  for (const std::string& name : names) model.remove_adapter(name);
}

void print_measures(const std::string& label, const ForgettingReport& r) {
  fmt::print("{:<15} G_A {:+.4f}  F_A {:+.4f}  rho_A {:.3f}  P_B {:+.4f}  D {:+.4f}\n", label,
             r.gain(0), r.forgetting(0), r.retention(0), r.plasticity(1), r.control_drift());
}

TEST(continual_fortunes, replay_forgets_less_than_naive) {
  if (!fs::exists(kModelPath) || !fs::exists(kFortunes / "songs-poems") ||
      !fs::exists(kFortunes / "computers") || !fs::exists(kFortunes / "wisdom")) {
    GTEST_SKIP() << "skipped: needs " << kModelPath << " (scripts/fetch-model) and the fortunes "
                 << "package (apt-get install fortunes)";
  }
  qlora::set_num_threads(kThreads);
  const auto start = std::chrono::steady_clock::now();
  const qlora::ModelSource source(kModelPath.string());
  const qlora::Tokenizer tokenizer = source.tokenizer();
  qlora::LlamaLoadOptions load;
  load.projections = qlora::QuantConfig{.format = qlora::QuantFormat::nf4, .block_size = 64};
  qlora::LlamaModel model = qlora::load_llama(source, load);
  const ContinualTask poems = load_task("songs-poems", tokenizer);
  const ContinualTask computers = load_task(env_or("QLORA_CONTINUAL_TASK_B", "computers"), tokenizer);
  const ContinualTask wisdom = load_task("wisdom", tokenizer, true);

  const fs::path dir = fs::temp_directory_path() / "qlora_continual_fortunes";
  fs::remove_all(dir);
  const auto seconds_since = [](auto t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };

  // Stage A, shared by every method; its end fills the replay buffer.
  double stage_a_seconds = 0.0;
  ForgettingReport stage_a;
  {
    ContinualLearner learner(model, base_config("stage A"), dir);
    learner.set_control("wisdom", wisdom.eval);
    const auto t0 = std::chrono::steady_clock::now();
    learner.learn(poems);
    stage_a_seconds = seconds_since(t0);
    stage_a = learner.report();
    remove_adapters(model, learner.adapter_names());
  }

  struct Run {
    ForgettingReport report;
    double seconds = 0.0;
    double tokens_per_second = 0.0;
  };
  const auto run_b = [&](ContinualConfig config, const auto& after) {
    const auto t0 = std::chrono::steady_clock::now();
    ContinualLearner learner(model, std::move(config));
    learner.load(dir);
    const qlora::continual::TaskRecord& record = learner.learn(computers);
    Run run{learner.report(), seconds_since(t0), record.tokens_per_second};
    after(learner);
    remove_adapters(model, learner.adapter_names());
    return run;
  };

  ContinualConfig naive_config = base_config("naive");
  naive_config.policy = qlora::continual::AdapterPolicy::shared;
  const Run naive = run_b(naive_config, [](ContinualLearner&) {});

  ContinualConfig replay_config = naive_config;
  replay_config.method = "replay";
  replay_config.replay.batch_fraction = kReplayFraction;
  const Run replay = run_b(replay_config, [](ContinualLearner& l) {
    EXPECT_EQ(l.tasks().back().replayed_rows_per_batch, 1);
  });

  ContinualConfig per_task_config = base_config("per-task, task id known");
  per_task_config.inference = qlora::continual::Inference::oracle;
  const Run per_task = run_b(per_task_config, [&](ContinualLearner& l) {
    EXPECT_EQ(l.tasks().back().active, std::vector<std::string>{computers.name});
  });

  ContinualConfig olora_config = base_config("olora");
  olora_config.olora = qlora::continual::OloraOptions{.lambda_orth = kOloraLambda};
  ForgettingReport oracle;
  double overlap = 0.0;
  const Run olora = run_b(olora_config, [&](ContinualLearner& l) {
    // Oracle isolation: A's own adapter gives row A's number bit for bit after B.
    const double a_alone = l.evaluate_with(poems.eval, {"songs-poems"}).mean();
    EXPECT_EQ(a_alone, stage_a.nll[1][0]);
    oracle = l.report();
    // With the task id known, each task is served by the adapters active when it was trained:
    // A alone for A, A and B for B.
    oracle.method = "olora, task id known";
    oracle.nll[2][0] = a_alone;
    oracle.nll[2][1] = l.evaluate_with(computers.eval, l.tasks()[1].active).mean();
    oracle.control_nll[2] = l.evaluate_with(wisdom.eval, l.tasks()[1].active).mean();
    overlap = qlora::continual::olora_overlap(model, computers.name, {"songs-poems"});
  });

  // The log: every table, then the measures side by side.
  for (const ForgettingReport* r : std::initializer_list<const ForgettingReport*>{
           &naive.report, &replay.report, &per_task.report, &olora.report, &oracle}) {
    fmt::print("\n{}", r->table());
  }
  fmt::print("\n");
  print_measures("naive", naive.report);
  print_measures("replay", replay.report);
  print_measures("per-task", per_task.report);
  print_measures("olora", olora.report);
  print_measures("olora task id", oracle);
  fmt::print("O-LoRA overlap sum |A_A A_B^T| at the end: {:.4f}\n", overlap);
  fmt::print("steps per stage {}, {} windows of {} tokens per step, {} threads\n",
             steps_per_stage(), kBatch, kSeqLen, kThreads);
  fmt::print("wall time: stage A {:.0f} s, naive B {:.0f} s ({:.0f} tokens/s), replay B {:.0f} s "
             "({:.0f} tokens/s), per-task B {:.0f} s ({:.0f} tokens/s), olora B {:.0f} s "
             "({:.0f} tokens/s), total {:.0f} s\n",
             stage_a_seconds, naive.seconds, naive.tokens_per_second, replay.seconds,
             replay.tokens_per_second, per_task.seconds, per_task.tokens_per_second,
             olora.seconds, olora.tokens_per_second, seconds_since(start));

  // The benchmark must be able to see forgetting, or the test is too weak.
  const ForgettingReport& n = naive.report;
  EXPECT_GE(n.gain(0), kMinGain);
  EXPECT_GE(n.plasticity(1), kMinGain);
  EXPECT_LE(n.retention(0), kMaxNaiveRetention);
  // Replay keeps most of task A and still learns task B.
  const ForgettingReport& r = replay.report;
  EXPECT_LE(r.forgetting(0), kReplayForgettingRatio * n.forgetting(0));
  EXPECT_GE(r.plasticity(1), kReplayPlasticityRatio * n.plasticity(1));
  EXPECT_LE(r.control_drift(), n.control_drift() + kControlDriftMargin);
  // Stage A is the same saved state for every method.
  EXPECT_EQ(r.nll[1], n.nll[1]);
  EXPECT_EQ(olora.report.nll[1], n.nll[1]);
  // Each task's own adapter keeps its numbers exactly.
  EXPECT_EQ(oracle.forgetting(0), 0.0);
  EXPECT_EQ(per_task.report.forgetting(0), 0.0);
  EXPECT_EQ(per_task.report.nll[2][0], stage_a.nll[1][0]);
  fs::remove_all(dir);
}

}  // namespace
