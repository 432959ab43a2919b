"""Stage 3 config: `python main.py --config=configs/stage3.py[:demo|:paper]`."""

from configs import common


def get_config(arg: str | None = None):
    return common.base_config(3, arg)
