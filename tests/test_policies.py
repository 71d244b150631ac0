"""Each policy's rule against hand-computed examples, and the registry's grids (docs/design.md, "Policies")."""

from __future__ import annotations

import math

import pytest
import torch

from epee_core.engine.policies import (
    POLICIES,
    POLICY_NAMES,
    PolicyError,
    init_state,
    make_policy,
    policy_step,
)
from epee_core.engine.signals import divergence, margin, normalised_entropy


def replay(policy, layer_probs: list[list[list[float]]], labels=None, multi_label=False):
    """Feed per-layer probabilities [L][B][C] through policy_step; return (exit layers, output probs)."""
    num_layers, batch = len(layer_probs), len(layer_probs[0])
    state = init_state(batch, len(layer_probs[0][0]))
    exit_layer = torch.zeros(batch, dtype=torch.long)
    outputs = torch.zeros(batch, len(layer_probs[0][0]))
    for index, probs in enumerate(layer_probs):
        probs_tensor = torch.tensor(probs)
        logits = torch.logit(probs_tensor) if multi_label else torch.log(probs_tensor)
        step = policy_step(policy, logits, state, index + 1, num_layers, multi_label, labels)
        state = step.state
        newly = step.exit_mask & (exit_layer == 0)
        exit_layer[newly] = index + 1
        outputs[newly] = step.probs[newly]
    return exit_layer.tolist(), outputs


def test_normalised_entropy_is_one_for_uniform_and_zero_for_certain():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]])
    assert normalised_entropy(probs, multi_label=False).tolist() == pytest.approx([1.0, 0.0], abs=1e-6)


def test_multilabel_entropy_is_mean_binary_entropy_over_log2():
    probs = torch.tensor([[0.5, 1.0]])  # one label at 1 bit, one certain → mean 0.5
    assert normalised_entropy(probs, multi_label=True).item() == pytest.approx(0.5, abs=1e-6)


def test_margin_is_top1_minus_top2_and_the_least_certain_labels_for_multi_label():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    assert margin(probs, multi_label=False).tolist() == pytest.approx([0.2, 0.85], abs=1e-6)
    # labels at 0.9 (|2p − 1| = 0.8), 0.4 (0.2) and 0.01 (0.98): the answer is as close to flipping as label 2
    assert margin(torch.tensor([[0.9, 0.4, 0.01]]), multi_label=True).item() == pytest.approx(0.2, abs=1e-6)


def test_fpabee_jsd_matches_worked_number():
    # p = (0.5, 0.5), q = (0.9, 0.1), m = (0.7, 0.3):
    # KL(p||m) = 0.5 ln(5/7) + 0.5 ln(5/3) = 0.087177; KL(q||m) = 0.9 ln(9/7) + 0.1 ln(1/3) = 0.116322
    # JSD = (0.087177 + 0.116322) / 2 = 0.101750
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    assert divergence(p, q, "jsd", multi_label=False).item() == pytest.approx(0.101750, abs=1e-5)


def test_kl_and_reverse_kl_are_the_two_directions():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # KL(p||q) = 0.510826
    backward = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # KL(q||p) = 0.368064
    assert divergence(p, q, "kl", multi_label=False).item() == pytest.approx(forward, abs=1e-5)
    assert divergence(p, q, "reverse_kl", multi_label=False).item() == pytest.approx(backward, abs=1e-5)


def test_multilabel_divergence_is_mean_of_bernoulli_divergences():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.5]])  # second label identical → contributes 0
    assert divergence(p, q, "jsd", multi_label=True).item() == pytest.approx(0.101750 / 2, abs=1e-5)


def test_full_exits_at_last_layer_only():
    layers = [[[0.99, 0.01]]] * 4
    assert replay(make_policy("full"), layers)[0] == [4]


def test_static_exits_at_its_layer():
    layers = [[[0.5, 0.5]]] * 4
    assert replay(make_policy("static", {"layer": 3}), layers)[0] == [3]


