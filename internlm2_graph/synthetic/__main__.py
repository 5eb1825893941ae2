"""python -m internlm2_graph.synthetic OUT [--size tiny|1.8b|7b|20b]: a random checkpoint."""

import argparse
import json

from internlm2_graph.synthetic import SIZES, make_config, write_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m internlm2_graph.synthetic", description=__doc__
    )
    parser.add_argument("output", help="folder to write the checkpoint into")
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--base", action="store_true", help="a base model (no chat tokens in eos)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=JSON",
        help="override config.json fields, e.g. num_hidden_layers=4",
    )
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    folder = write_checkpoint(
        args.output, make_config(args.size, **overrides), chat=not args.base, seed=args.seed
    )
    print(f"wrote a random {args.size} InternLM2 checkpoint to {folder}")


if __name__ == "__main__":
    main()
