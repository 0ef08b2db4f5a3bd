"""The import directions of the architecture (ARCHITECTURE.md, "Rooms and what each may touch") stay true.

Two checks of each rule: what importing a module really pulls in (``sys.modules`` in a fresh interpreter,
so transitive imports count: one subprocess per rule), and the import statements of its files (an AST scan,
so an import inside a function, which the first check cannot see, counts too).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ("latte/sample.py", "latte/export.py", "latte/evaluate.py")  # may read a dataset's facts
MODEL_FORBIDDEN = ("deepspeed", "boto3", "botocore", "webdataset", "data_pipeline")
PIPELINE_FORBIDDEN = ("latte.models", "deepspeed")


def files_under(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def module_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(*folders: str) -> list[str]:
    return [module_of(p) for p in files_under(*folders)]


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in packages)


_IMPORT_ALL = """
import importlib, json, sys
modules, forbidden = json.loads(sys.argv[1])
def bad():
    return {m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden)}
found = {}
for name in modules:
    before = bad()
    importlib.import_module(name)
    added = sorted(bad() - before)
    if added:
        found[name] = added
print(json.dumps(found))
"""


def imported_by(modules: list[str], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """{module: the forbidden modules importing it added}, each imported in turn in one fresh interpreter."""
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL, json.dumps([modules, forbidden])],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_statements(path: Path) -> set[str]:
    """Every absolute module an import statement of ``path`` names, at any depth (functions, TYPE_CHECKING);
    ``from a import b`` names both ``a`` and ``a.b``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def statements_naming(paths: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in paths:
        bad = sorted(n for n in import_statements(path) if within(n, forbidden))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


# --------------------------------------------------------------------------------------------------------
# What importing pulls in (transitively)
# --------------------------------------------------------------------------------------------------------


def test_models_and_diffusion_import_no_deepspeed_boto3_webdataset_or_data_pipeline():
    modules = modules_under("latte/models", "latte/diffusion")
    assert "latte.models" in modules and "latte.diffusion" in modules
    assert imported_by(modules, MODEL_FORBIDDEN) == {}


def test_no_data_pipeline_module_imports_the_model_or_deepspeed():
    modules = modules_under("data_pipeline")
    assert "data_pipeline.loader" in modules and "data_pipeline.index" in modules
    assert imported_by(modules, PIPELINE_FORBIDDEN) == {}


def test_sampling_and_the_light_modules_import_no_deepspeed_or_boto3():
    """DeepSpeed only where an engine or its checkpoints are handled, and only when they are (inside the
    functions that need it); S3 only through data_pipeline.storage."""
    entry = [module_of(REPO / p) for p in ENTRY_POINTS if (REPO / p).is_file()]  # (engine, checkpoint too)
    light = [
        "latte.rendezvous",
        "latte.metrics",
        "latte.conditioning",
        "latte.seeding",
        "latte.vae",
        "latte.precision",
    ]
    modules = [*entry, *modules_under("latte/sampling"), *light]
    assert imported_by(modules, ("deepspeed", "boto3", "botocore")) == {}


def test_the_helpers_every_part_imports_are_standard_library_only():
    """data_pipeline and the models may import them: they must stay free of torch and the rest."""
    modules = ["latte.errors", "latte.files", "latte.config"]  # the config: yaml, no torch
    assert imported_by(modules, ("torch", "numpy", "deepspeed", "boto3", "data_pipeline")) == {}


# --------------------------------------------------------------------------------------------------------
# What the files' import statements name (also those inside functions)
# --------------------------------------------------------------------------------------------------------


def library_files() -> list[Path]:
    """latte/ without its entry points (which, like train.py, may import data_pipeline)."""
    return [p for p in files_under("latte") if str(p.relative_to(REPO)) not in ENTRY_POINTS]


def test_the_latte_library_never_imports_data_pipeline():
    files = library_files()
    assert REPO / "latte" / "sampling" / "decoding.py" in files and REPO / "latte" / "sample.py" not in files
    assert statements_naming(files, ("data_pipeline",)) == {}


def test_only_the_data_pipeline_s3_modules_talk_to_s3():
    """The latte side reads S3 (a dataset index) only through data_pipeline.storage (its one-line errors)."""
    assert statements_naming(files_under("latte"), ("boto3", "botocore")) == {}
    users = statements_naming(files_under("data_pipeline"), ("boto3", "botocore"))
    assert set(users) <= {"data_pipeline/storage.py", "data_pipeline/s3_opener.py"}, users


@pytest.mark.parametrize(
    "folders, forbidden",
    [
        (("latte/models", "latte/diffusion"), MODEL_FORBIDDEN),
        (("data_pipeline",), PIPELINE_FORBIDDEN),
        (("latte/sampling",), ("deepspeed",)),  # raw ZeRO weights: latte.checkpoint imports the converter
    ],
)
def test_no_import_statement_crosses_a_line(folders, forbidden):
    assert statements_naming(files_under(*folders), forbidden) == {}


def test_the_rendezvous_never_imports_deepspeed():
    assert statements_naming([REPO / "latte" / "rendezvous.py"], ("deepspeed",)) == {}


def test_the_scan_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "import os\n\n\ndef f():\n    from data_pipeline import storage\n"
        "    import deepspeed.comm\n    from . import sibling\n"
    )
    assert import_statements(source) == {"os", "data_pipeline", "data_pipeline.storage", "deepspeed.comm"}