def test_max_prob_exits_when_top_probability_reaches_threshold():
    layers = [[[0.6, 0.4]], [[0.85, 0.15]], [[0.95, 0.05]], [[0.99, 0.01]]]
    assert replay(make_policy("max_prob", {"threshold": 0.9}), layers)[0] == [3]


def test_entropy_exits_below_tau():
    # binary entropies: 0.6/0.4 → 0.971, 0.95/0.05 → 0.286, 0.99/0.01 → 0.081
    layers = [[[0.6, 0.4]], [[0.95, 0.05]], [[0.99, 0.01]], [[0.99, 0.01]]]
    assert replay(make_policy("entropy", {"entropy_threshold": 0.2}), layers)[0] == [3]
    assert replay(make_policy("entropy", {"entropy_threshold": 0.3}), layers)[0] == [2]


def test_patience_counts_unchanged_predictions_and_resets_on_change():
    # predictions: 0, 0, 1, 1, 1, 1 → counter 0, 1, 0, 1, 2 → exit at layer 5 with patience 2
    a, b = [0.7, 0.3], [0.3, 0.7]
    layers = [[a], [a], [b], [b], [b], [b]]
    assert replay(make_policy("patience", {"patience": 2}), layers)[0] == [5]
    assert replay(make_policy("patience", {"patience": 1}), layers)[0] == [2]


def test_epee_counter_resets_when_entropy_rises_above_tau():
    confident, unsure = [0.97, 0.03], [0.6, 0.4]  # H = 0.194 and 0.971
    layers = [[confident], [unsure], [confident], [confident], [unsure], [unsure]]
    policy = make_policy("epee", {"entropy_threshold": 0.3, "patience": 2, "fast_ratio": 0.0})
    # counters 1, 0, 1, 2 → exit at layer 4, not at layer 3 (the reset at layer 2 forgets layer 1)
    assert replay(policy, layers)[0] == [4]


def test_epee_fast_path_fires_below_ratio_times_tau():
    very_confident = [0.999, 0.001]  # H = 0.0114 < 0.25 * 0.3 = 0.075
    layers = [[very_confident]] + [[[0.6, 0.4]]] * 3
    policy = make_policy("epee", {"entropy_threshold": 0.3, "patience": 3, "fast_ratio": 0.25})
    assert replay(policy, layers)[0] == [1]
    off = make_policy("epee", {"entropy_threshold": 0.3, "patience": 3, "fast_ratio": 0.0})
    assert replay(off, layers)[0] == [4]


def test_epee_window_mean_returns_mean_over_confident_run():
    layers = [[[0.6, 0.4]], [[0.96, 0.04]], [[0.98, 0.02]], [[0.6, 0.4]]]
    policy = make_policy(
        "epee", {"entropy_threshold": 0.3, "patience": 2, "fast_ratio": 0.0, "ensemble": "window_mean"}
    )
    exits, outputs = replay(policy, layers)
    assert exits == [3]
    assert outputs[0].tolist() == pytest.approx([0.97, 0.03], abs=1e-6)  # mean of layers 2 and 3, not layer 1


def test_fpabee_exits_when_consecutive_layers_stay_similar():
    layers = [[[0.5, 0.5]], [[0.9, 0.1]], [[0.91, 0.09]], [[0.91, 0.09]], [[0.2, 0.8]]]
    policy = make_policy("fpabee", {"similarity": "jsd", "similarity_threshold": 0.01, "patience": 2})
    # JSD(1→2) = 0.10 (≥ δ, counter 0), JSD(2→3) ≈ 0.0003 (1), JSD(3→4) = 0 (2) → exit at layer 4
    assert replay(policy, layers)[0] == [4]


def test_oracle_exits_at_first_correct_layer_else_last():
    layers = [[[0.9, 0.1], [0.9, 0.1]], [[0.2, 0.8], [0.9, 0.1]], [[0.2, 0.8], [0.9, 0.1]]]
    assert replay(make_policy("oracle"), layers, labels=torch.tensor([1, 1]))[0] == [2, 3]


