"""Stage 0 config: `python main.py --config=configs/stage0.py[:demo|:paper]`."""

from configs import common


def get_config(arg: str | None = None):
    return common.base_config(0, arg)
