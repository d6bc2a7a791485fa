"""``python -m rocoin.runtime.device.join_main --options FILE``: a device that joins the source, from typed options."""

import sys

from rocoin.runtime.device.options import JoinOptions, run_join
from rocoin.runtime.transport.entry import run_entry_point

if __name__ == "__main__":
    sys.exit(run_entry_point(JoinOptions, run_join, "rocoin.runtime.device.join_main"))
