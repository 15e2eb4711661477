"""Stage launcher: `deepspeed launch/ssl.py --ds_config ds_configs/<cfg>.json --out DIR ...`."""
from distseg.stages.launcher import main

if __name__ == "__main__":
    main("ssl")
