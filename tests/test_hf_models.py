"""Sparse training on Hugging Face models built in code: GPT-2 (Conv1D, tied lm_head), BERT;
saving and reloading with save_pretrained / torch.save."""
import logging

import pytest
import torch

import transposable as tp
from checks import assert_valid_mask
from transposable.nn import SparseLinear, export, restore_sparse, sparse_layers, sparsify

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64, num_labels=2)
    return transformers.BertForSequenceClassification(config).eval()


TOKENS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


def test_gpt2_conv1d_layers_are_sparsified_and_the_tied_head_is_not(caplog):
    model = tiny_gpt2()
    embedding = model.transformer.wte.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="transposable"):
        sparsify(model, "2:4")
    names = [name for name, _ in sparse_layers(model)]
    assert len(names) == 8 and all(".attn.c_" in n or ".mlp.c_" in n for n in names)  # 4 Conv1D per block
    assert "lm_head: weight shared with transformer.wte (tied)" in caplog.text
    assert torch.equal(model.transformer.wte.weight, embedding)  # the embedding is not pruned
    export(model)
    assert torch.equal(model.transformer.wte.weight, embedding)
    for name in names:
        weight = model.get_submodule(name).weight  # stored (in, out): groups along in = columns of W^T
        assert_valid_mask(weight.detach().t() != 0, 2, 4, transposable=True)


def test_bert_linear_layers_are_sparsified():
    model = sparsify(tiny_bert(), "2:4", exclude=["classifier"])
    names = [name for name, _ in sparse_layers(model)]
    assert len(names) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output per layer; the pooler
    assert all(isinstance(layer, SparseLinear) for _, layer in sparse_layers(model))


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_save_pretrained_then_restore_sparse_resumes_with_the_masks(make, tmp_path):
    model = sparsify(make(), "4:8", exclude=["classifier"])
    with torch.no_grad():  # training moved the weights away from what a fresh solve would pick
        for _, layer in sparse_layers(model):
            layer.weight.add_(torch.randn_like(layer.weight))
    expected = model(TOKENS).logits
    model.save_pretrained(tmp_path / "saved")

    loaded, info = type(model).from_pretrained(tmp_path / "saved", output_loading_info=True)
    assert sum(key.endswith(".mask") for key in info["unexpected_keys"]) == len(sparse_layers(model))
    assert not sparse_layers(loaded)  # plain from_pretrained: dense, the masks ignored

    restore_sparse(loaded.eval(), tmp_path / "saved")
    assert [n for n, _ in sparse_layers(loaded)] == [n for n, _ in sparse_layers(model)]
    for (_, a), (_, b) in zip(sparse_layers(model), sparse_layers(loaded)):
        assert torch.equal(a.mask, b.mask) and (str(a.pattern), a.transposable) == (str(b.pattern), b.transposable)
    torch.testing.assert_close(loaded(TOKENS).logits, expected)


def test_torch_save_state_dict_then_restore_sparse(tmp_path):
    model = sparsify(tiny_gpt2(), {"*.mlp.*": "2:4", "*.attn.*": "8:16"}, transposable=False)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    for source in (tmp_path / "state.pt", torch.load(tmp_path / "state.pt", weights_only=True)):
        fresh = restore_sparse(tiny_gpt2(seed=1).eval(), source)  # other initial weights: all loaded
        assert [(n, str(l.pattern), l.transposable) for n, l in sparse_layers(fresh)] == [
            (n, str(l.pattern), l.transposable) for n, l in sparse_layers(model)]
        torch.testing.assert_close(fresh(TOKENS).logits, model(TOKENS).logits)


def test_an_exported_model_loads_in_plain_transformers_without_missing_or_unexpected_keys(tmp_path):
    model = sparsify(tiny_gpt2(), "2:4")
    expected = model(TOKENS).logits
    export(model).save_pretrained(tmp_path / "exported")
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    torch.testing.assert_close(loaded.eval()(TOKENS).logits, expected)
    assert tp.is_transposable_nm(loaded.transformer.h[0].mlp.c_fc.weight.detach().t(), "2:4")
    with pytest.raises(ValueError, match="holds no '.*mask' tensors: it was not saved from a sparsified model"):
        restore_sparse(loaded, tmp_path / "exported")


