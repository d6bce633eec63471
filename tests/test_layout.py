"""How the checkout is cut: ``kernels/`` is a source root and no package; upq_hf has no import circle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run from the repository's root, where ``sys.path[0]`` is the checkout itself (as under ``python -m
# pytest``): the folder ``kernels/`` is then reachable as a namespace package named ``kernels``.
FROM_THE_ROOT = r"""
import importlib.metadata, json, sys, warnings
warnings.simplefilter("error")  # a half-imported peft would warn (or fail) here
import peft  # first: transformers probes for Hugging Face's `kernels` package while peft imports it
import upq_hf
import kernels
import upq_kernels
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from transformers.utils.import_utils import is_kernels_available
try:  # Hugging Face's `kernels` (a dependency of transformers >= 5.2x); absent from older installs
    hf_kernels = str(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
except importlib.metadata.PackageNotFoundError:
    hf_kernels = None
print(json.dumps({
    "hf_kernels_file": hf_kernels,
    "kernels_file": getattr(kernels, "__file__", None),
    "kernels_names": sorted(n for n in vars(kernels) if not n.startswith("__")),
    "kernels_available": is_kernels_available(),
    "upq_kernels_file": upq_kernels.__file__,
    "lora_tuner": PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA].__module__ + "." + PEFT_TYPE_TO_TUNER_MAPPING[PeftType.LORA].__name__,
}))
"""


@pytest.fixture(scope="module")
def from_the_root():
    out = subprocess.run([sys.executable, "-c", FROM_THE_ROOT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kernels_folder_is_a_source_root_not_a_package(from_the_root):
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix == ".py") == []
    hf_kernels = from_the_root["hf_kernels_file"]
    if hf_kernels is None:
        # no Hugging Face `kernels` installed: from the root, `kernels` is an empty namespace package, and
        # transformers reads it as "not installed"
        assert from_the_root["kernels_file"] is None and from_the_root["kernels_names"] == []
        assert from_the_root["kernels_available"] is False
    else:
        # installed (transformers >= 5.2x requires it): the checkout's folder does not shadow it
        assert Path(from_the_root["kernels_file"]).resolve() == Path(hf_kernels).resolve()
        assert ROOT / "kernels" not in Path(from_the_root["kernels_file"]).resolve().parents
        assert from_the_root["kernels_names"] != []
        assert from_the_root["kernels_available"] is True
    assert Path(from_the_root["upq_kernels_file"]) == ROOT / "kernels" / "upq_kernels" / "__init__.py"


def test_peft_imported_first_from_the_root_registers_lora(from_the_root):
    # peft imported before upq_hf, from the checkout's root: nothing is half-imported, LoRA knows UPQLinear
    assert from_the_root["lora_tuner"] == "upq_hf.lora.UPQLoraModel"


def test_setup_cfg_installs_every_package_from_its_folder():
    import configparser

    options = configparser.ConfigParser()
    options.read(ROOT / "setup.cfg")
    packages = options["options"]["packages"].split()
    package_dir = dict(line.split(" = ") for line in options["options"]["package_dir"].strip().splitlines())
    assert package_dir == {"upq_kernels": "kernels/upq_kernels"}
    found = sorted(".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "upq_hf").rglob("__init__.py"))
    found += sorted("upq_kernels" + ".".join(("",) + p.parent.relative_to(ROOT / "kernels" / "upq_kernels").parts)
                    for p in (ROOT / "kernels" / "upq_kernels").rglob("__init__.py"))
    assert sorted(packages) == sorted(found) == ["upq_hf", "upq_hf.data", "upq_hf.evaluation", "upq_kernels"]
    # the C and C++ sources the avx2 backend compiles at first use ship with the package
    shipped = options["options.package_data"]["upq_hf"].split()
    sources = sorted(str(p.relative_to(ROOT / "upq_hf")) for pattern in ("*.c", "*.cpp", "*.h")
                     for p in (ROOT / "upq_hf").rglob(pattern))
    assert sources == ["csrc/upq_cpu.c", "csrc/upq_cpu.h", "csrc/upq_decode.cpp", "csrc/upq_op.cpp"]
    assert all(any((ROOT / "upq_hf" / source).match(pattern) for pattern in shipped) for source in sources)


# ------------------------------------------------------------------------------------------ import circles

def module_imports(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` for every ``.py`` file below ``root`` (the folder
    of ``package``): every ``import`` statement anywhere in a file counts, function-local ones and those
    under ``if TYPE_CHECKING:`` included. ``from X import y`` imports the submodule ``X.y`` when there is one,
    else (an attribute) ``X`` itself; importing a module also runs the ``__init__`` of each package above it
    that is not above the importer too (those are already running)."""
    import ast

    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
        modules[name] = (path, parts[-1] == "__init__")
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        here = name if is_package else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in (t for t in targets if t in modules):
                parts = target.split(".")
                found.update(".".join(parts[:k]) for k in range(1, len(parts) + 1)
                             if not (name == ".".join(parts[:k]) or name.startswith(".".join(parts[:k]) + ".")))
        graph[name] = {m for m in found if m in modules}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan): each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_circle_finder_finds_a_circle_through_a_function_local_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = module_imports(pkg, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b"]]


@pytest.mark.parametrize("package,folder", [("upq_hf", "upq_hf"), ("upq_kernels", "kernels/upq_kernels")])
def test_no_import_circles(package, folder):
    graph = module_imports(ROOT / folder, package)
    assert len(graph) >= 8
    assert import_circles(graph) == []
