"""studio.core never imports Qt: checked at run time here (import-linter checks the source)."""

import pkgutil
import subprocess
import sys

import studio.core


def test_importing_every_core_module_loads_no_qt():
    modules = [f"studio.core.{m.name}" for m in pkgutil.iter_modules(studio.core.__path__)]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('PySide6', 'shiboken6', 'pyqtgraph', 'superqt', 'qtawesome', 'qtpy')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    assert len(modules) >= 6
