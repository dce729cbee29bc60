#include "qlora/continual/merge.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include <Eigen/SVD>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/model/llama.hpp"
#include "support/compare.hpp"
#include "support/tiny_llama.hpp"

namespace {

using qlora::LoraAdapter;
using qlora::RowMatrixD;
using qlora::RowMatrixF;
using qlora::continual::MergeMethod;
using qlora::continual::MergeOptions;
using qlora::continual::SignElection;
using ::testing::HasSubstr;

// concat rounds only its scaled factors and their product to float.
constexpr double kConcatRelTol = 1e-6;
// Full-rank svd and compression go through a QR and an SVD, then round the factors to float.
constexpr double kFullRankRelTol = 1e-5;
// Dense merges (linear, ties, dare_*) at a rank large enough for the whole result.
constexpr double kDenseRelTol = 1e-6;
// Energy shares and squared norms computed in double on both sides.
constexpr double kEnergyRelTol = 1e-9;
// Losses of the merged adapter against the same adapters active side by side.
constexpr double kLossRelTol = 1e-5;
// DARE's kept share over 4000 Bernoulli(0.25) draws: 5 standard deviations is 0.034.
constexpr double kKeptShareTol = 0.035;

RowMatrixF random_matrix(std::int64_t rows, std::int64_t cols, float scale, qlora::Rng& rng) {
  RowMatrixF m(rows, cols);
  for (float& v : m.reshaped()) v = static_cast<float>(rng.normal()) * scale;
  return m;
}

LoraAdapter random_adapter(std::int64_t n, std::int64_t k, int rank, float scaling,
                           std::uint64_t seed) {
  qlora::Rng rng(seed);
  LoraAdapter a;
  a.rank = rank;
  a.scaling = scaling;
  a.A = random_matrix(rank, k, 0.5f, rng);
  a.B = random_matrix(n, rank, 0.5f, rng);
  a.zero_grad();
  return a;
}

// An adapter of shape [1, K] whose update s * B A is exactly `row` (B = 1, A = row / s).
LoraAdapter row_adapter(const std::vector<float>& row, float scaling = 1.0f) {
  LoraAdapter a;
  a.rank = 1;
  a.scaling = scaling;
  a.B = RowMatrixF::Ones(1, 1);
  a.A.resize(1, static_cast<std::int64_t>(row.size()));
  for (std::size_t i = 0; i < row.size(); ++i) {
    a.A(0, static_cast<std::int64_t>(i)) = row[i] / scaling;
  }
  a.zero_grad();
  return a;
}

// The update of an adapter, formed in double from its float factors.
RowMatrixD update_of(const LoraAdapter& a) {
  if (a.pool_group_size > 0) {
    return a.delta_weight(a.A.cols() * a.pool_group_size).cast<double>();
  }
  return static_cast<double>(a.scaling) * (a.B.cast<double>() * a.A.cast<double>());
}

// sum_i w_i s_i B_i A_i in double.
RowMatrixD weighted_sum(const std::vector<const LoraAdapter*>& adapters,
                        const std::vector<float>& weights) {
  RowMatrixD sum = RowMatrixD::Zero(adapters[0]->B.rows(), update_of(*adapters[0]).cols());
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    sum += static_cast<double>(weights.empty() ? 1.0f : weights[i]) * update_of(*adapters[i]);
  }
  return sum;
}

double relative_error(const RowMatrixD& actual, const RowMatrixD& expected) {
  return (actual - expected).norm() / expected.norm();
}

::testing::AssertionResult updates_near(const RowMatrixD& actual, const RowMatrixD& expected,
                                        double rel_tol) {
  const std::span<const double> a(actual.data(), static_cast<std::size_t>(actual.size()));
  const std::span<const double> e(expected.data(), static_cast<std::size_t>(expected.size()));
  return qlora::test::arrays_near(a, e, rel_tol * expected.cwiseAbs().maxCoeff());
}

template <class T>
std::span<const T> span_of(const qlora::RowMatrixF& m) {
  return {m.data(), static_cast<std::size_t>(m.size())};
}

struct ThreeTasks {
  LoraAdapter a = random_adapter(24, 40, 2, 2.0f, 11);
  LoraAdapter b = random_adapter(24, 40, 3, 0.5f, 12);
  LoraAdapter c = random_adapter(24, 40, 4, 1.0f, 13);
  std::vector<const LoraAdapter*> list() const { return {&a, &b, &c}; }
};

