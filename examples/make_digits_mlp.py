"""Regenerate ``digits_mlp.safetensors``: a 64-256-256-10 MLP trained on scikit-learn's
bundled digits (offline), the weight file the README's quickstart solves masks for.

Run: python examples/make_digits_mlp.py   (needs scikit-learn)
"""
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits


def main():
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = slice(0, 1400), slice(1400, None)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[train]), y[train]).backward()
        opt.step()
    accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    names = {"0": "fc1", "2": "fc2", "4": "fc3"}
    state = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v.detach().contiguous()
             for k, v in model.state_dict().items()}
    out = Path(__file__).with_name("digits_mlp.safetensors")
    save_file(state, out, metadata={"dataset": "sklearn digits", "test_accuracy": f"{accuracy:.4f}"})
    print(f"wrote {out} (test accuracy {accuracy:.4f})")


if __name__ == "__main__":
    main()
