// Malformed GGUF and safetensors files: each must raise qlora::FormatError with a message that
// names the problem, never crash or read outside the file (the asan preset runs these too).
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "io/io_test_util.hpp"
#include "qlora/core/error.hpp"
#include "qlora/io/gguf.hpp"
#include "qlora/io/gguf_writer.hpp"
#include "qlora/io/safetensors.hpp"

namespace {

using ::testing::HasSubstr;
using qlora::test::GgufBytes;

constexpr std::uint64_t kHuge = std::uint64_t{1} << 62;
constexpr std::uint32_t kTypeF32 = 0;
constexpr std::uint32_t kTypeQ8_0 = 8;
constexpr unsigned kFuzzSeed = 1234;
constexpr int kFuzzRounds = 500;

struct MalformedCase {
  std::string name;
  std::vector<std::uint8_t> bytes;
  std::string expected_message;  // a substring of the error
};

// A valid file with one F32 tensor of 8 elements, used as the base of several cases.
GgufBytes one_tensor_prefix(std::vector<std::uint64_t> ne = {8}, std::uint32_t type = kTypeF32,
                            std::uint64_t offset = 0) {
  GgufBytes file;
  file.header(1, 1).kv_str("general.architecture", "llama").tensor_info("t", ne, type, offset);
  return file;
}

std::vector<MalformedCase> gguf_cases() {
  std::vector<MalformedCase> cases;
  const auto add = [&](std::string name, const GgufBytes& file, std::string message) {
    cases.push_back({std::move(name), file.bytes(), std::move(message)});
  };

  add("empty", GgufBytes(), "file ends inside the magic number");
  add("bad_magic", GgufBytes().u32(0x46554746).u32(3).u64(0).u64(0), "is not a GGUF file");
  add("version_1", GgufBytes().header(0, 0, 1), "unsupported GGUF version: got 1");
  add("version_4", GgufBytes().header(0, 0, 4), "unsupported GGUF version: got 4");
  add("big_endian", GgufBytes().header(0, 0, 0x03000000), "big-endian");
  add("truncated_counts", GgufBytes().u32(0x46554747).u32(3).u64(0), "the metadata count");
  add("huge_tensor_count", GgufBytes().header(kHuge, 0), "tensor count is too large");
  add("huge_metadata_count", GgufBytes().header(0, kHuge), "metadata count is too large");
  add("key_length_past_eof", GgufBytes().header(0, 1).u64(1000).u32(4).zeros(4),
      "string length past the end");
  add("value_string_past_eof", GgufBytes().header(0, 1).str("k").u32(8).u64(kHuge),
      "string length past the end");
  add("unknown_value_type", GgufBytes().header(0, 1).str("k").u32(13).u32(0),
      "unknown value type: got 13");
  add("invalid_bool", GgufBytes().header(0, 1).str("k").u32(7).u8(2), "invalid BOOL");
  add("huge_array", GgufBytes().header(0, 1).str("k").u32(9).u32(4).u64(kHuge),
      "array too long");
  add("unknown_array_type", GgufBytes().header(0, 1).str("k").u32(9).u32(77).u64(1),
      "unknown array element type");
  add("truncated_array", GgufBytes().header(0, 1).str("k").u32(9).u32(4).u64(3).u32(1),
      "array too long");
  {
    GgufBytes deep;
    deep.header(0, 1).str("k").u32(9);
    for (int i = 0; i < 20; ++i) deep.u32(9).u64(1);
    deep.u32(4).u64(1).u32(0);
    add("nested_too_deep", deep, "nests arrays too deeply");
  }
  add("duplicate_key", GgufBytes().header(0, 2).kv_u32("k", 1).kv_u32("k", 2), "appears twice");
  add("alignment_not_power_of_two", GgufBytes().header(0, 1).kv_u32("general.alignment", 24),
      "general.alignment is invalid");
  add("alignment_wrong_type", GgufBytes().header(0, 1).kv_str("general.alignment", "32"),
      "general.alignment is invalid");

  add("n_dims_5", one_tensor_prefix({1, 1, 1, 1, 8}).pad_to(32).zeros(32), "too many dimensions");
  add("unknown_type_id", one_tensor_prefix({8}, 99).pad_to(32).zeros(32),
      "unknown or retired ggml type: got type id 99");
  add("retired_type_id", one_tensor_prefix({32}, 4).pad_to(32).zeros(64),
      "unknown or retired ggml type: got type id 4");
  add("row_not_whole_blocks", one_tensor_prefix({16}, kTypeQ8_0).pad_to(32).zeros(64),
      "ne[0] % 32 == 0");
  add("size_overflow", one_tensor_prefix({kHuge, kHuge}).pad_to(32).zeros(32),
      "overflows 64 bits");
  add("dimension_above_int64", one_tensor_prefix({std::uint64_t{1} << 63}).pad_to(32).zeros(32),
      "dimension that overflows");
  add("offset_past_end", one_tensor_prefix({8}, kTypeF32, 64).pad_to(32).zeros(32),
      "lies outside the file");
  add("offset_huge", one_tensor_prefix({8}, kTypeF32, kHuge).pad_to(32).zeros(32),
      "lies outside the file");
  add("offset_misaligned", one_tensor_prefix({4}, kTypeF32, 4).pad_to(32).zeros(64),
      "misaligned");
  add("data_truncated", one_tensor_prefix({8}).pad_to(32).zeros(16), "lies outside the file");
  add("no_data_section", one_tensor_prefix({8}), "ends before its data section");
  add("tensor_name_past_eof", GgufBytes().header(1, 0).u64(500).zeros(40), "string length past the end");
  {
    GgufBytes file;
    file.header(2, 0).tensor_info("a", {8}, kTypeF32, 0).tensor_info("a", {8}, kTypeF32, 32);
    add("duplicate_tensor", file.pad_to(32).zeros(64), "tensor name 'a' appears twice");
  }
  {
    GgufBytes file;
    file.header(2, 0).tensor_info("a", {16}, kTypeF32, 0).tensor_info("b", {8}, kTypeF32, 32);
    add("overlapping_tensors", file.pad_to(32).zeros(96), "overlap");
  }
  return cases;
}

TEST(gguf_malformed, each_case_raises_format_error) {
  const qlora::test::TempDir dir;
  for (const MalformedCase& malformed : gguf_cases()) {
    SCOPED_TRACE(malformed.name);
    const auto path = dir / (malformed.name + ".gguf");
    qlora::test::write_bytes(path, malformed.bytes);
    EXPECT_THAT([&] { const qlora::GgufFile file(path); },
                ::testing::ThrowsMessage<qlora::FormatError>(AllOf(
                    HasSubstr(malformed.expected_message), HasSubstr(path.string()))));
  }
}

TEST(gguf_malformed, base_of_the_tensor_cases_is_valid) {
  const qlora::test::TempDir dir;
  qlora::test::write_bytes(dir / "ok.gguf", one_tensor_prefix().pad_to(32).zeros(32).bytes());
  const qlora::GgufFile file(dir / "ok.gguf");
  EXPECT_EQ(file.tensor("t").n_elements(), 8);
}

TEST(gguf_malformed, every_truncation_raises_format_error) {
  const qlora::test::TempDir dir;
  qlora::GgufWriter writer;
  writer.set("general.architecture", qlora::GgufValue("llama"));
  writer.set("a.u32", qlora::GgufValue(std::uint32_t{7}));
  writer.set("a.list", qlora::GgufValue::array(qlora::GgufValueType::string,
                                               {qlora::GgufValue("x"), qlora::GgufValue("y")}));
  writer.set("a.f64", qlora::GgufValue(1.5));
  const std::vector<float> values(8, 1.0f);  // 32 bytes: the file ends with no padding
  const std::int64_t shape_a[] = {2, 12};
  const std::int64_t shape_b[] = {8};
  const std::vector<float> values_a(24, 2.0f);
  writer.add_tensor("a", shape_a, values_a);
  writer.add_tensor("b", shape_b, values);
  writer.write(dir / "full.gguf");
  const std::vector<std::uint8_t> full = qlora::test::read_bytes(dir / "full.gguf");
  ASSERT_NO_THROW(qlora::GgufFile(dir / "full.gguf"));

  const auto path = dir / "cut.gguf";
  for (std::size_t length = 0; length < full.size(); ++length) {
    SCOPED_TRACE(length);
    qlora::test::write_bytes(path,
                             std::vector<std::uint8_t>(full.begin(),
                                                       full.begin() + static_cast<long>(length)));
    EXPECT_THROW(qlora::GgufFile file(path), qlora::FormatError);
  }
}

// Flips random bytes of a valid file. Each result must either open (and then dequantize
// without reading outside the file) or raise qlora::FormatError; anything else fails.
TEST(gguf_malformed, random_byte_flips_never_crash) {
  const qlora::test::TempDir dir;
  qlora::GgufWriter writer;
  writer.set("general.architecture", qlora::GgufValue("llama"));
  writer.set("a.list", qlora::GgufValue::array(qlora::GgufValueType::uint32,
                                               {qlora::GgufValue(std::uint32_t{1}),
                                                qlora::GgufValue(std::uint32_t{2})}));
  const std::vector<float> values(64, 0.25f);
  const std::int64_t shape[] = {2, 32};
  writer.add_tensor("f16", shape, values, qlora::GgmlType::f16);
  const std::int64_t ne[] = {32, 2};
  const std::vector<std::byte> q4_blocks(2 * 18, std::byte{0x11});
  writer.add_tensor("q4", qlora::GgmlType::q4_0, ne, q4_blocks);
  writer.write(dir / "base.gguf");
  const std::vector<std::uint8_t> base = qlora::test::read_bytes(dir / "base.gguf");

  std::mt19937 rng(kFuzzSeed);
  const auto path = dir / "flipped.gguf";
  int n_opened = 0;
  for (int round = 0; round < kFuzzRounds; ++round) {
    std::vector<std::uint8_t> bytes = base;
    const int n_flips = 1 + static_cast<int>(rng() % 4);
    for (int i = 0; i < n_flips; ++i) {
      bytes[rng() % bytes.size()] ^= static_cast<std::uint8_t>(1u << (rng() % 8));
    }
    qlora::test::write_bytes(path, bytes);
    try {
      const qlora::GgufFile file(path);
      for (const qlora::GgufTensor& tensor : file.tensors()) {
        if (qlora::ggml_type_traits(tensor.type).can_dequantize) (void)file.dequantize(tensor);
      }
      ++n_opened;
    } catch (const qlora::FormatError&) {
      // expected for most flips
    }
  }
  EXPECT_GT(n_opened, 0);  // flips inside tensor data leave a valid file
}

TEST(gguf_malformed, missing_file_raises_io_error) {
  EXPECT_THAT([] { const qlora::GgufFile file("/nonexistent/model.gguf"); },
              ::testing::ThrowsMessage<qlora::IoError>(HasSubstr("/nonexistent/model.gguf")));
}

// safetensors: an 8-byte header length, then the JSON header, then the data buffer.
std::vector<std::uint8_t> safetensors_bytes(const std::string& header, std::size_t data_size,
                                            std::uint64_t declared_length = 0) {
  const std::uint64_t length = declared_length != 0 ? declared_length : header.size();
  std::vector<std::uint8_t> bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<std::uint8_t>(length >> (8 * i)));
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), data_size, 0);
  return bytes;
}

