// LlamaModel on a tiny random configuration: gradients against central finite differences,
// KV-cache decoding against the full forward, packed documents against separate runs,
// gradient checkpointing against plain backward, the chunked loss against the logits, and
// the RoPE row permutation between GGUF and Hugging Face order.

#include <cmath>
#include <numeric>
#include <span>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "qlora/core/cpu.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/random.hpp"
#include "qlora/core/threads.hpp"
#include "qlora/kernels/matmul.hpp"
#include "qlora/model/llama.hpp"
#include "support/compare.hpp"

namespace {

// Central differences on an fp32 model: the step balances truncation error (O(step^2)) against
// the rounding noise of the loss (about 1e-6 / step).
constexpr float kFiniteDifferenceStep = 1e-2f;
constexpr double kGradientAbsTol = 5e-4;
constexpr double kGradientRelTol = 5e-3;
// Different but mathematically equal evaluation orders (KV cache, separate documents).
constexpr double kLogitsAbsTol = 1e-4;
constexpr double kLogitsRelTol = 1e-4;
constexpr double kLossAbsTol = 1e-5;

qlora::LlamaConfig tiny_config() {
  qlora::LlamaConfig config;
  config.hidden_size = 64;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 16;
  config.intermediate_size = 96;
  config.vocab_size = 97;
  config.max_position_embeddings = 128;
  config.rope_theta = 10000.0f;
  config.rms_norm_eps = 1e-5f;
  config.tie_word_embeddings = true;
  return config;
}

qlora::RowMatrixF random_matrix(qlora::Rng& rng, std::int64_t rows, std::int64_t cols,
                                float bound) {
  qlora::RowMatrixF m(rows, cols);
  for (float& v : m.reshaped()) v = rng.uniform(-bound, bound);
  return m;
}

qlora::VectorF random_norm(qlora::Rng& rng, std::int64_t size) {
  qlora::VectorF v(size);
  for (float& x : v) x = 1.0f + rng.uniform(-0.2f, 0.2f);
  return v;
}

qlora::LlamaWeights tiny_weights(const qlora::LlamaConfig& config, bool untied = false) {
  qlora::Rng rng(1234);
  const std::int64_t hidden = config.hidden_size;
  const std::int64_t q_dim = config.num_attention_heads * config.head_dim;
  const std::int64_t kv_dim = config.num_key_value_heads * config.head_dim;
  const std::int64_t inter = config.intermediate_size;
  const auto fan = [](std::int64_t in) { return 1.5f / std::sqrt(static_cast<float>(in)); };

  qlora::LlamaWeights w;
  w.embed_tokens = random_matrix(rng, config.vocab_size, hidden, 1.0f);
  w.norm = random_norm(rng, hidden);
  if (untied) w.lm_head = random_matrix(rng, config.vocab_size, hidden, 0.5f);
  for (std::int64_t l = 0; l < config.num_hidden_layers; ++l) {
    qlora::LlamaLayerWeights layer;
    layer.q_proj = random_matrix(rng, q_dim, hidden, fan(hidden));
    layer.k_proj = random_matrix(rng, kv_dim, hidden, fan(hidden));
    layer.v_proj = random_matrix(rng, kv_dim, hidden, fan(hidden));
    layer.o_proj = random_matrix(rng, hidden, q_dim, fan(q_dim));
    layer.gate_proj = random_matrix(rng, inter, hidden, fan(hidden));
    layer.up_proj = random_matrix(rng, inter, hidden, fan(hidden));
    layer.down_proj = random_matrix(rng, hidden, inter, fan(inter));
    layer.input_layernorm = random_norm(rng, hidden);
    layer.post_attention_layernorm = random_norm(rng, hidden);
    w.layers.push_back(std::move(layer));
  }
  return w;
}

qlora::LlamaLoadOptions int8_options() {
  return {.projections = qlora::QuantConfig{.format = qlora::QuantFormat::int8, .block_size = 32},
          .embeddings = std::nullopt};
}

qlora::LlamaLoadOptions float_options() {
  return {.projections = std::nullopt, .embeddings = std::nullopt};
}

// A model with INT8 projections and an adapter "a" whose B is random, so dA is not zero.
qlora::LlamaModel tiny_model_with_adapter(float dropout = 0.0f) {
  const qlora::LlamaConfig config = tiny_config();
  qlora::LlamaModel model(config, tiny_weights(config), int8_options());
  qlora::LoraConfig lora;
  lora.rank = 4;
  lora.alpha = 8.0f;
  lora.dropout = dropout;
  model.add_adapter("a", lora, 7);
  qlora::Rng rng(99);
  for (const qlora::LlamaProjectionRef& ref : model.projections()) {
    qlora::LoraAdapter& adapter = ref.linear->adapter("a");
    for (float& v : adapter.B.reshaped()) v = rng.uniform(-0.3f, 0.3f);
  }
  return model;
}

qlora::LlamaBatch random_batch(std::int64_t batch_size, std::int64_t seq_len, std::int64_t vocab,
                               std::uint64_t seed) {
  qlora::Rng rng(seed);
  qlora::LlamaBatch batch;
  batch.batch_size = batch_size;
  batch.seq_len = seq_len;
  for (std::int64_t i = 0; i < batch.n_tokens(); ++i) {
    batch.tokens.push_back(static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab))));
    batch.targets.push_back(static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(vocab))));
  }
  batch.targets[1] = qlora::kIgnoreIndex;
  return batch;
}

