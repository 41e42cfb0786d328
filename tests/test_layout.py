"""The repository's wiring: every config's ``_target_`` and ``@id`` resolves, every package the README
names imports, and checkpoints hold no module paths (so moving a module never breaks an old checkpoint).

Nothing here instantiates a component: the checks read the merged configs as text, then look each name
up, so a renamed module, a deleted id or a typo fails with the config file and the key that holds it.
"""

from __future__ import annotations

import importlib
import io
import os
import re
import zipfile

import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

from training_utils import REPO

CONFIGS = os.path.join(REPO, "bundle", "configs")

#: every merge the README, the demo, the benchmarks and the tests make (base first).
MERGES = [
    ["train.json"],
    ["train.json", "demo.json"],
    ["train.json", "kaggle.json"],
    ["train.json", "seed_patch.json"],
    ["train.json", "resume.json"],
    ["train.json", "monai_augment.json"],
    ["train.json", "multi_gpu_train.json"],
    ["train.json", "demo.json", "multi_gpu_train.json"],
    ["train.json", "resenc.json"],
    ["train.json", "resenc.json", "kaggle_resenc.json"],
    ["train.json", "demo.json", "resenc.json", "resenc_demo.json"],
    ["inference.json"],
    ["inference.json", "demo_inference.json"],
    ["inference.json", "evaluate.json"],
    ["predict_zarr.json"],
]

REF = re.compile(r"@(\w+(?:#\w+)*)")
DOTTED = re.compile(r"\b(custom_components(?:\.\w+)+)")


def _parser(names):
    parser = ConfigParser()
    parser.read_config([os.path.join(CONFIGS, n) for n in names])
    return parser


def _walk(node, path=""):
    """(id, value) of every item of a config, MONAI's ``#``-separated ids."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        yield from _walk(v, f"{path}#{k}" if path else str(k))


def _resolve_dotted(name: str):
    """Import the longest module prefix of ``name`` and get the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_every_config_file_is_in_a_merge():
    merged = {n for m in MERGES for n in m}
    on_disk = {n for n in os.listdir(CONFIGS) if n.endswith(".json") and n != "metadata.json"}
    assert on_disk <= merged, f"config files no test merges: {sorted(on_disk - merged)}"


@pytest.mark.parametrize("names", MERGES, ids=["+".join(m) for m in MERGES])
def test_every_target_and_reference_resolves(names):
    parser = _parser(names)
    locator = ComponentLocator()
    problems = []
    for item_id, value in _walk(parser.get()):
        if item_id.endswith("_target_") and isinstance(value, str):
            found = locator.get_component_module_name(value) if "." not in value else None
            try:
                if found is None:
                    _resolve_dotted(value)
            except (ImportError, AttributeError) as e:
                problems.append(f"{item_id}: _target_ {value!r} does not resolve ({e})")
        if not isinstance(value, str):
            continue
        for ref in REF.findall(value):
            if ref not in parser:
                problems.append(f"{item_id}: reference @{ref} names no item")
        if value.startswith("$"):
            for dotted in DOTTED.findall(value):
                try:
                    _resolve_dotted(dotted)
                except (ImportError, AttributeError) as e:
                    problems.append(f"{item_id}: {dotted} does not resolve ({e})")
    assert not problems, f"{' + '.join(names)}:\n" + "\n".join(problems)


def test_handlers_are_linked_by_id_not_position():
    parser = _parser(["train.json"])
    assert parser["train#checkpoint_resumer#saver"] == "@train#checkpoint_saver"
    assert "handlers#" not in parser["train#trainer#train_handlers"]
    handlers = parser["train#handlers"]
    assert all(isinstance(h, dict) for h in handlers), "MONAI's check_properties reads each handler as a dict"


def test_preflight_settings_override_by_id():
    parser = _parser(["train.json"])
    assert parser["preflight#_target_"] == "custom_components.training.workflow.preflight"
    parser["preflight#fold"] = 3
    assert parser.get("preflight")["fold"] == 3


def test_autotune_finds_the_safe_handlers_through_the_expression():
    from custom_components.training.autotune import SAFE_HANDLERS, _handler_refs

    parser = _parser(["train.json"])
    refs = _handler_refs(parser, "train#trainer")
    names = [parser[r[1:] + "#_target_"].rsplit(".", 1)[-1] for r in refs]
    assert sorted(names) == sorted(SAFE_HANDLERS)


def _readme_packages():
    text = open(os.path.join(REPO, "README.md")).read()
    return sorted(set(re.findall(r"`(custom_components(?:\.\w+)*)`", text)))


def test_readme_layout_table_names_every_package_and_each_imports():
    names = _readme_packages()
    for pkg in ("data", "training", "losses", "metrics", "inference"):
        assert f"custom_components.{pkg}" in names, f"README's layout table does not name custom_components.{pkg}"
    for name in names:
        _resolve_dotted(name)


@pytest.mark.parametrize("package", ["data", "training", "losses", "metrics", "inference"])
def test_every_module_of_a_package_imports(package):
    folder = os.path.join(REPO, "custom_components", package)
    modules = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")
    assert modules
    for m in modules:
        importlib.import_module(f"custom_components.{package}.{m}")


def test_checkpoints_hold_no_module_paths(tmp_path):
    """A checkpoint is tensors and plain containers only, so it loads with ``weights_only=True`` wherever the
    code that wrote it now lives."""
    from ignite.engine import Engine

    from custom_components.training.checkpoint import AtomicCheckpointSaver
    from custom_components.training.network import build_dynunet

    net = build_dynunet(patch_size=[16, 16, 16], filters=[4, 8, 16], deep_supervision=True, deep_supr_num=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10)
    trainer = Engine(lambda e, b: None)
    saver = AtomicCheckpointSaver(str(tmp_path), {"network": net, "optimizer": opt, "lr_scheduler": sched})
    saver.attach(trainer)
    trainer.run([0], max_epochs=1)
    path = tmp_path / "last.pt"
    with zipfile.ZipFile(path) as z:
        pickled = b"".join(z.read(n) for n in z.namelist() if n.endswith(".pkl"))
    assert b"custom_components" not in pickled
    assert b"monai" not in pickled
    ckpt = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    assert set(ckpt) == {"network", "optimizer", "lr_scheduler", "trainer", "meta"}
    assert ckpt["meta"]["epoch"] == 1


CLI_MODULES = ["data.synthetic", "data.validate_data", "data.datalist", "data.convert_nnunet", "training.autotune",
               "training.average_checkpoints", "metrics.evaluate", "inference.submission", "inference.report", "inference.tune_postprocess",
               "inference.predict_zarr"]


def test_every_command_module_is_in_the_readme_and_has_help():
    import subprocess
    import sys

    readme = open(os.path.join(REPO, "README.md")).read()
    on_disk = sorted(
        f"{pkg}.{f[:-3]}" for pkg in ("data", "training", "metrics", "inference")
        for f in os.listdir(os.path.join(REPO, "custom_components", pkg))
        if f.endswith(".py") and "__main__" in open(os.path.join(REPO, "custom_components", pkg, f)).read()
    )
    assert on_disk == sorted(CLI_MODULES)
    for mod in CLI_MODULES:
        assert f"...{mod}`" in readme or f"custom_components.{mod}`" in readme, f"README does not name {mod}"
        out = subprocess.run([sys.executable, "-m", f"custom_components.{mod}", "--help"], capture_output=True, text=True,
                             cwd=REPO, timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), f"{mod} --help: {out.stderr[-500:]}"
        assert f"custom_components.{mod}" in out.stdout, f"{mod} --help names another program: {out.stdout[:200]}"
