"""The ``rocoin`` command: parses arguments and calls the library."""
