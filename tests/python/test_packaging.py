"""The Python package as it ships: a wheel that carries the reference schema and loads it outside
the checkout, and subpackages whose imports run one way (sim -> ops -> app)."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "exporter" / "booking_guard"
SCHEMA = PACKAGE / "sim" / "data" / "app_schema.sql"

#: What each subpackage may import of booking_guard (besides itself and the top-level __version__).
ALLOWED = {"app": set(), "ops": {"app"}, "sim": {"app", "ops"}}


def test_examples_app_schema_is_a_link_to_the_packaged_schema():
    link = ROOT / "examples" / "app_schema.sql"
    assert link.is_symlink() and link.resolve() == SCHEMA.resolve()
    assert not SCHEMA.is_symlink()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the package's sources (setuptools writes build/ next to
    pyproject.toml: in the checkout that would be the extension's build directory)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "exporter", source / "exporter",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    out = tmp / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    [whl] = out.glob("booking_guard-*.whl")
    return whl


def test_the_wheel_carries_the_schema_and_the_three_subpackages(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        assert "booking_guard/sim/data/app_schema.sql" in names
        assert whl.read("booking_guard/sim/data/app_schema.sql") == SCHEMA.read_bytes()
        for module in ("__init__", "cli", "app/__init__", "app/booking", "app/circuit", "ops/__init__", "ops/cli",
                       "ops/serve", "ops/targets", "sim/__init__", "sim/cli", "sim/demo", "sim/simulate"):
            assert f"booking_guard/{module}.py" in names, module
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "booking-guard = booking_guard.cli:main" in whl.read(entry_points).decode()


def test_the_installed_wheel_loads_the_schema_outside_the_checkout(wheel, tmp_path, empty_db):
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                                "--target", str(site), str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel's copy comes first on the path; the checkout (the editable install's path) is not consulted
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = ("import booking_guard, booking_guard.sim as sim, sys; "
            "assert booking_guard.__file__.startswith(sys.argv[1]), booking_guard.__file__; "
            "sys.stdout.write(sim.app_schema())")
    loaded = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=elsewhere,
                            env=env, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == SCHEMA.read_text()
    # and it is the schema: it loads into an empty database, with the tables booking_guard attaches to
    empty_db.autocommit = True
    empty_db.execute(loaded.stdout)
    assert empty_db.execute("select to_regclass('public.calls') is not null and to_regclass('public.appointments')"
                            " is not null").fetchone()[0]


def imports_of(path: Path) -> set[str]:
    """The booking_guard subpackages a module imports (app, ops, sim), at any depth of the module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            pytest.fail(f"{path}: relative import; booking_guard imports by absolute name")
        for name in names:
            parts = name.split(".")
            if parts[0] == "booking_guard" and len(parts) > 1 and parts[1] in ALLOWED:
                found.add(parts[1])
    return found


def test_imports_run_one_way():
    for subpackage, allowed in ALLOWED.items():
        modules = sorted((PACKAGE / subpackage).rglob("*.py"))
        assert modules, subpackage
        for module in modules:
            wrong = imports_of(module) - allowed - {subpackage}
            assert not wrong, f"{module.relative_to(ROOT)} imports booking_guard.{', '.join(sorted(wrong))}"
    # the top level: the version, and the command that puts ops' and sim's commands together
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "cli.py"]
    assert imports_of(PACKAGE / "__init__.py") == set()


def test_an_application_imports_app_without_ops_or_sim():
    code = ("import sys, booking_guard.app; "
            "loaded = sorted(m for m in sys.modules if m.startswith(('booking_guard.ops', 'booking_guard.sim'))); "
            "assert not loaded, loaded; assert 'prometheus_client' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
