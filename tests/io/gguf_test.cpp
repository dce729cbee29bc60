// GGUF reader and writer on small files: the golden files of gguf-py (every dequantized type,
// every metadata type), writer round trips, version 2, and unsupported types.
#include "qlora/io/gguf.hpp"

#include <cmath>
#include <cstring>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "io/io_test_util.hpp"
#include "qlora/core/error.hpp"
#include "qlora/core/half.hpp"
#include "qlora/io/gguf_writer.hpp"
#include "support/compare.hpp"

namespace {

using ::testing::HasSubstr;
using qlora::GgmlType;
using qlora::GgufFile;
using qlora::GgufValue;
using qlora::GgufValueType;
using qlora::GgufWriter;

// gguf-py and qlora both compute each block value with one fp32 multiply and one fp32 add, so
// the golden comparison is exact.
constexpr double kExactTolerance = 0.0;

const std::filesystem::path kGoldenDir = std::filesystem::path(QLORA_SOURCE_DIR) / "tests" /
                                         "golden" / "gguf";

std::vector<float> read_f32_file(const std::filesystem::path& path) {
  const std::vector<std::uint8_t> bytes = qlora::test::read_bytes(path);
  std::vector<float> values(bytes.size() / sizeof(float));
  std::memcpy(values.data(), bytes.data(), values.size() * sizeof(float));
  return values;
}

struct GoldenCase {
  const char* file_stem;
  GgmlType type;
  std::int64_t rows;
  std::int64_t cols;
};

void PrintTo(const GoldenCase& golden, std::ostream* out) {
  *out << golden.file_stem << " [" << golden.rows << ", " << golden.cols << "]";
}

class gguf_golden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(gguf_golden, dequantize_matches_gguf_py) {
  const GoldenCase& golden = GetParam();
  const GgufFile file(kGoldenDir / (std::string(golden.file_stem) + ".gguf"));
  const qlora::GgufTensor& tensor = file.tensor("weight");
  ASSERT_EQ(tensor.type, golden.type);
  ASSERT_EQ(tensor.rows(), golden.rows);
  ASSERT_EQ(tensor.cols(), golden.cols);

  const qlora::RowMatrixF actual = file.dequantize(tensor);
  const std::vector<float> expected =
      read_f32_file(kGoldenDir / (std::string(golden.file_stem) + ".f32"));
  ASSERT_EQ(expected.size(), static_cast<std::size_t>(golden.rows * golden.cols));
  const std::span<const float> actual_span(actual.data(), static_cast<std::size_t>(actual.size()));
  EXPECT_TRUE(qlora::test::arrays_near(actual_span, std::span<const float>(expected),
                                       kExactTolerance));

