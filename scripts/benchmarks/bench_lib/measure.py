"""Measurement primitives: timing, honest peak memory, memory caps, and the fresh-process runner.

Memory on CPU is the peak resident-set-size delta of the process that runs the point: the kernel's high-water mark
(`VmHWM`) is reset through `/proc/self/clear_refs` after the model and inputs exist, so the figure covers exactly
the measured steps (tracemalloc cannot see torch's CPU tensors). Where that reset is unavailable a sampling thread
reads the RSS every 2 ms instead. On CUDA it is `torch.cuda.max_memory_allocated()` minus the allocation before
the steps.
"""

import multiprocessing
import os
import platform
import re
import resource
import statistics
import threading
import time
import traceback
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc", "memoryerror")


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def is_oom(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or any(marker in text for marker in OOM_MARKERS)


def failure(error: BaseException) -> dict:
    """A point's status and error after `error`: "oom" when it ran out of memory, "error" otherwise."""
    return {"status": "oom" if is_oom(error) else "error", "error": f"{type(error).__name__}: {error}"[:500]}


def outcome(record: dict, ok) -> str:
    """What a progress line says of a point: `ok(record)` when it ran, else its error (or why it was skipped)."""
    return ok(record) if record["status"] == "ok" else record.get("error", record.get("reason", ""))[:100]


def cap_address_space(cap_bytes: int | None) -> None:
    """Limit this process's address space to its current size + `cap_bytes` (CPU only), so that running out of
    memory raises inside torch ("can't allocate memory") instead of waking the kernel's OOM killer on a shared
    machine."""
    if not cap_bytes:
        return
    size = _status_kb("VmSize")
    if size is None:
        return
    limit = size + int(cap_bytes)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def pin_mmap_threshold(threshold_kb: int | None) -> bool:
    """glibc only: serve every allocation of `threshold_kb` KiB or more by mmap and trim freed memory above it (a
    fixed threshold, no dynamic raise), so that the resident set follows the live tensors and its peak is the step's
    own peak rather than one inflated by freed blocks kept in the heap. Returns whether it was applied."""
    if not threshold_kb:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        size = int(threshold_kb) * 1024
        return bool(libc.mallopt(-3, size)) and bool(libc.mallopt(-1, size))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def default_memory_cap() -> int:
    """60% of the memory available now, at most 16 GiB."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:
        available = 8 << 30
    return int(min(0.6 * available, 16 << 30))


class PeakMemory:
    """Peak memory (bytes) above the level at `start()`, for CPU (RSS) or CUDA (allocated)."""

    def __init__(self, device: str):
        self.device = device
        self.method = None
        self._thread = None

    def start(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated delta"
            return
        self.base = current_rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.method = "peak RSS delta (VmHWM reset via /proc/self/clear_refs), fresh process"
            return
        except OSError:
            pass
        self.method = "peak RSS delta (2 ms sampling), fresh process"
        self._peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, current_rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def peak(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        if self._thread is not None:
            self._peak = max(self._peak, current_rss())
            return max(0, self._peak - self.base)
        return max(0, (_status_kb("VmHWM") or current_rss()) - self.base)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_call(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


# `time_s` of a point: the median of its timed runs, or the fastest (on a loaded machine)
TIME_STATISTICS = ("median", "min")


def timed_repeats(
    fn, device: str, repeats: int, time_target: float, warmup: int = 1, statistic: str = "median"
) -> dict:
    """Run `fn` `warmup` times, then up to `repeats` times within about `time_target` seconds (at least once).

    Returns the median (or with `statistic="min"` the fastest) and every timed run; when the warm-up alone used the
    budget (`repeats_done == 0`) the warm-up time is reported and flagged.
    """
    warm_times = [time_call(fn, device) for _ in range(warmup)]
    warm = warm_times[-1] if warm_times else 0.0
    n = repeats if warm * repeats <= time_target else int(time_target // max(warm, 1e-9))
    times = [time_call(fn, device) for _ in range(max(0, min(repeats, n)))]
    if not times:
        return {"time_s": warm, "times_s": [], "warmup_s": warm_times, "repeats_done": 0}
    value = min(times) if statistic == "min" else statistics.median(times)
    return {"time_s": value, "times_s": times, "warmup_s": warm_times, "repeats_done": len(times)}


def _child(conn, target, kwargs):
    try:
        result = target(**kwargs)
    except BaseException as error:  # report everything; the parent decides what it means
        result = {
            "status": "oom" if is_oom(error) else "error",
            "error": f"{type(error).__name__}: {str(error)[:500]}",
            "traceback": traceback.format_exc()[-2000:] if not is_oom(error) else None,
        }
    try:
        conn.send(result)
    finally:
        conn.close()


def run_fresh(target, kwargs: dict, timeout: float, start_method: str = "fork") -> dict:
    """Run `target(**kwargs)` in a fresh process and return its dict; `status` is "timeout" when it ran past
    `timeout` seconds (the process is killed), "oom" when it ran out of memory or was killed by the kernel."""
    ctx = multiprocessing.get_context(start_method)
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(child_conn, target, kwargs), daemon=True)
    start = time.perf_counter()
    process.start()
    child_conn.close()
    result = None
    if parent_conn.poll(timeout):
        try:
            result = parent_conn.recv()
        except EOFError:
            result = None
    elapsed = time.perf_counter() - start
    if process.is_alive():
        if result is None:
            process.kill()
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()
    if result is None:
        code = process.exitcode
        if elapsed >= timeout * 0.99:
            result = {"status": "timeout", "error": f"no result within the {timeout:.0f} s budget (process killed)"}
        elif code is not None and code < 0 and -code == 9:
            result = {"status": "oom", "error": "killed by SIGKILL (kernel OOM killer)"}
        else:
            result = {"status": "error", "error": f"worker exited with code {code} without a result"}
    result["wall_s"] = round(elapsed, 3)
    return result


def median(values):
    return statistics.median(values) if values else None


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), or what `platform` says where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
