"""Write a split of a built-in task as JSONL:

python -m jaxpost.data.tasks arithmetic --split=test --n=500 --seed=0 --out=test.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from jaxpost.data.tasks import TASKS, arithmetic, get


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--split", default="train")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--knobs", default="{}", help="task options as JSON, e.g. '{\"max_digits\": 4}'"
    )
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = get(args.task).generate_split(args.seed, args.n, args.split, **json.loads(args.knobs))
    count = arithmetic.write_jsonl(rows, args.out)
    print(f"wrote {count} {args.task} {args.split} rows to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