std::span<const float> span_of(const qlora::RowMatrixF& m) {
  return {m.data(), static_cast<std::size_t>(m.size())};
}

std::span<const float> span_of(const qlora::RowVectorF& v) {
  return {v.data(), static_cast<std::size_t>(v.size())};
}

::testing::AssertionResult gradient_near(double analytic, double numeric) {
  const double diff = std::abs(analytic - numeric);
  if (diff <= kGradientAbsTol + kGradientRelTol * std::abs(numeric)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << "analytic " << analytic << " vs finite difference " << numeric << " (|diff| "
         << diff << ")";
}

}  // namespace

TEST(llama_gradients, adapter_entries_match_finite_differences) {
  qlora::LlamaModel model = tiny_model_with_adapter();
  const qlora::LlamaBatch batch = random_batch(2, 6, 97, 5);

  qlora::LlamaTrainState state;
  const qlora::LlamaLoss loss = model.forward(batch, state);
  ASSERT_EQ(loss.n_tokens, 11);
  model.backward(state, 1.0f / static_cast<float>(loss.n_tokens));

  struct Entry {
    int layer;
    qlora::LlamaProjection projection;
    bool is_a;
    std::int64_t row;
    std::int64_t col;
  };
  const std::vector<Entry> entries = {
      {0, qlora::LlamaProjection::q_proj, true, 1, 3},
      {0, qlora::LlamaProjection::k_proj, false, 5, 2},
      {0, qlora::LlamaProjection::v_proj, true, 3, 60},
      {1, qlora::LlamaProjection::o_proj, false, 10, 0},
      {1, qlora::LlamaProjection::gate_proj, true, 2, 17},
      {0, qlora::LlamaProjection::up_proj, false, 40, 1},
      {1, qlora::LlamaProjection::down_proj, true, 0, 90},
      {1, qlora::LlamaProjection::down_proj, false, 63, 3},
  };
  for (const Entry& e : entries) {
    SCOPED_TRACE(::testing::Message() << qlora::llama_module_key(e.layer, e.projection)
                                      << (e.is_a ? ".A(" : ".B(") << e.row << ", " << e.col
                                      << ")");
    qlora::LoraAdapter& adapter = model.projection(e.layer, e.projection).adapter("a");
    float& weight = e.is_a ? adapter.A(e.row, e.col) : adapter.B(e.row, e.col);
    const double analytic = e.is_a ? adapter.dA(e.row, e.col) : adapter.dB(e.row, e.col);

    const float saved = weight;
    weight = saved + kFiniteDifferenceStep;
    const double plus = model.loss(batch).mean();
    weight = saved - kFiniteDifferenceStep;
    const double minus = model.loss(batch).mean();
    weight = saved;
    EXPECT_TRUE(gradient_near(analytic, (plus - minus) / (2.0 * kFiniteDifferenceStep)));
  }
}