def test_oracle_without_labels_is_refused():
    with pytest.raises(PolicyError, match="gold labels"):
        replay(make_policy("oracle"), [[[0.9, 0.1]]])


def test_multilabel_patience_compares_label_sets():
    # label sets {0}, {0}, {0,1}, {0,1}: unchanged at layer 2, changed at 3, unchanged at 4
    layers = [[[0.9, 0.2]], [[0.8, 0.3]], [[0.8, 0.7]], [[0.9, 0.6]]]
    assert replay(make_policy("patience", {"patience": 1}), layers, multi_label=True)[0] == [2]


def test_multilabel_oracle_needs_the_exact_label_set():
    layers = [[[0.9, 0.2]], [[0.9, 0.7]], [[0.9, 0.7]]]
    assert replay(make_policy("oracle"), layers, labels=torch.tensor([[1.0, 1.0]]), multi_label=True)[0] == [
        2
    ]


def test_min_layer_blocks_earlier_exits():
    layers = [[[0.999, 0.001]]] * 4
    assert replay(make_policy("entropy", {"entropy_threshold": 0.5, "min_layer": 3}), layers)[0] == [3]


def test_unknown_policy_is_named():
    with pytest.raises(PolicyError, match="unknown policy 'fast'"):
        make_policy("fast")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "entropy",
            {"entropy_threshold": 1.5},
            "'entropy_threshold' must be a finite number in \\(0.0, 1.0\\]",
        ),
        ("patience", {"patience": 0}, "'patience' must be an integer in \\[1, 10000\\]"),
        ("patience", {"patience": "two"}, "'patience' must be an integer"),
        ("patience", {"patience": 1.5}, "'patience' must be an integer"),
        ("epee", {"ensemble": "median"}, "'ensemble' must be one of last, window_mean"),
        ("fpabee", {"similarity": "cosine"}, "'similarity' must be one of kl, reverse_kl, jsd"),
        ("entropy", {"patience": 2}, "policy 'entropy' takes no parameter 'patience'"),
        ("entropy", {"temperature": 2}, "unknown policy parameter 'temperature'"),
    ],
)
def test_bad_parameters_name_the_key(name, params, message):
    with pytest.raises(PolicyError, match=message):
        make_policy(name, params)


def test_string_values_from_the_command_line_are_coerced():
    policy = make_policy("epee", {"entropy_threshold": "0.3", "patience": "3", "ensemble": "window_mean"})
    assert policy.params["entropy_threshold"] == 0.3 and policy.params["patience"] == 3


def test_non_strict_ignores_parameters_of_other_policies():
    policy = make_policy("entropy", {"entropy_threshold": 0.1, "patience": 4}, strict=False)
    assert policy.params == {"min_layer": 1, "entropy_threshold": 0.1}


def test_static_layer_beyond_the_model_is_refused():
    with pytest.raises(PolicyError, match="'layer' is 9 but the model has 4 layers"):
        make_policy("static", {"layer": 9}).check_layers(4)


# --- the registry ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_calibration_grid_setting_is_a_valid_policy(name):
    for params in POLICIES[name].grid_settings(num_layers=12):
        assert make_policy(name, params).params.items() >= params.items()


def test_grid_settings_cross_the_parameters_in_order_with_below_depth_up_to_l_minus_1():
    settings = POLICIES["fpabee"].grid_settings(num_layers=3)
    assert settings[:3] == [
        {"similarity": "kl", "similarity_threshold": 1e-4, "patience": 1},
        {"similarity": "kl", "similarity_threshold": 1e-4, "patience": 2},
        {"similarity": "kl", "similarity_threshold": 3e-4, "patience": 1},
    ]
    assert len(settings) == 3 * 8 * 2


def test_a_policy_without_a_grid_is_not_searched():
    assert POLICIES["full"].grid_settings(num_layers=12) == []
