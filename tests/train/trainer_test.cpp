#include "qlora/train/trainer.hpp"

#include <cmath>
#include <filesystem>
#include <algorithm>
#include <fstream>
#include <limits>
#include <set>
#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/core/random.hpp"
#include "qlora/model/llama.hpp"
#include "qlora/model/tokenizer.hpp"
#include "qlora/train/data.hpp"
#include "qlora/train/optimizer.hpp"
#include "support/tiny_llama.hpp"

namespace {

using qlora::PackedRow;
using qlora::RowMatrixF;
using ::testing::HasSubstr;
using qlora::test::kEos;
using qlora::test::kPad;
using qlora::test::byte_tokenizer;
using qlora::test::sample_documents;
using qlora::test::tiny_model;

// Accumulating 2 x 4 rows and 8 rows at once sum the same terms in a different order.
constexpr double kAccumRelTol = 1e-5;

std::vector<PackedRow> sample_rows() { return qlora::pack_documents(sample_documents(), 24, kPad); }

std::vector<RowMatrixF> adapter_values(qlora::LlamaModel& model) {
  std::vector<RowMatrixF> values;
  for (const auto& ref : model.projections()) {
    values.push_back(ref.linear->adapter("default").A);
    values.push_back(ref.linear->adapter("default").B);
  }
  return values;
}

std::filesystem::path fresh_dir(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / name;
  std::filesystem::remove_all(dir);
  return dir;
}

TEST(pack_documents, segments_and_targets) {
  std::vector<qlora::Document> docs(2);
  docs[0].ids = {10, 11, 12};
  docs[0].loss_mask = {1, 1, 1};
  docs[1].ids = {20, 21, 22, 23, 24};
  docs[1].loss_mask = {0, 0, 1, 1, 1};  // a prompt of two tokens, then the completion
  const auto rows = qlora::pack_documents(docs, 6, kPad);
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].tokens, (std::vector<std::int32_t>{10, 11, 12, 20, 21, 22}));
  EXPECT_EQ(rows[0].segment_ids, (std::vector<std::int32_t>{0, 0, 0, 1, 1, 1}));
  // No target crosses a document boundary, prompt tokens are never targets, and the last
  // token of a row has no target inside the row.
  EXPECT_EQ(rows[0].targets,
            (std::vector<std::int32_t>{11, 12, qlora::kIgnoreIndex, qlora::kIgnoreIndex, 22,
                                       qlora::kIgnoreIndex}));
  EXPECT_EQ(rows[0].n_targets, 3);
  EXPECT_EQ(rows[1].tokens, (std::vector<std::int32_t>{23, 24, kPad, kPad, kPad, kPad}));
  EXPECT_EQ(rows[1].targets[0], 24);
  EXPECT_EQ(rows[1].n_targets, 1);
}

TEST(load_documents, completion_only_and_chat_masks) {
  const qlora::Tokenizer tokenizer = byte_tokenizer();
  const auto path = fresh_dir("qlora_data_test.jsonl");
  std::ofstream(path) << R"({"prompt": "Q: 2+2?", "completion": " A: 4"})" << "\n\n"
                      << R"({"text": "plain"})" << "\n";
  const auto docs = qlora::load_documents(path, tokenizer, {});
  ASSERT_EQ(docs.size(), 2u);
  const auto prompt_len = tokenizer.encode("Q: 2+2?", {.add_special = false}).size();
  for (std::size_t i = 0; i < docs[0].ids.size(); ++i) {
    EXPECT_EQ(docs[0].loss_mask[i], i < prompt_len ? 0 : 1) << "token " << i;
  }
  EXPECT_EQ(docs[0].ids.back(), kEos);
  EXPECT_EQ(docs[1].loss_mask, std::vector<std::uint8_t>(docs[1].ids.size(), 1));

  std::ofstream(path) << R"({"prompt": 3})" << "\n";
  EXPECT_THAT([&] { (void)qlora::load_documents(path, tokenizer, {}); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("line 1")));
  std::ofstream(path) << "{not json\n";
  EXPECT_THAT([&] { (void)qlora::load_documents(path, tokenizer, {}); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("invalid JSON")));
  std::filesystem::remove(path);
}

