"""Benchmark the sandbox: requests/s for sendText and chat with concurrent keep-alive httpx clients.

    .venv/bin/python bench/bench_sandbox.py [--seconds 3] [--clients 16] [--processes 2]

Load: ``--processes`` client processes x ``--clients / --processes`` threads, each thread with its own
keep-alive ``httpx.Client``, hammering one route for ``--seconds``. As a reference measured in the
same run (SPEC §7: machines are noisy, state ratios), the same load is pointed at a bare stdlib
``ThreadingHTTPServer`` that answers ``{}``: the ratio says how much the sandbox's own work costs.
The target is >= 1000 req/s per route.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

from sandbox.testing import SandboxProcess

TARGET_RPS = 1000.0


def _worker(
    url: str,
    route: str,
    headers: dict[str, str],
    threads: int,
    seconds: float,
    start_at: float,
    out: mp.Queue[tuple[int, int]],
) -> None:
    """One client process: ``threads`` threads, each with its own keep-alive client."""
    counts = [0] * threads
    errors = [0] * threads
    stop_at = start_at + seconds

    def loop(i: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=10.0, trust_env=False) as client:
            n = 0
            while time.time() < start_at:
                time.sleep(0.001)
            while time.time() < stop_at:
                n += 1
                try:
                    if route == "send":
                        r = client.post(
                            "/message/sendText/bench-1",
                            json={
                                "number": f"55119{os.getpid() % 1000:03d}{i:02d}{n % 100:02d}",
                                "text": f"bench {os.getpid()} {i} {n}",
                            },
                        )
                    elif route == "chat":
                        r = client.post(
                            "/api/v1/chat/completions",
                            json={
                                "model": "bench/model",
                                "max_tokens": 200,
                                "temperature": 0.7,
                                "messages": [
                                    {"role": "system", "content": "Write a short friendly message."},
                                    {"role": "user", "content": f"<lead>\nname: Ana {i}\ncompany: Acme {n}\n</lead>"},
                                ],
                            },
                        )
                    else:
                        r = client.post("/", json={"n": n})
                    if r.status_code < 300:
                        counts[i] += 1
                    else:
                        errors[i] += 1
                except httpx.HTTPError:
                    errors[i] += 1

    ts = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out.put((sum(counts), sum(errors)))


def run_load(
    url: str, route: str, headers: dict[str, str], clients: int, processes: int, seconds: float
) -> tuple[float, int]:
    """Run the load; return (successful requests/s, errors)."""
    ctx = mp.get_context("spawn")
    out: mp.Queue[tuple[int, int]] = ctx.Queue()
    per = max(1, clients // processes)
    start_at = time.time() + 1.5  # let every process import httpx and connect first
    procs = [
        ctx.Process(target=_worker, args=(url, route, headers, per, seconds, start_at, out)) for _ in range(processes)
    ]
    for p in procs:
        p.start()
    ok = err = 0
    for _ in procs:
        a, b = out.get(timeout=seconds + 60)
        ok += a
        err += b
    for p in procs:
        p.join()
    return ok / seconds, err


class _BareHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"{}"
        self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n" + body)


def _bare_server(port_out: mp.Queue[int]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BareHandler)
    server.daemon_threads = True
    port_out.put(server.server_address[1])
    server.serve_forever()


def main() -> int:
    """Run the benchmark and print the figures."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients in total")
    p.add_argument("--processes", type=int, default=2, help="client processes")
    p.add_argument("--no-reference", action="store_true", help="skip the bare-server reference")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = p.parse_args()

    results: dict[str, float] = {}
    print(
        f"bench_sandbox: {args.clients} keep-alive clients in {args.processes} processes, "
        f"{args.seconds:.0f} s per route, {os.cpu_count()} CPUs"
    )
    if not args.no_reference:
        ctx = mp.get_context("spawn")
        q: mp.Queue[int] = ctx.Queue()
        bare = ctx.Process(target=_bare_server, args=(q,), daemon=True)
        bare.start()
        port = q.get(timeout=30)
        rps, err = run_load(f"http://127.0.0.1:{port}", "bare", {}, args.clients, args.processes, args.seconds)
        bare.terminate()
        bare.join()
        results["reference_bare"] = rps
        print(f"  reference bare stdlib server : {rps:8.0f} req/s  (errors {err})")
    with SandboxProcess(seed=0) as sb:
        for route, headers in (
            ("send", {"apikey": sb.evolution_key}),
            ("chat", {"Authorization": f"Bearer {sb.chat_key}"}),
        ):
            sb.reset()
            rps, err = run_load(sb.url, route, headers, args.clients, args.processes, args.seconds)
            results[route] = rps
            summary = sb.summary()
            ratio = f"  = {rps / results['reference_bare']:.2f} x reference" if "reference_bare" in results else ""
            verdict = "OK" if rps >= TARGET_RPS else "BELOW TARGET"
            print(
                f"  sandbox {route:<5}               : {rps:8.0f} req/s  (errors {err}, ledger requests "
                f"{summary['requests']}){ratio}  [{verdict} >= {TARGET_RPS:.0f}]"
            )
    if args.json:
        print(json.dumps(results))
    return 0 if all(results[r] >= TARGET_RPS for r in ("send", "chat")) else 1


if __name__ == "__main__":
    sys.exit(main())
