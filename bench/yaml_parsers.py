"""Fast YAML parsers on a 100,000-device fleet file: seconds to Python objects, best of 2.

Run: ``python bench/yaml_parsers.py FLEET.yaml FLEET.json`` in an environment that has the parsers
(``pip install pyyaml yaml-rs fastyaml-rs pyyaml-rs rapidyaml``); a parser that is not installed is
skipped. "same" compares the result with PyYAML's (on this file; their YAML versions differ in general:
PyYAML reads YAML 1.1, the Rust readers 1.2, which is why rocoin's fast path checks the text first).
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
import time


def best(func, repeats: int = 2):
    seconds, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = func()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds, out


def gc_paused(func):
    def run():
        gc.disable()
        try:
            return func()
        finally:
            gc.enable()

    return run


def ryml_load(ryml, text: str):
    """rapidyaml gives a tree of byte spans, not Python objects: walk it (numbers by int/float)."""
    tree = ryml.parse_in_arena(text.encode())

    def convert(node):
        if tree.is_map(node):
            return {bytes(tree.key(c)).decode(): convert(c) for c in ryml.children(tree, node)}
        if tree.is_seq(node):
            return [convert(c) for c in ryml.children(tree, node)]
        value = bytes(tree.val(node)).decode()
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    return convert(tree.root_id())


def main() -> None:
    yaml_path, json_path = sys.argv[1], sys.argv[2]
    text = open(yaml_path, encoding="utf-8").read()
    import yaml

    reference = yaml.load(text, Loader=yaml.CSafeLoader)
    candidates = {
        "PyYAML CSafeLoader": ("yaml", lambda m: lambda: m.load(text, Loader=m.CSafeLoader)),
        "PyYAML CSafeLoader, gc paused": ("yaml", lambda m: gc_paused(lambda: m.load(text, Loader=m.CSafeLoader))),
        "yaml-rs (Rust)": ("yaml_rs", lambda m: lambda: m.loads(text)),
        "fastyaml-rs (Rust)": ("fast_yaml", lambda m: lambda: m.safe_load(text)),
        "pyyaml-rs (Rust)": ("pyyaml_rs", lambda m: lambda: m.safe_load(text)),
        "rapidyaml (C++), tree + Python walk": ("ryml", lambda m: lambda: ryml_load(m, text)),
        "rapidyaml, parse only (no Python objects)": ("ryml", lambda m: lambda: m.parse_in_arena(text.encode()) and None),
    }
    print("| parser | seconds | same as PyYAML |\n|---|---:|---|")
    for name, (module, make) in candidates.items():
        try:
            func = make(importlib.import_module(module))
        except ImportError:
            print(f"| {name} | not installed | |")
            continue
        seconds, out = best(func)
        print(f"| {name} | {seconds:.2f} | {'n/a' if out is None else out == reference} |", flush=True)
    seconds, out = best(lambda: json.loads(open(json_path, encoding="utf-8").read()))
    print(f"| json.loads (the same fleet as JSON) | {seconds:.2f} | {out == reference} |")


if __name__ == "__main__":
    main()
