"""OOD evaluation: detection AUROCs with three scores, OOD metric tables, scoring a run."""

import numpy as np
import pytest
import torch
from helpers import make_questions, tiny_llama, tiny_tokenizer
from sklearn.metrics import roc_auc_score

from loraens.data.tasks import TASKS
from loraens.evaluation.evaluate import score_questions
from loraens.evaluation.ood import OOD_PAIRS, SCORES, evaluate_ood, ood_metrics, ood_partner
from loraens.models.loading import BaseModel
from loraens.models.lora import LoRAEnsemble
from loraens.rundir.load import LoadedEnsemble
from loraens.runtime import Runtime


def _log(probs):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64))


def _random_members(rng, m, n, k, temperature):
    logits = rng.normal(size=(m, n, k)) * temperature
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def test_pairs_name_existing_tasks():
    assert OOD_PAIRS == {"cqa": "mmlu", "mmlu-ss": "mmlu-not-ss", "mmlu-stem": "mmlu-not-stem"}
    assert all(a in TASKS and b in TASKS for a, b in OOD_PAIRS.items())


def test_flat_ood_against_confident_in_distribution_is_detected():
    rng = np.random.default_rng(0)
    confident = _random_members(rng, 3, 50, 4, temperature=8.0)
    flat = np.full((3, 40, 5), -np.log(5.0))
    auroc = ood_metrics(confident, flat)["auroc"]
    assert auroc["ensemble"]["neg_max_prob"] == pytest.approx(1.0)
    assert auroc["ensemble"]["entropy"] == pytest.approx(1.0)
    assert auroc["single (mean)"]["neg_max_prob"] == pytest.approx(1.0)


def test_normalized_entropy_is_blind_to_the_number_of_options():
    # An unsure model is flat on both sets; only the option count differs (cqa 5, mmlu 4).
    # Raw -max p and entropy "detect" the 4-option set perfectly backwards; H / log K ties.
    in_dist = np.full((2, 30, 5), -np.log(5.0))
    ood = np.full((2, 20, 5), -np.inf)
    ood[..., :4] = -np.log(4.0)
    auroc = ood_metrics(in_dist, ood)["auroc"]["ensemble"]
    assert auroc["neg_max_prob"] == 0.0 and auroc["entropy"] == 0.0
    assert auroc["normalized_entropy"] == pytest.approx(0.5)


def test_same_distribution_gives_chance_auroc():
    rng = np.random.default_rng(1)
    both = _random_members(rng, 4, 4000, 4, temperature=1.5)
    auroc = ood_metrics(both[:, :2000], both[:, 2000:])["auroc"]
    for name in SCORES:
        assert auroc["ensemble"][name] == pytest.approx(0.5, abs=0.04)
    assert auroc["single (mean)"]["neg_max_prob"] == pytest.approx(0.5, abs=0.04)


def test_mutual_information_cannot_detect_anything_with_identical_members():
    rng = np.random.default_rng(2)
    one_in = _random_members(rng, 1, 30, 4, temperature=8.0)
    one_out = np.full((1, 20, 4), -np.log(4.0))
    # Identical members agree everywhere: MI is exactly 0 for every question, a full tie.
    auroc = ood_metrics(np.repeat(one_in, 3, axis=0), np.repeat(one_out, 3, axis=0))["auroc"]
    assert auroc["ensemble"]["mutual_information"] == 0.5
    assert auroc["ensemble"]["neg_max_prob"] == pytest.approx(1.0)
    assert ood_metrics(one_in, one_out)["auroc"]["ensemble"]["mutual_information"] == 0.5


