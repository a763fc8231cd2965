"""The folder-to-namespace mapping and the light device SDK, checked on the source tree
and on the built wheel (what users install)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]

# Importing the device SDK must not pull these in (gateways and Raspberry Pis install
# only the SDK's own dependencies).
_BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'web3', 'amqtt', 'eth_tester', 'eth', 'aiohttp'}:
            raise ImportError('blocked in test: ' + name)
        return None
sys.meta_path.insert(0, Blocker())
import blendsm.device_sdk
import blendsm.errors
print('ok', sorted(m for m in sys.modules if m.startswith('blendsm')))
"""


def _package_folders() -> set[str]:
    """Every importable package under the mapped folders, as a dotted blendsm name."""
    names: set[str] = set()
    for package, folder in SETUPTOOLS["package-dir"].items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base)
            if "node_modules" in rel.parts:
                continue
            names.add(".".join([package, *rel.parts]))
    return names


def test_every_package_folder_is_listed() -> None:
    assert _package_folders() == set(SETUPTOOLS["packages"])


def test_every_package_is_typed() -> None:
    # A folder nested in another mapped folder (src/blendsm/cli in src/blendsm) is covered
    # by its parent's marker (PEP 561: py.typed applies to subpackages).
    folders = {package: Path(folder) for package, folder in SETUPTOOLS["package-dir"].items()}
    for package, folder in folders.items():
        if not any(other in folder.parents for other in folders.values()):
            assert (ROOT / folder / "py.typed").is_file(), package


def test_device_sdk_imports_without_web3_or_amqtt() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKER], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("blendsm-*.whl")
    return found


def test_wheel_has_one_namespace_and_the_artifacts(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.startswith("blendsm-")}
    assert top == {"blendsm"}, top  # no generic top-level `plugins`, `broker`, ...
    for package in SETUPTOOLS["packages"]:
        assert package.replace(".", "/") + "/__init__.py" in names, package
    for artifact in (ROOT / "contracts" / "artifacts").glob("*.json"):
        assert f"blendsm/contracts/artifacts/{artifact.name}" in names
    assert "blendsm/contracts/src/PaymentChannels.sol" in names


def test_installed_wheel_runs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import blendsm, blendsm.contracts as c; "
        f"assert blendsm.__file__.startswith({str(target)!r}), blendsm.__file__; "
        "print(len(c.load_artifact('PaymentChannels')['abi']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 10
