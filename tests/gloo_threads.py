"""For the torchrun workers in tests/: how many of gloo's threads are still running in this process."""
import os


def gloo_threads():
    """The number of threads named gloo (worker and transport loops); None without Linux's /proc."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return None
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "comm")) as f:
                names.append(f.read())
        except OSError:  # the thread ended while we listed them
            continue
    return sum("gloo" in n for n in names)
