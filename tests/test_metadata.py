"""bundle/configs/metadata.json states the exact versions installed, for every package the code imports, and
pyproject.toml pins the same ones."""

from __future__ import annotations

import ast
import json
import os
import re
import sys
from importlib.metadata import version

from training_utils import META_JSON, REPO

#: import name -> distribution name, for the third-party packages custom_components imports
DISTRIBUTIONS = {"torch": "torch", "monai": "monai", "numpy": "numpy", "ignite": "pytorch-ignite", "fire": "fire",
                 "tifffile": "tifffile", "nibabel": "nibabel", "itk": "itk", "scipy": "scipy", "skimage": "scikit-image",
                 "edt": "edt", "cc3d": "connected-components-3d", "surface_distance": "surface-distance",
                 "tensorboard": "tensorboard", "tqdm": "tqdm", "matplotlib": "matplotlib"}


#: imported inside try/except, for an optional extra of pyproject.toml (not required, so not in metadata.json)
OPTIONAL = {"pynvml": "nvidia-ml-py (extra gpu)",
            "dynamic_network_architectures": "dynamic-network-architectures (--no-deps, Makefile; network kind 'resenc' only)",
            "zarr": "zarr (extra zarr)", "distributed": "dask[distributed] (extra zarr)"}


def _third_party_imports() -> set[str]:
    names = set()
    for folder, _, files in os.walk(os.path.join(REPO, "custom_components")):
        for f in files:
            if f.endswith(".py"):
                tree = ast.parse(open(os.path.join(folder, f)).read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "custom_components" and n not in OPTIONAL}


def test_every_imported_package_is_known_and_listed_at_its_installed_version():
    meta = json.load(open(META_JSON))
    listed = {"torch": meta["pytorch_version"], "monai": meta["monai_version"], "numpy": meta["numpy_version"],
              **meta["required_packages_version"]}
    imported = _third_party_imports()
    assert imported <= set(DISTRIBUTIONS), f"imported but not mapped to a distribution: {sorted(imported - set(DISTRIBUTIONS))}"
    for name in sorted(imported):
        dist = DISTRIBUTIONS[name]
        assert dist in listed, f"metadata.json does not list {dist} (imported as {name})"
        assert version(dist).split("+")[0] == listed[dist], f"{dist}: installed {version(dist)}, metadata.json {listed[dist]}"
    assert listed["topolosses"] == version("topolosses")  # loaded by file path, never imported


def test_pyproject_pins_what_metadata_states():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    deps = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', deps))
    meta = json.load(open(META_JSON))
    listed = {"torch": meta["pytorch_version"], "monai": meta["monai_version"], "numpy": meta["numpy_version"],
              **{k: v for k, v in meta["required_packages_version"].items() if k != "topolosses"}}
    assert {k: pins.get(k) for k in listed} == listed
    assert "topolosses==0.2.0" in open(os.path.join(REPO, "Makefile")).read()
    assert meta["authors"] == "Vesuvius surface bundle contributors"


def test_eval_metrics_are_the_published_figures_of_results_md():
    """metadata.json's eval_metrics are numbers, labelled synthetic and dated, and equal the RESULTS.md
    table row they name (score, TopoScore, SurfaceDice, VOI score in that order)."""
    metrics = json.load(open(META_JSON))["eval_metrics"]
    assert "synthetic, held-out profile" in metrics["data"] and re.search(r"\d{4}-\d{2}-\d{2}", metrics["data"])
    row = re.search(r"row (\S+)", metrics["data"]).group(1)
    table = open(os.path.join(REPO, "docs", "RESULTS.md")).read()
    line = re.search(rf"^\| {re.escape(row)} \|.*$", table, re.MULTILINE)
    assert line, f"docs/RESULTS.md has no table row '{row}' (named in metadata.json eval_metrics)"
    means = [float(cell.split()[0]) for cell in line.group(0).strip("|").split("|")[2:6]]
    assert means == [metrics[k] for k in ("competition_score", "topo_score", "surface_dice", "voi_score")]