TEST(load_documents, text_separator_and_stable_split) {
  const qlora::Tokenizer tokenizer = byte_tokenizer();
  const auto path = fresh_dir("qlora_data_test.txt");
  std::string text;
  for (int i = 0; i < 200; ++i) text += "fortune number " + std::to_string(i) + "\n%\n";
  std::ofstream(path) << text;
  qlora::DataOptions options;
  options.text_separator = "%";
  options.eval_fraction = 0.2;
  auto docs = qlora::load_documents(path, tokenizer, options);
  EXPECT_EQ(docs.size(), 200u);
  std::vector<qlora::Document> train, eval;
  qlora::split_documents(docs, options, train, eval);
  EXPECT_GT(eval.size(), 20u);
  EXPECT_LT(eval.size(), 60u);
  // Reordering the documents does not move any of them across the split.
  std::reverse(docs.begin(), docs.end());
  std::vector<qlora::Document> train2, eval2;
  qlora::split_documents(docs, options, train2, eval2);
  ASSERT_EQ(eval2.size(), eval.size());
  std::set<std::uint64_t> hashes;
  for (const auto& d : eval) hashes.insert(d.content_hash);
  for (const auto& d : eval2) EXPECT_TRUE(hashes.contains(d.content_hash));
  std::filesystem::remove(path);
}

TEST(adamw, matches_reference_update) {
  // One parameter, two steps, checked against the formula of torch.optim.AdamW.
  RowMatrixF value(1, 2), grad(1, 2);
  value << 1.0f, -2.0f;
  qlora::AdamW opt({.beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f, .weight_decay = 0.1f});
  const std::vector<qlora::ParamRef> params{{"p", &value, &grad}};
  double p0 = 1.0, m = 0.0, v = 0.0;
  const double g_values[] = {0.5, -0.25};
  for (int t = 1; t <= 2; ++t) {
    grad << static_cast<float>(g_values[t - 1]), 0.0f;
    opt.step(params, 0.01f);
    const double g = g_values[t - 1];
    p0 *= 1.0 - 0.01 * 0.1;
    m = 0.9 * m + 0.1 * g;
    v = 0.99 * v + 0.01 * g * g;
    const double m_hat = m / (1.0 - std::pow(0.9, t));
    const double v_hat = v / (1.0 - std::pow(0.99, t));
    p0 -= 0.01 * m_hat / (std::sqrt(v_hat) + 1e-8);
    EXPECT_NEAR(value(0, 0), p0, 1e-6) << "step " << t;
  }
  EXPECT_NEAR(value(0, 1), -2.0 * std::pow(1.0 - 0.001, 2), 1e-6) << "decay without gradient";
}

TEST(lr_schedule, warmup_then_decay) {
  using qlora::LrSchedule;
  EXPECT_FLOAT_EQ(qlora::scheduled_lr(LrSchedule::constant, 1.0f, 0, 4, 100), 0.25f);
  EXPECT_FLOAT_EQ(qlora::scheduled_lr(LrSchedule::constant, 1.0f, 3, 4, 100), 1.0f);
  EXPECT_FLOAT_EQ(qlora::scheduled_lr(LrSchedule::constant, 1.0f, 50, 4, 100), 1.0f);
  EXPECT_FLOAT_EQ(qlora::scheduled_lr(LrSchedule::linear, 1.0f, 52, 4, 100), 0.5f);
  EXPECT_NEAR(qlora::scheduled_lr(LrSchedule::cosine, 1.0f, 52, 4, 100), 0.5f, 1e-6f);
  EXPECT_NEAR(qlora::scheduled_lr(LrSchedule::cosine, 1.0f, 100, 4, 100), 0.0f, 1e-6f);
  EXPECT_THROW(qlora::parse_lr_schedule("step"), qlora::InvalidArgument);
}

TEST(trainer, grad_accumulation_equals_large_batch) {
  auto model_a = tiny_model(1);
  auto model_b = tiny_model(1);
  qlora::TrainerConfig config;
  config.max_steps = 1;
  config.lr = 1e-2f;
  config.seed = 3;
  config.batch_size = 2;
  config.grad_accum = 2;
  // Dropout masks are drawn per micro-batch, so they differ between the two layouts.
  for (auto* m : {&model_a, &model_b}) {
    for (const auto& ref : m->projections()) ref.linear->adapter("default").dropout = 0.0f;
  }
  qlora::Trainer accumulated(model_a, sample_rows(), {}, config);
  config.batch_size = 4;
  config.grad_accum = 1;
  qlora::Trainer single(model_b, sample_rows(), {}, config);
  const auto m1 = accumulated.step();
  const auto m2 = single.step();
  EXPECT_EQ(m1.tokens, m2.tokens);
  EXPECT_NEAR(m1.loss, m2.loss, kAccumRelTol * m2.loss);
  EXPECT_NEAR(m1.grad_norm, m2.grad_norm, kAccumRelTol * m2.grad_norm);
  const auto a = adapter_values(model_a);
  const auto b = adapter_values(model_b);
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(a[i].isApprox(b[i], 1e-4f)) << "parameter " << i;
  }
}

