#!/usr/bin/env python3
"""Who pays for a stack-bench round trip: the bench thread's samples split between the bench's
client, the in-memory model server and the proxy under test (its request path), plus the spool
writer thread, each in microseconds per request. The stack bench runs all three on one thread,
so its time per request is their sum; this splits it, from call stacks.

    cargo bench --bench stack --no-run
    perf record -F 999 --call-graph dwarf,16384 -o full.data target/release/deps/stack-<hash> \\
        --bench 'stack_1KiB/sluicegate_full_grpc$' --profile-time 4
    perf script -i full.data | benches/owners.py 52.3   # the bench's time per request, µs

A sample belongs to the owner named by its innermost frame that names one (the connection or
task types carry the owner: the client's `Full<Bytes>` bodies, the model's service in
`stack::{impl#3}::call`, sluicegate's or the baseline proxy's own types).
"""
import collections
import sys

OWNERS = [
    ("client", ["grpc_round_trip", "stack::round_trip",
                "H2ClientFuture<http_body_util::full::Full",
                "dispatch::Client<http_body_util::full::Full"]),
    ("model", ["stack::{impl#3}::call"]),
    ("proxy", ["sluicegate::", "RequestBody", "ResponseBody", "stack::baseline_server",
               "client::legacy", "MemoryUpstream"]),
]


def owner(frames):
    for frame in frames:
        for name, keys in OWNERS:
            if any(k in frame for k in keys):
                return name
    return "unattributed"


def main(per_request_us):
    counts = collections.Counter()
    bench_samples = 0
    thread, frames = None, []

    def flush():
        nonlocal bench_samples
        if thread is None:
            return
        if thread.startswith("stack-"):
            bench_samples += 1
            counts[owner(frames)] += 1
        elif thread.startswith("sluicegate-spoo"):
            counts["spool writer thread"] += 1

    for line in sys.stdin:
        if not line.strip():
            flush()
            thread, frames = None, []
        elif not line.startswith((" ", "\t")):
            thread = line.split()[0]
        else:
            frames.append(line.strip())
    flush()
    print("| owner | share of the bench thread | µs per request |")
    print("|---|---:|---:|")
    for name, n in sorted(counts.items()):
        share = n / bench_samples
        print(f"| {name} | {100 * share:.1f}% | {per_request_us * share:.1f} |")


if __name__ == "__main__":
    main(float(sys.argv[1]))
