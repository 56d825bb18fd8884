import numpy as np
import pytest

from fedwa.common.errors import ConfigError
from fedwa.core.topology import (
                                 MIXING_RULES,
                                 TOPOLOGIES,
                                 check_mixing,
                                 is_connected,
                                 mixing_matrix,
                                 neighbours,
                                 )


def test_ring_5():
    assert neighbours("ring", 5) == [[1, 4], [0, 2], [1, 3], [2, 4], [0, 3]]


def test_ring_degenerate_sizes():
    assert neighbours("ring", 1) == [[]]
    assert neighbours("ring", 2) == [[1], [0]]


def test_full_4():
    assert neighbours("full", 4) == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_torus_6_is_2x3():
    # grid  0 1 2 / 3 4 5; up and down coincide on 2 rows
    assert neighbours("torus", 6) == [
        [1, 2, 3], [0, 2, 4], [0, 1, 5], [0, 4, 5], [1, 3, 5], [2, 3, 4]
    ]


def test_torus_9_is_3x3():
    nb = neighbours("torus", 9)
    # grid 0 1 2 / 3 4 5 / 6 7 8
    assert nb[0] == [1, 2, 3, 6]
    assert nb[4] == [1, 3, 5, 7]
    assert nb[8] == [2, 5, 6, 7]
    assert all(len(x) == 4 for x in nb)


def test_torus_prime_is_ring():
    assert neighbours("torus", 7) == neighbours("ring", 7)


def test_star_4():
    assert neighbours("star", 4) == [[1, 2, 3], [0], [0], [0]]


def test_exponential_8():
    nb = neighbours("exponential", 8)
    assert nb[0] == [1, 2, 4, 6, 7]
    assert nb[3] == [1, 2, 4, 5, 7]
    assert all(len(x) == 5 for x in nb)


def test_erdos_renyi_reproducible_and_connected():
    for seed in range(6):
        for p in (1e-6, 0.1, 0.3, 1.0):
            nb = neighbours("erdos-renyi", 9, p=p, seed=seed)
            assert nb == neighbours("erdos-renyi", 9, p=p, seed=seed)
            assert is_connected(nb)
    assert neighbours("erdos-renyi", 6, p=1.0) == neighbours("full", 6)


def test_erdos_renyi_tiny_p_is_the_documented_chain():
    # no edge drawn: components {0}, {1}, ... are linked consecutively -> a path
    assert neighbours("erdos-renyi", 4, p=1e-12, seed=3) == [[1], [0, 2], [1, 3], [2]]


def test_erdos_renyi_seed_matters():
    graphs = {str(neighbours("erdos-renyi", 12, p=0.3, seed=s)) for s in range(5)}
    assert len(graphs) > 1


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 9, 10])
def test_graphs_are_undirected_and_connected(topology, n):
    nb = neighbours(topology, n, p=0.2, seed=1)
    assert len(nb) == n
    for i, row in enumerate(nb):
        assert row == sorted(set(row)) and i not in row
        assert all(i in nb[j] for j in row)
    assert is_connected(nb)


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("n", [1, 2, 5, 6, 8, 9])
def test_every_mixing_matrix_is_doubly_stochastic(topology, rule, n):
    nb = neighbours(topology, n, p=0.3, seed=2)
    w = mixing_matrix(nb, rule)
    assert w.dtype == np.float64 and w.shape == (n, n)
    check_mixing(w)
    np.testing.assert_array_equal(w, w.T)
    for i in range(n):
        off = [j for j in range(n) if j != i and j not in nb[i]]
        assert np.all(w[i, off] == 0.0)
        assert np.all(w[i, nb[i]] > 0.0)


def test_star_4_metropolis_by_hand():
    # hub degree 3, leaves degree 1: edge 1/(1+3) = 1/4, hub keeps 1 - 3/4, leaf 1 - 1/4
    w = mixing_matrix(neighbours("star", 4), "metropolis")
    expected = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.25, 0.75, 0.0, 0.0],
            [0.25, 0.0, 0.75, 0.0],
            [0.25, 0.0, 0.0, 0.75],
        ]
    )
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)


def test_metropolis_on_irregular_path():
    # path 0-1-2: degrees 1, 2, 1 -> every edge 1/3
    w = mixing_matrix([[1], [0, 2], [1]], "metropolis")
    np.testing.assert_allclose(w, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])


def test_uniform_ring_is_one_third_and_full_is_one_over_n():
    w = mixing_matrix(neighbours("ring", 6), "uniform")
    for i in range(6):
        np.testing.assert_allclose(w[i, [i, (i - 1) % 6, (i + 1) % 6]], 1 / 3)
    np.testing.assert_allclose(mixing_matrix(neighbours("full", 5), "uniform"), 1 / 5)


def test_uniform_on_irregular_graph_uses_max_degree():
    # star of 5: d_max = 4 -> edges 1/5, hub 1/5, leaves 4/5
    w = mixing_matrix(neighbours("star", 5), "uniform")
    np.testing.assert_allclose(w[0], 0.2)
    np.testing.assert_allclose(np.diag(w)[1:], 0.8)


def test_check_mixing_names_the_failure():
    check_mixing(np.eye(3))
    with pytest.raises(ValueError, match="rows"):
        check_mixing(np.array([[0.5, 0.4], [0.4, 0.5]]))
    with pytest.raises(ValueError, match="columns"):
        check_mixing(np.array([[0.5, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="symmetric"):
        check_mixing(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="negative"):
        check_mixing(np.array([[1.5, -0.5], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match="square"):
        check_mixing(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="finite"):
        check_mixing(np.array([[np.nan]]))


def test_is_connected():
    assert is_connected([[]])
    assert is_connected([[1], [0, 2], [1]])
    assert not is_connected([[1], [0], []])


def test_mixing_rejects_non_undirected_lists():
    with pytest.raises(ValueError, match="undirected"):
        mixing_matrix([[1], []], "uniform")
    with pytest.raises(ValueError, match="itself"):
        mixing_matrix([[0]], "metropolis")


@pytest.mark.parametrize(
    "call, key",
    [
        (lambda: neighbours("hypercube", 4), "topology"),
        (lambda: neighbours("ring", 0), "num-clients"),
        (lambda: neighbours("erdos-renyi", 4, p=0.0), "erdos-renyi-p"),
        (lambda: neighbours("erdos-renyi", 4, p=1.5), "erdos-renyi-p"),
        (lambda: mixing_matrix([[]], "max-degree"), "mixing-rule"),
    ],
)
def test_config_errors(call, key):
    with pytest.raises(ConfigError) as err:
        call()
    assert err.value.key == key