// Layer-level merges.

TEST(merge_concat, reproduces_weighted_sum) {
  const ThreeTasks tasks;
  const MergeOptions options{.method = MergeMethod::concat, .weights = {0.5f, -1.25f, 2.0f}};
  const auto merged = qlora::continual::merge_adapters(tasks.list(), options);

  EXPECT_EQ(merged.adapter.rank, 9);
  EXPECT_EQ(merged.adapter.scaling, 1.0f);
  EXPECT_FALSE(merged.adapter.trainable);
  const RowMatrixD expected = weighted_sum(tasks.list(), options.weights);
  const RowMatrixD actual = update_of(merged.adapter);
  EXPECT_LE(relative_error(actual, expected), kConcatRelTol);
  EXPECT_TRUE(updates_near(actual, expected, kConcatRelTol));
  EXPECT_EQ(merged.energy_kept, 1.0);
  EXPECT_NEAR(merged.energy_total, expected.squaredNorm(),
              kEnergyRelTol * expected.squaredNorm());
}

TEST(merge_concat, expands_qalora_inputs) {
  LoraAdapter pooled = random_adapter(12, 4, 2, 1.5f, 21);  // A [2, 16 / 4]
  pooled.pool_group_size = 4;
  const LoraAdapter plain = random_adapter(12, 16, 3, 0.5f, 22);
  const std::vector<const LoraAdapter*> list = {&pooled, &plain};
  const auto merged = qlora::continual::merge_adapters(list, {.method = MergeMethod::concat});

  EXPECT_EQ(merged.adapter.pool_group_size, 0);
  ASSERT_EQ(merged.adapter.A.cols(), 16);
  const RowMatrixD expected = weighted_sum(list, {});
  EXPECT_LE(relative_error(update_of(merged.adapter), expected), kConcatRelTol);
}

TEST(merge_svd, full_rank_matches_concat) {
  const ThreeTasks tasks;
  const std::vector<float> weights = {1.0f, 0.75f, -0.5f};
  const auto merged = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::svd, .weights = weights});

  EXPECT_EQ(merged.adapter.rank, 9);
  const RowMatrixD expected = weighted_sum(tasks.list(), weights);
  EXPECT_LE(relative_error(update_of(merged.adapter), expected), kFullRankRelTol);
  EXPECT_NEAR(merged.energy_kept, 1.0, kEnergyRelTol);
}

TEST(merge_svd, truncation_is_best_low_rank) {
  const ThreeTasks tasks;
  const auto merged =
      qlora::continual::merge_adapters(tasks.list(), {.method = MergeMethod::svd, .rank = 3});
  ASSERT_EQ(merged.adapter.rank, 3);

  // Eckart-Young: the best rank-3 error is the energy of the singular values after the third.
  const RowMatrixD expected = weighted_sum(tasks.list(), {});
  const Eigen::BDCSVD<Eigen::MatrixXd> svd(expected);
  const Eigen::VectorXd sigma = svd.singularValues();
  const double total = sigma.squaredNorm();
  const double kept = sigma.head(3).squaredNorm();
  EXPECT_NEAR(merged.energy_kept, kept / total, kEnergyRelTol);
  EXPECT_NEAR(merged.energy_total, total, kEnergyRelTol * total);
  const double error = (update_of(merged.adapter) - expected).squaredNorm();
  EXPECT_NEAR(error, total - kept, kFullRankRelTol * total);
}

TEST(merge_svd, budget_above_bound_is_lowered) {
  const LoraAdapter a = random_adapter(6, 40, 5, 1.0f, 31);
  const LoraAdapter b = random_adapter(6, 40, 4, 1.0f, 32);
  const std::vector<const LoraAdapter*> list = {&a, &b};
  const auto merged =
      qlora::continual::merge_adapters(list, {.method = MergeMethod::svd, .rank = 64});

  EXPECT_EQ(merged.adapter.rank, 6);  // min(N, K, 5 + 4)
  EXPECT_LE(relative_error(update_of(merged.adapter), weighted_sum(list, {})), kFullRankRelTol);
}

TEST(compress_adapter, full_rank_reproduces_update) {
  const LoraAdapter a = random_adapter(24, 40, 6, 2.0f, 41);
  for (int max_rank : {6, 32}) {
    const auto compressed = qlora::continual::compress_adapter(a, max_rank);
    EXPECT_EQ(compressed.adapter.rank, 6);
    EXPECT_EQ(compressed.adapter.scaling, 1.0f);
    EXPECT_LE(relative_error(update_of(compressed.adapter), update_of(a)), kFullRankRelTol);
    EXPECT_NEAR(compressed.energy_kept, 1.0, kEnergyRelTol);
  }
}

