# The CLI's main path on the real model, kept short: finetune a few steps (from a LoftQ
# start on two layers' q_proj and v_proj, to keep LoftQ's SVDs quick), generate with the
# adapter, export it as PEFT and GGUF, merge it, and check the files each step promises.
# Prints "skipped:" when the model is absent (run scripts/fetch-model).
if(NOT EXISTS "${MODEL}")
  message("skipped: ${MODEL} not found (run scripts/fetch-model)")
  return()
endif()
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(text "")
foreach(i RANGE 40)
  string(APPEND text "Proverb ${i}: a stitch in time saves nine, and haste makes waste.\n%\n")
endforeach()
file(WRITE "${WORK_DIR}/data.txt" "${text}")

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("$ ${ARGN}\n${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "command failed with ${rc}")
  endif()
endfunction()

run("${QLORA}" finetune "${MODEL}" "${WORK_DIR}/data.txt" --separator % -o "${WORK_DIR}/run"
    --init loftq --targets q_proj,v_proj --layers 0-1 --rank 4 --alpha 8 --steps 3
    --seq-len 32 --batch 2 --eval-max-rows 2 --eval-fraction 0.2 --threads 2)
foreach(f adapter/adapter_config.json adapter/adapter_model.safetensors metrics.jsonl
          loss_curve.svg checkpoint-3/trainer_state.json latest)
  if(NOT EXISTS "${WORK_DIR}/run/${f}")
    message(FATAL_ERROR "finetune did not write ${f}")
  endif()
endforeach()
run("${QLORA}" generate "${MODEL}" --adapter "${WORK_DIR}/run/adapter" --prompt "A stitch"
    --max-tokens 8 --temperature 0 --threads 2)
run("${QLORA}" export "${WORK_DIR}/run/adapter" --format peft -o "${WORK_DIR}/peft")
run("${QLORA}" export "${WORK_DIR}/run/adapter" --format gguf --model "${MODEL}"
    -o "${WORK_DIR}/adapter.gguf")
run("${QLORA}" info "${WORK_DIR}/peft")
run("${QLORA}" merge "${MODEL}" --adapter "${WORK_DIR}/run/adapter" --type q8_0
    -o "${WORK_DIR}/merged.gguf" --threads 2)
run("${QLORA}" info "${WORK_DIR}/merged.gguf")
