// The continual-learning building blocks on a tiny random model: the forgetting report's
// measures, the reservoir replay buffer, O-LoRA's penalty and gradient, and the adapter bank's
// exactness guarantees (oracle isolation, resume, seeds).
#include "qlora/continual/learner.hpp"

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/continual/olora.hpp"
#include "qlora/continual/replay.hpp"
#include "qlora/continual/report.hpp"
#include "support/tiny_llama.hpp"

namespace {

using qlora::PackedRow;
using qlora::RowMatrixF;
using qlora::continual::ContinualConfig;
using qlora::continual::ContinualLearner;
using qlora::continual::ForgettingReport;
using qlora::continual::ReplayBuffer;
using ::testing::HasSubstr;

// Hand-computed measures are sums of a few doubles.
constexpr double kMeasureTol = 1e-12;
// Chi-square bound for 10,000 cells (9,999 degrees of freedom) at p = 0.001 one-sided:
// 9,999 + 3.09 * sqrt(2 * 9,999) + a continuity margin.
constexpr double kChiSquareBound = 10'450.0;
// Finite differences of a piecewise-linear penalty in float: exact up to rounding.
constexpr double kFiniteDifferenceRelTol = 1e-3;
// Accumulating 2 x 2 rows or 4 rows at once sums the same terms in another order.
constexpr float kAccumAbsTol = 2e-5f;

std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / ("qlora_continual_" + name);
  std::filesystem::remove_all(dir);
  return dir;
}

qlora::LlamaModel bare_model(std::uint64_t seed) {
  qlora::LlamaModel model = qlora::test::tiny_model(seed);
  model.remove_adapter("default");
  return model;
}

std::vector<PackedRow> rows_of(const std::vector<std::string>& texts) {
  const qlora::Tokenizer tokenizer = qlora::test::byte_tokenizer();
  std::vector<qlora::Document> docs;
  for (const std::string& t : texts) {
    qlora::Document d;
    d.ids = tokenizer.encode(t, {.add_special = false});
    d.ids.push_back(qlora::test::kEos);
    d.loss_mask.assign(d.ids.size(), 1);
    docs.push_back(std::move(d));
  }
  return qlora::pack_documents(docs, 24, qlora::test::kPad);
}

qlora::continual::ContinualTask proverbs() {
  return {"proverbs",
          rows_of({"A stitch in time saves nine.", "Look before you leap, they say.",
                   "All that glitters is not gold.", "Still waters run deep and slow."}),
          rows_of({"Many hands make light work."})};
}

qlora::continual::ContinualTask numbers() {
  return {"numbers",
          rows_of({"0 1 1 2 3 5 8 13 21 34 55 89", "2 4 8 16 32 64 128 256 512",
                   "1 4 9 16 25 36 49 64 81 100", "3 1 4 1 5 9 2 6 5 3 5 8 9"}),
          rows_of({"1 2 3 4 5 6 7 8 9 10 11 12"})};
}

ContinualConfig small_config() {
  ContinualConfig config;
  config.lora.rank = 4;
  config.lora.alpha = 8.0f;
  config.train.batch_size = 2;
  config.train.max_steps = 4;
  config.train.lr = 5e-3f;
  config.seed = 11;
  return config;
}

PackedRow item_row(std::int32_t id) {
  PackedRow row;
  row.tokens = {id};
  row.targets = {id};
  row.segment_ids = {0};
  row.n_targets = 1;
  return row;
}

// --- ForgettingReport ---------------------------------------------------------------------

ForgettingReport three_stage_report() {
  ForgettingReport r;
  r.tasks = {"a", "b"};
  r.task_tokens = {100, 200};
  r.stages = {"base", "a", "b"};
  r.nll = {{3.0, 4.0}, {2.0, 3.5}, {2.6, 3.0}};
  r.control = "c";
  r.control_tokens = 50;
  r.control_nll = {5.0, 5.1, 5.3};
  return r;
}

TEST(forgetting_report, measures_follow_the_definitions) {
  const ForgettingReport r = three_stage_report();
  EXPECT_NEAR(r.gain(0), 1.0, kMeasureTol);
  EXPECT_NEAR(r.gain(1), 1.0, kMeasureTol);
  EXPECT_NEAR(r.forgetting(0), 0.6, kMeasureTol);
  EXPECT_EQ(r.forgetting(1), 0.0);  // the last task cannot have been forgotten yet
  EXPECT_NEAR(r.retention(0), 0.4, kMeasureTol);
  EXPECT_NEAR(r.plasticity(1), 0.5, kMeasureTol);  // 3.5 before stage b, 3.0 after
  EXPECT_NEAR(r.backward_transfer(), -0.6, kMeasureTol);
  EXPECT_NEAR(r.average_nll(), 2.8, kMeasureTol);
  EXPECT_NEAR(r.control_drift(), 0.3, kMeasureTol);
}

