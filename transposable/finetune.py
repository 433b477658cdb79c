"""Recovering a pruned language model by sparse fine-tuning: ``transposable finetune``.

A pruned folder (``transposable prune``'s, or any whose linear weights are N:M) is loaded,
every N:M layer is sparsified with exactly the mask its zeros describe, and the model trains
on the causal-LM loss of a text, optionally distilling from the dense model (KL divergence
of the logits, plus a hidden-state loss if asked). Masks stay fixed by default, or move with
SR-STE and refreshes. The result is written as a new folder that plain ``from_pretrained``
loads, every pruned layer still exactly N:M (transposable where it was).

Why a plain loop and not the Hugging Face ``Trainer``: the run's contract is about the
masks and the files, and a loop that owns every step keeps it with fewer surprises. The
Trainer would bring ``accelerate`` and its own choices (reporting to whatever tracker is
installed, moving the model, checkpoints written in place, gradient clipping at 1.0 by
default); here a checkpoint is written whole or not at all (a kill leaves the last complete
one), holds the masks, the optimizer, the schedule and the position in the data, and
``--resume`` continues the exact run.
"""
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .patterns import parse_pattern

# Light at import: the command's --help builds its options from Recipe; torch, transformers
# and the file formats load when a run starts.

#: The report written into every fine-tuned folder.
FINETUNE_REPORT = "finetune_report.json"