  // Bit equality, so that -0.0 versus 0.0 also counts.
  std::vector<std::uint32_t> actual_bits(expected.size());
  std::vector<std::uint32_t> expected_bits(expected.size());
  std::memcpy(actual_bits.data(), actual.data(), expected.size() * 4);
  std::memcpy(expected_bits.data(), expected.data(), expected.size() * 4);
  EXPECT_TRUE(qlora::test::arrays_equal(std::span<const std::uint32_t>(actual_bits),
                                        std::span<const std::uint32_t>(expected_bits)));
}

TEST_P(gguf_golden, dequantize_rows_matches_whole_tensor) {
  const GoldenCase& golden = GetParam();
  const GgufFile file(kGoldenDir / (std::string(golden.file_stem) + ".gguf"));
  const qlora::GgufTensor& tensor = file.tensor("weight");
  const qlora::RowMatrixF whole = file.dequantize(tensor);
  qlora::RowMatrixF tail(golden.rows - 1, golden.cols);
  file.dequantize_rows(tensor, 1, golden.rows - 1, tail.data());
  EXPECT_EQ(tail, whole.bottomRows(golden.rows - 1));
}

INSTANTIATE_TEST_SUITE_P(
    types, gguf_golden,
    ::testing::Values(GoldenCase{"f32", GgmlType::f32, 3, 40},
                      GoldenCase{"f16", GgmlType::f16, 3, 40},
                      GoldenCase{"bf16", GgmlType::bf16, 3, 40},
                      GoldenCase{"q8_0", GgmlType::q8_0, 4, 96},
                      GoldenCase{"q4_0", GgmlType::q4_0, 4, 96},
                      GoldenCase{"q4_1", GgmlType::q4_1, 4, 96},
                      GoldenCase{"q5_0", GgmlType::q5_0, 4, 96},
                      GoldenCase{"q5_1", GgmlType::q5_1, 4, 96},
                      GoldenCase{"q4_k", GgmlType::q4_k, 3, 512},
                      GoldenCase{"q5_k", GgmlType::q5_k, 3, 512},
                      GoldenCase{"q6_k", GgmlType::q6_k, 3, 512}),
    [](const ::testing::TestParamInfo<GoldenCase>& param_info) {
      return param_info.param.file_stem;
    });

TEST(gguf_metadata, reads_every_value_type_from_gguf_py) {
  const GgufFile file(kGoldenDir / "metadata.gguf");
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 32u);
  EXPECT_EQ(file.get_string("general.architecture"), "test");
  EXPECT_EQ(file.at("test.uint8"), GgufValue(std::uint8_t{200}));
  EXPECT_EQ(file.at("test.int8"), GgufValue(std::int8_t{-100}));
  EXPECT_EQ(file.at("test.uint16"), GgufValue(std::uint16_t{60000}));
  EXPECT_EQ(file.at("test.int16"), GgufValue(std::int16_t{-30000}));
  EXPECT_EQ(file.at("test.uint32"), GgufValue(std::uint32_t{4000000000u}));
  EXPECT_EQ(file.at("test.int32"), GgufValue(std::int32_t{-2000000000}));
  EXPECT_EQ(file.at("test.float32"), GgufValue(0.1f));
  EXPECT_EQ(file.at("test.bool"), GgufValue(true));
  EXPECT_EQ(file.get_string("test.string"), "h\xc3\xa9llo GGUF");
  EXPECT_EQ(file.at("test.uint64"), GgufValue(std::uint64_t{18000000000000000000u}));
  EXPECT_EQ(file.at("test.int64"), GgufValue(std::int64_t{-9000000000000000000}));
  EXPECT_EQ(file.at("test.float64"), GgufValue(0.1));
  EXPECT_EQ(file.get_array<std::string>("test.array_string"),
            (std::vector<std::string>{"a", "bc", ""}));
  EXPECT_EQ(file.at("test.array_uint64").get_if<qlora::GgufArray>()->element_type,
            GgufValueType::uint64);
  EXPECT_EQ(file.get_array<std::uint32_t>("test.array_uint64"),
            (std::vector<std::uint32_t>{1, 2, 3}));
  EXPECT_EQ(file.get_array<float>("test.array_float32"), (std::vector<float>{0.5f, -1.5f}));

  const auto* nested = file.at("test.array_nested").get_if<qlora::GgufArray>();
  ASSERT_NE(nested, nullptr);
  ASSERT_EQ(nested->element_type, GgufValueType::array);
  ASSERT_EQ(nested->elements.size(), 2u);
  const auto* first = nested->elements[0].get_if<qlora::GgufArray>();
  ASSERT_NE(first, nullptr);
  ASSERT_EQ(first->elements.size(), 2u);
  EXPECT_EQ(first->elements[1].to_int64(), 2);
}

TEST(gguf_metadata, getters_convert_integer_widths) {
  const GgufFile file(kGoldenDir / "metadata.gguf");
  EXPECT_EQ(file.get_u32("test.uint8"), 200u);
  EXPECT_EQ(file.get_u64("test.uint32"), 4000000000u);
  EXPECT_EQ(file.get_i64("test.int8"), -100);
  EXPECT_EQ(file.get_f32("test.float64"), 0.1f);
  EXPECT_EQ(file.get_f64("test.float32"), static_cast<double>(0.1f));
  EXPECT_EQ(file.get_or<std::uint32_t>("test.absent", 7u), 7u);
}

