#!/usr/bin/env python3
"""Capacity model for sharding mxcas metadata over many raft groups (docs/design/sharding.md).

Driven by figures measured with scripts/bench-cluster.sh (pass them as arguments); simulates
how CIDs spread over digest ranges that split at a size limit, and prints how many groups and
nodes N records need and how evenly load falls on them.

  scripts/shard_model.py --records 1e9 --commits-per-group 20000 --bytes-per-record 400
"""
import argparse
import hashlib
import math
import os
import random


def simulate_ranges(sample, max_per_range):
    """Splits the 64-bit digest-prefix space at the median until no range holds more than
    max_per_range of the sampled keys (what range splitting converges to). Returns the key
    counts per range."""
    keys = sorted(int.from_bytes(hashlib.sha256(os.urandom(16)).digest()[:8], "big") for _ in range(sample))
    ranges = [(0, len(keys))]
    done = []
    while ranges:
        lo, hi = ranges.pop()
        if hi - lo <= max_per_range:
            done.append(hi - lo)
        else:
            mid = (lo + hi) // 2
            ranges += [(lo, mid), (mid, hi)]
    return done


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=float, default=1e9, help="media/content records to hold")
    p.add_argument("--records-per-group", type=float, default=10e6, help="split limit per raft group")
    p.add_argument("--commits-per-group", type=float, required=True, help="measured CommitUpload/s of one 3-node group")
    p.add_argument("--bytes-per-record", type=float, required=True, help="measured state bytes per record")
    p.add_argument("--rss-per-replica-mib", type=float, required=True,
                   help="measured RSS of one metadata node (its redb caches are bounded, so RSS is not linear in records)")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--node-memory-gib", type=float, default=16)
    p.add_argument("--node-disk-gib", type=float, default=500)
    p.add_argument("--upload-rate", type=float, default=100e3, help="cluster-wide uploads/s to carry")
    p.add_argument("--sample", type=int, default=200_000)
    a = p.parse_args()

    scale = a.records / a.sample
    counts = simulate_ranges(a.sample, max(1, int(a.records_per_group / scale)))
    groups = len(counts)
    mean = sum(counts) / groups
    skew = max(counts) / mean
    state_gib = a.records * a.bytes_per_record / 2**30
    # Memory per replica is its bounded redb caches (the measured RSS), not its state size;
    # the state lives on disk (with the OS page cache as a bonus).
    per_replica_gib = state_gib / groups
    replicas = groups * a.replicas
    nodes_by_memory = math.ceil(replicas * a.rss_per_replica_mib / 1024 / (a.node_memory_gib * 0.6))
    nodes_by_disk = math.ceil(replicas * per_replica_gib * 3 / a.node_disk_gib)  # state + snapshot + log
    # Uploads hash uniformly over CIDs: the busiest group gets skew x its share.
    busiest = a.upload_rate / groups * skew
    print(f"records                         {a.records:,.0f}")
    print(f"raft groups after splitting     {groups} (split at {a.records_per_group:,.0f} records)")
    print(f"records per group, mean / max   {mean * scale:,.0f} / {max(counts) * scale:,.0f} (skew {skew:.2f})")
    print(f"state, all groups               {state_gib:,.1f} GiB ({per_replica_gib:.2f} GiB per replica)")
    print(f"replicas ({a.replicas} per group)            {replicas}")
    print(f"nodes needed (memory, disk)     {max(nodes_by_memory, nodes_by_disk, a.replicas)} ({nodes_by_memory}, {nodes_by_disk})")
    print(f"busiest group at {a.upload_rate:,.0f} uploads/s   {busiest:,.0f} commits/s "
          f"({busiest / a.commits_per_group:.1%} of one group's measured {a.commits_per_group:,.0f}/s)")
    print(f"cluster commit capacity         {groups * a.commits_per_group / skew:,.0f} commits/s (busiest group saturated)")


if __name__ == "__main__":
    random.seed(1)
    main()
