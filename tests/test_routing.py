"""Pure parts: the load score and the order nodes are tried in."""
import random
from collections import Counter

import pytest

import mesh


class FakeNode:
    def __init__(self, name, active=0, latency=None, weight=1.0, loaded=()):
        self.name, self.active_requests, self.avg_latency, self.weight = name, active, latency, weight
        self.loaded_models = {mesh.model_key(m): {} for m in loaded}

    def load_score(self, neutral_latency=0.0):
        return mesh.load_score(self.active_requests, self.avg_latency, self.weight,
                               neutral_latency=neutral_latency)


@pytest.mark.parametrize("active, latency, weight, neutral, expected", [
    (0, None, 1, 0.0, 0.0),
    (1, 0.0, 1, 0.0, 100.0),
    (0, 2.0, 1, 0.0, 20.0),
    (2, 1.0, 2, 0.0, 105.0),       # weight divides the whole score
    (0, None, 1, 0.5, 5.0),        # never measured: the pool's typical latency, not 0
])
def test_load_score(active, latency, weight, neutral, expected):
    assert mesh.load_score(active, latency, weight, neutral_latency=neutral) == pytest.approx(expected)


@pytest.mark.parametrize("prev, sample, expected", [(None, 1.0, 1.0), (1.0, 2.0, 1.3), (2.0, 2.0, 2.0)])
def test_ewma(prev, sample, expected):
    assert mesh.ewma(prev, sample) == pytest.approx(expected)


@pytest.mark.parametrize("nodes, model, best", [
    ([FakeNode("a", active=1), FakeNode("b")], None, "b"),                         # in-flight weighs most
    ([FakeNode("a", latency=0.5), FakeNode("b", latency=0.1)], None, "b"),        # then latency
    ([FakeNode("a", active=1, latency=0.01), FakeNode("b", latency=5.0)], None, "b"),
    ([FakeNode("a"), FakeNode("b", loaded=["m"])], "m", "b"),                     # loaded wins among equals
    ([FakeNode("a", active=2, weight=3), FakeNode("b", active=1)], None, "a"),    # a 4090 takes more
])
def test_rank_picks_best(nodes, model, best):
    assert mesh.rank_nodes(nodes, model=model, rng=random.Random(1))[0].name == best


def test_unmeasured_node_is_not_favoured_over_fast_ones():
    nodes = [FakeNode("fast", latency=0.1), FakeNode("fast2", latency=0.1), FakeNode("new")]
    # neutral latency is the median of measured nodes: the new node ties, it does not win outright
    wins = Counter(mesh.rank_nodes(nodes, rng=random.Random(i))[0].name for i in range(300))
    assert set(wins) == {"fast", "fast2", "new"}


def test_ties_spread_over_nodes():
    nodes = [FakeNode("a"), FakeNode("b"), FakeNode("c")]
    wins = Counter(mesh.rank_nodes(nodes, rng=random.Random(i))[0].name for i in range(300))
    assert set(wins) == {"a", "b", "c"} and min(wins.values()) > 50