TEST(forgetting_report, retention_is_undefined_without_gain) {
  ForgettingReport r = three_stage_report();
  r.nll[1][0] = 3.0;  // task a gained nothing
  EXPECT_TRUE(std::isnan(r.retention(0)));
  EXPECT_THAT(r.table(), HasSubstr("-"));
}

TEST(forgetting_report, json_round_trip_keeps_every_value) {
  ForgettingReport r = three_stage_report();
  r.nll[0][1] = std::numeric_limits<double>::quiet_NaN();  // never evaluated
  const auto dir = fresh_dir("report");
  std::filesystem::create_directories(dir);
  r.write_json(dir / "report.json");
  const ForgettingReport back = ForgettingReport::read_json(dir / "report.json");
  EXPECT_EQ(back.tasks, r.tasks);
  EXPECT_EQ(back.control_nll, r.control_nll);
  EXPECT_TRUE(std::isnan(back.nll[0][1]));
  EXPECT_EQ(back.nll[2], r.nll[2]);
  EXPECT_THAT(r.table(), HasSubstr("control drift 0.3000"));
}

TEST(forgetting_report, rejects_inconsistent_json) {
  nlohmann::json json = three_stage_report().to_json();
  json["stages"] = {"base"};
  EXPECT_THROW(ForgettingReport::from_json(json), qlora::FormatError);
  json.erase("nll");
  EXPECT_THROW(ForgettingReport::from_json(json), qlora::FormatError);
}

// --- ReplayBuffer ---------------------------------------------------------------------------

TEST(replay_buffer, reservoir_inclusion_is_uniform) {
  constexpr int kItems = 10'000;
  constexpr int kCapacity = 100;
  constexpr int kTrials = 2'000;
  std::vector<int> kept(kItems, 0);
  for (int trial = 0; trial < kTrials; ++trial) {
    ReplayBuffer buffer(kCapacity, static_cast<std::uint64_t>(trial) + 1);
    for (int i = 0; i < kItems; ++i) buffer.offer(item_row(i), 0);
    ASSERT_EQ(buffer.size(), kCapacity);
    for (const PackedRow* row : buffer.windows()) ++kept[static_cast<std::size_t>(row->tokens[0])];
  }
  const double expected = static_cast<double>(kTrials) * kCapacity / kItems;
  double chi_square = 0.0;
  for (int k : kept) chi_square += (k - expected) * (k - expected) / expected;
  EXPECT_LT(chi_square, kChiSquareBound);
}

TEST(replay_buffer, same_seed_same_content_and_draws) {
  ReplayBuffer a(8, 5), b(8, 5), c(8, 6);
  for (int i = 0; i < 100; ++i) {
    a.offer(item_row(i), 0);
    b.offer(item_row(i), 0);
    c.offer(item_row(i), 0);
  }
  bool differs = false;
  for (std::uint64_t d = 0; d < 32; ++d) {
    EXPECT_EQ(a.draw(d).tokens, b.draw(d).tokens);
    differs = differs || a.draw(d).tokens != c.draw(d).tokens;
  }
  EXPECT_TRUE(differs);
  EXPECT_EQ(a.seen(), 100u);
}

TEST(replay_buffer, save_and_load_continue_identically) {
  ReplayBuffer a(6, 9, true);
  for (int i = 0; i < 40; ++i) a.offer(item_row(i), i < 20 ? 0 : 1);
  const auto path = fresh_dir("replay") += ".safetensors";
  a.save(path);
  ReplayBuffer b = ReplayBuffer::load(path);
  for (int i = 40; i < 70; ++i) {
    a.offer(item_row(i), 2);
    b.offer(item_row(i), 2);
  }
  EXPECT_EQ(a.size(), b.size());
  for (std::uint64_t d = 0; d < 40; ++d) EXPECT_EQ(a.draw(d).tokens, b.draw(d).tokens);
  EXPECT_EQ(a.windows_per_task(), b.windows_per_task());
}

