import errno
import importlib.util
import os
import pickle
import re
import struct
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, atomic_save, load_state_dict_file, load_weights, safe_load


def test_atomic_save_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"w": torch.arange(5), "step": 3}, path)
    assert safe_load(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_atomic_files_get_the_permissions_open_would_give(tmp_path):
    path = tmp_path / "ck.pt"
    mask = os.umask(0o027)
    try:
        atomic_save({"step": 1}, path)
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o640  # not mkstemp's private 0600
    path.chmod(0o604)
    atomic_save({"step": 2}, path)
    assert path.stat().st_mode & 0o777 == 0o604  # a rewritten file keeps its mode


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)

    def dying_save(obj, f):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_truncated_empty_and_missing_files_are_named(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*ck.pt"):
        safe_load(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        safe_load(path)
    with pytest.raises(CheckpointError, match="not found"):
        safe_load(tmp_path / "nope.pt")


class Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"payload": Boom()}, path)  # torch's zip container with a code-running pickle inside
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Boom()))
    for file in (path, raw):
        with pytest.raises(CheckpointError, match=rf"refusing to load .*{file.name}: its pickle calls builtins.exec") as e:
            safe_load(file)
        assert "weights_only=False" not in str(e.value) and "may be malicious" in str(e.value)
        assert "Please" not in str(e.value)  # torch's advice to retry with the safety off is not passed on
    assert not (tmp_path / "PWNED").exists()


def test_disk_full_is_named_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match=r"^disk full: cannot write .*ck.pt .*MiB free\); ck.pt is unchanged$"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert safe_load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_load_weights_reports_keys_and_shapes_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = model.state_dict()
    bad = dict(state)
    del bad["1.bias"]
    bad["2.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(4, 2)
    with pytest.raises(CheckpointError) as e:
        load_weights(model, bad)
    msg = str(e.value)
    assert "missing: 1.bias" in msg and "unexpected: 2.weight" in msg and "0.weight: (4, 2)" in msg
    load_weights(model, state)


# --- third-party weight files ---


def assert_same_tensors(loaded, expected):
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


class SystemCall:
    def __reduce__(self):
        return (os.system, ("touch SENTINEL",))


class ExecCall:
    def __reduce__(self):
        return (exec, ("open('SENTINEL', 'w').close()",))


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("payload, name", [(SystemCall(), f"{os.system.__module__}.system"), (ExecCall(), "builtins.exec")])
def test_malicious_weight_file_is_refused_by_name_without_running(tmp_path, monkeypatch, payload, name, zipped):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": payload}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=rf"evil\.ckpt.*{re.escape(name)}.*may be malicious"):
        load_state_dict_file(path)
    assert not (tmp_path / "SENTINEL").exists()
    torch.load(path, weights_only=False)  # the payload is live: a plain unpickler runs it
    assert (tmp_path / "SENTINEL").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_plain_pickle_with_stack_global_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(SystemCall(), protocol=4))  # names the global by STACK_GLOBAL, not GLOBAL
    with pytest.raises(CheckpointError, match=rf"evil\.pt.*{os.system.__module__}\.system.*may be malicious"):
        load_state_dict_file(path)
    assert not (tmp_path / "SENTINEL").exists()


