"""scripts/gather_wheels.py: what a bare GPU box lacks is computed from pip's installation report."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "scripts" / "gather_wheels.py"
spec = importlib.util.spec_from_file_location("gather_wheels", SCRIPT)
gw = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gw)


def item(name, version, *requires):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


REPORT = {"install": [
    item("tunesmith", "0.1.0", "torch>=2.4", "datasets>=3.0", "PyYAML>=6"),
    item("torch", "2.5.1", "filelock", "fsspec", "sympy; python_version >= '3.9'", "opt-einsum; extra == 'opt'"),
    item("transformers", "5.0.0", "huggingface_hub>=1", "pyyaml"),
    item("peft", "0.17.0", "torch"), item("accelerate", "1.10.0", "torch", "psutil"),
    item("datasets", "5.2.0", "pyarrow>=24", "fsspec", "dill", "huggingface-hub"),
    item("trl", "1.16.0", "datasets", "transformers"),
    item("filelock", "3.0"), item("fsspec", "2026.9.0"), item("sympy", "1.13"), item("huggingface-hub", "2.4.0"),
    item("PyYAML", "6.0.3"), item("psutil", "7.0"), item("pyarrow", "26.0.1"), item("dill", "0.4.1"),
]}


def test_without_a_have_list_the_box_is_assumed_to_hold_torch_transformers_peft_accelerate_and_their_deps():
    names = [n for n, _ in gw.missing(REPORT)]
    assert names == ["datasets", "dill", "pyarrow", "trl", "tunesmith"]  # fsspec, yaml, hub come with the four


def test_a_have_list_decides_by_canonical_name():
    have = {"torch", "pyyaml", "filelock", "datasets"}
    names = [n for n, _ in gw.missing(REPORT, have)]
    assert "PyYAML" not in names and "datasets" not in names and "transformers" in names and "trl" in names


def test_read_pins(tmp_path):
    f = tmp_path / "have.txt"
    f.write_text("# comment\nTorch==2.5.1+cu124\nhuggingface_hub==2.4.0\nsomething>=1\npkg[extra]==1.0 ; "
                 "python_version>'3'\n")
    assert gw.read_pins(f) == {"torch": "2.5.1+cu124", "huggingface-hub": "2.4.0", "pkg": "1.0"}


def test_install_refuses_a_folder_without_tunesmith(tmp_path, capsys):
    assert gw.main(["install", "--dest", str(tmp_path)]) == 2
    assert "holds no tunesmith wheel" in capsys.readouterr().err
