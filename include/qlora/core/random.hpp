// A small, fully specified random number generator.
//
// qlora draws initial weights, dropout masks and data shuffles from this generator rather
// than from <random>'s distributions, whose algorithms differ between standard libraries, so
// that the same seed gives the same numbers on every platform and compiler. The engine is
// xoshiro256** (Blackman and Vigna, 2018) seeded through splitmix64.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>

namespace qlora {

/// Returns the splitmix64 successor of `state` and advances it; also a good 64-bit mixer.
constexpr std::uint64_t splitmix64(std::uint64_t& state) noexcept {
  state += 0x9e3779b97f4a7c15ull;
  std::uint64_t z = state;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/// Mixes two values into one seed, for deriving per-layer or per-step seeds.
constexpr std::uint64_t mix_seed(std::uint64_t a, std::uint64_t b) noexcept {
  std::uint64_t state = a ^ (b * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull);
  return splitmix64(state);
}

class Rng {
 public:
  explicit constexpr Rng(std::uint64_t seed = 0) noexcept { reseed(seed); }

  constexpr void reseed(std::uint64_t seed) noexcept {
    std::uint64_t sm = seed;
    for (auto& word : s_) word = splitmix64(sm);
  }

  /// Returns the next 64 random bits.
  constexpr std::uint64_t next() noexcept {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }

  /// Returns a float uniform in [0, 1) with 24 random bits.
  constexpr float uniform() noexcept {
    return static_cast<float>(next() >> 40) * 0x1p-24f;
  }

  /// Returns a float uniform in [low, high).
  constexpr float uniform(float low, float high) noexcept {
    return low + (high - low) * uniform();
  }

  /// Returns a double uniform in [0, 1) with 53 random bits.
  constexpr double uniform_double() noexcept {
    return static_cast<double>(next() >> 11) * 0x1p-53;
  }

  /// Returns a standard normal draw (Box-Muller; uses two uniforms per call).
  double normal() noexcept {
    const double u1 = 1.0 - uniform_double();  // in (0, 1], so the log is finite
    const double u2 = uniform_double();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

  /// Returns an integer uniform in [0, n) for n > 0, without modulo bias (draws below
  /// 2^64 mod n are rejected).
  constexpr std::uint64_t below(std::uint64_t n) noexcept {
    const std::uint64_t threshold = (0 - n) % n;
    for (;;) {
      const std::uint64_t x = next();
      if (x >= threshold) return x % n;
    }
  }

  /// The generator state, for checkpoints.
  constexpr std::array<std::uint64_t, 4> state() const noexcept { return s_; }
  constexpr void set_state(const std::array<std::uint64_t, 4>& s) noexcept { s_ = s; }

 private:
  static constexpr std::uint64_t rotl(std::uint64_t x, int k) noexcept {
    return (x << k) | (x >> (64 - k));
  }

  std::array<std::uint64_t, 4> s_{};
};

}  // namespace qlora