TEST(compress_adapter, reports_energy_kept) {
  const LoraAdapter a = random_adapter(24, 40, 6, 2.0f, 42);
  const auto compressed = qlora::continual::compress_adapter(a, 2);
  ASSERT_EQ(compressed.adapter.rank, 2);

  const Eigen::BDCSVD<Eigen::MatrixXd> svd(update_of(a));
  const Eigen::VectorXd sigma = svd.singularValues();
  EXPECT_NEAR(compressed.energy_kept, sigma.head(2).squaredNorm() / sigma.squaredNorm(),
              kEnergyRelTol);
  EXPECT_LT(compressed.energy_kept, 1.0);
}

TEST(compress_adapter, zero_update_keeps_all_energy) {
  LoraAdapter a = random_adapter(8, 12, 3, 1.0f, 43);
  a.B.setZero();  // a freshly initialised adapter
  const auto compressed = qlora::continual::compress_adapter(a, 2);
  EXPECT_EQ(compressed.energy_total, 0.0);
  EXPECT_EQ(compressed.energy_kept, 1.0);
  EXPECT_EQ(update_of(compressed.adapter).norm(), 0.0);
}

TEST(merge_linear, equals_weighted_sum) {
  const ThreeTasks tasks;
  const std::vector<float> weights = {0.3f, 1.0f, -2.0f};
  const auto merged = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::linear, .weights = weights});

  EXPECT_EQ(merged.adapter.rank, 9);
  const RowMatrixD expected = weighted_sum(tasks.list(), weights);
  EXPECT_LE(relative_error(update_of(merged.adapter), expected), kDenseRelTol);
  EXPECT_NEAR(merged.energy_kept, 1.0, kEnergyRelTol);
}

TEST(merge_dare, density_one_equals_linear_and_ties) {
  const ThreeTasks tasks;
  const std::vector<float> weights = {0.3f, 1.0f, -2.0f};
  const auto linear = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::linear, .weights = weights});
  const auto dare_linear = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::dare_linear, .weights = weights, .seed = 5});
  EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(dare_linear.adapter.A),
                                        span_of<float>(linear.adapter.A)));
  EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(dare_linear.adapter.B),
                                        span_of<float>(linear.adapter.B)));

  // dare_ties adds the TIES election, so with nothing dropped it equals ties, as in PEFT.
  const auto ties = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::ties, .weights = weights});
  const auto dare_ties = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::dare_ties, .weights = weights, .seed = 5});
  EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(dare_ties.adapter.A),
                                        span_of<float>(ties.adapter.A)));
  EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(dare_ties.adapter.B),
                                        span_of<float>(ties.adapter.B)));
}

TEST(merge_dare, keeps_density_share_and_rescales) {
  const LoraAdapter ones = row_adapter(std::vector<float>(4000, 1.0f));
  const std::vector<const LoraAdapter*> list = {&ones};
  const auto merged = qlora::continual::merge_adapters(
      list, {.method = MergeMethod::dare_linear, .density = 0.25f, .seed = 3});

  const RowMatrixD update = update_of(merged.adapter);
  int kept = 0;
  for (std::int64_t c = 0; c < update.cols(); ++c) {
    const double v = update(0, c);
    if (std::abs(v) < 1e-3) continue;
    ++kept;
    EXPECT_NEAR(v, 4.0, 4.0 * kDenseRelTol) << "column " << c;
  }
  EXPECT_NEAR(kept / 4000.0, 0.25, kKeptShareTol);
}

TEST(merge_dare, same_seed_same_result) {
  const ThreeTasks tasks;
  const MergeOptions options{.method = MergeMethod::dare_ties, .density = 0.5f, .seed = 9};
  const auto first = qlora::continual::merge_adapters(tasks.list(), options);
  const auto second = qlora::continual::merge_adapters(tasks.list(), options);
  EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(first.adapter.A),
                                        span_of<float>(second.adapter.A)));
  EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(first.adapter.B),
                                        span_of<float>(second.adapter.B)));

  MergeOptions other = options;
  other.seed = 10;
  const auto third = qlora::continual::merge_adapters(tasks.list(), other);
  EXPECT_GT((update_of(third.adapter) - update_of(first.adapter)).norm(), 0.0);
}

