"""The README's quickstart stays true: two commands, and CI runs the test one verbatim."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def test_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "transposable solve examples/" in commands[0]
    assert (REPO / "examples" / "digits_mlp.safetensors").exists()


def test_ci_runs_the_readme_test_command():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci_lines