// The loss is what training minimizes and what evaluation reports, so it never uses int8
// activations, even for a batch small enough for them. Logits of the same batch may.
TEST(llama_model, loss_keeps_fp32_activations) {
  const bool saved = qlora::int8_activations();
  const qlora::LlamaModel model = tiny_model_with_adapter();
  const qlora::LlamaBatch batch = random_batch(2, 6, 97, 5);
  qlora::set_int8_activations(false);
  const qlora::LlamaLoss fp32 = model.loss(batch);
  const qlora::RowMatrixF logits_fp32 = model.logits(batch);
  qlora::set_int8_activations(true);
  EXPECT_EQ(model.logits(batch, qlora::ActivationPrecision::fp32), logits_fp32);
  const qlora::LlamaLoss with_int8 = model.loss(batch);
  const qlora::RowMatrixF logits_int8 = model.logits(batch);
  qlora::set_int8_activations(saved);
  EXPECT_EQ(with_int8.sum, fp32.sum);
  if (qlora::select_isa() != qlora::Isa::scalar) {
    EXPECT_NE(logits_int8, logits_fp32) << "12 positions should take the int8 path";
  }
  EXPECT_TRUE(logits_int8.isApprox(logits_fp32, 0.02f));
}

TEST(llama_gradients, embedding_gradients_match_finite_differences) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel reference(config, tiny_weights(config, true), float_options());
  qlora::LlamaModel model(config, tiny_weights(config, true), float_options());

  // Feed embeddings directly so that they can be perturbed; segments make two documents.
  qlora::LlamaBatch batch = random_batch(2, 7, 97, 11);
  qlora::Rng rng(3);
  batch.inputs_embeds = random_matrix(rng, batch.n_tokens(), config.hidden_size, 1.0f);
  batch.tokens.clear();
  batch.segment_ids = {0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0};

  qlora::LlamaTrainState state;
  const qlora::LlamaLoss loss = model.forward(batch, state);
  qlora::RowMatrixF d_embeddings;
  model.backward(state, 1.0f, &d_embeddings);  // gradient of the loss sum
  ASSERT_EQ(d_embeddings.rows(), batch.n_tokens());
  ASSERT_EQ(d_embeddings.cols(), config.hidden_size);

  const std::vector<std::pair<std::int64_t, std::int64_t>> entries = {
      {0, 0}, {0, 33}, {2, 5}, {3, 63}, {6, 10}, {7, 1}, {12, 40}, {13, 7}};
  for (const auto& [row, col] : entries) {
    SCOPED_TRACE(::testing::Message() << "inputs_embeds(" << row << ", " << col << ")");
    qlora::LlamaBatch perturbed = batch;
    perturbed.inputs_embeds(row, col) += kFiniteDifferenceStep;
    const double plus = reference.loss(perturbed).sum;
    perturbed.inputs_embeds(row, col) -= 2.0f * kFiniteDifferenceStep;
    const double minus = reference.loss(perturbed).sum;
    EXPECT_TRUE(gradient_near(d_embeddings(row, col),
                              (plus - minus) / (2.0 * kFiniteDifferenceStep)));
  }
  EXPECT_GT(loss.sum, 0.0);
}