TEST(merge_ties, one_sign_gives_weighted_mean) {
  for (float sign : {1.0f, -1.0f}) {
    std::vector<LoraAdapter> tasks;
    for (std::uint64_t seed = 51; seed < 54; ++seed) {
      LoraAdapter a = random_adapter(10, 14, 2, 1.5f, seed);
      a.A = a.A.cwiseAbs();
      a.B = a.B.cwiseAbs() * sign;  // every entry of s B A has this sign
      tasks.push_back(a);
    }
    const std::vector<const LoraAdapter*> list = {&tasks[0], &tasks[1], &tasks[2]};
    const std::vector<float> weights = {1.0f, 2.0f, 0.5f};
    const auto merged = qlora::continual::merge_adapters(
        list, {.method = MergeMethod::ties, .weights = weights});

    const RowMatrixD expected = weighted_sum(list, weights) / 3.0;
    EXPECT_LE(relative_error(update_of(merged.adapter), expected), kDenseRelTol)
        << "sign " << sign;
  }
}

// Three tasks of shape [1, 4]. With density 0.5 each keeps its two largest entries:
//   [3, -1, 0.5, 2] -> [3, 0, 0, 2]
//   [2, -4, 1, 0.1] -> [2, -4, 0, 0]
//   [-1, 2, -3, 0.2] -> [0, 2, -3, 0]
// Column 1 sums to -2 (total elects -) but has one sign of each (frequency ties, elects +).
struct TiesCase {
  LoraAdapter t1 = row_adapter({3.0f, -1.0f, 0.5f, 2.0f}, 2.0f);
  LoraAdapter t2 = row_adapter({2.0f, -4.0f, 1.0f, 0.1f});
  LoraAdapter t3 = row_adapter({-1.0f, 2.0f, -3.0f, 0.2f}, 0.5f);
  std::vector<const LoraAdapter*> list() const { return {&t1, &t2, &t3}; }
};

TEST(merge_ties, trim_elect_and_disjoint_mean) {
  const TiesCase tasks;
  const std::vector<float> weights = {1.0f, 2.0f, 0.5f};
  const auto merged = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::ties, .weights = weights, .density = 0.5f});

  // Column 0: tasks 1 and 2 agree, (1 * 3 + 2 * 2) / 2. Columns 1-3: one agreeing task each.
  RowMatrixD expected(1, 4);
  expected << 3.5, -8.0, -1.5, 2.0;
  EXPECT_TRUE(updates_near(update_of(merged.adapter), expected, kDenseRelTol));
}

TEST(merge_ties, frequency_election_breaks_ties_to_plus) {
  const TiesCase tasks;
  const std::vector<float> weights = {1.0f, 2.0f, 0.5f};
  const auto merged = qlora::continual::merge_adapters(
      tasks.list(), {.method = MergeMethod::ties,
                     .weights = weights,
                     .density = 0.5f,
                     .sign_election = SignElection::frequency});

  // Column 1: one + and one - vote, so + wins and only task 3's 0.5 * 2 remains.
  RowMatrixD expected(1, 4);
  expected << 3.5, 1.0, -1.5, 2.0;
  EXPECT_TRUE(updates_near(update_of(merged.adapter), expected, kDenseRelTol));
}

