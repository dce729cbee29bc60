#include "qlora/core/version.hpp"

#define QLORA_STRINGIFY_IMPL(x) #x
#define QLORA_STRINGIFY(x) QLORA_STRINGIFY_IMPL(x)

namespace qlora {

const char* version_string() noexcept {
  return QLORA_STRINGIFY(QLORA_VERSION_MAJOR) "." QLORA_STRINGIFY(
      QLORA_VERSION_MINOR) "." QLORA_STRINGIFY(QLORA_VERSION_PATCH);
}

}  // namespace qlora