TEST(replay_buffer, per_task_quota_keeps_every_task) {
  ReplayBuffer buffer(9, 3, true);
  for (int i = 0; i < 500; ++i) buffer.offer(item_row(i), 0);
  for (int i = 0; i < 5; ++i) buffer.offer(item_row(1000 + i), 1);
  for (int i = 0; i < 500; ++i) buffer.offer(item_row(2000 + i), 2);
  const auto per_task = buffer.windows_per_task();
  EXPECT_EQ(per_task.at(0), 3);
  EXPECT_EQ(per_task.at(1), 3);
  EXPECT_EQ(per_task.at(2), 3);
}

TEST(replay_buffer, clear_zero_capacity_and_errors) {
  ReplayBuffer buffer(4, 1);
  buffer.offer(item_row(1), 0);
  EXPECT_EQ(buffer.stored_tokens(), 1);
  buffer.clear();
  EXPECT_TRUE(buffer.empty());
  EXPECT_EQ(buffer.seen(), 0u);
  EXPECT_THROW((void)buffer.draw(0), qlora::InvalidArgument);
  ReplayBuffer off(0, 1);
  off.offer(item_row(1), 0);
  EXPECT_TRUE(off.empty());
  EXPECT_THROW(ReplayBuffer(-1, 0), qlora::InvalidArgument);
  PackedRow bad = item_row(1);
  bad.targets.clear();
  EXPECT_THROW(buffer.offer(bad, 0), qlora::InvalidArgument);
  const auto path = fresh_dir("missing") += ".safetensors";
  EXPECT_THROW(ReplayBuffer::load(path), qlora::IoError);
}

// --- O-LoRA ---------------------------------------------------------------------------------

TEST(olora, gradient_matches_finite_differences) {
  qlora::LlamaModel model = bare_model(21);
  qlora::LoraConfig lora;
  lora.rank = 3;
  model.add_adapter("old", lora, 1);
  model.add_adapter("new", lora, 2);
  const qlora::continual::OloraOptions options{.lambda_orth = 0.5f, .lambda_l2 = 0.1f};

  qlora::Rng rng(4);
  for (const auto& ref : model.projections()) {  // B != 0, so the L2 term has a gradient
    for (float& v : ref.linear->adapter("new").B.reshaped()) v = rng.uniform(-0.2f, 0.2f);
  }
  model.zero_grad();
  qlora::continual::olora_penalty(model, "new", {"old"}, options);
  const auto refs = model.projections();
  qlora::LoraAdapter& a = refs[3].linear->adapter("new");
  const RowMatrixF grad_a = a.dA;
  const RowMatrixF grad_b = a.dB;

  constexpr float kStep = 1e-2f;
  const auto numeric = [&](float& weight) {
    const float saved = weight;
    weight = saved + kStep;
    const double plus = qlora::continual::olora_penalty(model, "new", {"old"}, options, false);
    weight = saved - kStep;
    const double minus = qlora::continual::olora_penalty(model, "new", {"old"}, options, false);
    weight = saved;
    return (plus - minus) / (2.0 * kStep);
  };

  for (int k = 0; k < 6; ++k) {
    const double want = numeric(a.A(k % 3, 5 * k));
    EXPECT_NEAR(grad_a(k % 3, 5 * k), want, kFiniteDifferenceRelTol * std::max(1.0, std::fabs(want)))
        << "A(" << k % 3 << ", " << 5 * k << ")";
    const double want_b = numeric(a.B(4 * k, k % 3));
    EXPECT_NEAR(grad_b(4 * k, k % 3), want_b,
                kFiniteDifferenceRelTol * std::max(1.0, std::fabs(want_b)));
  }
}

TEST(olora, rejects_bad_lambdas_and_missing_adapter) {
  qlora::LlamaModel model = bare_model(22);
  model.add_adapter("new", qlora::LoraConfig{}, 2);
  EXPECT_THROW(qlora::continual::olora_penalty(model, "new", {}, {.lambda_orth = -1.0f}),
               qlora::InvalidArgument);
  EXPECT_THROW(qlora::continual::olora_penalty(model, "absent", {}, {}), qlora::InvalidArgument);
}

