import pytest

from mechinterp.errors import UserError
from mechinterp.files import atomic_path, sha256_file, verify_sha256, write_json


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "out" / "table.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_leaves_nothing_after_an_error(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed halfway")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_the_old_output_when_the_new_one_fails(tmp_path):
    target = tmp_path / "summary.json"
    write_json({"run": 1}, target)
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise ValueError
    assert target.read_text().startswith("{\n")


def test_verify_sha256_names_the_config_key(tmp_path):
    path = tmp_path / "x.whl"
    path.write_bytes(b"wheel bytes")
    assert verify_sha256(path, sha256_file(path), "wheels.x.sha256") == sha256_file(path)
    with pytest.raises(UserError, match=r"wheels\.x\.sha256"):
        verify_sha256(path, "0" * 64, "wheels.x.sha256")