@dataclass
class Recipe:
    """How to fine-tune: every option of ``transposable finetune``, recorded in the report.

    Parameters
    ----------
    tokens : int
        Training tokens in all (steps = tokens / (batch_size * accumulation * seqlen)).
    seqlen, batch_size, accumulation : int
        Tokens per window, windows per micro-batch, micro-batches per optimizer step.
    lr, weight_decay : float
        AdamW's learning rate (peak) and decoupled weight decay.
    warmup : float
        Fraction of the steps with a linear warm-up; cosine decay to zero after it.
    masks : {"fixed", "srste"}
        Keep the pruned masks, or train with SR-STE and refresh them every
        ``refresh_every`` steps. With a teacher, SR-STE starts from dense weights under the
        pruned masks (pruned entries take the teacher's values, kept ones the pruned
        model's), so that refreshes can move weights in and out; the report gives the
        flips of every refresh (SAD).
    refresh_every : int
        Steps between refreshes with ``masks="srste"``.
    backward_mask : bool
        Row-wise pruned models: the input gradients use a second, column-wise N:M mask of
        every layer's weight, as :func:`transposable.sparsify`'s ``backward_mask`` (Bi-Mask),
        so that on a GPU both GEMMs of row-wise 2:4 layers run on sparse tensor cores; the
        model keeps its row-wise masks. On SmolLM2-135M it recovers as row-wise 2:4 does
        with exact gradients, where transposable 2:4 stays 1.3-1.4x worse (benchmarks/README).
    distill_weight, hidden_weight : float
        With a teacher: weight of the KL divergence of the logits and of the hidden-state
        loss (mean squared error over every layer's output, relative to the teacher's
        mean square), added to the cross-entropy.
    eval_fraction : float
        The end of the text held out for perplexity.
    eval_every, save_every : int
        Steps between held-out evaluations, and between checkpoints (0: only at the end).
    dtype : {"float32", "bfloat16"}
        The weights' training precision.
    autocast : bool
        Run the forward and backward passes (student and teacher) in bfloat16 under
        ``torch.autocast``, the weights and the optimizer staying in ``dtype``: mixed
        precision. About 1.7x faster steps on a CPU with AMX (benchmarks/README); held-out
        perplexity is measured without it.
    seed : int
        Seeds the order of the windows.

    Examples
    --------
    >>> Recipe(tokens=4096, seqlen=64).steps
    16
    """
    tokens: int = 262144
    seqlen: int = 256
    batch_size: int = 4
    accumulation: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    masks: str = "fixed"
    refresh_every: int = 40
    backward_mask: bool = False
    distill_weight: float = 1.0
    hidden_weight: float = 0.0
    eval_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 50
    dtype: str = "float32"
    autocast: bool = False
    seed: int = 0

    @property
    def steps(self):
        """Optimizer steps the token budget buys."""
        return self.tokens // (self.batch_size * self.accumulation * self.seqlen)

    def check(self):
        """Raise ``ValueError`` naming the first bad option."""
        for name in ("tokens", "seqlen", "batch_size", "accumulation", "refresh_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "save_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "weight_decay", "distill_weight", "hidden_weight"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.masks not in ("fixed", "srste"):
            raise ValueError(f"masks must be 'fixed' or 'srste', got {self.masks!r}")
        for name in ("autocast", "backward_mask"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.steps < 1:
            raise ValueError(f"tokens={self.tokens} is less than one optimizer step of batch_size * accumulation * "
                             f"seqlen = {self.batch_size * self.accumulation * self.seqlen} tokens")


def nm_layers(model, model_dir=None):
    """The N:M layers of a pruned model: ``{name: (pattern, transposable)}``.

    Read from ``pruning_report.json`` in ``model_dir`` when it is there, else from each
    linear layer's zeros: the smallest M whose groups along the input features all hold
    fewer than M non-zeros (N is the most any group holds), transposable if every M x M
    tile also holds at most N per column. Layers with no such M are dense.

    Parameters
    ----------
    model : nn.Module
        The loaded model.
    model_dir : str or Path, optional
        Its folder.

    Returns
    -------
    dict
        Layer names (``model.named_modules()``) to ``(Pattern, bool)``.

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     _ = layer.weight.mul_(torch.tensor([[1., 1, 0, 0]]).repeat(4, 2))  # 2:4 rows, full columns
    >>> {name: (str(p), t) for name, (p, t) in nm_layers(torch.nn.Sequential(layer)).items()}
    {'0': ('2:4', False)}
    """
    from .folders import REPORT_NAME
    from .layers import linear_weight, prunable

    report = Path(model_dir) / REPORT_NAME if model_dir is not None else None
    modules = dict(model.named_modules())
    if report is not None and report.is_file():
        saved = json.loads(report.read_text())
        pattern, transposable = parse_pattern(saved["pattern"]), bool(saved["transposable"])
        return {layer["name"]: (pattern, transposable) for layer in saved["layers"]
                if layer["status"] == "pruned" and layer["name"] in modules}
    found = {}
    for name, module in modules.items():
        if prunable(module) and linear_weight(module).dim() == 2:
            fit = _zeros_pattern(linear_weight(module).detach() != 0)
            if fit is not None:
                found[name] = fit
    return found


def _zeros_pattern(keep):
    """``(pattern, transposable)`` of a non-zero map ``(out, in)``, or None (see ``nm_layers``)."""
    out, inp = keep.shape
    for m in range(2, min(inp, 128) + 1):
        if inp % m:
            continue
        n = int(keep.reshape(out, inp // m, m).sum(dim=2).max())
        if n >= m:
            continue
        n = max(n, 1)
        tiles = out % m == 0 and int(keep.reshape(out // m, m, inp // m, m).sum(dim=1).max()) <= n
        return parse_pattern((n, m)), tiles
    return None


def finetune(model_dir, output, data_file, *, teacher=None, recipe=None, resume=False, force=False, allow_dense=False,
             progress=False, log=None):
    """Fine-tune a pruned model folder under its N:M masks and write a new folder.

    Parameters
    ----------
    model_dir : str or Path
        A Hugging Face causal LM folder whose linear weights are N:M (see :func:`nm_layers`).
    output : str or Path
        The new folder (must not exist unless ``force``). Checkpoints go to
        ``OUTPUT.checkpoints`` while the run lasts and are removed when it completes.
    data_file : str or Path
        UTF-8 text; its last ``recipe.eval_fraction`` is held out for perplexity.
    teacher : str or Path, optional
        The dense model's folder, to distill from (same vocabulary and hidden size).
    recipe : Recipe, optional
        The options (default ``Recipe()``).
    resume : bool, default False
        Continue from the last checkpoint in ``OUTPUT.checkpoints``.
    force : bool, default False
        Replace an existing ``output``.
    allow_dense : bool, default False
        Fine-tune a model with no N:M layer too (the dense control of an experiment)
        instead of refusing it.
    progress : bool, default False
        A progress bar (loss, tokens/s, ETA).
    log : callable, optional
        Called with a line at every evaluation.

    Returns
    -------
    dict
        The report also written to ``output / FINETUNE_REPORT``.

    Raises
    ------
    ValueError
        Before any training: bad options, a text that is not UTF-8, empty, or too short for
        one batch and one held-out window, a model with no N:M layer, a teacher of another
        vocabulary or hidden size; ``resume`` without a checkpoint.
    FileExistsError
        If ``output`` exists and ``force`` is False.

    Examples
    --------
    ::

        finetune("SmolLM2-135M-2of4", "SmolLM2-135M-2of4-recovered", "text.txt",
                 teacher="SmolLM2-135M", recipe=Recipe(tokens=2**20))
    """
    import torch

    from .io import atomic_directory
    from .nn import export, sparse_layers, sparsify_layers
    from .folders import load_model, read_text, require_transformers, write_model_folder
    from .formats import find_checkpoint

    recipe = recipe or Recipe()
    recipe.check()
    model_dir, output = Path(model_dir), Path(output)
    checkpoint = find_checkpoint(model_dir)
    text = read_text(data_file, "data file")
    if teacher is not None:
        find_checkpoint(Path(teacher))
    if output.resolve() == model_dir.resolve():
        raise ValueError(f"output '{output}' is the model folder; inputs are never overwritten")
    saves = Path(f"{output}.checkpoints")
    if resume and not _latest(saves):
        raise ValueError(f"nothing to resume: '{saves}' holds no checkpoint")
    with atomic_directory(output, force=force) as folder:
        transformers = require_transformers()
        if not progress:
            transformers.utils.logging.disable_progress_bar()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        train_windows, eval_windows = _windows(tokenizer, text, recipe)
        if teacher is not None:
            _check_teacher(transformers, model_dir, teacher)
        model = load_model(transformers, model_dir)
        layers = nm_layers(model, model_dir)
        if not layers and not allow_dense:
            raise ValueError(f"no linear layer of '{model_dir}' is N:M: prune it first (transposable prune)")
        if recipe.backward_mask and any(t for _, t in layers.values()):
            raise ValueError(f"backward_mask is for row-wise N:M layers, and '{model_dir}' is transposable N:M (its "
                             "masks serve the backward GEMMs already): leave backward_mask off")
        dtype = getattr(torch, recipe.dtype)
        model.to(dtype)
        sparsify_layers(model, layers, gradient="srste" if recipe.masks == "srste" else "ste",
                        refresh_every=recipe.refresh_every, backward_mask=recipe.backward_mask)
        for name, layer in sparse_layers(model):
            kept = layer.weight.detach() != 0
            if bool((kept & ~layer.mask).any()):
                raise ValueError(f"layer '{name}' is not {layer.pattern}{' transposable' if layer.transposable else ''}"
                                 " in its zeros; prune it first (transposable prune)")
        dense = None
        if teacher is not None:
            dense = load_model(transformers, Path(teacher)).to(dtype).eval().requires_grad_(False)
        regrow = recipe.masks == "srste" and dense is not None and bool(layers)
        if regrow:
            _dense_under_masks(model, dense)
        report = _train(model, dense, train_windows, eval_windows, recipe, saves, resume, progress, log)
        report["pruned_weights_from"] = "teacher" if regrow else "zeros" if recipe.masks == "srste" else None
        if layers:
            export(model)
        report.update(model=str(model_dir), data=str(data_file), teacher=None if teacher is None else str(teacher),
                      recipe=asdict(recipe),
                      layers={name: f"{p}{' transposable' if t else ''}" for name, (p, t) in layers.items()})
        metadata = {"transposable.finetuned": "1", "transposable.finetune_tokens": str(report["tokens"])}
        write_model_folder(model, model_dir, checkpoint, folder, [n for n, _ in model.named_parameters()], metadata,
                           replaced=(FINETUNE_REPORT,))
        (folder / FINETUNE_REPORT).write_text(json.dumps(report, indent=2))
    shutil.rmtree(saves, ignore_errors=True)  # the run is complete: its checkpoints are spent
    return report


def _dense_under_masks(model, teacher):
    """Give every sparse layer's pruned entries the teacher's dense values, kept entries as
    they are (the pruned model's reconstruction): the model computes what the pruned one
    does, and SR-STE can regrow what pruning removed (stored as zeros it would start from
    nothing, and no refresh could prefer it)."""
    import torch

    from .nn import sparse_layers

    with torch.no_grad():
        for name, layer in sparse_layers(model):
            dense = teacher.get_submodule(name).weight
            layer.weight.copy_(torch.where(layer.mask, layer.weight, dense.to(layer.weight.dtype)))


def _windows(tokenizer, text, recipe):
    """Training and held-out windows ``(count, seqlen)`` of token ids, or a one-line error."""
    import torch

    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    held = int(len(ids) * recipe.eval_fraction)
    train, held_out = ids[:len(ids) - held], ids[len(ids) - held:]
    count, evals = len(train) // recipe.seqlen, len(held_out) // recipe.seqlen
    if count < recipe.batch_size or evals < 1:
        raise ValueError(f"the data text has {len(ids)} tokens: too short for {recipe.batch_size} training windows "
                         f"of {recipe.seqlen} tokens and one held-out window ({recipe.eval_fraction:g} of the text); "
                         "give more text, or a smaller --seqlen or --batch-size")
    return (train[:count * recipe.seqlen].reshape(count, recipe.seqlen),
            held_out[:evals * recipe.seqlen].reshape(evals, recipe.seqlen))


def _check_teacher(transformers, model_dir, teacher):
    student, dense = (transformers.AutoConfig.from_pretrained(path) for path in (model_dir, teacher))
    for key in ("vocab_size", "hidden_size", "num_hidden_layers"):
        if getattr(student, key, None) != getattr(dense, key, None):
            raise ValueError(f"teacher '{teacher}' has {key}={getattr(dense, key, None)} but the model has "
                             f"{getattr(student, key, None)}; distill from the dense model it was pruned from")


def _latest(saves):
    found = sorted(saves.glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1])) if saves.is_dir() else []
    return found[-1] if found else None


def _schedule(recipe):
    """Learning-rate factor per step: linear warm-up, then cosine decay to zero."""
    warm = int(recipe.warmup * recipe.steps)

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, recipe.steps - warm)))

    return factor


def _train(model, teacher, train_windows, eval_windows, recipe, saves, resume, progress, log):
    """The loop: optimizer steps over the data order, each of :func:`_loss` on its
    micro-batches, with held-out evaluations (:func:`_perplexity`) and checkpoints
    (:func:`_save`, :func:`_restore`) when due."""
    import torch
    from tqdm import tqdm

    from .nn import MaskRefresher, sparse_layers

    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(recipe))
    refresher = MaskRefresher(model) if recipe.masks == "srste" and sparse_layers(model) else None
    run = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "refresher": refresher}
    step, history = _restore(_latest(saves), run) if resume else (0, {"loss": [], "eval": []})
    per_step = recipe.batch_size * recipe.accumulation
    order = torch.cat([torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(recipe.seed + e))
                       for e in range(math.ceil(recipe.steps * per_step / len(train_windows)))])

    def evaluate():
        perplexity = _perplexity(model, eval_windows, recipe.batch_size)
        history["eval"].append({"step": step, "perplexity": perplexity})
        if log:
            log(f"step {step}/{recipe.steps}: held-out perplexity {perplexity:.3f}")

    if not history["eval"]:
        evaluate()
    model.train()
    start, trained, step_times = time.perf_counter(), 0, []
    bar = tqdm(total=recipe.steps, initial=step, desc="fine-tuning", unit="step", disable=not progress, leave=False)
    while step < recipe.steps:
        step_start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(recipe.accumulation):
            first = (step * recipe.accumulation + micro) * recipe.batch_size
            loss = _loss(model, teacher, train_windows[order[first:first + recipe.batch_size]], recipe)
            (loss / recipe.accumulation).backward()
            losses.append(float(loss.detach()))
        optimizer.step()
        scheduler.step()
        step += 1
        if refresher is not None:
            refresher.step()
        trained += per_step * recipe.seqlen
        step_times.append(time.perf_counter() - step_start)
        history["loss"].append({"step": step, "loss": sum(losses) / len(losses)})
        bar.update(1)
        bar.set_postfix(loss=f"{history['loss'][-1]['loss']:.3f}",
                        tok_s=f"{trained / (time.perf_counter() - start):.0f}")
        if recipe.save_every and step % recipe.save_every == 0 and step < recipe.steps:
            _save(saves, step, history, run)
        if recipe.eval_every and step % recipe.eval_every == 0 and step < recipe.steps:
            evaluate()
    bar.close()
    evaluate()
    return {"steps": step, "tokens": step * per_step * recipe.seqlen, "seconds": time.perf_counter() - start,
            "step_seconds": sorted(step_times)[len(step_times) // 2] if step_times else None,
            "perplexity_before": history["eval"][0]["perplexity"], "perplexity_after": history["eval"][-1]["perplexity"],
            "history": history,
            "sad": None if refresher is None else [r["total"]["fraction"] for r in refresher.history],
            "sad_per_refresh": None if refresher is None else [
                {"step": r["step"], "flips": r["total"]["flips"], "fraction": r["total"]["fraction"]}
                for r in refresher.history]}


def _loss(model, teacher, batch, recipe):
    """The training loss of one micro-batch: the causal-LM cross-entropy, plus with a
    teacher the KL divergence of the logits and, if weighted, the hidden-state loss."""
    import torch
    import torch.nn.functional as F

    device = batch.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=recipe.autocast):
        out = model(input_ids=batch, labels=batch, output_hidden_states=recipe.hidden_weight > 0)
        if teacher is not None:
            with torch.no_grad():
                target = teacher(input_ids=batch, output_hidden_states=recipe.hidden_weight > 0)
    loss = out.loss
    if teacher is None:
        return loss
    vocab = out.logits.shape[-1]
    loss = loss + recipe.distill_weight * F.kl_div(
        F.log_softmax(out.logits.float().reshape(-1, vocab), dim=-1),
        F.log_softmax(target.logits.float().reshape(-1, vocab), dim=-1),
        log_target=True, reduction="batchmean")
    if recipe.hidden_weight > 0:
        loss = loss + recipe.hidden_weight * sum(
            F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean()
            for s, t in zip(out.hidden_states[1:], target.hidden_states[1:])) / (len(out.hidden_states) - 1)
    return loss