TEST(merge_names, parse_round_trip) {
  for (MergeMethod m : {MergeMethod::concat, MergeMethod::svd, MergeMethod::linear,
                        MergeMethod::ties, MergeMethod::dare_linear, MergeMethod::dare_ties}) {
    EXPECT_EQ(qlora::continual::parse_merge_method(qlora::continual::to_string(m)), m);
  }
  EXPECT_EQ(qlora::continual::parse_sign_election("frequency"), SignElection::frequency);
  EXPECT_THAT([] { qlora::continual::parse_merge_method("magic"); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got 'magic'")));
  EXPECT_THAT([] { qlora::continual::parse_sign_election("majority"); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got 'majority'")));
}

// Expects merge_adapters(list, options) to throw qlora::InvalidArgument containing `text`.
void expect_merge_error(const std::vector<const LoraAdapter*>& list, const MergeOptions& options,
                        const std::string& text) {
  EXPECT_THAT([&] { qlora::continual::merge_adapters(list, options); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr(text)))
      << "expected: " << text;
}

TEST(merge_errors, bad_lists_and_shapes) {
  const ThreeTasks tasks;
  expect_merge_error({}, {}, "no adapters to merge");
  expect_merge_error({&tasks.a, nullptr}, {}, "adapter 1 is a null pointer");

  const LoraAdapter other_n = random_adapter(25, 40, 2, 1.0f, 61);
  expect_merge_error({&tasks.a, &other_n}, {}, "got [N, K] = [25, 40], expected [24, 40]");
  const LoraAdapter other_k = random_adapter(24, 41, 2, 1.0f, 62);
  expect_merge_error({&tasks.a, &other_k}, {}, "got [N, K] = [24, 41], expected [24, 40]");

  LoraAdapter bad_rank = tasks.b;
  bad_rank.rank = 5;
  expect_merge_error({&tasks.a, &bad_rank}, {}, "adapter 1 has inconsistent factors: got rank 5");
}

TEST(merge_errors, non_finite_values) {
  const ThreeTasks tasks;
  LoraAdapter nan_a = tasks.b;
  nan_a.A(1, 2) = std::numeric_limits<float>::quiet_NaN();
  expect_merge_error({&tasks.a, &nan_a}, {}, "adapter 1 holds NaN or infinite values");
  LoraAdapter inf_scaling = tasks.b;
  inf_scaling.scaling = std::numeric_limits<float>::infinity();
  expect_merge_error({&tasks.a, &inf_scaling}, {}, "non-finite scaling");
  expect_merge_error(tasks.list(),
                     {.weights = {1.0f, std::numeric_limits<float>::quiet_NaN(), 1.0f}},
                     "weight 1 is not finite");
}

TEST(merge_errors, bad_options) {
  const ThreeTasks tasks;
  expect_merge_error(tasks.list(), {.weights = {1.0f, 2.0f}}, "got 2 weights for 3 adapters");
  for (float density : {0.0f, -0.5f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    expect_merge_error(tasks.list(), {.method = MergeMethod::ties, .density = density},
                       "density must be in (0, 1]");
  }
  expect_merge_error(tasks.list(), {.method = MergeMethod::linear, .density = 0.5f},
                     "density 0.5 has no effect on method linear");
  expect_merge_error(tasks.list(),
                     {.method = MergeMethod::svd, .sign_election = SignElection::frequency},
                     "sign election frequency has no effect on method svd");
  expect_merge_error(tasks.list(), {.method = MergeMethod::svd, .rank = -1},
                     "rank budget must be non-negative: got -1");
  expect_merge_error(tasks.list(), {.method = MergeMethod::concat, .rank = 8},
                     "got rank 8, expected 0 or at least the sum of the ranks, 9");
  EXPECT_THAT([&] { qlora::continual::compress_adapter(tasks.a, 0); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  HasSubstr("max_rank must be at least 1: got 0")));
}

// Model-level merges and routing on the tiny random Llama.

// Adds adapter `name` with random non-zero factors to the projections `targets` selects.
void add_random_adapter(qlora::LlamaModel& model, const std::string& name, int rank,
                        std::vector<std::string> targets, std::uint64_t seed) {
  qlora::LoraConfig config;
  config.rank = rank;
  config.alpha = 2.0f * static_cast<float>(rank);
  config.target_modules = std::move(targets);
  model.add_adapter(name, config, seed);
  qlora::Rng rng(seed);
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    if (!ref.linear->has_adapter(name)) continue;
    LoraAdapter& a = ref.linear->adapter(name);
    a.B = random_matrix(a.B.rows(), a.B.cols(), 0.3f, rng);
  }
}

std::vector<std::vector<std::string>> active_sets(qlora::LlamaModel& model) {
  std::vector<std::vector<std::string>> sets;
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    sets.push_back(ref.linear->active_adapters());
  }
  return sets;
}

const std::vector<std::string> kAllLinear = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};

qlora::LlamaBatch document_batch(std::size_t index) {
  const std::vector<qlora::Document> docs = qlora::test::sample_documents();
  const std::vector<std::int32_t>& ids = docs[index].ids;
  qlora::LlamaBatch batch;
  batch.seq_len = static_cast<std::int64_t>(ids.size()) - 1;
  batch.tokens.assign(ids.begin(), ids.end() - 1);
  batch.targets.assign(ids.begin() + 1, ids.end());
  return batch;
}

TEST(merge_model_adapters, concat_matches_active_pair) {
  qlora::LlamaModel model = qlora::test::tiny_model(7);
  add_random_adapter(model, "task_a", 4, kAllLinear, 100);
  add_random_adapter(model, "task_b", 2, {"q_proj", "v_proj"}, 200);
  model.set_active_adapters({"task_a"});
  const auto before = active_sets(model);

  const std::vector<std::string> names = {"task_a", "task_b"};
  const std::vector<float> weights = {1.0f, 0.5f};
  const auto report = qlora::continual::merge_model_adapters(
      model, names, "merged", {.method = MergeMethod::concat, .weights = weights});

  EXPECT_EQ(active_sets(model), before);
  ASSERT_EQ(report.projections.size(), 14u);  // 2 layers x 7 projections
  EXPECT_EQ(report.energy_kept, 1.0);
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    ASSERT_TRUE(ref.linear->has_adapter("merged")) << ref.key;
    std::vector<const LoraAdapter*> held = {&ref.linear->adapter("task_a")};
    std::vector<float> held_weights = {1.0f};
    if (ref.linear->has_adapter("task_b")) {
      held.push_back(&ref.linear->adapter("task_b"));
      held_weights.push_back(0.5f);
    }
    const LoraAdapter& merged = ref.linear->adapter("merged");
    EXPECT_EQ(merged.rank, held.size() == 2 ? 6 : 4) << ref.key;
    EXPECT_LE(relative_error(update_of(merged), weighted_sum(held, held_weights)),
              kConcatRelTol)
        << ref.key;
  }

  // With weights 1 the merged adapter alone gives the loss of both adapters side by side.
  qlora::LlamaModel plain = qlora::test::tiny_model(7);
  add_random_adapter(plain, "task_a", 4, kAllLinear, 100);
  add_random_adapter(plain, "task_b", 2, {"q_proj", "v_proj"}, 200);
  qlora::continual::merge_model_adapters(plain, names, "merged", {.method = MergeMethod::concat});
  const qlora::LlamaBatch batch = document_batch(0);
  plain.set_active_adapters(names);
  const double pair_loss = plain.loss(batch).mean();
  plain.set_active_adapters({"merged"});
  const double merged_loss = plain.loss(batch).mean();
  EXPECT_NEAR(merged_loss, pair_loss, kLossRelTol * pair_loss);
}

TEST(merge_model_adapters, ties_matches_layer_merge) {
  qlora::LlamaModel model = qlora::test::tiny_model(8);
  add_random_adapter(model, "task_a", 4, kAllLinear, 300);
  add_random_adapter(model, "task_b", 4, kAllLinear, 400);
  const std::vector<std::string> names = {"task_a", "task_b"};
  const MergeOptions options{.method = MergeMethod::ties, .density = 0.3f, .rank = 3};
  const auto report = qlora::continual::merge_model_adapters(model, names, "merged", options);

  double kept = 0.0;
  double total = 0.0;
  std::size_t i = 0;
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    const std::vector<const LoraAdapter*> held = {&ref.linear->adapter("task_a"),
                                                  &ref.linear->adapter("task_b")};
    const auto expected = qlora::continual::merge_adapters(held, options);
    const LoraAdapter& merged = ref.linear->adapter("merged");
    EXPECT_EQ(merged.rank, 3);
    EXPECT_TRUE(qlora::test::arrays_equal(span_of<float>(merged.A),
                                          span_of<float>(expected.adapter.A)))
        << ref.key;
    ASSERT_LT(i, report.projections.size());
    EXPECT_EQ(report.projections[i].key, ref.key);
    EXPECT_EQ(report.projections[i].energy_kept, expected.energy_kept);
    kept += expected.energy_kept * expected.energy_total;
    total += expected.energy_total;
    ++i;
  }
  EXPECT_NEAR(report.energy_kept, kept / total, kEnergyRelTol);
  EXPECT_LT(report.energy_kept, 1.0);
}

