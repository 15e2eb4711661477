"""Stage launcher: `deepspeed launch/finetune_head.py --ds_config ds_configs/<cfg>.json --out DIR ...`."""
from distseg.stages.launcher import main

if __name__ == "__main__":
    main("head")
