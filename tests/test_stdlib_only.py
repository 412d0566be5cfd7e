"""The app runs on the standard library alone: nothing to install but Python."""
import ast
import sys

from conftest import REPO


def test_every_app_module_imports_only_the_standard_library():
    modules = sorted(REPO.glob("*.py"))
    local = {path.stem for path in modules}
    allowed = set(sys.stdlib_module_names) | local | {"__future__"}
    outside = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            outside += [f"{path.name}: {name}" for name in names
                        if name.split(".")[0] not in allowed]
    assert len(modules) >= 2
    assert outside == []