TEST(gguf_metadata, getters_reject_wrong_types) {
  const GgufFile file(kGoldenDir / "metadata.gguf");
  EXPECT_THAT([&] { (void)file.get_u32("test.int8"); },
              ::testing::ThrowsMessage<qlora::FormatError>(
                  AllOf(HasSubstr("test.int8"), HasSubstr("INT8"))));
  EXPECT_THAT([&] { (void)file.get_u32("test.uint64"); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("32-bit unsigned")));
  EXPECT_THAT([&] { (void)file.get_string("test.uint32"); },
              ::testing::ThrowsMessage<qlora::FormatError>(
                  AllOf(HasSubstr("test.uint32"), HasSubstr("UINT32"), HasSubstr("STRING"))));
  EXPECT_THAT([&] { (void)file.get_f32("test.string"); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("FLOAT32 or FLOAT64")));
  EXPECT_THAT([&] { (void)file.get_bool("test.missing"); },
              ::testing::ThrowsMessage<qlora::FormatError>(
                  AllOf(HasSubstr("test.missing"), HasSubstr("missing"))));
  EXPECT_THAT([&] { (void)file.get_array<std::string>("test.uint8"); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("ARRAY")));
  EXPECT_THAT([&] { (void)file.get_array<std::string>("test.array_uint64"); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("STRING")));
  EXPECT_THAT([&] { (void)file.tensor("missing.weight"); },
              ::testing::ThrowsMessage<qlora::FormatError>(HasSubstr("missing.weight")));
}

const std::vector<std::int32_t> kInts = {1, -2, 3};

// Writes one entry of every type, nested arrays, and tensors of each storage path.
GgufWriter make_full_writer(std::uint32_t alignment = 32) {
  GgufWriter writer(alignment);
  writer.set("general.architecture", GgufValue("llama"));
  writer.set("a.uint8", GgufValue(std::uint8_t{1}));
  writer.set("a.int8", GgufValue(std::int8_t{-2}));
  writer.set("a.uint16", GgufValue(std::uint16_t{3}));
  writer.set("a.int16", GgufValue(std::int16_t{-4}));
  writer.set("a.uint32", GgufValue(std::uint32_t{5}));
  writer.set("a.int32", GgufValue(std::int32_t{-6}));
  writer.set("a.float32", GgufValue(7.5f));
  writer.set("a.bool", GgufValue(false));
  writer.set("a.string", GgufValue("eight"));
  writer.set("a.uint64", GgufValue(std::uint64_t{9}));
  writer.set("a.int64", GgufValue(std::int64_t{-10}));
  writer.set("a.float64", GgufValue(11.25));
  writer.set("a.array", GgufValue::array_of(std::span<const std::int32_t>(kInts)));
  writer.set("a.nested",
             GgufValue::array(GgufValueType::array,
                              {GgufValue::array(GgufValueType::string,
                                                {GgufValue("x"), GgufValue("yz")}),
                               GgufValue::array(GgufValueType::string, {})}));
  return writer;
}