std::vector<MalformedCase> safetensors_cases() {
  const std::string one = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  return {
      {"too_short", {1, 2, 3}, "too short for a header length"},
      {"length_past_eof", safetensors_bytes(one, 8, 1000), "header length is invalid"},
      {"length_huge", safetensors_bytes(one, 8, kHuge), "header length is invalid"},
      {"not_json", safetensors_bytes("{not json}", 0), "not valid JSON"},
      {"not_object_start", safetensors_bytes("[1, 2]", 0), "does not start with '{'"},
      {"gap", safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                                12),
       "not contiguous"},
      {"overlap", safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                    R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                                    8),
       "not contiguous"},
      {"dtype_size_mismatch",
       safetensors_bytes(R"({"a":{"dtype":"F16","shape":[2],"data_offsets":[0,8]}})", 8),
       "do not match its dtype and shape"},
      {"unknown_dtype",
       safetensors_bytes(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}})", 1),
       "unknown dtype"},
      {"data_past_eof", safetensors_bytes(one, 4), "past the end of the file"},
      {"trailing_bytes", safetensors_bytes(one, 12), "tensors cover 8"},
      {"duplicate_name",
       safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                         R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         8),
       "appears twice"},
      {"metadata_not_string",
       safetensors_bytes(R"({"__metadata__":{"format":1},)"
                         R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                         8),
       "is not a string"},
      {"negative_shape",
       safetensors_bytes(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "invalid shape"},
      {"shape_overflow",
       safetensors_bytes(
           R"({"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}})", 8),
       "overflows 64 bits"},
      {"offsets_wrong_arity",
       safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8),
       "invalid data_offsets"},
      {"entry_missing_fields", safetensors_bytes(R"({"a":{"dtype":"F32"}})", 0),
       "invalid header entry"},
  };
}

