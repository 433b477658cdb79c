"""The pruning path as a recipe of steps (issue 30): ``PruneRecipe`` checks and resolves once,
the keyword API and the command build the same recipe, the report records it whole, and the
block walker gathers what a score declares and knows no score by name (a score is one module
plus one registry line)."""
import json
import subprocess
import sys
import types

import pytest
import torch

from transposable.prune import PruneRecipe, prune, prune_model
from transposable.scores import SCORES
from transposable.scores.base import STATISTICS

transformers = pytest.importorskip("transformers")

from test_prune import calibration, model_folder, tiny_llama  # noqa: E402,F401  (model_folder: a fixture)


def test_a_recipe_is_resolved_once_and_frozen():
    recipe = PruneRecipe((4, 8), score="adaprune", options={"steps": 5}, layers=["*.mlp.*"])
    assert (recipe.pattern.n, recipe.pattern.m, recipe.method) == (4, 8, "cyclecanceling")
    assert dict(recipe.options) == {"steps": 5, "lr": 1e-3}  # the score's defaults fill in
    assert recipe.layers == ("*.mlp.*",) and recipe.step is SCORES["adaprune"]
    assert PruneRecipe("2:4", transposable=False).method == "rowwise"
    with pytest.raises(AttributeError):
        recipe.score = "wanda"
    again = PruneRecipe(**json.loads(json.dumps(recipe.as_dict())))  # what a report records repeats the run
    assert again == recipe


@pytest.mark.parametrize("fields,error,match", [
    (dict(pattern="2-4"), ValueError, r"pattern must look like 'N:M'"),
    (dict(transposable="yes"), TypeError, r"transposable must be True or False"),
    (dict(score="obs"), ValueError, r"unknown score 'obs'; choose from \['sparsegpt', 'wanda', 'magnitude', 'adaprune', 'alps'\]"),
    (dict(method="simplex"), ValueError, r"unknown method 'simplex'"),
    (dict(pattern="4:8", method="exhaustive"), ValueError, r"the exhaustive method enumerates tiles up to m=5, got m=8"),
    (dict(layers="model.layers.0.mlp.up_proj"), TypeError, r"layers must be a list of layer names or glob patterns"),
    (dict(score="wanda", options={"dampening": 0.1}), ValueError, r"score 'wanda' takes no option 'dampening'"),
    (dict(options={"dampening": -0.1}), ValueError, r"dampening must be a non-negative number, got -0.1"),
    (dict(score="adaprune", options={"steps": 0}), ValueError, r"steps must be a positive integer, got 0"),
    (dict(score="adaprune", options={"lr": 0.0}), ValueError, r"lr must be a positive number, got 0.0"),
    (dict(permute=1), TypeError, r"permute must be True or False"),
    (dict(permute_seconds=0), ValueError, r"seconds must be a positive number, got seconds=0"),
    (dict(refit="no"), TypeError, r"refit must be True or False, got 'no'"),
    (dict(refit=True, refit_dampening=0), ValueError, r"refit_dampening must be a positive number, got 0"),
    (dict(refit=True, refit_dampening="0.1"), ValueError, r"refit_dampening must be a positive number, got '0.1'"),
])
def test_every_field_is_checked_with_its_name_and_value(fields, error, match):
    with pytest.raises(error, match=match):
        PruneRecipe(**{"pattern": "2:4", **fields})


def test_the_keyword_api_runs_the_recipe_it_builds():
    models = [tiny_llama(), tiny_llama()]
    prune(models[0], calibration(), "2:4", score="sparsegpt", dampening=0.05, steps=7, layers=["*.mlp.*"])
    prune_model(models[1], calibration(), PruneRecipe("2:4", score="sparsegpt", options={"dampening": 0.05},
                                                      layers=["*.mlp.*"]))
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="recipe must be a PruneRecipe, got str"):
        prune_model(models[1], calibration(), "2:4")


