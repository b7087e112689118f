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


# ---------------------------------------------------------------------------
# Routing by expected completion time (mesh.Balancer): pure, no I/O.
# ---------------------------------------------------------------------------

def chat(*contents, model="m:1"):
    roles = ["user", "assistant"]
    return {"model": model, "messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}


@pytest.mark.parametrize("earlier, later, shared", [
    (chat("hi " * 400), chat("hi " * 400, "reply", "more"), True),          # a conversation's next turn
    (chat("hi " * 400), chat("hi " * 399 + "ho ", "reply"), False),           # different history
    (chat("hi " * 400), chat("hi " * 400, "reply", model="other:1"), False),  # another model's cache
    ({"model": "m:1", "prompt": "x" * 5000}, {"model": "m:1", "prompt": "x" * 5000 + "y" * 100}, True),
    ({"model": "m:1", "prompt": "x" * 1000}, {"model": "m:1", "prompt": "x" * 1000 + "y"}, False),  # under a block
    # OpenAI's / Anthropic's content blocks: the texts decide, an image part too
    (chat([{"type": "text", "text": "hi " * 400}]), chat([{"type": "text", "text": "hi " * 400}], "reply", "more"), True),
    (chat([{"type": "text", "text": "hi " * 400}]), chat([{"type": "text", "text": "hi " * 399 + "ho"}], "r"), False),
    (chat([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:a"}}]),
     chat([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:b"}}], "r"), False),
    (chat([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
     chat([{"type": "text", "text": "ab"}], "r"), False),
    # images (base64, often megabytes): the same image continues a conversation, another does not
    ({"model": "m:1", "messages": [{"role": "user", "content": "hi", "images": ["A" * 3_000_000]}]},
     {"model": "m:1", "messages": [{"role": "user", "content": "hi", "images": ["A" * 3_000_000]},
                                   {"role": "assistant", "content": "r"}]}, True),
    ({"model": "m:1", "messages": [{"role": "user", "content": "hi", "images": ["A" * 3_000_000]}]},
     {"model": "m:1", "messages": [{"role": "user", "content": "hi", "images": ["B" + "A" * 2_999_999]},
                                   {"role": "assistant", "content": "r"}]}, False),
    # ... also when two images share their first 100 KB (screenshots with the same top bar)
    ({"model": "m:1", "messages": [{"role": "user", "content": "hi", "images": ["A" * 3_000_000]}]},
     {"model": "m:1", "messages": [{"role": "user", "content": "hi", "images": ["A" * 100_000 + "B" * 2_900_000]},
                                   {"role": "assistant", "content": "r"}]}, False),
    (chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 3_000_000}}]),
     chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 3_000_000}}], "r"), True),
])
def test_prompt_prefixes_find_what_a_slot_may_hold(earlier, later, shared):
    path = "/api/chat" if "messages" in earlier else "/api/generate"
    first, _ = mesh.prompt_prefixes(path, earlier)
    second, tokens = mesh.prompt_prefixes(path, later)
    assert (bool(first) and first[-1][0] in {fp for fp, _ in second}) is shared
    assert all(tokens >= n and len(fp) == 8 for fp, n in second)


def test_generate_context_is_recognised():
    fp = mesh.context_fingerprint({"model": "m"}, [1, 2, 3])
    chain, tokens = mesh.prompt_prefixes("/api/generate", {"model": "m", "context": [1, 2, 3], "prompt": "go on"})
    assert chain[0] == (fp, 3) and tokens == 4


def test_generate_context_fingerprints_tell_contexts_apart():
    long = list(range(4096))
    fp = mesh.context_fingerprint({"model": "m"}, long)
    assert fp == mesh.context_fingerprint({"model": "m"}, list(long))
    assert fp != mesh.context_fingerprint({"model": "m"}, long[:-1] + [5])
    assert fp != mesh.context_fingerprint({"model": "other"}, long)
    # not Ollama's token list (a client's own): still a fingerprint, no error
    odd = mesh.context_fingerprint({"model": "m"}, [1, {"a": [2]}])
    assert len(odd) == 8 and odd != mesh.context_fingerprint({"model": "m"}, [1, {"a": [3]}])


SS_BUSY = """0 0 127.0.0.1:11434 127.0.0.1:50000
\t cubic rto:204 lastsnd:9000 lastrcv:20 lastack:20
0 0 127.0.0.1:11434 127.0.0.1:50001
\t cubic rto:204 lastsnd:30 lastrcv:4000 lastack:30
0 0 127.0.0.1:11434 127.0.0.1:50002
\t cubic rto:204 lastsnd:9000 lastrcv:9500 lastack:9000
0 0 127.0.0.1:11434 127.0.0.1:50003
\t cubic rto:204 lastsnd:7000 lastrcv:7000 lastack:7000
"""
PROC_TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000   997        0 1 1
   1: 0100007F:2CAA 0100007F:C350 01 00000000:00000000 00:00000000 00000000   997        0 2 1
   2: 0100007F:C350 0100007F:2CAA 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""


