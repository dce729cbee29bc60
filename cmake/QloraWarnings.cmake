# Warning flags for qlora's own targets; consumers never inherit them.

# Adds the project's warning set to `target`, and -Werror when QLORA_WARNINGS_AS_ERRORS is on.
function(qlora_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE
      -Wall -Wextra -Wpedantic -Wconversion -Wsign-conversion -Wshadow
      -Wnon-virtual-dtor -Wold-style-cast -Wcast-align -Wnull-dereference
      -Wimplicit-fallthrough)
    if(QLORA_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()
