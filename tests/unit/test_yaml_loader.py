"""Fleet files parse with libyaml's C parser where PyYAML has it, with the same strictness."""

from __future__ import annotations

import pytest
import yaml

from rocoin.contracts import fileio
from rocoin.contracts.errors import RocoinError


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
