"""The README's quickstart stays true: two commands, and CI runs the test one verbatim."""
import os
import re
import subprocess
import sys
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


def readme_table(heading):
    """Rows (lists of cells) of the first Markdown table after the line starting ``heading``."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return [row for row in rows[1:] if not set(row[0]) <= {"-"}]  # no header, no rule


def printed_table(out):
    """Rows of the table a command printed."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ")]
    return [row for row in rows[1:]]


def test_readme_training_table_is_what_train_demo_prints(capsys):
    from transposable.cli import main

    assert main(["train", "--demo"]) == 0
    captured = capsys.readouterr()
    assert printed_table(captured.out) == readme_table("`transposable train --demo` trains")
    assert len(captured.err.splitlines()) == 9  # one line per finished run (stderr is no terminal)


def test_the_training_demo_prints_the_same_table_on_other_cpus_and_thread_counts():
    """What another machine would do: other vector instructions (AVX2 instead of this CPU's
    best) and another thread count change float32 rounding, and used to change the table."""
    def table(**environment):
        result = subprocess.run([sys.executable, "-m", "transposable", "train", "--demo", "--epochs", "4"],
                                capture_output=True, text=True, timeout=600, env={**os.environ, **environment})
        assert result.returncode == 0, result.stderr
        return printed_table(result.stdout)

    here = table()
    assert len(here) == 9
    assert table(MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2") == here
    assert table(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") == here


def test_ci_runs_the_readme_test_command():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci_lines