@pytest.mark.parametrize("text, busy", [
    (SS_BUSY, 2),            # waiting on a reply; streaming; idle keep-alive; idle (same ms)
    ("", 0),                 # ss ran: no connection at all
    (PROC_TCP, 1),           # no ss: established connections to the port (not the listener)
    ("sh: ss: not found\n", None),
])
def test_count_busy_connections(text, busy):
    assert mesh.count_busy_connections(text, 11434) == busy


def router(*nodes):
    """nodes: (name, tokens/s or None, slots, loaded models)"""
    r = mesh.Balancer()
    for name, tps, slots, loaded in nodes:
        st = r.node(name, num_parallel=slots)
        if tps:
            st.model("m:1").gen_tps = tps
            st.model("m:1").prompt_tps = 1000.0
        for m in loaded:
            st.loaded[m] = 0.0
    r.reply_tokens["m:1"] = 100.0
    return r


def waiting(r, n, payload=None, model="m:1"):
    reqs = []
    for i in range(n):
        req = mesh.RouteRequest("/api/generate", payload or {"model": model, "prompt": f"q{i}"}, now=0.0)
        req.candidates = list(r.nodes)
        reqs.append(req)
    return reqs


def test_burst_goes_where_it_finishes_first_and_waits_in_mesh_otherwise():
    r = router(("slow", 10.0, 1, ["m:1"]), ("fast", 100.0, 1, ["m:1"]))
    plan = r.plan(waiting(r, 5), 0.0, rng=random.Random(1))
    # fast (1 s each) beats slow (10 s): the 1st goes to fast, the 2nd-4th wait for it
    # in mesh, none is sent to a busy node; slow takes nothing it would finish later
    assert [name for _, name, _, _ in plan] == ["fast"]


def test_slow_node_takes_work_once_waiting_for_the_fast_one_costs_more():
    r = router(("slow", 10.0, 1, ["m:1"]), ("fast", 100.0, 1, ["m:1"]))
    plan = r.plan(waiting(r, 30), 0.0, rng=random.Random(1))
    assert sorted(name for _, name, _, _ in plan) == ["fast", "slow"]
    slow = [req for req, name, _, _ in plan if name == "slow"][0]
    assert slow is not None


def test_requests_are_planned_first_come_first_served():
    r = router(("a", 50.0, 1, ["m:1"]))
    reqs = waiting(r, 3)
    assert [req for req, _, _, _ in r.plan(reqs, 0.0)] == [reqs[0]]


def test_conversation_returns_to_its_node_unless_waiting_costs_more():
    r = router(("a", 50.0, 4, ["m:1"]), ("b", 50.0, 4, ["m:1"]))
    history = chat("words " * 4000)                       # ~6,000 tokens: 6 s to evaluate again
    first = waiting(r, 1, history)[0]
    r.dispatched(first, "b", 1.0, 0.0)
    r.finished(first, "b", 1.0, {"eval_count": 100, "eval_duration": 2e9, "prompt_eval_count": 6000,
                                 "prompt_eval_duration": 6e9, "total_duration": 8e9})
    nxt = waiting(r, 1, chat("words " * 4000, "reply", "and then?"))[0]
    [(_, name, _, why)] = r.plan([nxt], 2.0, rng=random.Random(3))
    assert name == "b" and "cached" in why
    for i in range(4):                                     # b is now full for a long time
        busy = waiting(r, 1)[0]
        r.dispatched(busy, "b", 60.0, 2.0)
    [(_, name, _, _)] = r.plan([nxt], 2.0, rng=random.Random(3))
    assert name == "a"


@pytest.mark.parametrize("reply, concurrency, ok, bad", [
    ({"total_duration": 2e9, "eval_duration": 1.5e9, "prompt_eval_duration": 0.4e9, "eval_count": 10}, 3, 3, None),
    ({"total_duration": 4e9, "eval_duration": 1.5e9, "prompt_eval_duration": 0.4e9, "eval_count": 10}, 3, 2, 3),
    ({"total_duration": 4e9, "eval_duration": 1.5e9, "prompt_eval_duration": 0.4e9, "eval_count": 10}, 2, 1, 2),
])
def test_parallel_slots_are_learned_from_time_queued_inside_ollama(reply, concurrency, ok, bad):
    r = router(("a", None, None, ["m:1"]))
    req = waiting(r, 1)[0]
    r.nodes["a"].parallel_ok = 2
    r.dispatched(req, "a", 1.0, 0.0)
    r.finished(req, "a", 2.0, reply, concurrency=concurrency)
    assert (r.nodes["a"].parallel_ok, r.nodes["a"].parallel_bad) == (ok, bad)
    assert r.nodes["a"].stats["m:1"].gen_tps == pytest.approx(10 / 1.5)


