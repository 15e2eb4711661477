"""Stage launcher: `deepspeed launch/pretrain_mim.py --ds_config ds_configs/<cfg>.json --data SHARDS --out DIR ...`
(the 'mim' kind: edge-guided masked image modelling on unlabelled shards)."""
import os
import sys

# This folder holds ssl.py, which would shadow the standard library's ssl module for everything imported below.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from distseg.stages.launcher import main  # noqa: E402

if __name__ == "__main__":
    main("mim", prog="launch/pretrain_mim.py")