TEST(safetensors_malformed, each_case_raises_format_error) {
  const qlora::test::TempDir dir;
  for (const MalformedCase& malformed : safetensors_cases()) {
    SCOPED_TRACE(malformed.name);
    const auto path = dir / (malformed.name + ".safetensors");
    qlora::test::write_bytes(path, malformed.bytes);
    EXPECT_THAT([&] { const qlora::SafetensorsFile file(path); },
                ::testing::ThrowsMessage<qlora::FormatError>(AllOf(
                    HasSubstr(malformed.expected_message), HasSubstr(path.string()))));
  }
}

TEST(safetensors_malformed, every_truncation_raises_format_error) {
  const qlora::test::TempDir dir;
  qlora::SafetensorsWriter writer;
  const std::vector<float> values(6, 1.0f);
  const std::int64_t shape[] = {2, 3};
  writer.add("x", shape, values);
  writer.add("y", shape, values, qlora::SafetensorsDtype::bf16);
  writer.write(dir / "full.safetensors");
  const std::vector<std::uint8_t> full = qlora::test::read_bytes(dir / "full.safetensors");
  ASSERT_NO_THROW(qlora::SafetensorsFile(dir / "full.safetensors"));

  const auto path = dir / "cut.safetensors";
  for (std::size_t length = 0; length < full.size(); ++length) {
    SCOPED_TRACE(length);
    qlora::test::write_bytes(path,
                             std::vector<std::uint8_t>(full.begin(),
                                                       full.begin() + static_cast<long>(length)));
    EXPECT_THROW(qlora::SafetensorsFile file(path), qlora::FormatError);
  }
}

