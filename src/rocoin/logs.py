"""Logging setup for the command line: one line per event, optionally JSON.

Events that concern a query pass ``extra={"query_id": ...}`` so a query can be followed from the
source through every device (``grep`` the id, or filter the JSON field).

Log lines carry strings that clients chose (query ids, refused values). In text logs every
control character of a message or an extra field is escaped (``\\n``, ``\\x1b``, ...) and an extra
value with spaces or quotes is quoted, so a client cannot end a line and forge the next one, nor
pass for another field; only a traceback spans several lines. JSON logs are safe by
construction (``json.dumps`` escapes them).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from rocoin.contracts.text import escape

#: Attributes of a LogRecord that are not user-supplied ``extra`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

#: Extra values shown as they are; anything else is quoted.
_PLAIN_VALUE = re.compile(r"""[^\s"'=]*""")


def _field(value: object) -> str:
    text = escape(str(value))
    return text if _PLAIN_VALUE.fullmatch(text) else '"' + text.replace('"', '\\"') + '"'


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"rocoin: {record.levelname}: {escape(record.getMessage())}"
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if extras:
            text += " " + " ".join(f"{k}={_field(v)}" for k, v in extras.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def configure(level: int, *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
