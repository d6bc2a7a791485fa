"""rocoin.pipeline's step cache: reuse when nothing changed, redo when an input changed, when an
output is missing or cannot be loaded, and with ``fresh``; named and content-addressed outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rocoin.contracts.errors import RocoinError
from rocoin.pipeline.cache import CannotReuse, StepCache, digest, file_key, step_key, unreadable_as_stale


class Step:
    """A step writing ``value`` to ``path``; counts how often it was made."""

    def __init__(self, path: Path, value: str = "made") -> None:
        self.path, self.value, self.made = path, value, 0

    def make(self) -> str:
        self.made += 1
        self.path.write_text(self.value)
        return self.value

    def load(self) -> str:
        text = self.path.read_text()
        if text != self.value:
            raise CannotReuse("it holds something else")
        return text


def run(cache: StepCache, step: Step, inputs) -> tuple[str, bool]:
    done = cache.run("step", inputs, [step.path], step.make, step.load)
    return done.value, done.reused


def test_an_unchanged_step_is_reused_by_a_new_cache(tmp_path):
    step = Step(tmp_path / "out.txt")
    said: list[str] = []
    assert run(StepCache(tmp_path), step, {"a": 1}) == ("made", False)
    assert run(StepCache(tmp_path, say=said.append), step, {"a": 1}) == ("made", True)
    assert step.made == 1
    assert said == ["reusing step (out.txt)"]
    entry = json.loads((tmp_path / "steps.json").read_text())["step"]
    assert entry["key"] == step_key({"a": 1}) and entry["inputs"] == {"a": 1}


def test_a_changed_input_redoes_the_step_and_says_so(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})
    said: list[str] = []
    assert run(StepCache(tmp_path, say=said.append), step, {"a": 2}) == ("made", False)
    assert step.made == 2
    assert said == ["step: its inputs changed since the last run; redoing it"]
    assert run(StepCache(tmp_path), step, {"a": 2})[1]  # the new key is recorded


def test_a_missing_output_redoes_the_step(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})
    step.path.unlink()
    assert run(StepCache(tmp_path), step, {"a": 1}) == ("made", False)
    assert step.made == 2 and step.path.exists()


def test_an_output_that_cannot_be_loaded_is_made_again(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})
    step.path.write_text("damaged")
    said: list[str] = []
    assert run(StepCache(tmp_path, say=said.append), step, {"a": 1}) == ("made", False)
    assert step.made == 2 and step.path.read_text() == "made"
    assert said == ["step: out.txt cannot be reused (it holds something else); redoing it"]


def test_a_reader_refusing_the_file_counts_as_cannot_be_loaded(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})

    def refused() -> str:
        with unreadable_as_stale():
            raise RocoinError("out.txt: truncated")

    done = StepCache(tmp_path).run("step", {"a": 1}, [step.path], step.make, refused)
    assert not done.reused and step.made == 2


def test_other_errors_of_load_are_not_swallowed(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})

    def bad_input() -> str:
        raise RocoinError("out.txt: header says (1000000, 1000000)")

    with pytest.raises(RocoinError, match="1000000"):
        StepCache(tmp_path).run("step", {"a": 1}, [step.path], step.make, bad_input)


def test_fresh_redoes_each_step_once(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})
    fresh = StepCache(tmp_path, fresh=True)
    assert run(fresh, step, {"a": 1}) == ("made", False)
    assert run(fresh, step, {"a": 1}) == ("made", True)  # made in this run: reused by later callers
    assert step.made == 2


def test_a_failed_step_leaves_no_record(tmp_path):
    step = Step(tmp_path / "out.txt")
    run(StepCache(tmp_path), step, {"a": 1})

    def boom() -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        StepCache(tmp_path).run("step", {"a": 2}, [step.path], boom, step.load)
    assert "step" not in json.loads((tmp_path / "steps.json").read_text())
    assert run(StepCache(tmp_path), step, {"a": 1}) == ("made", False)  # the old record is gone too


def test_content_addressed_outputs_need_no_record(tmp_path):
    made: list[str] = []

    def outputs(key: str) -> list[Path]:
        return [tmp_path / f"thing-{key}.txt"]

    def step(inputs):
        path = outputs(step_key(inputs))[0]

        def make() -> str:
            made.append(path.name)
            path.write_text("x")
            return path.name

        return StepCache(tmp_path).run("thing", inputs, outputs, make, lambda: path.name)

    first, other = step({"a": 1}), step({"a": 2})
    assert not first.reused and not other.reused and first.value != other.value
    again = step({"a": 1})
    assert again.reused and again.value == first.value and again.key == first.key
    assert len(made) == 2 and not (tmp_path / "steps.json").exists()


def test_keys_follow_the_inputs_and_file_contents(tmp_path):
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})
    assert step_key("0123456789abcdef") == "0123456789abcdef"  # an upstream key as it is
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    before = file_key(f)
    f.write_bytes(b"two")
    assert file_key(f) != before and len(before) == 16