TEST(llama_gradients, checkpointing_is_bit_identical) {
  const qlora::LlamaBatch batch = random_batch(2, 8, 97, 21);
  const qlora::LlamaTrainOptions plain{.gradient_checkpointing = false, .dropout = true,
                                       .dropout_seed = 77};
  qlora::LlamaTrainOptions checkpointed = plain;
  checkpointed.gradient_checkpointing = true;

  auto run = [&](const qlora::LlamaTrainOptions& options, std::vector<float>& grads,
                 qlora::RowMatrixF& d_embeddings) {
    qlora::LlamaModel model = tiny_model_with_adapter(0.1f);
    qlora::LlamaTrainState state;
    const qlora::LlamaLoss loss = model.forward(batch, state, options);
    model.backward(state, 1.0f / static_cast<float>(loss.n_tokens), &d_embeddings);
    for (const qlora::LlamaProjectionRef& ref : model.projections()) {
      const qlora::LoraAdapter& a = ref.linear->adapter("a");
      grads.insert(grads.end(), a.dA.data(), a.dA.data() + a.dA.size());
      grads.insert(grads.end(), a.dB.data(), a.dB.data() + a.dB.size());
    }
    return loss.sum;
  };
  std::vector<float> grads_plain;
  std::vector<float> grads_checkpointed;
  qlora::RowMatrixF d_plain;
  qlora::RowMatrixF d_checkpointed;
  const double loss_plain = run(plain, grads_plain, d_plain);
  const double loss_checkpointed = run(checkpointed, grads_checkpointed, d_checkpointed);

  EXPECT_EQ(loss_plain, loss_checkpointed);
  EXPECT_TRUE(qlora::test::arrays_equal(std::span<const float>(grads_checkpointed),
                                        std::span<const float>(grads_plain)));
  EXPECT_TRUE(qlora::test::arrays_equal(span_of(d_checkpointed), span_of(d_plain)));
  // Dropout is on, so a nonzero gradient shows the masks were reproduced, not skipped.
  EXPECT_GT(std::abs(std::accumulate(grads_plain.begin(), grads_plain.end(), 0.0)), 0.0);
}

TEST(llama_gradients, backward_twice_is_rejected) {
  qlora::LlamaModel model = tiny_model_with_adapter();
  const qlora::LlamaBatch batch = random_batch(1, 4, 97, 2);
  qlora::LlamaTrainState state;
  model.forward(batch, state);
  model.backward(state, 1.0f);
  EXPECT_THROW(model.backward(state, 1.0f), qlora::InvalidArgument);
}

TEST(llama_kv_cache, decoding_matches_full_forward) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel model(config, tiny_weights(config), int8_options());
  const qlora::LlamaBatch batch = random_batch(1, 9, 97, 17);
  const qlora::RowMatrixF full = model.logits(batch);

  qlora::LlamaKvCache cache(config, 16);
  const std::span<const std::int32_t> tokens(batch.tokens);
  qlora::RowVectorF step = model.prefill(cache, tokens.first(5));
  EXPECT_TRUE(qlora::test::arrays_near(span_of(step), span_of(qlora::RowMatrixF(full.row(4))),
                                       kLogitsAbsTol, kLogitsRelTol));
  for (std::size_t t = 5; t < tokens.size(); ++t) {
    SCOPED_TRACE(::testing::Message() << "position " << t);
    step = model.forward_next(cache, tokens[t]);
    const qlora::RowMatrixF expected = full.row(static_cast<std::int64_t>(t));
    EXPECT_TRUE(qlora::test::arrays_near(span_of(step), span_of(expected), kLogitsAbsTol,
                                         kLogitsRelTol));
  }
  EXPECT_EQ(cache.size(), 9);

  // Truncating back to the prompt and decoding again repeats the first step.
  cache.truncate(5);
  const qlora::RowVectorF again = model.forward_next(cache, tokens[5]);
  EXPECT_TRUE(qlora::test::arrays_near(span_of(again), span_of(qlora::RowMatrixF(full.row(5))),
                                       kLogitsAbsTol, kLogitsRelTol));
}

TEST(llama_kv_cache, overflow_is_rejected) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel model(config, tiny_weights(config), int8_options());
  qlora::LlamaKvCache cache(config, 4);
  const std::vector<std::int32_t> tokens = {1, 2, 3, 4, 5};
  EXPECT_THAT([&] { model.prefill(cache, tokens); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  ::testing::HasSubstr("cache full")));
  EXPECT_EQ(cache.size(), 0);
}

