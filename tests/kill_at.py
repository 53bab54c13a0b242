"""`python tests/kill_at.py POINT N [--after] [--match STR] -- ARGS`: `python train.py ARGS`,
SIGKILLed at the N-th call of POINT (probes.KillAt), installed before actlab is imported."""

import argparse
import runpy
import sys
from pathlib import Path

import probes

split = sys.argv.index("--")
parser = argparse.ArgumentParser()
parser.add_argument("point")
parser.add_argument("n", type=int)
parser.add_argument("--after", action="store_true")
parser.add_argument("--match")
given = parser.parse_args(sys.argv[1:split])
probes.KillAt(given.point, given.n, given.after, given.match)
train = Path(__file__).resolve().parents[1] / "train.py"
sys.argv = [str(train), *sys.argv[split + 1 :]]
runpy.run_path(str(train), run_name="__main__")