TEST(merge_model_adapters, error_leaves_model_unchanged) {
  qlora::LlamaModel model = qlora::test::tiny_model(9);
  add_random_adapter(model, "task_a", 2, kAllLinear, 500);
  add_random_adapter(model, "task_b", 2, kAllLinear, 600);
  model.projection(1, qlora::LlamaProjection::up_proj).adapter("task_b").B(0, 0) =
      std::numeric_limits<float>::quiet_NaN();

  const std::vector<std::string> names = {"task_a", "task_b"};
  EXPECT_THAT(
      [&] { qlora::continual::merge_model_adapters(model, names, "merged", {}); },
      ::testing::ThrowsMessage<qlora::InvalidArgument>(
          HasSubstr("adapter 'task_b' on model.layers.1.mlp.up_proj holds NaN")));
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    EXPECT_FALSE(ref.linear->has_adapter("merged")) << ref.key;
  }
}

TEST(merge_model_adapters, rejects_bad_names) {
  qlora::LlamaModel model = qlora::test::tiny_model(10);
  add_random_adapter(model, "task_a", 2, kAllLinear, 700);
  const auto expect_error = [&](std::vector<std::string> names, const std::string& output,
                                const std::string& text) {
    EXPECT_THAT([&] { qlora::continual::merge_model_adapters(model, names, output, {}); },
                ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr(text)))
        << text;
  };
  expect_error({}, "merged", "no adapter names");
  expect_error({"task_a", "task_a"}, "merged", "adapter 'task_a' is listed twice");
  expect_error({"task_z"}, "merged", "adapter 'task_z' not found on any projection");
  expect_error({"task_a"}, "default", "adapter 'default' already exists");
  expect_error({"task_a"}, "task_a", "adapter 'task_a' already exists");
  expect_error({"task_a"}, "", "output adapter name is empty");
  EXPECT_THAT(
      [&] {
        qlora::continual::merge_model_adapters(model, std::vector<std::string>{"task_a"},
                                               "merged", {.weights = {1.0f, 2.0f}});
      },
      ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("got 2 weights for 1")));
}