def test_restore_sparse_refuses_what_does_not_fit():
    model = sparsify(tiny_gpt2(), "2:4", transposable=False)
    state = model.state_dict()
    with pytest.raises(ValueError, match="the mask of 'transformer.h.0.attn.c_attn' is not 4:8 transposable; pass"):
        restore_sparse(tiny_gpt2(), state, pattern="4:8", transposable=True)
    with pytest.raises(ValueError, match="has a mask for 'transformer.nowhere', which is not a linear or conv"):
        restore_sparse(tiny_gpt2(), {**state, "transformer.nowhere.mask": state["transformer.h.0.attn.c_attn.mask"]})
    untouched = tiny_gpt2()
    with pytest.raises(ValueError, match="holds tensors the model does not have: extra.weight; restore into"):
        restore_sparse(untouched, {**state, "extra.weight": torch.zeros(2)})
    assert not sparse_layers(untouched)  # refused before any change


# ---- the Trainer callback ---------------------------------------------------------------------

class Tokens(torch.utils.data.Dataset):
    """Random token sequences; ``labels`` as the model wants them."""

    def __init__(self, causal, size=64):
        generator = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 256, (size, 16), generator=generator)
        self.classes = torch.randint(0, 2, (size,), generator=generator)
        self.causal = causal

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i] if self.causal else self.classes[i]}


def fine_tune(make, output_dir, max_steps, resume=None, seed=0):
    from transposable.hf import SparseTrainingCallback

    model = sparsify(make(seed).train(), "2:4", refresh_every=2, exclude=["classifier"])
    args = transformers.TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8,
                                          learning_rate=5e-3, save_steps=3, logging_steps=1000, report_to=[],
                                          use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(causal=make is tiny_gpt2))
    callback = SparseTrainingCallback(trainer)
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_bert], ids=["gpt2", "bert"])
def test_trainer_callback_refreshes_logs_sad_and_checkpoints_the_refresher(make, tmp_path):
    trainer, callback = fine_tune(make, tmp_path / "run", max_steps=6)
    assert [r["step"] for r in callback.refresher.history] == [2, 4, 6]
    logged = [entry for entry in trainer.state.log_history if "sad" in entry]
    assert [entry["sad_flips"] for entry in logged] == [r["total"]["flips"] for r in callback.refresher.history]
    assert [entry["step"] for entry in logged] == [2, 4, 6]  # logged at the refresh's own step
    assert any(entry["sad_flips"] > 0 for entry in logged)  # the weights moved: masks changed
    for _, layer in sparse_layers(trainer.model):
        assert_valid_mask(layer.mask, 2, 4, transposable=True)

    # Resumed from the step-3 checkpoint (other initial weights: all come from the checkpoint),
    # the run ends where the uninterrupted one did: same masks, same SAD record.
    resumed, resumed_callback = fine_tune(make, tmp_path / "resumed", max_steps=6,
                                          resume=str(tmp_path / "run" / "checkpoint-3"), seed=1)
    assert resumed_callback.refresher.history == callback.refresher.history
    for (_, a), (_, b) in zip(sparse_layers(trainer.model), sparse_layers(resumed.model)):
        assert torch.equal(a.mask, b.mask)


def test_adaprune_takes_batch_encodings_as_tokenizers_return_them():
    from transposable.adaprune import adaprune

    ids = TOKENS.repeat(2, 1)
    encoded = [transformers.BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})]
    pruned = adaprune(tiny_bert(), encoded, "2:4", steps=3)
    as_dicts = adaprune(tiny_bert(), [dict(batch) for batch in encoded], "2:4", steps=3)
    for (name, a), b in zip(pruned.named_parameters(), as_dicts.parameters()):
        assert torch.equal(a, b), name
    assert tp.is_transposable_nm(pruned.bert.encoder.layer[0].intermediate.dense.weight, "2:4")
