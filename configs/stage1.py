"""Stage 1 config: `python main.py --config=configs/stage1.py[:demo|:paper]`."""

from configs import common


def get_config(arg: str | None = None):
    return common.base_config(1, arg)
