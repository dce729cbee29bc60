# `mpiexec -n 2 qlora finetune` on the real model: a 2-rank run trains and only rank 0 writes;
# a different seed on rank 1 is rejected with one error; a rank that fails ends the job with
# an error naming it. Skips when the model is missing (scripts/fetch-model fetches it).
#   cmake -DQLORA=... -DMODEL=... -DDATA=... -DWORK_DIR=... "-DMPIEXEC=mpiexec;-n;2;..."
#         -P run_mpi_cli.cmake
if(NOT EXISTS "${MODEL}")
  message("skipped: ${MODEL} not found (run scripts/fetch-model)")
  return()
endif()
file(REMOVE_RECURSE "${WORK_DIR}")
set(common --separator % --steps 2 --seq-len 32 --batch 1 --rank 4 --dropout 0 --threads 1
  --eval-max-rows 2)

# Splits MPIEXEC ("mpiexec;-n;2;flags...") into the launcher flags for an MPMD launch.
list(GET MPIEXEC 0 launcher)
list(SUBLIST MPIEXEC 3 -1 launcher_flags)

execute_process(COMMAND ${MPIEXEC} "${QLORA}" finetune "${MODEL}" "${DATA}" -o "${WORK_DIR}/run"
    ${common}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(NOT rc EQUAL 0 OR NOT out MATCHES "data parallel: 2 ranks, 2 rows per step")
  message(FATAL_ERROR "2-rank finetune failed (exit ${rc}):\n${out}")
endif()
file(STRINGS "${WORK_DIR}/run/metrics.jsonl" train_lines REGEX "\"type\":\"train\"")
list(LENGTH train_lines n_train)
if(NOT n_train EQUAL 2)
  message(FATAL_ERROR "expected 2 training lines in metrics.jsonl (rank 0 only), got ${n_train}")
endif()
if(NOT EXISTS "${WORK_DIR}/run/adapter/adapter_model.safetensors")
  message(FATAL_ERROR "the 2-rank run wrote no adapter")
endif()

execute_process(COMMAND "${launcher}" ${launcher_flags}
    -n 1 "${QLORA}" finetune "${MODEL}" "${DATA}" -o "${WORK_DIR}/seed" ${common} --seed 1 :
    -n 1 "${QLORA}" finetune "${MODEL}" "${DATA}" -o "${WORK_DIR}/seed" ${common} --seed 2
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0 OR NOT out MATCHES "the ranks disagree on the seed: rank 1")
  message(FATAL_ERROR "a different seed on rank 1 was not rejected (exit ${rc}):\n${out}")
endif()

execute_process(COMMAND "${launcher}" ${launcher_flags}
    -n 1 "${QLORA}" finetune "${MODEL}" "${DATA}" -o "${WORK_DIR}/fail" ${common} :
    -n 1 "${QLORA}" finetune "${MODEL}" "${WORK_DIR}/missing.txt" -o "${WORK_DIR}/fail" ${common}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
if(rc EQUAL 0 OR NOT out MATCHES "error on rank 1 of 2: .*missing.txt")
  message(FATAL_ERROR "a failing rank 1 did not end the job with its error (exit ${rc}):\n${out}")
endif()
if(EXISTS "${WORK_DIR}/fail/adapter")
  message(FATAL_ERROR "the failed job left an adapter behind")
endif()
message("mpi cli: 2-rank run, seed mismatch and failing rank behave")
