"""The whole conversion story on real data, offline: ``transposable demo``.

Train a small MLP on the bundled digits, prune it to 50 % unstructured sparsity (and
fine-tune), save it as a checkpoint, then convert that checkpoint to 2:4 transposable by
magnitude (``convert_checkpoint``, file to file) and by AdaPrune, and compare accuracies.
"""
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adaprune import adaprune
from .convert import convert_checkpoint


def load_digits():
    """The bundled digits (see ``transposable/data/README.md``): images scaled to [0, 1],
    shape (1797, 64), and labels (1797,)."""
    with resources.files("transposable").joinpath("data/digits.npz").open("rb") as f:
        data = np.load(f)
        return torch.tensor(data["images"], dtype=torch.float32) / 16.0, torch.tensor(data["labels"], dtype=torch.long)


def split_digits(seed):
    """The bundled digits shuffled by ``seed``: 1,200 training and 597 test images,
    ``(x_train, y_train, x_test, y_test)``."""
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1200], order[1200:]
    return x[train], y[train], x[test], y[test]


def make_model():
    return nn.Sequential(
        nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Linear(256, 10))


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(model, x, y, steps, masks=None, lr=3e-3):
    """Full-batch Adam; ``masks`` (parameter -> bool mask) are re-applied after each step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if masks:
            with torch.no_grad():
                for param, mask in masks.items():
                    param.mul_(mask)
    return model


def kept_fraction_of_linear_weights(model):
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run_demo(workdir=None, pattern="2:4", seed=0, log=print):
    """Run the story and return ``[(label, non-zero fraction of the Linear weights, test
    accuracy), ...]``; ``workdir`` keeps the checkpoints (default: a temporary directory).
    ``tests/test_convert.py`` runs it through ``transposable demo``."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = split_digits(seed)
    # Calibration: 10 training images per class, 100 in all (AdaPrune needs very few).
    calibration = [x_train[torch.cat([(y_train == c).nonzero()[:10, 0] for c in range(10)])]]

    dense = train(make_model(), x_train, y_train, steps=300)
    rows = [("dense", 1.0, accuracy(dense, x_test, y_test))]
    log(f"trained dense MLP: test accuracy {rows[-1][2]:.4f}")

    masks = {}
    linear = [m.weight for m in dense.modules() if isinstance(m, nn.Linear)]
    threshold = torch.cat([w.detach().abs().flatten() for w in linear]).quantile(0.5)
    for weight in linear:
        masks[weight] = weight.detach().abs() > threshold
    with torch.no_grad():
        for weight, mask in masks.items():
            weight.mul_(mask)
    unstructured = train(dense, x_train, y_train, steps=100, masks=masks, lr=1e-3)
    rows.append(("50% unstructured (magnitude, fine-tuned)", kept_fraction_of_linear_weights(unstructured),
                 accuracy(unstructured, x_test, y_test)))
    log(f"pruned to 50% unstructured and fine-tuned: test accuracy {rows[-1][2]:.4f}")

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(workdir or scratch)
        checkpoint = folder / "digits_mlp_unstructured.safetensors"
        save_file({k: v.contiguous() for k, v in unstructured.state_dict().items()}, checkpoint)
        converted_path = folder / f"digits_mlp_{pattern.replace(':', '')}_transposable.safetensors"
        report = convert_checkpoint(checkpoint, converted_path, pattern, transposable=True, force=True)
        for tensor in report.tensors:
            if tensor.status != "converted" and not tensor.status.startswith("skipped: 1-D"):
                log(f"  {tensor.name}: {tensor.status}")
        magnitude = make_model()
        magnitude.load_state_dict(load_file(converted_path))
        rows.append((f"{pattern} transposable, magnitude (convert)", kept_fraction_of_linear_weights(magnitude),
                     accuracy(magnitude, x_test, y_test)))
        log(f"converted the checkpoint to {pattern} transposable by magnitude: test accuracy {rows[-1][2]:.4f}")

        fitted = make_model()
        fitted.load_state_dict(load_file(checkpoint))
        adaprune(fitted, calibration, pattern, transposable=True)
        rows.append((f"{pattern} transposable, AdaPrune ({len(calibration[0])} images)",
                     kept_fraction_of_linear_weights(fitted), accuracy(fitted, x_test, y_test)))
        log(f"converted by AdaPrune: test accuracy {rows[-1][2]:.4f}")
    return rows


def run_training_demo(epochs=30, seed=0, log=print, progress=True):
    """Train the digits MLP from scratch dense, and N:M-sparse with STE and SR-STE at 2:4
    and 4:8, row-wise and transposable. Returns ``[(label, test accuracy, final SAD), ...]``
    where SAD is the fraction of mask entries flipped at the last refresh (None if dense).

    It trains in float64 so that every machine prints the same table: in float32 the BLAS
    kernels of different CPUs (AVX2, AVX-512) and thread counts round differently, a mask
    entry near a tie flips on one machine and not on another, and the runs drift apart."""
    from tqdm import tqdm

    from .nn import MaskRefresher, sparsify

    x_train, y_train, x_test, y_test = (t.double() if t.is_floating_point() else t for t in split_digits(seed))
    runs = [("dense", None, None, None)]
    for pattern in ("2:4", "4:8"):
        for transposable in (False, True):
            for gradient in ("ste", "srste"):
                kind = "transposable" if transposable else "row-wise"
                runs.append((f"{pattern} {kind} {gradient.upper().replace('SRSTE', 'SR-STE')}",
                             pattern, transposable, gradient))
    rows = []
    for label, pattern, transposable, gradient in tqdm(runs, desc="training", disable=not progress, leave=False):
        torch.manual_seed(seed)
        model = make_model().double()
        refresher = None
        optimizer = None
        if pattern is not None:
            # First and last layers stay dense (10 outputs do not tile anyway); refresh every
            # 40 steps for transposable masks (Hubara et al.), every step row-wise (Zhou et al.).
            sparsify(model, pattern, transposable=transposable, gradient=gradient, skip_last=True)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        if pattern is not None:
            refresher = MaskRefresher(model).attach(optimizer)
        batches = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        for _ in range(epochs):
            model.train()
            for start in range(0, len(x_train), 64):
                index = batches[start:start + 64]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x_train[index]), y_train[index]).backward()
                optimizer.step()
            batches = batches[torch.randperm(len(batches))]
        sad = refresher.history[-1]["total"]["fraction"] if refresher and refresher.history else None
        rows.append((label, accuracy(model, x_test, y_test), sad))
        log(f"{label}: test accuracy {rows[-1][1]:.4f}" + (f", final SAD {sad:.5f}" if sad is not None else ""))
    return rows
