# Runs example_finetune, then example_generate with the adapter it wrote.
# Prints "skipped:" (which the test's SKIP_REGULAR_EXPRESSION turns into a skip) when the
# model file is absent: run scripts/fetch-model.
if(NOT EXISTS "${MODEL}")
  message("skipped: ${MODEL} not found (run scripts/fetch-model)")
  return()
endif()
file(REMOVE_RECURSE "${WORK_DIR}")
file(WRITE "${WORK_DIR}/text.txt"
  "The early bird catches the worm.\n%\nA penny saved is a penny earned.\n%\n"
  "Actions speak louder than words.\n%\nFortune favours the bold.\n%\n"
  "Knowledge is power.\n%\nTime is money.\n%\nPractice makes perfect.\n%\n"
  "Honesty is the best policy.\n%\nWhere there is a will, there is a way.\n%\n"
  "Look before you leap.\n%\nBetter late than never.\n%\nTwo heads are better than one.\n")
execute_process(COMMAND "${FINETUNE}" "${MODEL}" "${WORK_DIR}/text.txt" "${WORK_DIR}/run"
  RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "example_finetune failed with ${rc}")
endif()
execute_process(COMMAND "${GENERATE}" "${MODEL}" "${WORK_DIR}/run/checkpoint-4/adapter"
  "Knowledge is" RESULT_VARIABLE rc OUTPUT_VARIABLE out)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "example_generate failed with ${rc}")
endif()