TEST(llama_packing, documents_match_separate_runs) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel model(config, tiny_weights(config), int8_options());
  const qlora::LlamaBatch doc1 = random_batch(1, 4, 97, 31);
  const qlora::LlamaBatch doc2 = random_batch(1, 5, 97, 32);

  qlora::LlamaBatch packed;
  packed.seq_len = 9;
  packed.tokens = doc1.tokens;
  packed.tokens.insert(packed.tokens.end(), doc2.tokens.begin(), doc2.tokens.end());
  packed.segment_ids = {0, 0, 0, 0, 1, 1, 1, 1, 1};
  packed.targets = doc1.targets;
  packed.targets.insert(packed.targets.end(), doc2.targets.begin(), doc2.targets.end());

  const qlora::RowMatrixF logits = model.logits(packed);
  const qlora::RowMatrixF first = logits.topRows(4);
  const qlora::RowMatrixF second = logits.bottomRows(5);
  EXPECT_TRUE(qlora::test::arrays_near(span_of(first), span_of(model.logits(doc1)),
                                       kLogitsAbsTol, kLogitsRelTol));
  EXPECT_TRUE(qlora::test::arrays_near(span_of(second), span_of(model.logits(doc2)),
                                       kLogitsAbsTol, kLogitsRelTol));

  const double separate = model.loss(doc1).sum + model.loss(doc2).sum;
  const qlora::LlamaLoss packed_loss = model.loss(packed);
  EXPECT_EQ(packed_loss.n_tokens, 7);  // target 1 of each document is kIgnoreIndex
  EXPECT_NEAR(packed_loss.sum, separate, kLossAbsTol * 7.0);
}

TEST(llama_loss, matches_log_softmax_of_logits) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel model(config, tiny_weights(config, true), int8_options());
  qlora::LlamaBatch batch = random_batch(3, 5, 97, 41);
  batch.loss_mask.assign(15, 1);
  batch.loss_mask[7] = 0;

  // fp32 logits, the precision of the loss (15 positions could otherwise use int8).
  const qlora::RowMatrixF logits = model.logits(batch, qlora::ActivationPrecision::fp32);
  double expected = 0.0;
  std::int64_t counted = 0;
  for (std::int64_t m = 0; m < batch.n_tokens(); ++m) {
    const auto i = static_cast<std::size_t>(m);
    if (batch.targets[i] == qlora::kIgnoreIndex || batch.loss_mask[i] == 0) continue;
    const double max_logit = logits.row(m).maxCoeff();
    double sum_exp = 0.0;
    for (std::int64_t j = 0; j < logits.cols(); ++j) sum_exp += std::exp(logits(m, j) - max_logit);
    expected += max_logit + std::log(sum_exp) - logits(m, batch.targets[i]);
    ++counted;
  }
  const qlora::LlamaLoss loss = model.loss(batch);
  EXPECT_EQ(loss.n_tokens, counted);
  EXPECT_EQ(counted, 13);
  EXPECT_NEAR(loss.sum, expected, kLossAbsTol * static_cast<double>(counted));
}

TEST(llama_threads, logits_do_not_depend_on_thread_count) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel model(config, tiny_weights(config), int8_options());
  const qlora::LlamaBatch batch = random_batch(2, 7, 97, 51);
  qlora::set_num_threads(1);
  const qlora::RowMatrixF one = model.logits(batch);
  qlora::set_num_threads(2);
  const qlora::RowMatrixF two = model.logits(batch);
  qlora::set_num_threads(0);
  EXPECT_TRUE(qlora::test::arrays_equal(span_of(two), span_of(one)));
}

