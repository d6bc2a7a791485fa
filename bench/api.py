"""Client-API benchmark: the source's KServe v2 REST API and its gRPC API on the same cluster.

Run: ``.venv/bin/python bench/api.py`` (after ``bench/runtime.py`` made its bundle). For
concurrency 1, 8 and 32 it prints p50/p99 latency and queries/s through each API, and the
overhead each adds over the source's own time per query (reported by the source itself).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from pathlib import Path

from report import report_to

from rocoin.contracts.fleet import load_fleet
from rocoin.contracts.manifest import load_manifest
from rocoin.data import load_dataset
from rocoin.runtime.api.client import run_queries, run_queries_http
from rocoin.runtime.cluster.local import LocalCluster

CONCURRENCY = (1, 8, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("results/bench-runtime/bundle"))
    parser.add_argument("--fleet", type=Path, default=Path("results/bench-accuracy/fleet.yaml"))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs/bench/api.txt"), help="also write the report here (the README's source)")
    args = parser.parse_args()
    with report_to(args.out):
        logging.basicConfig(level=logging.ERROR)
        test = load_dataset(load_manifest(args.bundle).dataset).test
        images, labels = test.images[: args.queries], test.labels[: args.queries]
        print(f"{'api':>6} {'conc':>5} {'p50 ms':>8} {'p99 ms':>8} {'q/s':>8} {'source p50 ms':>14} {'API overhead p50 ms':>20}")
        with tempfile.TemporaryDirectory() as state:
            with LocalCluster(args.bundle, load_fleet(args.fleet), state, deadline_s=0.5, http=True) as cluster:
                grpc_address, http_url = cluster.state.source.address, f"http://{cluster.state.source.http_address}"
                for concurrency in CONCURRENCY:
                    for api, run in (
                        ("grpc", lambda c: run_queries(grpc_address, images, labels, concurrency=c)),
                        ("rest", lambda c: run_queries_http(http_url, images, labels, concurrency=c)),
                    ):
                        asyncio.run(run(concurrency))  # warm-up
                        r = asyncio.run(run(concurrency))
                        p50, source = r["latency_s"]["p50"], r["source_latency_s"]["p50"]
                        print(
                            f"{api:>6} {concurrency:>5} {1e3 * p50:>8.2f} {1e3 * r['latency_s']['p99']:>8.2f} {r['queries_per_s']:>8.1f}"
                            f" {1e3 * source:>14.2f} {1e3 * (p50 - source):>20.2f}"
                        )


if __name__ == "__main__":
    main()