TEST(gguf_writer, round_trips_metadata_and_tensors) {
  const qlora::test::TempDir dir;
  GgufWriter writer = make_full_writer();

  std::vector<float> values(2 * 64);
  for (std::size_t i = 0; i < values.size(); ++i) {
    values[i] = std::sin(static_cast<float>(i)) * 3.0f;
  }
  const std::int64_t shape[] = {2, 64};
  writer.add_tensor("w.f32", shape, values, GgmlType::f32);
  writer.add_tensor("w.f16", shape, values, GgmlType::f16);
  writer.add_tensor("w.bf16", shape, values, GgmlType::bf16);
  // Raw Q8_0 blocks: d = 0.5 and q = j - 16 for every block.
  std::vector<std::byte> q8(2 * 2 * 34);
  for (std::size_t block = 0; block < 4; ++block) {
    const std::uint16_t d = qlora::fp32_to_fp16(0.5f);
    std::memcpy(q8.data() + block * 34, &d, 2);
    for (int j = 0; j < 32; ++j) q8[block * 34 + 2 + static_cast<std::size_t>(j)] = std::byte(j - 16);
  }
  const std::int64_t ne[] = {64, 2};
  writer.add_tensor("w.q8_0", GgmlType::q8_0, ne, q8);
  writer.write(dir / "model.gguf");

  const GgufFile file(dir / "model.gguf");
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.metadata().size(), 15u);
  EXPECT_EQ(file.at("a.int16"), GgufValue(std::int16_t{-4}));
  EXPECT_EQ(file.at("a.float64"), GgufValue(11.25));
  EXPECT_EQ(file.get_array<std::int32_t>("a.array"), kInts);
  const auto* nested = file.at("a.nested").get_if<qlora::GgufArray>();
  ASSERT_NE(nested, nullptr);
  ASSERT_EQ(nested->elements.size(), 2u);
  const auto* strings = nested->elements[0].get_if<qlora::GgufArray>();
  const auto* empty = nested->elements[1].get_if<qlora::GgufArray>();
  ASSERT_NE(strings, nullptr);
  ASSERT_NE(empty, nullptr);
  ASSERT_EQ(strings->elements.size(), 2u);
  EXPECT_EQ(strings->elements[1], GgufValue("yz"));
  EXPECT_EQ(empty->element_type, GgufValueType::string);
  EXPECT_TRUE(empty->elements.empty());

  ASSERT_EQ(file.tensors().size(), 4u);
  EXPECT_EQ(file.tensor("w.f32").shape(), (std::vector<std::int64_t>{2, 64}));
  EXPECT_EQ(file.tensor("w.f32").ne[0], 64);
  const qlora::RowMatrixF f32 = file.dequantize("w.f32");
  EXPECT_EQ(f32, qlora::ConstMapRowMatrixF(values.data(), 2, 64));
  const qlora::RowMatrixF f16 = file.dequantize("w.f16");
  const qlora::RowMatrixF bf16 = file.dequantize("w.bf16");
  for (std::size_t i = 0; i < values.size(); ++i) {
    EXPECT_EQ(f16.data()[i], qlora::fp16_to_fp32(qlora::fp32_to_fp16(values[i])));
    EXPECT_EQ(bf16.data()[i], qlora::bf16_to_fp32(qlora::fp32_to_bf16(values[i])));
  }
  const qlora::RowMatrixF q8_values = file.dequantize("w.q8_0");
  EXPECT_EQ(q8_values(1, 33), 0.5f * (1 - 16));
  for (const qlora::GgufTensor& tensor : file.tensors()) {
    EXPECT_EQ(tensor.offset % file.alignment(), 0u) << tensor.name;
  }
}

TEST(gguf_writer, custom_alignment_is_written_and_used) {
  const qlora::test::TempDir dir;
  GgufWriter writer(64);
  const std::vector<float> values(3, 1.0f);
  const std::int64_t shape[] = {3};
  writer.add_tensor("a", shape, values);
  writer.add_tensor("b", shape, values);
  writer.write(dir / "aligned.gguf");
  const GgufFile file(dir / "aligned.gguf");
  EXPECT_EQ(file.alignment(), 64u);
  EXPECT_EQ(file.get_u32("general.alignment"), 64u);
  EXPECT_EQ(file.tensor("b").offset, 64u);
  EXPECT_EQ(file.data_offset() % 64, 0u);
}

TEST(gguf_writer, rejects_invalid_tensors) {
  GgufWriter writer;
  const std::vector<float> values(4, 0.0f);
  const std::int64_t shape[] = {2, 2};
  const std::int64_t wrong_shape[] = {3, 2};
  writer.add_tensor("x", shape, values);
  EXPECT_THROW(writer.add_tensor("x", shape, values), qlora::InvalidArgument);
  EXPECT_THROW(writer.add_tensor("y", wrong_shape, values), qlora::InvalidArgument);
  EXPECT_THROW(writer.add_tensor(std::string(64, 'n'), shape, values), qlora::InvalidArgument);
  EXPECT_THROW(writer.add_tensor("z", shape, values, GgmlType::q4_0), qlora::InvalidArgument);
  const std::int64_t ne[] = {16};  // not a whole Q8_0 block
  const std::vector<std::byte> bytes(34);
  EXPECT_THAT([&] { writer.add_tensor("q", GgmlType::q8_0, ne, bytes); },
              ::testing::ThrowsMessage<qlora::InvalidArgument>(HasSubstr("ne[0] % 32")));
  EXPECT_THROW(GgufWriter(24), qlora::InvalidArgument);
}