def test_hand_checked_example():
    # In: ensemble max p 0.9 and 0.6; OOD: 0.7 and 0.5 (two members, two options).
    lp_in = _log([[[0.9, 0.1], [0.8, 0.2]], [[0.9, 0.1], [0.4, 0.6]]])
    lp_out = _log([[[0.7, 0.3], [0.9, 0.1]], [[0.7, 0.3], [0.1, 0.9]]])
    result = ood_metrics(lp_in, lp_out, ood_labels=np.array([0, 1]), in_labels=np.array([0, 0]))
    auroc = result["auroc"]
    # -max p: OOD 0.7 beats in 0.9 but not 0.6; OOD 0.5 beats both -> 3 of 4 pairs.
    assert auroc["ensemble"]["neg_max_prob"] == pytest.approx(0.75)
    # Entropy: OOD H(.7,.3)=.611 beats H(.9,.1)=.325 but not H(.6,.4)=.673; H(.5,.5) beats both.
    assert auroc["ensemble"]["entropy"] == pytest.approx(0.75)
    # MI: in {0, .087}, OOD {0, .368}: the 0-0 tie counts half -> (0.5 + 0 + 1 + 1) / 4.
    assert auroc["ensemble"]["mutual_information"] == pytest.approx(0.625)
    # Member 0: in {.9, .8} vs OOD {.7, .9} -> 2.5/4; member 1: in {.9, .6} vs {.7, .9} -> 1.5/4.
    assert auroc["single (per member)"] == pytest.approx([0.625, 0.375])
    assert auroc["single (mean)"]["neg_max_prob"] == pytest.approx(0.5)
    assert auroc["single (std)"]["neg_max_prob"] == pytest.approx(0.125)
    # OOD accuracy: the ensemble ties 0.5/0.5 on the second question and picks "a" (wrong);
    # member 0 gets 1 of 2 right, member 1 both.
    assert result["ood"]["ensemble (M=2)"]["accuracy"] == pytest.approx(0.5)
    assert result["ood"]["single (mean)"]["accuracy"] == pytest.approx(0.75)
    assert result["in_distribution"]["ensemble (M=2)"]["accuracy"] == pytest.approx(1.0)
    assert (result["n_members"], result["n_in"], result["n_ood"]) == (2, 2, 2)


def test_tables_are_left_out_without_labels_and_sizes_must_match():
    rng = np.random.default_rng(3)
    result = ood_metrics(_random_members(rng, 2, 5, 3, 1.0), _random_members(rng, 2, 6, 5, 1.0))
    assert "ood" not in result and "in_distribution" not in result
    with pytest.raises(ValueError, match="members"):
        ood_metrics(_random_members(rng, 2, 5, 3, 1.0), _random_members(rng, 3, 5, 3, 1.0))


def test_evaluate_ood_scores_a_loaded_ensemble():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    ensemble = LoRAEnsemble(model, n_members=2)
    ensemble.init_members([1, 2])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ensemble.lora_parameters("B"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    runtime = Runtime(device=torch.device("cpu"), autocast_dtype=None)
    loaded = LoadedEnsemble(ensemble, BaseModel(model, tokenizer, None), runtime, 512)
    in_qs, ood_qs = make_questions(6, seed=1), make_questions(5, seed=2)
    result = evaluate_ood(loaded, in_qs, ood_qs, batch_size=4)
    assert (result["n_members"], result["n_in"], result["n_ood"]) == (2, 6, 5)
    assert set(result["ood"]) == {"single (mean)", "single (std)", "ensemble (M=2)"}

    # The same members' scores, turned into AUROCs and accuracy independently: sklearn's
    # roc_auc_score on the ensemble's (mean of probabilities) -max p, and a plain count.
    p_in = np.exp(score_questions(loaded, in_qs, batch_size=4))
    p_out = np.exp(score_questions(loaded, ood_qs, batch_size=4))
    neg_max = np.r_[-p_in.mean(axis=0).max(axis=1), -p_out.mean(axis=0).max(axis=1)]
    is_ood = np.r_[np.zeros(len(in_qs)), np.ones(len(ood_qs))]
    assert len(set(neg_max)) == len(neg_max)  # no ties: the check does not hinge on them
    assert result["auroc"]["ensemble"]["neg_max_prob"] == pytest.approx(
        roc_auc_score(is_ood, neg_max), abs=1e-12
    )
    members = [
        roc_auc_score(is_ood, np.r_[-p_in[m].max(axis=1), -p_out[m].max(axis=1)]) for m in range(2)
    ]
    assert result["auroc"]["single (per member)"] == pytest.approx(members, abs=1e-12)
    ood_answers = np.array([q.answer for q in ood_qs])
    ood_accuracy = np.mean(p_out.mean(axis=0).argmax(axis=1) == ood_answers)
    assert result["ood"]["ensemble (M=2)"]["accuracy"] == pytest.approx(ood_accuracy)
    unlabelled = [q.__class__(q.id, q.question, q.choices, None) for q in ood_qs]
    assert "ood" not in evaluate_ood(loaded, in_qs, unlabelled, batch_size=4)


def test_ood_partner_is_the_papers_pair_or_an_actionable_error():
    assert [ood_partner(t) for t in ("cqa", "mmlu-ss", "mmlu-stem")] == [
        "mmlu",
        "mmlu-not-ss",
        "mmlu-not-stem",
    ]
    with pytest.raises(ValueError, match="--ood_task or --ood_file"):
        ood_partner("arce")
