"""Bench-only instrumentation: where does a worker process's memory go over many messages?

Loaded into a worker by naming it on the command line after the engine's actors
(``dramatiq actors bench.memtrace``), like bench/dbcount.py; nothing of the engine changes. Active
only when ``BENCH_MEMTRACE_DIR`` is set. Then, in every worker process:

* ``tracemalloc`` traces Python allocations (``BENCH_MEMTRACE_FRAMES`` frames, default 10);
* every ``BENCH_MEMTRACE_EVERY`` seconds (default 5) one JSON line goes to ``<dir>/<pid>.jsonl``:
  messages processed, VmRSS, the Python heap as tracemalloc sees it, glibc's own view of the heap
  (``mallinfo2``: bytes in use vs free-but-kept), gc object count, threads, open files;
* when the process's processed-message count crosses a value of ``BENCH_MEMTRACE_SNAP_AT``
  (comma-separated, e.g. ``500,2500``), or when a file ``<dir>/request-<label>`` appears (see
  :func:`request_snapshot`), a tracemalloc snapshot is dumped to ``<dir>/<pid>-<label>.snap`` with the
  object counts by type next to it (``<pid>-<label>.types.json``).

Reading the figures: a real leak shows as tracemalloc ``current`` and the gc object count growing with
the messages; allocator behaviour shows as a flat Python heap while RSS (and mallinfo2's ``free``
bytes kept in the arenas) creeps.

Analysis (in the benchmark process, or by hand)::

    .venv/bin/python bench/memtrace.py DIR            # series + top growth between first/last snapshots
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import gc
import json
import linecache
import logging
import os
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

log = logging.getLogger("bench.memtrace")

_processed = 0
_lock = threading.Lock()
_thread: threading.Thread | None = None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def mallinfo() -> dict[str, int]:
    """glibc's heap figures in bytes (all arenas): ``used`` by malloc'd blocks, ``free`` kept in arenas,
    ``mmap`` in large direct mappings; empty when not on glibc >= 2.33."""
    if _LIBC is None:
        return {}
    mi = _LIBC.mallinfo2()
    return {"arena": mi.arena, "used": mi.uordblks, "free": mi.fordblks, "mmap": mi.hblkhd, "keepcost": mi.keepcost}


def malloc_info(path: Path) -> None:
    """glibc's malloc_info(3) XML (free chunks by size class, per arena) written to ``path``."""
    if _LIBC is None:
        return
    _LIBC.fopen.restype = ctypes.c_void_p
    _LIBC.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    _LIBC.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    _LIBC.fclose.argtypes = [ctypes.c_void_p]
    fp = _LIBC.fopen(str(path).encode(), b"w")
    if fp:
        try:
            _LIBC.malloc_info(0, fp)
        finally:
            _LIBC.fclose(fp)


