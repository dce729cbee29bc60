// safetensors reader and writer: round trips in each dtype, header details, sharded
// checkpoints, and the errors of unsupported dtypes and bad indexes.
#include "qlora/io/safetensors.hpp"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "io/io_test_util.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"

namespace {

using ::testing::HasSubstr;
using qlora::SafetensorsDtype;
using qlora::SafetensorsFile;
using qlora::SafetensorsWriter;

std::vector<float> ramp(std::size_t n) {
  std::vector<float> values(n);
  for (std::size_t i = 0; i < n; ++i) values[i] = std::cos(static_cast<float>(i)) * 0.37f;
  return values;
}

TEST(safetensors_writer, round_trips_each_dtype) {
  const qlora::test::TempDir dir;
  const std::vector<float> values = ramp(12);
  const std::int64_t shape[] = {3, 4};
  SafetensorsWriter writer;
  writer.add("w.f32", shape, values);
  writer.add("w.f16", shape, values, SafetensorsDtype::f16);
  writer.add("w.bf16", shape, values, SafetensorsDtype::bf16);
  const std::vector<float> scalar = {2.5f};
  writer.add("scalar", std::span<const std::int64_t>(), scalar);
  writer.add("empty", std::vector<std::int64_t>{0, 4}, std::span<const float>());
  writer.write(dir / "adapter_model.safetensors");

  const SafetensorsFile file(dir / "adapter_model.safetensors");
  EXPECT_EQ(file.metadata().at("format"), "pt");
  ASSERT_EQ(file.tensors().size(), 5u);
  EXPECT_EQ(file.tensor("w.f16").dtype, "F16");
  EXPECT_EQ(file.tensor("w.f32").shape, (std::vector<std::int64_t>{3, 4}));
  EXPECT_EQ(file.to_matrix("w.f32"), qlora::ConstMapRowMatrixF(values.data(), 3, 4));
  const std::vector<float> f16 = file.to_float(file.tensor("w.f16"));
  const std::vector<float> bf16 = file.to_float(file.tensor("w.bf16"));
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(f16[i], qlora::fp16_to_fp32(qlora::fp32_to_fp16(values[i])));
    EXPECT_EQ(bf16[i], qlora::bf16_to_fp32(qlora::fp32_to_bf16(values[i])));
  }
  EXPECT_EQ(file.to_float(file.tensor("scalar")), scalar);
  EXPECT_TRUE(file.tensor("scalar").shape.empty());
  EXPECT_EQ(file.tensor("empty").n_elements(), 0);
}

TEST(safetensors_writer, header_is_padded_and_has_metadata) {
  const qlora::test::TempDir dir;
  SafetensorsWriter writer;
  writer.set_metadata("note", "made by a test");
  const std::vector<float> values = ramp(3);
  writer.add("v", std::vector<std::int64_t>{3}, values);
  writer.write(dir / "v.safetensors");

  const std::vector<std::uint8_t> bytes = qlora::test::read_bytes(dir / "v.safetensors");
  std::uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  EXPECT_EQ(header_size % 8, 0u);
  const std::string header(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(header_size));
  const auto json = nlohmann::json::parse(header);
  EXPECT_EQ(json["__metadata__"]["format"], "pt");
  EXPECT_EQ(json["__metadata__"]["note"], "made by a test");
  EXPECT_EQ(json["v"]["data_offsets"], nlohmann::json::array({0, 12}));
}

TEST(safetensors_writer, matrix_overload_keeps_shape) {
  const qlora::test::TempDir dir;
  qlora::RowMatrixF matrix(2, 5);
  for (int i = 0; i < matrix.size(); ++i) matrix.data()[i] = static_cast<float>(i) - 3.0f;
  SafetensorsWriter writer;
  writer.add("m", matrix.block(0, 1, 2, 3));  // a strided view
  writer.write(dir / "m.safetensors");
  const SafetensorsFile file(dir / "m.safetensors");
  EXPECT_EQ(file.to_matrix("m"), matrix.block(0, 1, 2, 3));
}

TEST(safetensors_writer, rejects_invalid_tensors) {
  SafetensorsWriter writer;
  const std::vector<float> values(4);
  writer.add("a", std::vector<std::int64_t>{4}, values);
  EXPECT_THROW(writer.add("a", std::vector<std::int64_t>{4}, values), qlora::InvalidArgument);
  EXPECT_THROW(writer.add("b", std::vector<std::int64_t>{5}, values), qlora::InvalidArgument);
  EXPECT_THROW(writer.add("__metadata__", std::vector<std::int64_t>{4}, values),
               qlora::InvalidArgument);
  EXPECT_THROW(writer.add("c", std::vector<std::int64_t>{-4}, values), qlora::InvalidArgument);
}

