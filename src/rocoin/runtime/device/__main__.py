"""``python -m rocoin.runtime.device --options FILE``: a device worker from typed options."""

import sys

from rocoin.runtime.device.options import DeviceOptions, run_device
from rocoin.runtime.transport.entry import run_entry_point

if __name__ == "__main__":
    sys.exit(run_entry_point(DeviceOptions, run_device, "rocoin.runtime.device"))
