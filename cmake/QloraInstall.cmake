# Install rules: headers, the library, the exported qlora::qlora target, and a package
# config with a version file so that consumers can write find_package(qlora CONFIG REQUIRED).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(QLORA_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/qlora")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/qlora"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS qlora
  EXPORT qloraTargets
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}"
  INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
if(TARGET qlora_cli)
  install(TARGETS qlora_cli RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}")
endif()
install(EXPORT qloraTargets
  NAMESPACE qlora::
  DESTINATION "${QLORA_CMAKE_DIR}")

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/qloraConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/qloraConfig.cmake"
  INSTALL_DESTINATION "${QLORA_CMAKE_DIR}")
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/qloraConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES
  "${PROJECT_BINARY_DIR}/qloraConfig.cmake"
  "${PROJECT_BINARY_DIR}/qloraConfigVersion.cmake"
  DESTINATION "${QLORA_CMAKE_DIR}")