def _perplexity(model, windows, batch_size):
    """Held-out perplexity of ``windows``, in eval mode (the model is left in train mode)."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train()
    return math.exp(total / len(windows))


def _save(saves, step, history, run):
    """Write checkpoint ``step`` whole or not at all (atomically), then remove older ones."""
    import torch

    from .io import atomic_output

    saves.mkdir(parents=True, exist_ok=True)
    refresher = run["refresher"]
    with atomic_output(saves / f"step-{step}.pt", force=True) as tmp:
        torch.save({"model": run["model"].state_dict(), "optimizer": run["optimizer"].state_dict(),
                    "scheduler": run["scheduler"].state_dict(), "step": step, "history": history,
                    "rng": torch.get_rng_state(),
                    "refresher": refresher.state_dict() if refresher is not None else None}, tmp)
    for old in saves.glob("step-*.pt"):
        if old.name != f"step-{step}.pt":
            old.unlink()


def _restore(path, run):
    """Load checkpoint ``path`` into the run (safely: ``weights_only``); returns ``(step, history)``."""
    import torch

    state = torch.load(path, weights_only=True)
    run["model"].load_state_dict(state["model"])
    run["optimizer"].load_state_dict(state["optimizer"])
    run["scheduler"].load_state_dict(state["scheduler"])
    if run["refresher"] is not None:
        run["refresher"].load_state_dict(state["refresher"])
    torch.set_rng_state(state["rng"])  # dropout goes on as in the uninterrupted run
    return state["step"], state["history"]
