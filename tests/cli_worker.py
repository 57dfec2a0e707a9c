"""Run by tests/test_distributed.py under torchrun: ``dagfm_ext run`` exactly as the CLI runs it,
then one line with the number of gloo threads this rank still runs. It must be 0: a gloo worker
thread still releasing a backward's all-reduce while the interpreter exits aborts the process."""
import sys

from gloo_threads import gloo_threads

from dagfm_ext.cli import main

if __name__ == "__main__":
    rc = main(sys.argv[1:])
    print(f"gloo threads after run: {gloo_threads()}", flush=True)
    sys.exit(rc)
