"""Bad images through the real `prepare` stage: handled as a user expects (converted, resized) or refused
with the file named, a non-zero exit, and the previous output untouched. (`tests/test_data.py` covers the
loaders case by case; this runs them as the stage a user runs.)"""

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from stages import prepare
from storage.datasets import open_dataset
from storage.hashing import tree_sha256

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory, copy_pipeline):
    return copy_pipeline(tmp_path_factory.mktemp("bad_data") / "repo")


def run_prepare(root: Path, monkeypatch, source: str, path: str) -> int:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"].update(source=source, path=path, max_images=None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(root)
    return prepare.main()


def image(path: Path, size=(20, 20), mode="RGB", value=128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode in ("L", "I;16") else (value,) * len(mode)).save(path)


def folder_with(root: Path, name: str, files: dict[str, str]) -> str:
    """A folder of class subfolders; each file spec is 'rgb', 'grey', 'rgba', 'big', 'text' or 'truncated'."""
    base = root / "data" / name
    base.mkdir(parents=True)
    for rel, kind in files.items():
        path = base / rel
        if kind == "text":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image")
        elif kind == "truncated":
            image(path)
            path.write_bytes(path.read_bytes()[:40])
        else:
            mode, size = {"rgb": ("RGB", (20, 20)), "grey": ("L", (20, 20)), "rgba": ("RGBA", (20, 20)),
                          "big": ("RGB", (64, 40))}[kind]
            image(path, size=size, mode=mode)
    return f"data/{name}"


REFUSED = [
    ("empty", {}, "no class subfolders"),
    ("class_without_images", {"a/1.png": "rgb", "a/2.png": "rgb", "b/readme.txt": "text"}, "b"),
    ("truncated", {"a/1.png": "rgb", "a/2.png": "rgb", "b/1.png": "rgb", "b/2.png": "truncated"}, "2.png"),
]


@pytest.mark.parametrize(("name", "files", "named"), REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_folder_is_refused_naming_the_file(repo, monkeypatch, capsys, name, files, named):
    before = tree_sha256(repo / "artifacts/prepare")
    assert run_prepare(repo, monkeypatch, "imagefolder", folder_with(repo, name, files)) != 0
    err = capsys.readouterr().err
    assert f"data/{name}" in err and named in err and "Traceback" not in err, err
    assert tree_sha256(repo / "artifacts/prepare") == before


def test_npz_labels_out_of_range_are_refused(repo, monkeypatch, capsys):
    before = tree_sha256(repo / "artifacts/prepare")
    np.savez(repo / "data/bad.npz", images=np.zeros((8, 16, 16), np.uint8), labels=np.array([0, 1, 2, -1] * 2),
             class_names=np.array(["a", "b", "c"]))
    assert run_prepare(repo, monkeypatch, "npz", "data/bad.npz") != 0
    err = capsys.readouterr().err
    assert "data/bad.npz" in err and "labels" in err, err
    assert tree_sha256(repo / "artifacts/prepare") == before


def test_mixed_sizes_modes_stray_files_and_a_single_class_are_handled(repo, monkeypatch):
    files = {f"only/{i}.png": kind for i, kind in enumerate(["rgb", "grey", "rgba", "big"] * 2)}
    files["only/notes.txt"] = "text"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_prepare(repo, monkeypatch, "imagefolder", folder_with(repo, "mixed", files)) == 0
    assert any("notes.txt" in str(w.message) for w in caught), "a skipped file is named in a warning"
    train = open_dataset(repo / "artifacts/prepare/train.zarr", kind="images", verify=True)
    assert train["images"].shape[1:] == (3, 16, 16) and train.attrs["num_classes"] == 1