// The regularizer runs once per optimizer step, so accumulation does not change its weight.
TEST(olora, penalty_weight_does_not_grow_with_accumulation) {
  const auto run = [](std::int64_t batch, std::int64_t accum) {
    qlora::LlamaModel model = bare_model(23);
    qlora::LoraConfig lora;
    lora.rank = 4;
    model.add_adapter("old", lora, 1);
    model.add_adapter("new", lora, 2);
    for (const auto& ref : model.projections()) ref.linear->adapter("old").trainable = false;
    qlora::TrainerConfig config;
    config.batch_size = batch;
    config.grad_accum = accum;
    config.max_steps = 3;
    config.lr = 1e-2f;
    config.adapter_name = "new";
    qlora::Trainer trainer(model, numbers().train, {}, config);
    trainer.regularizer = [&model]() {
      return qlora::continual::olora_penalty(model, "new", {"old"}, {.lambda_orth = 5.0f});
    };
    while (!trainer.done()) trainer.step();
    return RowMatrixF(model.projections()[0].linear->adapter("new").A);
  };
  const RowMatrixF one = run(4, 1);
  const RowMatrixF two = run(2, 2);
  EXPECT_LT((one - two).cwiseAbs().maxCoeff(), kAccumAbsTol);
}

// --- ContinualLearner -----------------------------------------------------------------------

TEST(continual_learner, oracle_adapters_never_change_old_numbers) {
  qlora::LlamaModel model = bare_model(31);
  ContinualConfig config = small_config();
  config.inference = qlora::continual::Inference::oracle;
  ContinualLearner learner(model, config);
  learner.set_control("control", rows_of({"Quiet control text, never trained."}));
  learner.learn(proverbs());
  learner.learn(numbers());
  const ForgettingReport& r = learner.report();
  ASSERT_EQ(r.nll.size(), 3u);
  EXPECT_EQ(r.nll[2][0], r.nll[1][0]);  // bit for bit
  EXPECT_EQ(r.forgetting(0), 0.0);
  EXPECT_EQ(learner.evaluate_with(learner.held_out(0), {"proverbs"}).mean(), r.nll[1][0]);
  EXPECT_GT(r.gain(0), 0.0);
  EXPECT_GT(r.gain(1), 0.0);
  EXPECT_EQ(learner.adapter_names(), (std::vector<std::string>{"proverbs", "numbers"}));
  EXPECT_EQ(learner.tasks()[1].active, std::vector<std::string>{"numbers"});
  EXPECT_GT(learner.memory_usage().adapters, 0);
}

TEST(continual_learner, summed_adapters_keep_each_task_by_id) {
  qlora::LlamaModel model = bare_model(38);
  ContinualLearner learner(model, small_config());
  learner.learn(proverbs());
  learner.learn(numbers());
  const ForgettingReport& r = learner.report();
  EXPECT_EQ(learner.tasks()[1].active, (std::vector<std::string>{"proverbs", "numbers"}));
  EXPECT_EQ(learner.evaluate_with(learner.held_out(0), learner.tasks()[0].active).mean(),
            r.nll[1][0]);
  EXPECT_NE(r.nll[2][0], r.nll[1][0]);  // both adapters summed do change task A
}

TEST(continual_learner, shared_adapter_forgets_and_replay_draws_old_rows) {
  qlora::LlamaModel naive_model = bare_model(32);
  ContinualConfig naive_config = small_config();
  naive_config.policy = qlora::continual::AdapterPolicy::shared;
  ContinualLearner naive(naive_model, naive_config);
  naive.learn(proverbs());
  naive.learn(numbers());
  EXPECT_EQ(naive.adapter_names(), std::vector<std::string>{"proverbs"});
  EXPECT_EQ(naive.tasks()[1].replayed_rows_per_batch, 0);

  qlora::LlamaModel replay_model = bare_model(32);
  ContinualConfig replay_config = naive_config;
  replay_config.replay = {.capacity = 8, .batch_fraction = 0.5, .seed = 3};
  ContinualLearner replay(replay_model, replay_config);
  replay.learn(proverbs());
  replay.learn(numbers());
  EXPECT_EQ(replay.tasks()[1].replayed_rows_per_batch, 1);
  EXPECT_EQ(replay.report().nll[1], naive.report().nll[1]);  // stage 1 has nothing to replay
  EXPECT_NE(replay.report().nll[2], naive.report().nll[2]);
  EXPECT_GT(replay.replay().size(), 0);
}