TEST(safetensors_malformed, random_byte_flips_never_crash) {
  const qlora::test::TempDir dir;
  qlora::SafetensorsWriter writer;
  const std::vector<float> values(6, 1.0f);
  writer.add("x", std::vector<std::int64_t>{2, 3}, values);
  writer.add("y", std::vector<std::int64_t>{6}, values, qlora::SafetensorsDtype::f16);
  writer.write(dir / "base.safetensors");
  const std::vector<std::uint8_t> base = qlora::test::read_bytes(dir / "base.safetensors");

  std::mt19937 rng(kFuzzSeed);
  const auto path = dir / "flipped.safetensors";
  for (int round = 0; round < kFuzzRounds; ++round) {
    std::vector<std::uint8_t> bytes = base;
    bytes[rng() % bytes.size()] ^= static_cast<std::uint8_t>(1u << (rng() % 8));
    qlora::test::write_bytes(path, bytes);
    try {
      const qlora::SafetensorsFile file(path);
      for (const qlora::SafetensorsTensor& tensor : file.tensors()) {
        try {
          (void)file.to_float(tensor);
        } catch (const qlora::NotImplemented&) {
          // a flipped dtype name can turn F32 into another valid dtype
        }
      }
    } catch (const qlora::FormatError&) {
      // expected for most flips
    }
  }
}

}  // namespace