def probe_score(gathered):
    """A real score module made in code: magnitude masks that declare Wanda's statistic and
    record what the walker handed them."""
    from transposable.masks import mask

    module = types.ModuleType("probe")
    module.NEEDS, module.LINEAR_ONLY, module.CHANGES_BIAS = frozenset({"sum_squares"}), True, False
    module.OPTIONS = {}
    module.importance = lambda weight, stats, options: weight.abs()
    module.input_priority = lambda stats: None

    def prune_layer(layer, weight, stats, recipe):
        gathered.append({"sum_squares": stats.sum_squares is not None, "hessian": stats.hessian is not None,
                         "inputs": bool(stats.inputs), "dense_outputs": stats.dense_outputs is not None,
                         "sums": stats.sums is not None, "tokens": stats.tokens})
        return mask(weight, recipe.pattern, transposable=recipe.transposable, method=recipe.method), None, None

    module.prune = prune_layer
    return module


def test_a_new_score_is_one_module_and_one_registry_line(monkeypatch):
    gathered = []
    monkeypatch.setitem(SCORES, "probe", probe_score(gathered))  # the one line
    model = tiny_llama()
    prune(model, calibration(), "2:4", score="probe")
    assert len(gathered) == 14  # every linear layer of the two blocks
    assert all(g == {"sum_squares": True, "hessian": False, "inputs": False, "dense_outputs": False, "sums": False,
                     "tokens": 3 * 4 * 32} for g in gathered)  # what it declared, and nothing else
    assert set(STATISTICS) == {"sum_squares", "hessian", "inputs", "dense_outputs", "sums"}
    with pytest.raises(ValueError, match="score 'probe' is defined for linear layers; use score='magnitude' or "
                                         "'adaprune'"):
        prune(torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1)), [torch.randn(1, 8, 2, 2)], "2:4", score="probe")


def test_every_declared_statistic_reaches_the_score(monkeypatch):
    for needs in ({"hessian"}, {"inputs", "dense_outputs"}, {"sums"}):
        gathered = []
        probe = probe_score(gathered)
        probe.NEEDS = frozenset(needs)
        monkeypatch.setitem(SCORES, "probe", probe)
        prune(tiny_llama(layers=1), calibration(), "2:4", score="probe")
        assert {key for key in STATISTICS if gathered[0][key]} == needs


def test_the_command_offers_every_score_and_option_from_the_registry():
    result = subprocess.run([sys.executable, "-m", "transposable", "prune", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert f"one of {', '.join(SCORES)} (default sparsegpt)" in text
    for name in {name for step in SCORES.values() for name in step.OPTIONS}:
        users = [score for score, step in SCORES.items() if name in step.OPTIONS]
        option = SCORES[users[0]].OPTIONS[name]
        flag = name.replace("_", "-")
        assert f"--{flag} {name.upper()} {', '.join(users)}: {option.help} (default {option.default})" in text


def test_the_command_builds_the_recipe_and_the_report_records_it(model_folder, tmp_path):  # noqa: F811
    from test_prune import prune_cli

    out = tmp_path / "pruned"
    result = prune_cli(model_folder / "model", "--pattern", "2:4", "--transposable", "--calibration",
                       model_folder / "calibration.txt", "--samples", "4", "--seqlen", "32", "--dampening", "0.05",
                       "--refit", "--refit-dampening", "0.2", "-o", out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["recipe"] == {"pattern": "2:4", "transposable": True, "score": "sparsegpt", "method": "exhaustive",
                                "layers": None, "options": {"dampening": 0.05}, "permute": False,
                                "permute_seconds": 1.0, "refit": True, "refit_dampening": 0.2}
    assert PruneRecipe(**report["recipe"]).options["dampening"] == 0.05
    refused = prune_cli(model_folder / "model", "--pattern", "2:4", "--score", "wanda", "--calibration",
                        model_folder / "calibration.txt", "--dampening", "0.05", "-o", tmp_path / "refused")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert "score 'wanda' takes no option 'dampening' (its options: none)" in refused.stderr
    assert not (tmp_path / "refused").exists()
    for flags, message in ((["--refit-dampening", "0.2"], "--refit-dampening 0.2 does nothing without --refit; add "
                            "--refit"),
                           (["--refit", "--refit-dampening", "-1"], "refit_dampening must be a positive number, got "
                            "-1.0")):
        refused = prune_cli(model_folder / "model", "--pattern", "2:4", "--calibration",
                            model_folder / "calibration.txt", *flags, "-o", tmp_path / "refused")
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert message in refused.stderr and not (tmp_path / "refused").exists()