TEST(llama_adapters, keys_and_targets_follow_peft) {
  qlora::LlamaModel model = tiny_model_with_adapter();
  const std::vector<qlora::LlamaProjectionRef> refs = model.projections();
  ASSERT_EQ(refs.size(), 14u);
  EXPECT_EQ(refs[0].key, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(refs[13].key, "model.layers.1.mlp.down_proj");
  EXPECT_EQ(refs[1].linear->adapter("a").B.rows(), 32);  // k_proj: kv_heads * head_dim

  qlora::LoraConfig only_v;
  only_v.target_modules = {"v_proj"};
  model.add_adapter("b", only_v, 1);
  EXPECT_TRUE(model.projection(1, qlora::LlamaProjection::v_proj).has_adapter("b"));
  EXPECT_FALSE(model.projection(1, qlora::LlamaProjection::q_proj).has_adapter("b"));

  model.set_active_adapters({"b"});
  EXPECT_EQ(model.projection(0, qlora::LlamaProjection::v_proj).active_adapters(),
            std::vector<std::string>{"b"});
  EXPECT_TRUE(model.projection(0, qlora::LlamaProjection::q_proj).active_adapters().empty());
  model.remove_adapter("b");
  EXPECT_FALSE(model.projection(0, qlora::LlamaProjection::v_proj).has_adapter("b"));

  qlora::LoraConfig nothing;
  nothing.target_modules = {"no_such_proj"};
  EXPECT_THROW(model.add_adapter("c", nothing, 1), qlora::InvalidArgument);
}

TEST(llama_adapters, float_projections_reject_adapters) {
  const qlora::LlamaConfig config = tiny_config();
  qlora::LlamaModel model(config, tiny_weights(config), float_options());
  EXPECT_THAT([&] { model.add_adapter("a", qlora::LoraConfig{}, 1); },
              ::testing::ThrowsMessage<qlora::NotImplemented>(
                  ::testing::HasSubstr("needs quantized projections")));
  EXPECT_TRUE(model.projections().empty());
}

TEST(llama_model, bad_inputs_are_rejected) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel model(config, tiny_weights(config), int8_options());
  qlora::LlamaBatch batch = random_batch(1, 4, 97, 61);
  batch.tokens[2] = 97;
  EXPECT_THAT([&] { model.logits(batch); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  ::testing::HasSubstr("token id out of range at index 2: got 97")));

  batch = random_batch(1, 4, 97, 61);
  batch.targets.pop_back();
  EXPECT_THAT([&] { model.loss(batch); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  ::testing::HasSubstr("batch.targets has 3 entries")));

  qlora::LlamaWeights weights = tiny_weights(config);
  weights.layers[1].k_proj = qlora::RowMatrixF::Zero(16, 64);
  EXPECT_THAT([&] { qlora::LlamaModel(config, std::move(weights), int8_options()); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(
                  ::testing::HasSubstr("model.layers.1.self_attn.k_proj has shape [16, 64]")));
}

TEST(llama_model, quantized_embeddings_stay_close_to_float) {
  const qlora::LlamaConfig config = tiny_config();
  const qlora::LlamaModel dense(config, tiny_weights(config), int8_options());
  qlora::LlamaLoadOptions options = int8_options();
  options.embeddings = qlora::QuantConfig{.format = qlora::QuantFormat::int8, .block_size = 32};
  const qlora::LlamaModel quantized(config, tiny_weights(config), options);
  const qlora::LlamaBatch batch = random_batch(1, 6, 97, 71);
  // INT8 with groups of 32 changes each weight by at most half a step (about 0.4%).
  EXPECT_NEAR(quantized.loss(batch).mean(), dense.loss(batch).mean(), 0.05);
}

TEST(llama_rope_permutation, gguf_order_of_one_head) {
  // One head of head_dim 8: GGUF row r contains HF row r / 2 + (r % 2) * 4.
  qlora::RowMatrixF hf(8, 1);
  for (int i = 0; i < 8; ++i) hf(i, 0) = static_cast<float>(i);
  const qlora::RowMatrixF gguf = qlora::permute_hf_rope_rows(hf, 1);
  const std::vector<float> expected = {0, 4, 1, 5, 2, 6, 3, 7};
  EXPECT_TRUE(qlora::test::arrays_equal(span_of(gguf), std::span<const float>(expected)));
  EXPECT_TRUE(qlora::test::arrays_equal(span_of(qlora::unpermute_gguf_rope_rows(gguf, 1)),
                                        span_of(hf)));
}

TEST(llama_rope_permutation, round_trip_over_heads) {
  qlora::Rng rng(5);
  const qlora::RowMatrixF w = random_matrix(rng, 3 * 64, 5, 1.0f);
  const qlora::RowMatrixF back =
      qlora::unpermute_gguf_rope_rows(qlora::permute_hf_rope_rows(w, 3), 3);
  EXPECT_TRUE(qlora::test::arrays_equal(span_of(back), span_of(w)));
  EXPECT_THROW(qlora::permute_hf_rope_rows(w, 5), qlora::InvalidArgument);
}
