"""Seconds to record in-memory training data by its content hash (orpo.config.memory_label).

    PYTHONPATH=src python benchmarks/memory_label.py [--rows 100000]
"""

import argparse
import json
import time

from orpo.config import memory_label


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    row = {"prompt": "Human: what is the capital of France? " * 10, "chosen": "Paris is the capital. " * 20,
           "rejected": "Lyon. " * 30}
    rows = [row] * args.rows
    print(f"{args.rows} rows, {len(json.dumps(row)) * args.rows / 1e6:.0f} MB of JSON")
    t = time.perf_counter()
    memory_label(rows)
    print(f"list of dicts: {time.perf_counter() - t:.2f} s")
    import pandas as pd

    df = pd.DataFrame(rows)
    t = time.perf_counter()
    memory_label(df)
    print(f"pandas DataFrame: {time.perf_counter() - t:.2f} s")
    import datasets

    ds = datasets.Dataset.from_list(rows[:1000])
    t = time.perf_counter()
    memory_label(ds)
    print(f"datasets.Dataset (1000 rows; its own fingerprint): {time.perf_counter() - t:.4f} s")


if __name__ == "__main__":
    main()
