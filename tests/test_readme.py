"""The README's Python examples run as written (so they cannot rot).

``python`` blocks run here; ``py`` blocks are illustrations that need files only a user has (checkpoints).
"""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLES = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_examples():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})


def test_readme_commands_name_existing_modules():
    # every `python -m <module>` the README documents must exist (a renamed module would leave it dangling)
    import importlib.util

    modules = set(re.findall(r"python3? -m (crfrnn_deeplab[\w.]*)", README.read_text(encoding="utf-8")))
    assert modules, "the README documents no `python -m crfrnn_deeplab...` command"
    for module in sorted(modules):
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"README runs python -m {module}, which does not exist"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__"
