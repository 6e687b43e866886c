# Builds and runs tests/consumer/app against attnkit, as a separate project would.
#   MODE=installed: install attnkit to a temporary prefix, find_package(attnkit CONFIG REQUIRED),
#                   then also compile the same app with the flags of the installed attnkit.pc.
#   MODE=subdir:    add_subdirectory(<attnkit source>).
cmake_minimum_required(VERSION 3.25)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(app_dir ${ATTNKIT_SOURCE_DIR}/tests/consumer/app)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  message(STATUS "${out}")
endfunction()

if(MODE STREQUAL "installed")
  set(prefix ${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${ATTNKIT_BINARY_DIR} --prefix ${prefix})
  if(NOT EXISTS ${prefix}/share/doc/attnkit/LICENSE)
    message(FATAL_ERROR "the installed package lacks share/doc/attnkit/LICENSE")
  endif()
  run(${CMAKE_COMMAND} -S ${app_dir} -B ${WORK_DIR}/build -DCMAKE_CXX_COMPILER=${CXX}
      -DCMAKE_PREFIX_PATH=${prefix} -DATTNKIT_CONSUMER_MODE=installed)
elseif(MODE STREQUAL "subdir")
  run(${CMAKE_COMMAND} -S ${app_dir} -B ${WORK_DIR}/build -DCMAKE_CXX_COMPILER=${CXX}
      -DATTNKIT_CONSUMER_MODE=subdir -DATTNKIT_SOURCE=${ATTNKIT_SOURCE_DIR})
else()
  message(FATAL_ERROR "MODE must be installed or subdir")
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
run(${WORK_DIR}/build/consumer_app)

if(MODE STREQUAL "installed")
  find_program(PKG_CONFIG pkg-config)
  if(PKG_CONFIG)
    set(ENV{PKG_CONFIG_PATH} ${prefix}/share/pkgconfig)
    execute_process(COMMAND ${PKG_CONFIG} --cflags --libs attnkit OUTPUT_VARIABLE flags RESULT_VARIABLE rc
                    OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "pkg-config --cflags attnkit failed")
    endif()
    execute_process(COMMAND ${PKG_CONFIG} --variable=license attnkit OUTPUT_VARIABLE license
                    OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT license STREQUAL "Apache-2.0")
      message(FATAL_ERROR "pkg-config --variable=license attnkit: expected Apache-2.0, got '${license}'")
    endif()
    separate_arguments(flags UNIX_COMMAND "${flags}")
    run(${CXX} ${app_dir}/main.cpp ${flags} -o ${WORK_DIR}/consumer_app_pc)
    run(${WORK_DIR}/consumer_app_pc)
  endif()
endif()