def save_lightning_like(path, monkeypatch, zipped=True, **extra):
    """torch.save the shape of an original SD .ckpt: Lightning's ModelCheckpoint pickled by name, with state.
    The stand-in modules exist only while saving; returns the state dict."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    callback = ModelCheckpoint()
    callback.__dict__.update(monitor="val/loss", best_model_path="epoch=5.ckpt", best_score=np.float64(0.125))
    state = {"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3), "betas": torch.linspace(0, 0.02, 5, dtype=torch.float64)}
    with monkeypatch.context() as m:
        for name in names:
            m.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
        obj = {"state_dict": state, "callbacks": {ModelCheckpoint: callback}, "global_step": 5, **extra}
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
    assert "pytorch_lightning" not in sys.modules and importlib.util.find_spec("pytorch_lightning") is None
    return state


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_lightning_checkpoint_loads_without_importing_lightning(tmp_path, monkeypatch, zipped):
    path = tmp_path / "sd.ckpt"
    state = save_lightning_like(path, monkeypatch, zipped)
    with pytest.raises(pickle.UnpicklingError, match="pytorch_lightning"):
        torch.load(path, weights_only=True)  # why the fallback exists
    attempts = []

    class ImportSpy:
        def find_spec(self, fullname, path=None, target=None):
            attempts.append(fullname)

    monkeypatch.setattr(sys, "meta_path", [ImportSpy(), *sys.meta_path])
    assert_same_tensors(load_state_dict_file(path), state)
    assert "pytorch_lightning" not in sys.modules
    assert not [a for a in attempts if "lightning" in a or "numpy" in a]


def test_lightning_metadata_does_not_excuse_a_payload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_lightning_like(tmp_path / "sd.ckpt", monkeypatch, epoch=ExecCall())
    with pytest.raises(CheckpointError, match=r"calls builtins\.exec, which") as e:
        load_state_dict_file(tmp_path / "sd.ckpt")
    assert "pytorch_lightning" not in str(e.value)
    assert not (tmp_path / "SENTINEL").exists()


def test_safetensors_and_bin_round_trip(tmp_path):
    state = {"a.weight": torch.randn(3, 4), "a.bias": torch.arange(3), "h": torch.randn(2, dtype=torch.float16)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.bin")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for name in ("w.safetensors", "w.bin", "legacy.pth"):
        assert_same_tensors(load_state_dict_file(tmp_path / name), state)


def test_nested_state_dict_is_unwrapped_and_non_tensors_dropped(tmp_path):
    w = torch.randn(2, 3)
    torch.save({"state_dict": {"w": w, "note": "x", "n": 3}, "global_step": 5, "epoch": 1}, tmp_path / "sd.ckpt")
    assert_same_tensors(load_state_dict_file(tmp_path / "sd.ckpt"), {"w": w})
    torch.save({"w": w, "step": 3}, tmp_path / "flat.pt")
    assert_same_tensors(load_state_dict_file(tmp_path / "flat.pt"), {"w": w})
    torch.save({"global_step": 5, "state_dict": {}}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match=r"meta\.pt holds no tensors"):
        load_state_dict_file(tmp_path / "meta.pt")


def test_truncated_and_corrupt_weight_files_are_named(tmp_path):
    state = {"w": torch.randn(1000)}
    save_file(state, tmp_path / "full.safetensors")
    torch.save(state, tmp_path / "full.ckpt")
    torch.save(state, tmp_path / "full.pt", _use_new_zipfile_serialization=False)
    for suffix in (".safetensors", ".ckpt", ".pt"):
        data = (tmp_path / f"full{suffix}").read_bytes()
        path = tmp_path / f"cut{suffix}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=rf"cannot read .*cut\{suffix} \((truncated|.*corrupt)"):
            load_state_dict_file(path)
    data = (tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / "lying.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])  # header claims a terabyte
    with pytest.raises(CheckpointError, match=r"cannot read .*lying\.safetensors \(truncated or corrupt"):
        load_state_dict_file(path)


def test_wrong_extension_empty_and_missing_weight_files_are_named(tmp_path):
    path = tmp_path / "w.h5"
    path.write_bytes(b"not weights")
    with pytest.raises(CheckpointError, match=r"w\.h5: unknown weight-file extension '\.h5'; supported: \.safetensors, \.ckpt"):
        load_state_dict_file(path)
    for name in ("e.safetensors", "e.ckpt"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is empty"):
            load_state_dict_file(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"not found: .*nope\.safetensors"):
        load_state_dict_file(tmp_path / "nope.safetensors")
