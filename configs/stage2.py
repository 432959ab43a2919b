"""Stage 2 config: `python main.py --config=configs/stage2.py[:demo|:paper]`."""

from configs import common


def get_config(arg: str | None = None):
    return common.base_config(2, arg)
