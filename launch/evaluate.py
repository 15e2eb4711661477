"""Evaluate a stage folder or weights file: `deepspeed launch/evaluate.py RUN_DIR --data SHARDS [--split val]`."""
import os
import sys

# This folder holds ssl.py, which would shadow the standard library's ssl module for everything imported below.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from distseg.stages.launcher import main  # noqa: E402

if __name__ == "__main__":
    main("eval", prog="launch/evaluate.py")
