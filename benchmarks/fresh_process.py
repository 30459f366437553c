"""Run each benchmark measurement in a fresh process, forked from a server that imported the heavy modules once,
and read that process's own peak memory.

Runs then share no allocator state (each peak-memory reading is the run's own) and skip the seconds of imports.
"""

import multiprocessing as mp
import traceback


def fork_server_context(heavy_modules: list[str]):
    """A multiprocessing context whose processes start from a server that already imported `heavy_modules`."""
    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    context = mp.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(heavy_modules)
    return context


def _child(run_once, recipe, options: dict, connection) -> None:
    try:
        connection.send(("ok", run_once(recipe, options)))
    except BaseException:  # report any failure to the parent instead of dying silently
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_in_fresh_process(context, run_once, recipe, options: dict, label: str) -> dict:
    """`run_once(recipe, options)` in a new process of `context`; its result, or an error naming `label`."""
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(run_once, recipe, options, sender))
    process.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "worker exited without a result"
    process.join()
    if status != "ok":
        raise RuntimeError(f"run of {label} failed:\n{payload}")
    return payload


def read_status_kib(key: str) -> int:
    """A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`, ...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that only this run's own peak is counted; False if unable
    (then VmHWM also holds what this process touched between the fork and the baseline)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True