TEST(continual_learner, olora_with_zero_lambda_equals_summed_adapters) {
  const auto run = [](std::optional<qlora::continual::OloraOptions> olora) {
    qlora::LlamaModel model = bare_model(33);
    ContinualConfig config = small_config();
    config.olora = olora;
    ContinualLearner learner(model, config);
    learner.learn(proverbs());
    learner.learn(numbers());
    return std::make_pair(learner.report().nll,
                          qlora::continual::olora_overlap(model, "numbers", {"proverbs"}));
  };
  const auto plain = run(std::nullopt);
  const auto zero = run(qlora::continual::OloraOptions{.lambda_orth = 0.0f});
  const auto strong = run(qlora::continual::OloraOptions{.lambda_orth = 50.0f});
  EXPECT_EQ(plain.first, zero.first);
  EXPECT_EQ(plain.second, zero.second);
  EXPECT_LT(strong.second, plain.second);
}

TEST(continual_learner, resumed_run_gives_the_same_report) {
  const auto dir = fresh_dir("resume");
  ContinualConfig config = small_config();
  config.replay = {.capacity = 4, .batch_fraction = 0.5, .seed = 8};
  qlora::LlamaModel full_model = bare_model(34);
  ContinualLearner full(full_model, config);
  full.set_control("control", rows_of({"Quiet control text, never trained."}));
  full.learn(proverbs());
  full.learn(numbers());

  {
    qlora::LlamaModel model = bare_model(34);
    ContinualLearner first(model, config, dir);
    first.set_control("control", rows_of({"Quiet control text, never trained."}));
    first.learn(proverbs());
  }
  qlora::LlamaModel model = bare_model(34);
  ContinualLearner resumed(model, config, dir);
  resumed.load(dir);
  resumed.learn(numbers());
  EXPECT_EQ(resumed.report().nll, full.report().nll);
  EXPECT_EQ(resumed.report().control_nll, full.report().control_nll);
  EXPECT_EQ(ForgettingReport::read_json(dir / "state" / "report.json").nll, full.report().nll);

  // The same seed, run again from scratch, writes the same report.
  qlora::LlamaModel again_model = bare_model(34);
  ContinualLearner again(again_model, config);
  again.set_control("control", rows_of({"Quiet control text, never trained."}));
  again.learn(proverbs());
  again.learn(numbers());
  EXPECT_EQ(again.report().to_json(), full.report().to_json());
}

TEST(continual_learner, failed_task_leaves_the_bank_unchanged) {
  qlora::LlamaModel model = bare_model(39);
  ContinualLearner learner(model, small_config());
  learner.learn(proverbs());
  const ForgettingReport before = learner.report();
  qlora::continual::ContinualTask broken = numbers();
  broken.train[0].tokens[3] = 100'000;  // not in the vocabulary
  EXPECT_THROW(learner.learn(broken), qlora::InvalidArgument);
  EXPECT_EQ(learner.report().to_json(), before.to_json());
  EXPECT_EQ(learner.adapter_names(), std::vector<std::string>{"proverbs"});
  EXPECT_FALSE(model.projections()[0].linear->has_adapter("numbers"));
  learner.learn(numbers());  // the same name works once the data is fixed
  EXPECT_EQ(learner.tasks().size(), 2u);
}

TEST(continual_learner, rejects_invalid_settings_and_tasks) {
  qlora::LlamaModel model = bare_model(35);
  ContinualConfig config = small_config();
  config.policy = qlora::continual::AdapterPolicy::shared;
  config.olora = qlora::continual::OloraOptions{};
  EXPECT_THROW(ContinualLearner(model, config), qlora::InvalidArgument);
  config = small_config();
  config.replay.batch_fraction = 1.0;
  EXPECT_THROW(ContinualLearner(model, config), qlora::InvalidArgument);

  ContinualLearner learner(model, small_config());
  EXPECT_THROW(learner.learn({"empty", {}, {}}), qlora::InvalidArgument);
  learner.learn(proverbs());
  EXPECT_THROW(learner.learn(proverbs()), qlora::InvalidArgument);
  EXPECT_THROW(learner.set_control("late", proverbs().eval), qlora::InvalidArgument);

  qlora::LlamaModel with_adapter = qlora::test::tiny_model(36);
  EXPECT_THROW(ContinualLearner(with_adapter, small_config()), qlora::InvalidArgument);
  qlora::LlamaModel other = bare_model(37);
  ContinualLearner fresh(other, small_config());
  try {
    fresh.load(fresh_dir("nothing"));
    FAIL() << "load of an empty folder must throw";
  } catch (const qlora::IoError& e) {
    EXPECT_THAT(e.what(), HasSubstr("contains no continual state"));
  }
}

}  // namespace
