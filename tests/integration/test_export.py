"""rocoin export: students.pt + plan -> ONNX bundle; parity with PyTorch, atomicity, integrity."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import rocoin  # noqa: E402
from rocoin.contracts.errors import RocoinError  # noqa: E402
from rocoin.contracts.manifest import MANIFEST_NAME, load_manifest, verify_file  # noqa: E402
from rocoin.contracts.plan import GroupPlan, Plan, save_plan  # noqa: E402
from rocoin.data import DatasetInfo  # noqa: E402
from rocoin.distillation.checkpoint import save_checkpoint  # noqa: E402
from rocoin.distillation.students import StudentNetwork  # noqa: E402
from rocoin.distillation.teacher import info_to_json  # noqa: E402
from rocoin.export import export_bundle, onnx_bundle  # noqa: E402
from rocoin.profiles.generate import default_catalog  # noqa: E402

INFO = DatasetInfo(
    name="toy",
    num_classes=5,
    input_shape=(3, 12, 12),
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.25, 0.3),
    class_names=("ant", "bee", "cat", "dog", "eel"),
    augmentation="none",
)
#: Interleaved partitions, so that "filter order" differs from "group order".
GROUPS = [(["a"], [0, 3, 7], 0.1, "wrn-10-1"), (["b", "c"], [1, 4, 8, 9], 0.01, "wrn-10-1"), (["d"], [2, 5, 6], 0.2, "mobilenetv2-0.25")]
SMALL_GROUPS = [(["a"], [0, 2], 0.1, "wrn-10-1"), (["b"], [1, 3], 0.1, "wrn-10-1")]


def make_plan(groups, num_filters: int | None = None) -> Plan:
    catalog = default_catalog((1, 28, 28))
    spec = catalog["wrn-16-1"]
    return Plan(
        scheme="rocoin",
        epsilon=0.25,
        num_filters=num_filters or sum(len(f) for _, f, _, _ in groups),
        groups=[GroupPlan(devices=d, filters=f, student=s, failure_prob=q, latency_s=1.0) for d, f, q, s in groups],
        latency_s=1.0,
        p_complete=float(np.prod([1 - q for _, _, q, _ in groups])),
        catalog={s: spec for *_, s in groups},
    )


def make_students(path: Path, plan: Plan, info: DatasetInfo = INFO, seed: int = 0) -> StudentNetwork:
    """Random weights, with BatchNorm statistics moved away from the identity so they matter."""
    torch.manual_seed(seed)
    network = StudentNetwork(plan, info.input_shape[0], info.num_classes)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
    network.eval()
    metadata = {"plan": plan.model_dump(mode="json"), "dataset": info_to_json(info), "data": {"dataset": info.name}}
    save_checkpoint(path, "students", metadata, network.state_dict())
    return network


def random_images(batch: int, seed: int, info: DatasetInfo = INFO) -> np.ndarray:
    pixels = np.random.default_rng(seed).random((batch, *info.input_shape), dtype=np.float32)
    mean, std = (np.array(v, dtype=np.float32)[:, None, None] for v in (info.mean, info.std))
    return ((pixels - mean) / std).astype(np.float32)


def session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def close(got: np.ndarray, expected: np.ndarray) -> bool:
    return np.allclose(got, expected, rtol=onnx_bundle.PARITY_RTOL, atol=onnx_bundle.PARITY_ATOL)


def leftovers(folder: Path) -> list[str]:
    """Temporary or backup folders an export left beside its output."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    plan = make_plan(GROUPS)
    network = make_students(root / "students.pt", plan)
    save_plan(plan, root / "plan.json")
    manifest = export_bundle(root / "students.pt", root / "bundle", plan_path=root / "plan.json")
    return root, plan, network, manifest


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A two-group checkpoint for the tests that export several times."""
    root = tmp_path_factory.mktemp("small")
    plan = make_plan(SMALL_GROUPS)
    network = make_students(root / "students.pt", plan, seed=1)
    return root / "students.pt", plan, network


# --------------------------------------------------------------------------------------------
# The bundle


def test_bundle_files_and_manifest(exported):
    root, plan, _, manifest = exported
    bundle = root / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["group-0.onnx", "group-1.onnx", "group-2.onnx", "head.onnx", MANIFEST_NAME]
    assert sorted(p.name for p in root.iterdir()) == ["bundle", "plan.json", "students.pt"]  # no temp folder left
    assert load_manifest(bundle) == manifest
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    assert raw["format"] == "rocoin-bundle/1" and raw["rocoin_version"] == rocoin.__version__
    assert manifest.plan == plan
    assert manifest.dataset == "toy" and manifest.class_names == list(INFO.class_names)
    assert manifest.normalization.mean == list(INFO.mean) and manifest.normalization.std == list(INFO.std)
    for k, (model, group) in enumerate(zip(manifest.groups, plan.groups)):
        assert model.file == f"group-{k}.onnx" and model.group == k
        assert (model.student, model.devices, model.filters) == (group.student, group.devices, group.filters)
        assert (model.input.name, model.input.shape) == ("input", [3, 12, 12])
        assert (model.output.name, model.output.shape) == ("features", [len(group.filters)])
    assert (manifest.head.file, manifest.head.input.name, manifest.head.input.shape) == ("head.onnx", "features", [10])
    assert (manifest.head.output.name, manifest.head.output.shape) == ("logits", [5])
    for model in [*manifest.groups, manifest.head]:
        path = verify_file(bundle, model)
        data = path.read_bytes()
        assert model.size_bytes == len(data) and model.sha256 == hashlib.sha256(data).hexdigest()
        inputs, outputs = session(path).get_inputs(), session(path).get_outputs()
        assert [i.name for i in inputs] == [model.input.name] and [o.name for o in outputs] == [model.output.name]
        assert isinstance(inputs[0].shape[0], str) and inputs[0].shape[1:] == model.input.shape  # dynamic batch
        assert isinstance(outputs[0].shape[0], str) and outputs[0].shape[1:] == model.output.shape
    assert (bundle / MANIFEST_NAME).stat().st_mode & 0o777 == (bundle / "head.onnx").stat().st_mode & 0o777


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch):
    root, plan, network, manifest = exported
    x = random_images(batch, seed=100 + batch)
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        expected_features = [s.pooled(xt).numpy() for s in network.students]
        expected_vector = network.features(xt).numpy()
        expected_logits = network(xt).numpy()
        missing = torch.zeros((batch, plan.num_groups), dtype=torch.bool)
        missing[:, 1] = True
        expected_degraded = network(xt, missing).numpy()
    vector = np.zeros((batch, plan.num_filters), dtype=np.float32)
    for model, expected in zip(manifest.groups, expected_features):
        (got,) = session(root / "bundle" / model.file).run(["features"], {"input": x})
        assert got.shape == (batch, len(model.filters))
        assert close(got, expected), np.abs(got - expected).max()
        vector[:, model.filters] = got
    assert close(vector, expected_vector)
    head = session(root / "bundle" / "head.onnx")
    (logits,) = head.run(["logits"], {"features": vector})
    assert logits.shape == (batch, 5) and close(logits, expected_logits), np.abs(logits - expected_logits).max()
    vector[:, manifest.groups[1].filters] = 0.0  # group 1 missing at the deadline: its slots zero-filled
    (degraded,) = head.run(["logits"], {"features": vector})
    assert close(degraded, expected_degraded) and not close(degraded, expected_logits)


def test_loading_the_bundle_needs_no_torch(exported):
    root, *_ = exported
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any 'import torch' now raises ImportError
        "import numpy as np, onnxruntime as ort\n"
        "from rocoin.contracts.manifest import load_manifest, verify_file\n"
        "bundle = sys.argv[1]\n"
        "m = load_manifest(bundle)\n"
        "path = verify_file(__import__('pathlib').Path(bundle), m.groups[0])\n"
        "s = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])\n"
        "(out,) = s.run([m.groups[0].output.name], {m.input.name: np.zeros((2, *m.input.shape), np.float32)})\n"
        "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
        "print(out.shape)\n"
    )
    src = str(Path(rocoin.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script, str(root / "bundle")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(2, 3)"


# --------------------------------------------------------------------------------------------
# Refusals


def test_a_plan_that_differs_from_the_checkpoint_is_refused(exported, tmp_path):
    root, plan, _, _ = exported
    moved = [(["a"], [0, 3, 7], 0.1, "wrn-10-1"), (["b"], [1, 4, 8, 9], 0.01, "wrn-10-1"), (["c", "d"], [2, 5, 6], 0.2, "mobilenetv2-0.25")]
    save_plan(make_plan(moved), tmp_path / "moved.json")
    expected = r"moved\.json: groups\[1\]\.devices = \['b'\] but .*students\.pt was distilled for groups\[1\]\.devices = \['b', 'c'\]"
    with pytest.raises(RocoinError, match=expected):
        export_bundle(root / "students.pt", tmp_path / "out", plan_path=tmp_path / "moved.json")
    bigger = [*GROUPS[:2], (["d"], [2, 5, 6, 10], 0.2, "mobilenetv2-0.25")]
    save_plan(make_plan(bigger), tmp_path / "bigger.json")
    with pytest.raises(RocoinError, match=r"bigger\.json: num_filters = 11 but .* num_filters = 10"):
        export_bundle(root / "students.pt", tmp_path / "out", plan_path=tmp_path / "bigger.json")
    save_plan(plan.model_copy(update={"epsilon": 0.3}), tmp_path / "eps.json")
    with pytest.raises(RocoinError, match=r"epsilon = 0\.3 but"):
        export_bundle(root / "students.pt", tmp_path / "out", plan_path=tmp_path / "eps.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger.json", "eps.json", "moved.json"]


def test_an_existing_output_is_refused_or_replaced_only_when_complete(small, tmp_path):
    students, plan, _ = small
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RocoinError, match="not empty; refusing to replace it without overwrite"):
        export_bundle(students, out)
    with pytest.raises(RocoinError, match="holds no manifest.json, so it is not a rocoin bundle"):
        export_bundle(students, out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and leftovers(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(RocoinError, match="exists and is not a folder"):
        export_bundle(students, tmp_path / "file")
    with pytest.raises(RocoinError, match="output folder .* does not exist"):
        export_bundle(students, tmp_path / "no" / "such")

    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder is fine
    images = random_images(3, seed=7)
    first = export_bundle(students, empty, parity_images=images)
    assert first.plan == plan
    (empty / "stale.onnx").write_text("from an older export")
    second = export_bundle(students, empty, overwrite=True, opset=18)
    assert second == load_manifest(empty)
    assert "stale.onnx" not in {p.name for p in empty.iterdir()}  # replaced as a whole
    assert leftovers(tmp_path) == []


def test_bad_arguments_are_refused_before_any_work(small, tmp_path):
    students, *_ = small
    with pytest.raises(RocoinError, match="opset = 9: expected an integer in 13..20"):
        export_bundle(students, tmp_path / "out", opset=9)
    with pytest.raises(RocoinError, match=r"parity images: shape \(2, 1, 12, 12\): expected \(N, 3, 12, 12\)"):
        export_bundle(students, tmp_path / "out", parity_images=np.zeros((2, 1, 12, 12), np.float32))
    with pytest.raises(RocoinError, match="checkpoint not found"):
        export_bundle(tmp_path / "missing.pt", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Parity failures leave nothing behind


def test_a_parity_failure_leaves_no_bundle_and_no_temp_folder(small, tmp_path, monkeypatch):
    students, *_ = small
    monkeypatch.setattr(onnx_bundle, "PARITY_ATOL", -1.0)  # nothing can pass
    expected = r"group-0\.onnx: onnxruntime's features differ from PyTorch's at batch 1: max \|diff\| = .*nothing written"
    with pytest.raises(RocoinError, match=expected):
        export_bundle(students, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_head_is_caught_and_the_old_bundle_kept(small, tmp_path, monkeypatch):
    students, *_ = small
    out = tmp_path / "bundle"
    old = export_bundle(students, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original = onnx_bundle._export_onnx

    def corrupting(module, example, path, input_name, output_name, opset):
        if path.name == "head.onnx":  # what a broken exporter might write: a slightly different FC
            module = copy.deepcopy(module)
            with torch.no_grad():
                module.bias[2] += 1e-3
        original(module, example, path, input_name, output_name, opset)

    monkeypatch.setattr(onnx_bundle, "_export_onnx", corrupting)
    with pytest.raises(RocoinError, match=r"head\.onnx: onnxruntime's logits of the whole pipeline .* max \|diff\| = 0\.001"):
        export_bundle(students, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old bundle, untouched
    assert load_manifest(out) == old
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Integrity


def test_verify_file_refuses_a_truncated_or_tampered_group_file(exported, tmp_path):
    root, _, _, manifest = exported
    bundle = tmp_path / "copy"
    shutil.copytree(root / "bundle", bundle)
    group0, group1 = manifest.groups[0], manifest.groups[1]
    data = (bundle / group0.file).read_bytes()
    (bundle / group0.file).write_bytes(data[: len(data) // 2])
    with pytest.raises(RocoinError, match=r"group-0\.onnx: \d+ bytes but the manifest says \d+ \(truncated or replaced\)"):
        verify_file(bundle, group0)
    tampered = bytearray((bundle / group1.file).read_bytes())
    tampered[-5] ^= 0x01  # one bit flipped, same size
    (bundle / group1.file).write_bytes(bytes(tampered))
    with pytest.raises(RocoinError, match=r"group-1\.onnx: SHA-256 does not match the manifest \(tampered or corrupt\)"):
        verify_file(bundle, group1)
    (bundle / manifest.groups[2].file).unlink()
    with pytest.raises(RocoinError, match="model file is missing"):
        verify_file(bundle, manifest.groups[2])
    assert verify_file(bundle, manifest.head) == bundle / "head.onnx"
