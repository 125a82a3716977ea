import pickle

import pytest
import torch

from ldm.checkpoint import CheckpointError, atomic_save, load_weights, safe_load


def test_atomic_save_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"w": torch.arange(5), "step": 3}, path)
    assert safe_load(path)["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


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
    with pytest.raises(CheckpointError):
        safe_load(path)
    assert not (tmp_path / "PWNED").exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        safe_load(raw)
    assert not (tmp_path / "PWNED").exists()


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