def test_a_model_others_need_is_not_unloaded_while_another_node_can_load():
    r = router(("a", 50.0, 1, ["big-a:1"]), ("b", 50.0, 1, ["big-b:1"]), ("c", 50.0, 1, []))
    for name in r.nodes:
        r.nodes[name].max_loaded = 1
        r.nodes[name].loaded = {k: 0.0 for k in r.nodes[name].loaded}   # used just now
    [(_, name, _, why)] = r.plan(waiting(r, 1, model="big-b:1"), 1.0, explain=True)
    assert name in ("b", "c") and "a=no" in why
    r.nodes["c"].loaded = {"big-a:1": 0.0}
    r.nodes["b"].inflight[99] = (0.0, 30.0, "big-b:1")             # b busy for 30 s
    assert r.plan(waiting(r, 1, model="big-b:1"), 1.0) == []        # waits for b rather than unload


def test_others_requests_seen_at_the_node_count_as_load():
    r = router(("a", 50.0, 2, ["m:1"]), ("b", 50.0, 2, ["m:1"]))
    r.nodes["a"].external = 2
    plan = r.plan(waiting(r, 2), 0.0, rng=random.Random(1))
    assert [name for _, name, _, _ in plan] == ["b", "b"]


def test_num_parallel_setting():
    spec = mesh.NodeSpec.from_settings("gpu", {"num_parallel": "4"})
    assert spec.num_parallel == 4
    with pytest.raises(mesh.ConfigError, match="num_parallel"):
        mesh.NodeSpec.from_settings("gpu", {"num_parallel": "0"})


@pytest.mark.parametrize("busy", [0, 3, 999])
def test_a_node_with_many_slots_plans_as_with_every_slot_listed(busy):
    # num_parallel=1000 (a node that runs everything at once): planning looks at the
    # few soonest slots only, and decides exactly as it would looking at all of them
    def plan(limit_slots):
        r = router(("big", 50.0, 1000, ["m:1"]), ("small", 50.0, 2, ["m:1"]))
        for i in range(busy):
            r.nodes["big"].inflight[i] = (0.0, 2.0, "m:1")
        if not limit_slots:
            full = r._slot_times
            r._slot_times = lambda node, now, limit=None: full(node, now)
        return [(req.model, name, round(t, 6)) for req, name, t, _ in r.plan(waiting(r, 6), 0.0,
                                                                              rng=random.Random(3))]
    assert plan(True) == plan(False)
    assert len(plan(True)) == min(6, 1000 - busy + 2)   # every free slot is used


def test_a_lone_request_is_planned_as_a_batch_would_plan_it():
    # plan() takes a shortcut for one waiting request when every candidate has a slot and
    # the model: it must choose as the full plan does (explain=True always takes that)
    rng = random.Random(7)
    for trial in range(300):
        r = router(*[(name, rng.choice([10.0, 30.0, 30.0, 100.0]), rng.choice([1, 2, 4]),
                      ["m:1"] if rng.random() < 0.9 else ["x:1"]) for name in ("a", "b", "c")])
        firsts = []
        for _ in range(rng.randrange(6)):             # earlier conversations, some still in flight
            firsts.append("w " * rng.randrange(1, 6000))
            req = waiting(r, 1, chat(firsts[-1]))[0]
            name = rng.choice(list(r.nodes))
            r.dispatched(req, name, 1.0, 0.0)
            if rng.random() < 0.7:
                r.finished(req, name, 1.0, {"eval_count": 50, "eval_duration": 1e9, "total_duration": 3e9,
                                            "prompt_eval_count": 400, "prompt_eval_duration": rng.random() * 1e9})
        # the next turn of one of them (its prefix cached somewhere), a new conversation, or a generate
        payload = rng.choice([chat(rng.choice(firsts), "r", "next?") if firsts else None,
                              chat("w " * rng.randrange(1, 6000), "r", "next?"), None])
        nxt = waiting(r, 1, payload)[0]
        nxt.candidates = rng.sample(list(r.nodes), rng.randrange(1, 4))
        seed = rng.randrange(1 << 30)
        lone = r.plan([nxt], 2.0, rng=random.Random(seed))
        full = r.plan([nxt], 2.0, explain=True, rng=random.Random(seed))
        assert [(q, n, round(e, 9), w) for q, n, e, w in lone] == \
            [(q, n, round(e, 9), w.split(" | ")[0]) for q, n, e, w in full], trial
