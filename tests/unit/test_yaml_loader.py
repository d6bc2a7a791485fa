"""Fleet files parse with libyaml's C parser where PyYAML has it, with the same strictness."""

from __future__ import annotations

import sys

import pytest
import yaml

from rocoin.contracts import fileio
from rocoin.contracts.errors import RocoinError
from rocoin.profiles.generate import generate_fleet


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="this PyYAML was built without libyaml")
def test_documents_are_parsed_by_libyaml_when_pyyaml_has_it():
    assert issubclass(fileio._StrictLoader, yaml.CSafeLoader)


def test_a_duplicate_key_is_refused_with_its_lines(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  - id: a\n    flops: 1\n    id: b\n")
    with pytest.raises(RocoinError, match=r"duplicate key 'id' on line 4 \(first on line 2\)"):
        fileio.load_document(path)


def test_merged_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "doc.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nitem:\n  <<: *b\n  x: 3\n")
    assert fileio.load_document(path)["item"] == {"x": 3, "y": 2}


def test_nesting_beyond_the_parser_is_one_line(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("[" * 20_000 + "]" * 20_000)
    with pytest.raises(RocoinError, match="nested too deeply"):
        fileio.load_document(path)


# --- the fast reader (yaml-rs) and PyYAML read every document alike ---------------------------

yaml_rs = pytest.importorskip("yaml_rs")

#: Documents where YAML 1.2 (yaml-rs) and 1.1 (PyYAML) differ, or yaml-rs lacks a check of ours.
TRICKY = [
    "a: yes\nb: No\nc: on\nd: OFF\n",
    "a: 010\nb: 0o17\nc: 0x1F\nd: 0b101\ne: -010\nf: 09\n",
    "a: 1_000\nb: 1e7\nc: 1.5e7\nd: 1.0e+7\ne: 12E3\nf: .5e+3\n",
    "a: .5\nb: -.5\nc: +.5\nd: 1.\ne: -0\nf: +1\n",
    "a: 1:30\nb: 190:20:30.15\nc: 2001-12-14\nd: 2001-12-14 21:59:43.10 -5\n",
    "a: =\nb: '='\n",
    "base: &b {x: 1, y: 2}\nitem:\n  <<: *b\n  x: 3\n",
    "a: !!str 1\nb: !!float 2\n",
    "a: 'yes'\nb: \"010\"\nc: ''\nd: ~\ne: null\nf:\n",
    "a: .inf\nb: -.inf\nc: .Inf\nd: inf\ne: NaN\n",
    "1: a\n2: b\n",
    "true: a\n1: b\n",
    "a: b\n  c\n   d\n",
    "a: 'b\n  c'\nb: \"d\n  e\"\n",
    "{a: [1, 2, {b: c}], d: [e, f]}\n",
    "a: b  # comment\nc: d#e\n# end\n",
    "---\na: 1\n",
    "a: 1\n---\nb: 2\n",
    "a: 1\n...\n",
    "%YAML 1.1\n---\na: 1\n",
    "a: |\n  x\n  y\nb: >\n  x\n  y\n",
    "? [1, 2]\n: x\n",
    "a: 0X9f\nb: 6_E6\nc: 0x_\nd: ._4\ne: 0_9\nf: -0_7\n",
    "a: _1\nb: -_1\nc: __1\nd: _1.5\ne: 1_:3\nf: _a\ng: 1__0\n_1: x\n",
    'a: "\\x41\\t"\n',
    "a: é\n",
    "a:\tb\n",
    "- - - x\n",
    "- -1\n- - 2\n",
    "",
    "# only a comment\n",
    "a: b: c\n",
    "a: [1, 2\n",
    "devices:\n  - id: a\n    flops: 1\n    id: b\n",
    "a: 1\na: 2\n",
    "a: 1\n1: 2\n1.0: 3\n",
    "a: @b\n",
    "a: `b`\n",
    "id: cam-on\nx: cam on\ny: dev-000001\nz: 000001\n",
    "address: 10.0.0.1:50051\nhost: localhost:8080\nv: 1.2.3\n",
]


def pyyaml_reading(text: str):
    try:
        return "ok", yaml.load(text, Loader=fileio._StrictLoader)
    except fileio._DuplicateKey as exc:
        return "error", exc.describe()
    except (yaml.YAMLError, ValueError):
        return "error", "syntax"


@pytest.mark.parametrize("text", TRICKY)
def test_every_document_reads_as_pyyaml_reads_it(tmp_path, text):
    path = tmp_path / "doc.yaml"
    path.write_text(text)
    expected = pyyaml_reading(text)
    try:
        got = ("ok", fileio.load_document(path))
    except RocoinError as exc:
        got = ("error", str(exc))
    assert got[0] == expected[0], (got, expected)
    if got[0] == "ok":
        assert repr(got[1]) == repr(expected[1])  # repr: types too (1 vs 1.0 vs True), and NaN
    elif expected[1] != "syntax":
        assert expected[1] in got[1]


def test_a_generated_fleet_is_read_by_yaml_rs(tmp_path, monkeypatch):
    fleet = generate_fleet(50, 3, 0.8, random_state=0, input_bits=6272, downlink_bps=1e6)
    text = fleet.to_yaml()
    assert fileio._plain_yaml(text)
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    expected = fileio.load_document(path)
    monkeypatch.setattr(fileio, "_load_yaml", lambda text: pytest.fail("read by PyYAML"))
    assert fileio.load_document(path) == expected == yaml.load(text, Loader=fileio._StrictLoader)


def test_without_yaml_rs_pyyaml_reads_everything(tmp_path, monkeypatch):
    path = tmp_path / "fleet.yaml"
    path.write_text(generate_fleet(5, 3, 0.8, random_state=0).to_yaml())
    expected = fileio.load_document(path)
    monkeypatch.setitem(sys.modules, "yaml_rs", None)  # import fails
    assert fileio.load_document(path) == expected


def test_compact_nesting_deeper_than_yaml_rs_can_go_is_one_error(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("- " * 20_000 + "x\n")  # yaml-rs would overflow the C stack
    with pytest.raises(RocoinError, match="nested"):
        fileio.load_document(path)


def test_fleets_are_written_as_pyyaml_writes_them():
    fleet = generate_fleet(30, 3, 0.8, random_state=2, input_bits=6272, downlink_bps=1e6)
    assert fleet.to_yaml() == yaml.safe_dump(fleet.model_dump(mode="json", exclude_none=True), sort_keys=False)