TEST(compress_model_adapter, in_place_keeps_active_sets) {
  qlora::LlamaModel model = qlora::test::tiny_model(11);
  add_random_adapter(model, "task_a", 4, kAllLinear, 800);
  std::vector<LoraAdapter> originals;
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    originals.push_back(ref.linear->adapter("task_a"));
  }
  model.set_active_adapters({"default"});
  const auto before = active_sets(model);

  const auto full = qlora::continual::compress_model_adapter(model, "task_a", 4, "task_a_r4");
  EXPECT_NEAR(full.energy_kept, 1.0, kEnergyRelTol);
  const auto half = qlora::continual::compress_model_adapter(model, "task_a", 2, "task_a");
  EXPECT_LT(half.energy_kept, 1.0);
  EXPECT_GT(half.energy_kept, 0.0);
  EXPECT_EQ(active_sets(model), before);

  std::size_t i = 0;
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    EXPECT_EQ(ref.linear->adapter("task_a").rank, 2) << ref.key;
    EXPECT_LE(relative_error(update_of(ref.linear->adapter("task_a_r4")),
                             update_of(originals[i])),
              kFullRankRelTol)
        << ref.key;
    ++i;
  }
  EXPECT_THAT(
      [&] { qlora::continual::compress_model_adapter(model, "task_a", 2, "default"); },
      ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("'default' already exists")));
  EXPECT_THAT(
      [&] { qlora::continual::compress_model_adapter(model, "task_a", 0, "task_a"); },
      ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("max_rank must be at least 1")));
}

// Trains adapter `name` alone for a few SGD steps on `batch`, so that it fits that text.
void fit_adapter(qlora::LlamaModel& model, const std::string& name,
                 const qlora::LlamaBatch& batch) {
  constexpr float kLearningRate = 0.5f;
  constexpr int kSteps = 30;
  model.set_active_adapters({name});
  for (int step = 0; step < kSteps; ++step) {
    model.zero_grad();
    qlora::LlamaTrainState state;
    const qlora::LlamaLoss loss =
        model.forward(batch, state, {.dropout = false});
    model.backward(state, 1.0f / static_cast<float>(loss.n_tokens));
    for (const qlora::LlamaProjectionRef& ref : model.projections()) {
      if (!ref.linear->has_adapter(name)) continue;
      LoraAdapter& a = ref.linear->adapter(name);
      a.A -= kLearningRate * a.dA;
      a.B -= kLearningRate * a.dB;
    }
  }
}

