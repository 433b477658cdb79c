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
    finished = [line for line in captured.err.splitlines()  # with an empty numba cache, compile notices too
                if not line.startswith("transposable: compiling solver kernels")]
    assert len(finished) == 9  # one line per finished run (stderr is no terminal)


def test_the_training_demo_prints_the_same_table_on_other_cpus_and_thread_counts():
    """What another machine would do: other vector instructions (AVX2 instead of this CPU's
    best) and another thread count change float32 rounding, and used to change the table."""
    from transposable.demo import run_training_demo

    here = run_training_demo(epochs=4, progress=False, log=lambda *a: None)
    result = subprocess.run([sys.executable, "-m", "transposable", "train", "--demo", "--epochs", "4"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                                 "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert printed_table(result.stdout) == [[label, f"{accuracy:.4f}", "-" if sad is None else f"{sad:.5f}"]
                                            for label, accuracy, sad in here]


def test_ci_runs_the_readme_commands_in_order_as_a_new_user_would():
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    use, develop = quickstart_commands()
    assert use in ci_lines and develop in ci_lines and ci_lines.index(use) < ci_lines.index(develop)


def test_extras_are_installed_from_the_checkout_as_the_package_is_on_no_index():
    """``pip install "transposable[llm]"`` cannot work: nothing advises it."""
    sources = [REPO / "README.md", *(REPO / "transposable").rglob("*.py"), *(REPO / "examples").glob("*.py")]
    advising = [p.name for p in sources if re.search(r"transposable\[\w+\]", p.read_text())]
    assert advising == []
    readme = (REPO / "README.md").read_text()
    assert 'pip install ".[llm]"' in readme and 'pip install ".[hf]"' in readme


def test_the_quickstart_output_is_ignored_by_git():
    output = re.search(r" -o (\S+)", quickstart_commands()[0]).group(1)
    assert f"/{output}" in (REPO / ".gitignore").read_text().splitlines()


def test_the_readme_says_how_to_get_a_real_model_folder():
    readme = (REPO / "README.md").read_text()
    assert "python examples/smollm2_folder.py SmolLM2-135M" in readme
    assert "transposable prune SmolLM2-135M --pattern 2:4" in readme and "--calibration README.md" in readme


def test_the_real_model_recipe_saves_a_folder_that_loads_and_prunes(tmp_path):
    """``examples/smollm2_folder.py``'s copy step on a tiny model standing in for the GGUF one."""
    import torch
    import transformers

    sys.path.insert(0, str(REPO / "examples"))
    from smollm2_folder import save_plain_copy

    from test_prune import tiny_llama

    model = tiny_llama()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer(
        __import__("tokenizers").models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]")
    folder = save_plain_copy(model, tokenizer, tmp_path / "model")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert (folder / "tokenizer.json").exists()
