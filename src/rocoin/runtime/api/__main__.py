"""``python -m rocoin.runtime.api --options FILE``: a source process (the source and its client APIs) from typed options."""

import sys

from rocoin.runtime.api.options import SourceOptions, run_source
from rocoin.runtime.transport.entry import run_entry_point

if __name__ == "__main__":
    sys.exit(run_entry_point(SourceOptions, run_source, "rocoin.runtime.api"))
