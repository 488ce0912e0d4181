import numpy as np
import pytest
import torch

from mtlkit.data import SyntheticConfig, make_synthetic
from mtlkit.errors import ConfigError


@pytest.mark.parametrize("p", [-0.5, 0.1, 0.5, 0.9, 1.0])
def test_linear_case_label_correlation_equals_target(p):
    data = make_synthetic(correlation=p, num_rows=40_000, num_sine_terms=0, noise_std=1e-3, seed=3)
    assert abs(data.label_correlation[0, 1] - p) < 0.02


def test_k_tasks_follow_a_target_matrix():
    target = np.array([[1.0, 0.8, 0.2], [0.8, 1.0, 0.5], [0.2, 0.5, 1.0]])
    data = make_synthetic(correlation=target, num_rows=40_000, num_sine_terms=0, noise_std=1e-3, seed=1)
    assert data.labels.shape == (40_000, 3)
    np.testing.assert_allclose(data.label_correlation, target, atol=0.02)
    w = data.task_weights
    cosine = (w @ w.T) / np.outer(np.linalg.norm(w, axis=1), np.linalg.norm(w, axis=1))
    np.testing.assert_allclose(cosine, target, atol=1e-9)


def test_two_task_weights_follow_the_paper_formula():
    data = make_synthetic(correlation=0.3, scale=2.0, num_rows=10, seed=0)
    w1, w2 = data.task_weights
    assert np.isclose(np.linalg.norm(w1), 2.0) and np.isclose(np.linalg.norm(w2), 2.0)
    u1 = w1 / 2.0
    u2 = (w2 / 2.0 - 0.3 * u1) / np.sqrt(1 - 0.3**2)
    assert np.isclose(u1 @ u2, 0.0, atol=1e-12) and np.isclose(np.linalg.norm(u2), 1.0)


def test_sine_terms_lower_the_label_correlation_on_average():
    # The paper's Figure 2: with sine terms the label correlation falls well below the cosine.
    achieved = [make_synthetic(correlation=0.5, num_rows=20_000, seed=s).label_correlation[0, 1] for s in range(8)]
    assert np.mean(achieved) < 0.4


def test_seed_reproduces_the_data_exactly():
    a = make_synthetic(correlation=0.7, num_rows=500, seed=11)
    b = make_synthetic(correlation=0.7, num_rows=500, seed=11)
    c = make_synthetic(correlation=0.7, num_rows=500, seed=12)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_presets():
    ple = SyntheticConfig.preset("ple", num_rows=100)
    assert (ple.input_dim, ple.scale, ple.num_sine_terms) == (512, 1.0, 10)
    assert make_synthetic(ple).inputs.shape == (100, 512)
    assert SyntheticConfig.preset("mmoe").input_dim == 100
    with pytest.raises(ConfigError, match="preset"):
        SyntheticConfig.preset("paper")


@pytest.mark.parametrize("correlation, message", [
    (1.5, r"\[-1, 1\]"),
    (-1.01, r"\[-1, 1\]"),
    ([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]], "positive semi-definite"),
    ([[1.0, 0.2], [0.3, 1.0]], "symmetric"),
    ([[2.0, 0.2], [0.2, 1.0]], "diagonal"),
    ([[1.0, 0.2, 0.1]], "square"),
])
def test_bad_correlations_are_clear_errors(correlation, message):
    with pytest.raises(ConfigError, match=message):
        make_synthetic(correlation=correlation, num_rows=10)


def test_bad_generator_values():
    with pytest.raises(ConfigError, match="input_dim"):
        make_synthetic(correlation=[[1, 0, 0], [0, 1, 0], [0, 0, 1]], input_dim=2, num_rows=10)
    with pytest.raises(ConfigError, match="noise_std"):
        make_synthetic(noise_std=-1.0, num_rows=10)