TEST(route_by_min_loss, picks_adapter_fitted_to_prefix) {
  qlora::LlamaModel model = qlora::test::tiny_model(12);
  add_random_adapter(model, "task_a", 4, kAllLinear, 900);
  add_random_adapter(model, "task_b", 4, kAllLinear, 901);
  fit_adapter(model, "task_a", document_batch(0));
  fit_adapter(model, "task_b", document_batch(1));

  model.set_active_adapters({"default", "task_b"});
  model.set_adapters_disabled(true);
  const auto before = active_sets(model);

  const std::vector<std::string> names = {"task_a", "task_b"};
  const std::vector<qlora::Document> docs = qlora::test::sample_documents();
  for (std::size_t doc = 0; doc < 2; ++doc) {
    const auto result = qlora::continual::route_by_min_loss(model, names, docs[doc].ids);
    EXPECT_EQ(result.best, doc);
    ASSERT_EQ(result.losses.size(), 2u);
    EXPECT_LT(result.losses[doc], result.losses[1 - doc]);
  }
  EXPECT_EQ(active_sets(model), before);
  EXPECT_TRUE(model.projection(0, qlora::LlamaProjection::q_proj).adapters_disabled());
}

TEST(route_by_min_loss, losses_match_each_adapter_alone) {
  qlora::LlamaModel model = qlora::test::tiny_model(13);
  add_random_adapter(model, "task_a", 2, kAllLinear, 1000);
  add_random_adapter(model, "task_b", 2, {"up_proj"}, 1001);
  const std::vector<std::string> names = {"task_a", "default", "task_b"};
  const std::vector<qlora::Document> docs = qlora::test::sample_documents();
  const std::span<const std::int32_t> prefix(docs[2].ids.data(), 16);

  const auto result = qlora::continual::route_by_min_loss(model, names, prefix);
  qlora::LlamaBatch batch;
  batch.seq_len = 15;
  batch.tokens.assign(prefix.begin(), prefix.end() - 1);
  batch.targets.assign(prefix.begin() + 1, prefix.end());
  ASSERT_EQ(result.losses.size(), 3u);
  std::size_t best = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    model.set_active_adapters({names[i]});
    EXPECT_EQ(result.losses[i], model.loss(batch).mean()) << names[i];
    if (result.losses[i] < result.losses[best]) best = i;
  }
  EXPECT_EQ(result.best, best);
}

TEST(route_by_min_loss, tie_goes_to_first) {
  qlora::LlamaModel model = qlora::test::tiny_model(14);
  add_random_adapter(model, "task_a", 2, kAllLinear, 1100);
  add_random_adapter(model, "task_b", 2, kAllLinear, 1100);  // the same factors
  const std::vector<qlora::Document> docs = qlora::test::sample_documents();
  const std::vector<std::string> ab = {"task_a", "task_b"};
  const std::vector<std::string> ba = {"task_b", "task_a"};
  EXPECT_EQ(qlora::continual::route_by_min_loss(model, ab, docs[0].ids).best, 0u);
  EXPECT_EQ(qlora::continual::route_by_min_loss(model, ba, docs[0].ids).best, 0u);
}

TEST(route_by_min_loss, errors_restore_active_sets) {
  qlora::LlamaModel model = qlora::test::tiny_model(15);
  add_random_adapter(model, "task_a", 2, kAllLinear, 1200);
  add_random_adapter(model, "task_b", 2, kAllLinear, 1201);
  model.set_active_adapters({"default"});
  const auto before = active_sets(model);
  const std::vector<std::string> names = {"task_a", "task_b"};
  const auto expect_error = [&](std::vector<std::string> list, std::vector<std::int32_t> prefix,
                                const std::string& text) {
    EXPECT_THAT([&] { qlora::continual::route_by_min_loss(model, list, prefix); },
                ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr(text)))
        << text;
    EXPECT_EQ(active_sets(model), before) << text;
  };
  expect_error({}, {1, 2, 3}, "no adapter names");
  expect_error({"task_a", "missing"}, {1, 2, 3}, "adapter 'missing' not found");
  expect_error({"task_a", "task_a"}, {1, 2, 3}, "listed twice");
  expect_error(names, {1}, "prefix too short: got 1 tokens");
  expect_error(names, std::vector<std::int32_t>(200, 1), "got 200 tokens, expected at most");
  expect_error(names, {1, 2, 999}, "prefix token id out of range at index 2: got 999");
  expect_error(names, {-1, 2, 3}, "prefix token id out of range at index 0: got -1");

  model.projection(0, qlora::LlamaProjection::down_proj).adapter("task_b").A(0, 0) =
      std::numeric_limits<float>::quiet_NaN();
  expect_error(names, {1, 2, 3}, "adapter 'task_b' gives a non-finite loss");
}

}  // namespace