TEST(gguf_writer, failed_write_leaves_no_file) {
  const qlora::test::TempDir dir;
  const GgufWriter writer = make_full_writer();
  EXPECT_THROW(writer.write(dir / "missing_dir" / "model.gguf"), qlora::IoError);
  writer.write(dir / "model.gguf");
  std::size_t n_files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir.path())) {
    ++n_files;
  }
  EXPECT_EQ(n_files, 1u);  // no temporary file left behind
}

TEST(gguf_file, reads_version_2) {
  const qlora::test::TempDir dir;
  make_full_writer().write(dir / "v3.gguf");
  std::vector<std::uint8_t> bytes = qlora::test::read_bytes(dir / "v3.gguf");
  bytes[4] = 2;  // version 2 has the same little-endian layout as version 3
  qlora::test::write_bytes(dir / "v2.gguf", bytes);
  const GgufFile file(dir / "v2.gguf");
  EXPECT_EQ(file.version(), 2u);
  EXPECT_EQ(file.get_string("a.string"), "eight");
}

TEST(gguf_file, is_movable_and_spans_survive_the_move) {
  GgufFile file(kGoldenDir / "q4_k.gguf");
  const std::byte* data = file.tensor("weight").data.data();
  const GgufFile moved(std::move(file));
  EXPECT_EQ(moved.tensor("weight").data.data(), data);
  EXPECT_EQ(moved.dequantize("weight").rows(), 3);
}

TEST(gguf_file, unsupported_type_names_tensor_and_type) {
  const qlora::test::TempDir dir;
  GgufWriter writer;
  const std::int64_t ne[] = {32};
  const std::vector<std::byte> block(18);
  writer.add_tensor("blk.0.attn_q.weight", GgmlType::iq4_nl, ne, block);
  writer.write(dir / "iq4.gguf");
  const GgufFile file(dir / "iq4.gguf");
  EXPECT_THAT([&] { (void)file.dequantize("blk.0.attn_q.weight"); },
              ::testing::ThrowsMessage<qlora::NotImplemented>(
                  AllOf(HasSubstr("blk.0.attn_q.weight"), HasSubstr("IQ4_NL"))));
}

TEST(gguf_file, dequantize_rows_rejects_bad_ranges) {
  const GgufFile file(kGoldenDir / "q8_0.gguf");
  const qlora::GgufTensor& tensor = file.tensor("weight");
  std::vector<float> out(static_cast<std::size_t>(tensor.n_elements()));
  EXPECT_THROW(file.dequantize_rows(tensor, 3, 2, out.data()), qlora::InvalidArgument);
  EXPECT_THROW(file.dequantize_rows(tensor, -1, 1, out.data()), qlora::InvalidArgument);
  EXPECT_NO_THROW(file.dequantize_rows(tensor, 4, 0, out.data()));
}

TEST(ggml_types, traits_match_ggml) {
  EXPECT_EQ(qlora::ggml_type_traits(GgmlType::q5_k).type_size, 176);
  EXPECT_EQ(qlora::ggml_type_traits(GgmlType::q6_k).type_size, 210);
  EXPECT_EQ(qlora::ggml_type_traits(GgmlType::q4_k).block_size, 256);
  EXPECT_EQ(qlora::to_string(GgmlType::bf16), "BF16");
  EXPECT_FALSE(qlora::ggml_type_traits(4u).has_value());   // retired Q4_2
  EXPECT_FALSE(qlora::ggml_type_traits(99u).has_value());
}

}  // namespace
