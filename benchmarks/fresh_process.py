"""Run each benchmark measurement in a fresh process, forked from a server that imported the heavy modules once,
and read that process's own peak memory.

Runs then share no allocator state (each peak-memory reading is the run's own) and skip the seconds of imports.
"""

import gc
import multiprocessing as mp
import os
import tempfile
import traceback


def steady_environment(device: str, threads: int) -> None:
    """Environment for runs that repeat to the same step time and peak RSS; set before the fork server starts.

    TRL's trainer sends telemetry from a network thread during the run, and the tokenizers' thread pool gives each run
    a different malloc-arena layout: both make step time and peak RSS vary between identical runs (nothing is
    downloaded). A fixed mmap threshold turns off glibc's adaptive one, so freed tensor buffers go back to the OS and
    the peak RSS follows live memory rather than heap layout (runs of one configuration then agree within 0.2 MiB).
    """
    os.environ.update(
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        MALLOC_MMAP_THRESHOLD_="131072",
    )
    if device == "cpu":
        os.environ["OMP_NUM_THREADS"] = str(threads)


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
    return run_in_fresh_processes(context, run_once, [(recipe, label)], options)[0]


def run_in_fresh_processes(context, run_once, recipes: list[tuple], options: dict) -> list[dict]:
    """`run_once(recipe, options)` for every `(recipe, label)` at once, each in a new process of `context`; their
    results in order, or an error naming the label of the first that failed."""
    started = []
    for recipe, label in recipes:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_child, args=(run_once, recipe, options, sender))
        process.start()
        sender.close()
        started.append((label, receiver, process))
    results = []
    for label, receiver, process in started:
        try:
            status, payload = receiver.recv()
        except EOFError:
            status, payload = "error", "worker exited without a result"
        process.join()
        if status != "ok":
            raise RuntimeError(f"run of {label} failed:\n{payload}")
        results.append(payload)
    return results


def quiet_run(threads: int) -> None:
    """In a measured run: one torch thread count, and no warnings, progress bars or info logs on the console."""
    import logging
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("trl_plus").setLevel(logging.ERROR)
    torch.set_num_threads(threads)


class PeakMemory:
    """`with PeakMemory(on_cuda) as memory: ...`, then `memory.mib`: the block's peak memory increase, in MiB.

    On CUDA, allocated device memory; on CPU, the process's peak RSS (VmHWM) over its RSS when the block starts.
    """

    def __init__(self, on_cuda: bool):
        self.on_cuda = on_cuda
        self.mib = None

    def __enter__(self):
        import torch

        gc.collect()
        if self.on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._baseline = torch.cuda.memory_allocated()
        else:
            _reset_peak_rss()
            self._baseline = _read_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc_info):
        import torch

        if self.on_cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _read_status_kib("VmHWM") * 1024
        self.mib = (peak - self._baseline) / 2**20


def measured_run_settings(options: dict, eos_token_id: int, on_cuda: bool) -> dict:
    """The config settings every measured run shares: its own output dir under `options["work_dir"]`, bf16 only on
    CUDA, `options["steps"]` steps logged one by one, nothing saved or reported, and completions of exactly
    `options["completion_length"]` tokens (EOS is suppressed until the last position, then forced), so that step
    times compare."""
    length = options["completion_length"]
    return dict(
        output_dir=tempfile.mkdtemp(dir=options["work_dir"]),
        use_cpu=not on_cuda,
        bf16=on_cuda,
        max_completion_length=length,
        generation_kwargs={"min_new_tokens": length - 1, "forced_eos_token_id": eos_token_id},
        max_steps=options["steps"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )


def train_measured(trainer_class, args, *, model_path: str, reward_funcs, dataset, peft_config, on_cuda: bool) -> dict:
    """Build and train one trainer inside `PeakMemory`, without the console printer; returns the trainer, its peak
    memory increase (MiB), its step times and the mean completion lengths it logged."""
    import transformers

    with PeakMemory(on_cuda) as memory:
        trainer = trainer_class(
            model=model_path, reward_funcs=reward_funcs, args=args, train_dataset=dataset, peft_config=peft_config
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    history = trainer.state.log_history
    return {
        "trainer": trainer,
        "step_times": [entry["step_time"] for entry in history if "step_time" in entry],
        "peak_mib": memory.mib,
        "lengths": sorted({e["completions/mean_length"] for e in history if "completions/mean_length" in e}),
    }


def _read_status_kib(key: str) -> int:
    """A `/proc/self/status` field in KiB (`VmRSS`, `VmHWM`, ...)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that only this run's own peak is counted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # then VmHWM also holds the few MiB this process touched between the fork and the baseline
        pass
