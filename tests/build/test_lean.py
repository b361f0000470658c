import pytest

from exporter.build.gating import BuildError
from exporter.build.lean import find_lean_runtime, library_name


def fake_pip_install(site, package: str, dist: str, version: str, library: str):
    """A pip-installed library package the way TensorRT's wheels lay it out (package dir + dist-info)."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    (site / package / library).write_bytes(b"lean runtime")
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "top_level.txt").write_text(package + "\n")
    (info / "RECORD").write_text(f"{package}/__init__.py,,\n{package}/{library},,\n")
    return site / package / library


def test_the_lean_runtime_is_the_installed_tensorrt_major_and_the_first_found(tmp_path):
    assert library_name("11.4.0.106") == "libnvinfer_lean.so.11" and library_name("10.13.0.35") == "libnvinfer_lean.so.10"
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        folder.mkdir()
        (folder / "libnvinfer_lean.so.11").write_bytes(b"lean")
    assert find_lean_runtime("11.4.0.106", [tmp_path / "missing", first, second]) == first / "libnvinfer_lean.so.11"
    with pytest.raises(BuildError, match=r"lean runtime \(libnvinfer_lean.so.10\), found nowhere.*"
                                         r"pip install tensorrt-lean-cu12==10.13.0.35.*drop 'version_compatible'"):
        find_lean_runtime("10.13.0.35", [first, second])


def test_a_pip_lean_runtime_of_another_tensorrt_release_is_refused(tmp_path, monkeypatch):
    library = fake_pip_install(tmp_path / "site", "tensorrt_lean_libs", "tensorrt_lean_cu12_libs", "11.4.0.106",
                               "libnvinfer_lean.so.11")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_lean_runtime("11.4.0.106", [library.parent]) == library
    with pytest.raises(BuildError, match=r"is TensorRT 11.4.0.106's lean runtime and this TensorRT is 11.3.0.1.*"
                                         r"pip install tensorrt-lean-cu12==11.3.0.1"):
        find_lean_runtime("11.3.0.1", [library.parent])
