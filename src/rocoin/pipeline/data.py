"""The data step: Fashion-MNIST where :mod:`rocoin.data` finds it; else ``apt-get install
dataset-fashion-mnist`` (as root on Debian); else a download (MD5-checked, by :mod:`rocoin.data`);
else scikit-learn's digits, with a notice."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rocoin.contracts.errors import RocoinError

logger = logging.getLogger(__name__)

DEBIAN_PACKAGE = "dataset-fashion-mnist"
FALLBACK_NOTICE = (
    "NOTICE: Fashion-MNIST is not available here, so the demo runs on scikit-learn's digits"
    " (1,797 8x8 images, 20 % of them for testing); its numbers are not Fashion-MNIST's"
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class DataChoice:
    name: str  # "fashion-mnist" or "digits"
    data_dir: str | None
    how: str  # how it was obtained, for the report
    notice: str | None = None  # set when the demo fell back to another data set


def resolve_dataset(
    requested: str,
    data_dir: str | None = None,
    *,
    install: bool = True,
    download: bool = True,
    download_url: str | None = None,
    say: Say = logger.info,
) -> DataChoice:
    """Fashion-MNIST where it is; else apt-get (root on Debian); else a download; else digits."""
    from rocoin.data import load_dataset

    if requested == "digits":
        load_dataset("digits")
        return DataChoice("digits", None, "scikit-learn's bundled digits (asked for with --dataset digits)")
    root = Path(data_dir) if data_dir else None
    try:
        load_dataset("fashion-mnist", root)
        return DataChoice("fashion-mnist", data_dir, where_fashion_mnist(root))
    except RocoinError as exc:
        say(f"Fashion-MNIST is not here ({str(exc).split(';')[0]})")
    choice = _installed(root, data_dir, install, say) or (_downloaded(root, download_url, say) if download else None)
    if choice is not None:
        return choice
    say(FALLBACK_NOTICE)
    load_dataset("digits")
    return DataChoice("digits", None, "scikit-learn's bundled digits (fallback)", FALLBACK_NOTICE)


def _installed(root: Path | None, data_dir: str | None, install: bool, say: Say) -> DataChoice | None:
    from rocoin.data import load_dataset

    if not install:
        return None
    if not _can_apt_get():
        say(
            f"not installing {DEBIAN_PACKAGE}: "
            + ("not running as root" if _is_debian() and shutil.which("apt-get") else "no apt-get (not Debian)")
        )
        return None
    if not _apt_install(say):
        return None
    try:
        load_dataset("fashion-mnist", root)
    except RocoinError as exc:
        say(f"{DEBIAN_PACKAGE} is installed but not readable: {exc}")
        return None
    return DataChoice("fashion-mnist", data_dir, f"installed now with apt-get install {DEBIAN_PACKAGE}")


def _downloaded(root: Path | None, download_url: str | None, say: Say) -> DataChoice | None:
    from rocoin.data import default_data_dir, load_dataset

    target = root or default_data_dir()
    say(f"downloading Fashion-MNIST into {target} (MD5-checked)")
    try:
        load_dataset("fashion-mnist", target, download=True, base_url=download_url)
    except RocoinError as exc:
        say(f"download failed: {exc}")
        return None
    return DataChoice("fashion-mnist", str(target), f"downloaded into {target} (MD5-checked)")


def where_fashion_mnist(root: Path | None) -> str:
    """Which of :mod:`rocoin.data`'s folders holds the Fashion-MNIST files, for the report."""
    from rocoin.data.datasets import FASHION_MNIST_SYSTEM_DIRS, default_data_dir, fashion_mnist_folder

    folder = fashion_mnist_folder(root or default_data_dir())
    if folder is not None:
        system = folder in FASHION_MNIST_SYSTEM_DIRS
        return f"found in {folder}" + (f" (Debian's {DEBIAN_PACKAGE})" if system else "")
    return "found by rocoin.data"


def _is_debian() -> bool:
    return Path("/etc/debian_version").exists()


def _can_apt_get() -> bool:
    return _is_debian() and shutil.which("apt-get") is not None and hasattr(os, "geteuid") and os.geteuid() == 0


def _apt_install(say: Say) -> bool:
    """``apt-get install -y dataset-fashion-mnist`` (after ``apt-get update`` if it fails), shown line by line."""
    install = ["apt-get", "install", "-y", DEBIAN_PACKAGE]
    if _run_shown(install, say) == 0:
        return True
    say("apt-get install failed; refreshing the package lists and trying again")
    return _run_shown(["apt-get", "update"], say) == 0 and _run_shown(install, say) == 0


def _run_shown(command: list[str], say: Say) -> int:
    say("$ " + " ".join(command))
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True, errors="replace"
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                say("  " + line.rstrip())
            return process.wait()
    except OSError as exc:
        say(f"cannot run {command[0]}: {exc}")
        return 1
