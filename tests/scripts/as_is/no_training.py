"""Parses its arguments and prints, but never trains (a helper script, not an entry point)."""

import argparse

parser = argparse.ArgumentParser()
parser.add_argument("--name", required=True)
args = parser.parse_args()
print(f"hello {args.name}")