def malloc_trim() -> None:
    """Give free arena memory back to the OS (for experiments: does RSS fall to the heap?)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _status() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmData", "Threads"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def sample() -> dict[str, Any]:
    """One line of figures for this process."""
    current, peak = tracemalloc.get_traced_memory() if tracemalloc.is_tracing() else (0, 0)
    st = _status()
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    return {
        "t": time.time(),
        "pid": os.getpid(),
        "processed": _processed,
        "rss_kb": st.get("VmRSS", 0),
        "anon_kb": st.get("RssAnon", 0),
        "data_kb": st.get("VmData", 0),
        "threads": st.get("Threads", 0),
        "traced": current,
        "traced_peak": peak,
        "tracemalloc_overhead": tracemalloc.get_tracemalloc_memory(),
        "gc_objects": len(gc.get_objects()),
        "fds": fds,
        "malloc": mallinfo(),
    }


def type_counts(top: int = 60) -> dict[str, int]:
    """Live gc-tracked objects by type name (the ``top`` most common)."""
    c = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return dict(c.most_common(top))


def _snapshot(directory: Path, label: str) -> None:
    if label == "trim":
        # the allocator probe: how much of RSS is memory glibc keeps free in its arenas?
        before = sample()
        malloc_trim()
        (directory / f"{os.getpid()}-trim.json").write_text(json.dumps({"before": before, "after": sample()}))
        return
    malloc_info(directory / f"{os.getpid()}-{label}.malloc.xml")
    if not tracemalloc.is_tracing():  # light mode (BENCH_MEMTRACE_FRAMES=0): object counts only
        (directory / f"{os.getpid()}-{label}.types.json").write_text(
            json.dumps({"processed": _processed, "sample": sample(), "types": type_counts()})
        )
        return
    snap = tracemalloc.take_snapshot().filter_traces(
        (
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        )
    )
    path = directory / f"{os.getpid()}-{label}.snap"
    snap.dump(str(path))
    (directory / f"{os.getpid()}-{label}.types.json").write_text(
        json.dumps({"processed": _processed, "sample": sample(), "types": type_counts()})
    )
    log.info("memtrace pid=%s: snapshot %s at %s messages", os.getpid(), path, _processed)


def _loop(directory: Path, every: float, snap_at: list[int]) -> None:
    pending = sorted(snap_at)
    served: set[str] = set()
    out = directory / f"{os.getpid()}.jsonl"
    # experiment: what a periodic malloc_trim(0) in the worker would do to RSS (0 = never)
    trim_every = float(os.environ.get("BENCH_MEMTRACE_TRIM_EVERY", "0"))
    next_trim = time.monotonic() + trim_every
    while True:
        if trim_every and time.monotonic() >= next_trim:
            started = time.perf_counter()
            malloc_trim()
            log.info(
                "memtrace pid=%s: malloc_trim(0) took %.1f ms", os.getpid(), 1000 * (time.perf_counter() - started)
            )
            next_trim = time.monotonic() + trim_every
        try:
            with out.open("a") as f:
                f.write(json.dumps(sample()) + "\n")
            while pending and _processed >= pending[0]:
                _snapshot(directory, str(pending.pop(0)))
            for req in sorted(directory.glob("request-*")):
                label = req.name[len("request-") :]
                if label not in served:
                    served.add(label)
                    _snapshot(directory, label)
        except Exception:  # never take the worker down for a measurement
            log.warning("memtrace pid=%s: sampling failed", os.getpid(), exc_info=True)
        time.sleep(every)


def _start() -> None:
    global _thread
    directory = os.environ.get("BENCH_MEMTRACE_DIR")
    if not directory or (_thread is not None and _thread.is_alive()):
        return
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if os.environ.get("BENCH_MEMTRACE_FRAMES", "10") != "0" and not tracemalloc.is_tracing():
        tracemalloc.start(int(os.environ.get("BENCH_MEMTRACE_FRAMES", "10")))
    snap_at = [int(x) for x in os.environ.get("BENCH_MEMTRACE_SNAP_AT", "").split(",") if x.strip()]
    _thread = threading.Thread(
        target=_loop,
        args=(d, float(os.environ.get("BENCH_MEMTRACE_EVERY", "5")), snap_at),
        name="bench-memtrace",
        daemon=True,
    )
    _thread.start()


def _register_middleware() -> None:
    import dramatiq
    from dramatiq.middleware import Middleware

    class CountMessages(Middleware):
        """Starts the sampler in each worker process and counts the messages it handled."""

        def before_worker_boot(self, broker: Any, worker: Any) -> None:
            _start()

        def after_process_message(
            self, broker: Any, message: Any, *, result: Any = None, exception: Any = None
        ) -> None:
            global _processed
            with _lock:
                _processed += 1

        def after_skip_message(self, broker: Any, message: Any) -> None:
            global _processed
            with _lock:
                _processed += 1

    dramatiq.get_broker().add_middleware(CountMessages())


# --------------------------------------------------------------------------------------------
# analysis (benchmark side)


def request_snapshot(directory: Path, label: str, pids: list[int], timeout: float = 120) -> bool:
    """Ask every worker process for a snapshot ``label`` and wait until ``pids`` have written it
    (label ``trim``: call malloc_trim(0) and record RSS before/after instead)."""
    (directory / f"request-{label}").write_text("")
    suffix = ".json" if label == "trim" else ".types.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((directory / f"{pid}-{label}{suffix}").exists() for pid in pids):
            return True
        time.sleep(0.5)
    return False


def read_series(directory: Path) -> dict[int, list[dict[str, Any]]]:
    """Every process's samples, by pid."""
    out: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("*.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # the last line may be half-written
        if rows:
            out[rows[0]["pid"]] = rows
    return out


def _fmt_row(r: dict[str, Any]) -> str:
    mi = r.get("malloc") or {}
    return (
        f"msgs={r['processed']:6d} rss={r['rss_kb'] / 1024:7.1f} anon={r['anon_kb'] / 1024:7.1f} "
        f"py_heap={r['traced'] / 2**20:6.1f} tm_overhead={r['tracemalloc_overhead'] / 2**20:5.1f} "
        f"malloc_used={mi.get('used', 0) / 2**20:6.1f} malloc_free={mi.get('free', 0) / 2**20:6.1f} "
        f"mmap={mi.get('mmap', 0) / 2**20:5.1f} gc_objs={r['gc_objects']:7d} thr={r['threads']} fds={r['fds']}"
    )


def print_series(directory: Path, points: int = 8) -> None:
    """A few evenly spaced samples per process (RSS next to Python heap, malloc free, gc objects)."""
    for pid, rows in read_series(directory).items():
        print(f"   pid {pid}: {len(rows)} samples")
        step = max(1, len(rows) // points)
        for r in rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else []):
            print("     " + _fmt_row(r))


def print_trim(directory: Path) -> None:
    """RSS and glibc free bytes before/after malloc_trim(0) in every process that answered."""
    for path in sorted(directory.glob("*-trim.json")):
        doc = json.loads(path.read_text())
        b, a = doc["before"], doc["after"]
        print(
            f"   pid {b['pid']}: malloc_trim(0): RSS {b['rss_kb'] / 1024:.1f} -> {a['rss_kb'] / 1024:.1f} MiB, "
            f"malloc free {b['malloc'].get('free', 0) / 2**20:.1f} -> {a['malloc'].get('free', 0) / 2**20:.1f} MiB"
        )


def compare(directory: Path, first: str, last: str, top: int = 15, key: str = "traceback") -> None:
    """Top growth sites between two snapshot labels, per process, plus object-count growth by type."""
    for a in sorted(directory.glob(f"*-{first}.types.json")):
        pid = a.name.split("-", 1)[0]
        if not (directory / f"{pid}-{last}.types.json").exists():
            continue
        ta = json.loads(a.read_text())
        tb = json.loads((directory / f"{pid}-{last}.types.json").read_text())
        n = max(1, tb["processed"] - ta["processed"])
        sa, sb = ta["sample"], tb["sample"]
        print(
            f"   pid {pid}: {first} -> {last} ({n} deliveries): RSS {sb['rss_kb'] - sa['rss_kb']:+d} KiB, "
            f"gc objects {sb['gc_objects'] - sa['gc_objects']:+d}, malloc used "
            f"{(sb['malloc'].get('used', 0) - sa['malloc'].get('used', 0)) / 1024:+.0f} KiB, free "
            f"{(sb['malloc'].get('free', 0) - sa['malloc'].get('free', 0)) / 1024:+.0f} KiB"
        )
        print("   object count growth by type:")
        grow = {t: tb["types"].get(t, 0) - ta["types"].get(t, 0) for t in set(ta["types"]) | set(tb["types"])}
        for t, d in sorted(grow.items(), key=lambda kv: -abs(kv[1]))[:12]:
            print(f"     {d:+8d}  {t}")
        snap_a, snap_b = directory / f"{pid}-{first}.snap", directory / f"{pid}-{last}.snap"
        if not (snap_a.exists() and snap_b.exists()):
            continue
        s1, s2 = tracemalloc.Snapshot.load(str(snap_a)), tracemalloc.Snapshot.load(str(snap_b))
        total = sum(st.size for st in s2.statistics("filename")) - sum(st.size for st in s1.statistics("filename"))
        print(f"   traced Python heap {total / 1024:+.0f} KiB ({total / n:+.0f} B/delivery)")
        print(f"   top {top} growth sites by {key}:")
        for st in s2.compare_to(s1, key)[:top]:
            print(f"     {st.size_diff / 1024:+9.1f} KiB {st.count_diff:+7d} blocks  (now {st.size / 1024:.0f} KiB)")
            frames = st.traceback.format(limit=8 if key == "traceback" else 1)
            for line in frames:
                if line.strip():
                    print("        " + line.rstrip())


def main(argv: list[str]) -> int:
    """``memtrace.py DIR [first last]``: print the series and compare snapshots."""
    if not argv:
        print(__doc__)
        return 2
    d = Path(argv[0])
    print_series(d)
    # labels in the order they were taken
    labels = [
        p.name.split("-", 1)[1][: -len(".types.json")]
        for p in sorted(d.glob("*.types.json"), key=lambda p: p.stat().st_mtime)
    ]
    labels = list(dict.fromkeys(labels))
    first, last = (
        (argv[1], argv[2]) if len(argv) >= 3 else (labels[0], labels[-1]) if len(labels) >= 2 else (None, None)
    )
    if first and last:
        compare(d, first, last)
    print_trim(d)
    linecache.clearcache()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
elif os.environ.get("BENCH_MEMTRACE_DIR"):
    _register_middleware()
