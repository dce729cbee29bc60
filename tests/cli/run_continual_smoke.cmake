# `qlora continual` on the real model, kept short: two tasks into one run folder (the second
# resumes the saved bank and replays the first task's windows), the report in text and JSON,
# an exact merge and a compression of the task adapters, routing a prompt, the replay buffer
# cleared, and the settings that must not change between tasks rejected.
# Prints "skipped:" when the model is absent (run scripts/fetch-model).
if(NOT EXISTS "${MODEL}")
  message("skipped: ${MODEL} not found (run scripts/fetch-model)")
  return()
endif()
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(proverbs "")
set(numbers "")
set(control "")
foreach(i RANGE 30)
  string(APPEND proverbs "Proverb ${i}: a stitch in time saves nine, and haste makes waste.\n%\n")
  string(APPEND numbers "Sequence ${i}: 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144.\n%\n")
  string(APPEND control "Note ${i}: the meeting moved to Thursday afternoon.\n%\n")
endforeach()
file(WRITE "${WORK_DIR}/proverbs.txt" "${proverbs}")
file(WRITE "${WORK_DIR}/numbers.txt" "${numbers}")
file(WRITE "${WORK_DIR}/control.txt" "${control}")

function(run expect)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("$ ${ARGN}\n${out}${err}")
  if(expect STREQUAL "ok" AND NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed with ${rc}")
  elseif(NOT expect STREQUAL "ok")
    if(rc EQUAL 0)
      message(FATAL_ERROR "command succeeded, expected an error matching '${expect}'")
    endif()
    if(NOT "${out}${err}" MATCHES "${expect}")
      message(FATAL_ERROR "the error does not match '${expect}'")
    endif()
  endif()
  set(output "${out}${err}" PARENT_SCOPE)
endfunction()

set(settings --run "${WORK_DIR}/run" --separator % --targets q_proj,v_proj --alpha 8
    --steps 2 --seq-len 32 --batch 2 --eval-max-tokens 128 --eval-fraction 0.2 --threads 2
    --replay 8 --replay-fraction 0.5)
set(common ${settings} --rank 4)
run(ok "${QLORA}" continual learn "${MODEL}" "${WORK_DIR}/proverbs.txt" --task proverbs
    --control "${WORK_DIR}/control.txt" ${common})
run(ok "${QLORA}" continual learn "${MODEL}" "${WORK_DIR}/numbers.txt" --task numbers ${common})
if(NOT output MATCHES "1 replayed rows per micro-batch")
  message(FATAL_ERROR "the second task did not replay the first task's windows")
endif()
foreach(f run.json report.json report.txt state/continual.json state/report.json
          state/replay.safetensors state/held_out.safetensors
          state/adapters/proverbs/adapter_model.safetensors
          state/adapters/numbers/adapter_model.safetensors)
  if(NOT EXISTS "${WORK_DIR}/run/${f}")
    message(FATAL_ERROR "continual learn did not write ${f}")
  endif()
endforeach()
run(ok "${QLORA}" continual report --run "${WORK_DIR}/run")
if(NOT output MATCHES "forgetting" OR NOT output MATCHES "control drift")
  message(FATAL_ERROR "the report lacks its measures")
endif()
run(ok "${QLORA}" continual report --run "${WORK_DIR}/run" --json)
run(ok "${QLORA}" continual merge "${MODEL}" --run "${WORK_DIR}/run" --method concat
    -o "${WORK_DIR}/merged" --threads 2)
if(NOT output MATCHES "energy kept 1.0000" OR NOT EXISTS "${WORK_DIR}/merged/adapter_config.json")
  message(FATAL_ERROR "the exact merge did not keep all the energy or wrote no adapter")
endif()
run(ok "${QLORA}" continual merge "${MODEL}" --run "${WORK_DIR}/run" --tasks proverbs
    --method svd --rank 2 -o "${WORK_DIR}/compressed" --threads 2)
run(ok "${QLORA}" continual route "${MODEL}" --run "${WORK_DIR}/run"
    --prompt "Sequence 7: 1, 1, 2, 3, 5, 8" --threads 2)
if(NOT output MATCHES "<- chosen")
  message(FATAL_ERROR "route chose no adapter")
endif()
run("the run has no task 'poems'" "${QLORA}" continual merge "${MODEL}" --run "${WORK_DIR}/run"
    --tasks poems -o "${WORK_DIR}/bad")
run(ok "${QLORA}" continual clear-replay --run "${WORK_DIR}/run")
if(NOT output MATCHES "cleared 8 stored windows")
  message(FATAL_ERROR "clear-replay did not report the 8 windows it erased")
endif()
run("'rank' was 4 for the earlier tasks" "${QLORA}" continual learn "${MODEL}"
    "${WORK_DIR}/numbers.txt" --task more ${settings} --rank 8)
run("has its control set already" "${QLORA}" continual learn "${MODEL}"
    "${WORK_DIR}/numbers.txt" --task more --control "${WORK_DIR}/control.txt" ${common})
run("task 'numbers' was learnt already" "${QLORA}" continual learn "${MODEL}"
    "${WORK_DIR}/numbers.txt" --task numbers ${common})