TEST(trainer, resume_equals_uninterrupted) {
  const auto dir = fresh_dir("qlora_trainer_resume");
  qlora::TrainerConfig config;
  config.max_steps = 4;
  config.lr = 5e-3f;
  config.seed = 7;
  config.batch_size = 2;
  config.grad_accum = 1;
  config.save_every = 2;
  config.keep_checkpoints = 5;
  config.schedule = qlora::LrSchedule::cosine;
  config.warmup_steps = 1;

  auto full_model = tiny_model(2);
  config.output_dir = dir / "full";
  qlora::Trainer full(full_model, sample_rows(), sample_rows(), config);
  std::vector<double> full_losses;
  while (!full.done()) full_losses.push_back(full.step().loss);

  auto resumed_model = tiny_model(2);
  config.output_dir = dir / "resumed";
  qlora::Trainer resumed(resumed_model, sample_rows(), sample_rows(), config);
  resumed.resume(dir / "full" / "checkpoint-2");
  EXPECT_EQ(resumed.current_step(), 2);
  std::vector<double> resumed_losses;
  while (!resumed.done()) resumed_losses.push_back(resumed.step().loss);

  ASSERT_EQ(resumed_losses.size(), 2u);
  EXPECT_EQ(resumed_losses[0], full_losses[2]) << "bit-identical loss after resume";
  EXPECT_EQ(resumed_losses[1], full_losses[3]);
  EXPECT_EQ(adapter_values(resumed_model), adapter_values(full_model));
  EXPECT_TRUE(std::filesystem::exists(dir / "full" / "checkpoint-4" / "adapter" /
                                      "adapter_model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(dir / "full" / "metrics.jsonl"));
  full.write_loss_curve();
  EXPECT_TRUE(std::filesystem::exists(dir / "full" / "loss_curve.svg"));
  std::filesystem::remove_all(dir);
}

TEST(trainer, resume_rejects_other_data) {
  const auto dir = fresh_dir("qlora_trainer_mismatch");
  qlora::TrainerConfig config;
  config.max_steps = 1;
  config.output_dir = dir;
  auto model = tiny_model(3);
  qlora::Trainer trainer(model, sample_rows(), {}, config);
  trainer.step();
  auto other_rows = sample_rows();
  other_rows.pop_back();
  auto model2 = tiny_model(3);
  qlora::Trainer other(model2, other_rows, {}, config);
  EXPECT_THAT([&] { other.resume(dir); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("other training data")));
  std::filesystem::remove_all(dir);
}

TEST(trainer, non_finite_loss_stops_and_keeps_checkpoint) {
  const auto dir = fresh_dir("qlora_trainer_nan");
  qlora::TrainerConfig config;
  config.max_steps = 3;
  config.save_every = 1;
  config.output_dir = dir;
  auto model = tiny_model(4);
  qlora::Trainer trainer(model, sample_rows(), {}, config);
  trainer.step();
  model.projections().front().linear->adapter("default").A(0, 0) =
      std::numeric_limits<float>::quiet_NaN();
  model.projections().front().linear->adapter("default").B.setConstant(1.0f);
  EXPECT_THROW(trainer.step(), qlora::TrainingDiverged);
  EXPECT_TRUE(std::filesystem::exists(dir / "checkpoint-1" / "trainer_state.json"));
  EXPECT_FALSE(std::filesystem::exists(dir / "checkpoint-2"));
  std::filesystem::remove_all(dir);
}

TEST(trainer, loss_falls_on_repeated_text) {
  auto model = tiny_model(5);
  qlora::TrainerConfig config;
  config.max_steps = 30;
  config.lr = 1e-2f;
  config.batch_size = 2;
  qlora::Trainer trainer(model, sample_rows(), sample_rows(), config);
  const double before = trainer.evaluate().loss;
  while (!trainer.done()) trainer.step();
  const double after = trainer.eval_history().back().loss;
  EXPECT_LT(after, before * 0.95) << "before " << before << ", after " << after;
}

}  // namespace
