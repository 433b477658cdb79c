"""Pruning and fine-tuning write what they wrote before the pruning path was reshaped into a
recipe of steps (issue 30): the fingerprints in ``tests/data/golden_pruning.json`` were
written by the code before that change (``tests/golden_pruning.py`` says how)."""
import json
import math

import pytest

pytest.importorskip("transformers")

import golden_pruning  # noqa: E402


@pytest.fixture(scope="module")
def results():
    return golden_pruning.compute()


@pytest.fixture(scope="module")
def golden():
    return json.loads(golden_pruning.GOLDEN.read_text())


def test_every_case_is_computed(results, golden):
    assert sorted(results) == sorted(golden)


@pytest.mark.parametrize("case", [case for case, *_ in golden_pruning.PRUNES] + [
    "folder-streamed-sparsegpt-t2:4", "folder-streamed-wanda-t4:8-permute", "finetune-fixed-distilled",
    "finetune-srste", "finetune-hidden-accumulated"])
def test_the_same_tensors_as_before(results, golden, case):
    ours, theirs = results[case], golden[case]
    assert ours.get("report") == theirs.get("report")
    assert sorted(ours["tensors"]) == sorted(theirs["tensors"]), "not the same tensors changed"
    for name, expected in theirs["tensors"].items():
        found = ours["tensors"][name]
        assert found["shape"] == expected["shape"] and found["nonzero"] == expected["nonzero"], name
        scale = math.sqrt(expected["sums"][1]) * math.sqrt(math.prod(expected["shape"]))  # bounds each sum
        for got, want in zip(found["sums"], expected["sums"]):
            # Bit-identical on the machine that wrote them; another CPU may round BLAS sums otherwise.
            assert abs(got - want) <= 1e-9 * max(scale, abs(want)), (name, got, want)