TEST(safetensors_file, other_dtypes_open_but_do_not_convert) {
  const qlora::test::TempDir dir;
  const std::string header = R"({"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})";
  std::vector<std::uint8_t> bytes(8);
  bytes[0] = static_cast<std::uint8_t>(header.size());
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), 16, 0);
  qlora::test::write_bytes(dir / "ids.safetensors", bytes);

  const SafetensorsFile file(dir / "ids.safetensors");
  EXPECT_EQ(file.tensor("ids").dtype, "I64");
  EXPECT_THAT([&] { (void)file.to_float(file.tensor("ids")); },
              ::testing::ThrowsMessage<qlora::NotImplemented>(
                  AllOf(HasSubstr("'ids'"), HasSubstr("I64"))));
}

TEST(safetensors_file, to_matrix_rejects_rank_3) {
  const qlora::test::TempDir dir;
  SafetensorsWriter writer;
  writer.add("t", std::vector<std::int64_t>{2, 2, 2}, ramp(8));
  writer.write(dir / "t.safetensors");
  const SafetensorsFile file(dir / "t.safetensors");
  EXPECT_THROW((void)file.to_matrix("t"), qlora::InvalidArgument);
  EXPECT_THROW((void)file.tensor("missing"), qlora::FormatError);
}

// Writes a two-shard checkpoint with its index into `dir`.
void write_sharded(const qlora::test::TempDir& dir, const std::string& index_text) {
  SafetensorsWriter first;
  first.add("model.embed_tokens.weight", std::vector<std::int64_t>{4, 2}, ramp(8),
            SafetensorsDtype::bf16);
  first.write(dir / "model-00001-of-00002.safetensors");
  SafetensorsWriter second;
  second.add("model.norm.weight", std::vector<std::int64_t>{2}, ramp(2));
  second.add("lm_head.weight", std::vector<std::int64_t>{4, 2}, ramp(8), SafetensorsDtype::f16);
  second.write(dir / "model-00002-of-00002.safetensors");
  qlora::test::write_text(dir / "model.safetensors.index.json", index_text);
}

const char* const kIndex = R"({
  "metadata": {"total_size": 52},
  "weight_map": {
    "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
    "model.norm.weight": "model-00002-of-00002.safetensors",
    "lm_head.weight": "model-00002-of-00002.safetensors"
  }
})";

TEST(safetensors_checkpoint, reads_sharded_directory) {
  const qlora::test::TempDir dir;
  write_sharded(dir, kIndex);
  const qlora::SafetensorsCheckpoint checkpoint(dir.path());
  EXPECT_EQ(checkpoint.shards().size(), 2u);
  EXPECT_EQ(checkpoint.tensor_names(),
            (std::vector<std::string>{"lm_head.weight", "model.embed_tokens.weight",
                                      "model.norm.weight"}));
  EXPECT_EQ(checkpoint.to_matrix("model.embed_tokens.weight").rows(), 4);
  EXPECT_EQ(checkpoint.tensor("lm_head.weight").dtype, "F16");
  EXPECT_EQ(checkpoint.to_float("model.norm.weight").size(), 2u);
  EXPECT_THAT([&] { (void)checkpoint.tensor("model.layers.0.mlp.up_proj.weight"); },
              ::testing::ThrowsMessage<qlora::FormatError>(
                  HasSubstr("model.layers.0.mlp.up_proj.weight")));
}

TEST(safetensors_checkpoint, reads_single_file_directory) {
  const qlora::test::TempDir dir;
  SafetensorsWriter writer;
  writer.add("x", std::vector<std::int64_t>{2}, ramp(2));
  writer.write(dir / "model.safetensors");
  const qlora::SafetensorsCheckpoint from_dir(dir.path());
  EXPECT_TRUE(from_dir.contains("x"));
  const qlora::SafetensorsCheckpoint from_file(dir / "model.safetensors");
  EXPECT_EQ(from_file.shards().size(), 1u);
}

TEST(safetensors_checkpoint, rejects_bad_indexes) {
  {
    const qlora::test::TempDir dir;
    write_sharded(dir, "{ not json");
    EXPECT_THROW(qlora::SafetensorsCheckpoint checkpoint(dir.path()), qlora::FormatError);
  }
  {
    const qlora::test::TempDir dir;
    write_sharded(dir, R"({"metadata": {}})");
    EXPECT_THAT([&] { qlora::SafetensorsCheckpoint checkpoint(dir.path()); },
                ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("weight_map")));
  }
  {
    const qlora::test::TempDir dir;
    write_sharded(dir, R"({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})");
    EXPECT_THAT([&] { qlora::SafetensorsCheckpoint checkpoint(dir.path()); },
                ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("does not hold it")));
  }
  {
    const qlora::test::TempDir dir;
    write_sharded(dir, R"({"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}})");
    EXPECT_THAT([&] { qlora::SafetensorsCheckpoint checkpoint(dir.path()); },
                ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("invalid shard")));
  }
  {
    const qlora::test::TempDir dir;
    EXPECT_THROW(qlora::SafetensorsCheckpoint checkpoint(dir.path()), qlora::IoError);
  }
}

}  // namespace
