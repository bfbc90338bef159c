#!/usr/bin/env python3
"""Self time of a `perf report --no-children --sort comm,symbol --stdio` by thread and by kind
of work: the tables in bench-results/profile-*.md.

    cargo bench --bench stack --no-run
    perf record -F 999 -g -o full16k.data target/release/deps/stack-<hash> \\
        --bench 'stack_16KiB/sluicegate_full' --profile-time 10
    perf report -i full16k.data --no-children --sort comm,symbol --stdio > full16k.txt
    benches/profile.py full16k.txt
"""
import collections
import re
import sys

KINDS = [
    ("Ed25519 signing (curve25519, sha512)", r"curve25519|sha512|ed25519"),
    ("malloc/free", r"malloc|_int_free|cfree|unlink_chunk|malloc_consolidate|realloc"),
    ("memmove/memcpy/memcmp", r"memmove|memcpy|memcmp|memset"),
    ("serde_json parse (Value, ignore_*, numbers)",
     r"serde_json::de|serde_json::value::de|ValueVisitor|drop_in_place<serde_json|DeserializeSeed|Visitor"),
    ("serde_json serialize (escaping, floats)", r"serde_json::ser|format_escaped|zmij|grisu|flt2dec|Serialize"),
    ("hyper/http/httparse (both proxy sides and the bench harness)", r"hyper|http::|httparse|h2::"),
    ("kernel", r"\[k\]"),
    ("sluicegate own code", r"sluicegate::"),
]
THREADS = [
    (r"^stack-", "request path (bench thread)"),
    (r"^sluicegate-spoo", "spool writer thread"),
    (r"^sluicegate-kafk|^rdk:", "Kafka sender and librdkafka"),
]


def thread_name(comm):
    for pattern, name in THREADS:
        if re.search(pattern, comm):
            return name
    return comm


def main(path):
    by_thread = collections.defaultdict(lambda: collections.defaultdict(float))
    for line in open(path):
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+(.*)", line)
        if not m:
            continue
        share, comm, symbol = float(m.group(1)), m.group(2), m.group(3)
        kind = next((k for k, r in KINDS if re.search(r, symbol)), "other")
        by_thread[thread_name(comm)][kind] += share
    print("| thread / work | self time |\n|---|---:|")
    for thread, kinds in sorted(by_thread.items(), key=lambda t: -sum(t[1].values())):
        print(f"| **{thread}** | **{sum(kinds.values()):.1f}%** |")
        for kind, share in sorted(kinds.items(), key=lambda k: -k[1]):
            if share >= 0.1:
                print(f"| {kind} | {share:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1])
