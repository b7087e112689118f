"""The module API (issue 2, item 6) through real sshd nodes."""
import asyncio

import pytest

import mesh
from conftest import needs_sshd
from lab import wait_for

pytestmark = needs_sshd


def run(coro):
    return asyncio.run(coro)


def test_seed_usage_works_as_written(mesh_env):
    lab = mesh_env
    lab.add_node("vengeance", ["qwen2.5:7b"])

    async def go():
        orchestrator = mesh.MeshOrchestrator(config=lab.config_path)
        try:
            response = await orchestrator.generate("Hello, world!", model="qwen2.5:7b")
            best = orchestrator.select_best_node("qwen2.5:7b")
            return response, best
        finally:
            await orchestrator.close()

    response, best = run(go())
    assert response["response"] == "Hello from vengeance." and response["done"] is True
    assert response["node"] == "vengeance"
    assert isinstance(best, mesh.SSHNode) and best.ssh_alias == "vengeance" and best.name == "vengeance"
    assert best.active_requests == 0 and best.avg_latency is not None and best.load_score() >= 0


def test_thirty_concurrent_requests_keep_every_node_busy(mesh_env):
    lab = mesh_env
    for name in ("a", "b", "c"):   # each Ollama runs 8 at once (OLLAMA_NUM_PARALLEL=8), as the user says
        lab.add_node(name, ["qwen2.5:7b"], delay=0.2, settings="num_parallel=8")

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as m:
            results = await asyncio.gather(*(m.generate(f"q{i}", model="qwen2.5:7b") for i in range(30)))
            return results

    results = run(go())
    assert len(results) == 30 and all(r["done"] for r in results)
    served = {name: sum(r["node"] == name for r in results) for name in ("a", "b", "c")}
    assert all(count >= 5 for count in served.values()), served
    # requests really ran at the same time on every node, not one after another
    assert all(lab.fakes[n].max_active >= 5 for n in ("a", "b", "c")), {n: lab.fakes[n].max_active for n in "abc"}
    assert lab.ssh_processes() == []


def test_stream_true_yields_chunks_as_they_are_produced(mesh_env):
    lab = mesh_env
    fake = lab.add_node("alpha", ["m:1"], token_delay=0.3, tokens=["a", "b", "c", "d"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as m:
            stream = await m.generate("x", model="m:1", stream=True)
            chunks, active_at_first = [], None
            async for chunk in stream:
                if active_at_first is None:
                    active_at_first = fake.active   # the node is still generating
                chunks.append(chunk)
            return chunks, active_at_first

    chunks, active_at_first = run(go())
    assert active_at_first == 1
    assert [c["response"] for c in chunks] == ["a", "b", "c", "d", ""]
    assert chunks[-1]["done"] is True and all(c["node"] == "alpha" for c in chunks)


def test_chat_embed_and_pinning(mesh_env):
    lab = mesh_env
    lab.add_node("a", ["m:1"])
    lab.add_node("b", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path, nodes=["a", "b"]) as m:
            chat = await m.chat([{"role": "user", "content": "hi"}], model="m:1", node="b")
            emb = await m.embed(["abc", "de"], model="m:1", node="a")
            streamed = [c async for c in await m.chat([{"role": "user", "content": "x"}], model="m:1",
                                                      node="a", stream=True)]
            return chat, emb, streamed

    chat, emb, streamed = run(go())
    assert chat["message"]["content"] == "Hello from b." and chat["node"] == "b"
    assert emb["node"] == "a" and [v[0] for v in emb["embeddings"]] == [3.0, 2.0]
    assert "".join(c["message"]["content"] for c in streamed) == "Hello from a." and streamed[0]["node"] == "a"


def test_unknown_pinned_node_and_missing_model(mesh_env):
    lab = mesh_env
    lab.add_node("a", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as m:
            with pytest.raises(mesh.UsageError, match="unknown node 'zzz'"):
                await m.generate("x", model="m:1", node="zzz")
            with pytest.raises(mesh.ModelNotFoundError, match='model "big:70b" not found on any node'):
                await m.generate("x", model="big:70b")
            with pytest.raises(mesh.ModelNotFoundError, match="not found on node a"):
                await m.generate("x", model="big:70b", node="a")

    run(go())


def test_concurrent_first_requests_start_exactly_one_master(mesh_env):
    lab = mesh_env
    lab.add_node("a", ["m:1"])
    lab.add_node("b", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as m:
            await asyncio.gather(*(m.generate("x", model="m:1") for _ in range(20)))
            return sum(n.transport.started_master for n in m.nodes)

    assert run(go()) == 2
    masters = lab.ssh_processes(include_masters=True)
    assert len(masters) == 2, masters


def test_close_can_stop_masters(mesh_env):
    lab = mesh_env
    lab.add_node("a", ["m:1"])

    async def go():
        m = mesh.MeshOrchestrator(config=lab.config_path)
        await m.generate("x", model="m:1")
        # the master only: the TCP_NODELAY session's ssh may still be ending (reaped in the background)
        assert len([p for p in lab.ssh_processes(include_masters=True) if "ControlMaster=yes" in p]) == 1
        await m.close(stop_masters=True)

    run(go())
    wait_for(lambda: lab.ssh_processes(include_masters=True) == [], 10, "the master to exit")


def test_model_pulled_on_a_node_after_the_inventory_was_read(mesh_env):
    lab = mesh_env
    fake = lab.add_node("a", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as m:
            await m.refresh()
            fake.models.append("fresh:1b")           # pulled on the node directly
            m.nodes[0].inventory_at -= 5             # the cached list is a few seconds old
            return await m.generate("x", model="fresh:1b")

    assert run(go())["node"] == "a"


def test_model_lists_are_read_in_one_pipelined_exchange(mesh_env):
    lab = mesh_env
    fake = lab.add_node("a", ["m:1"])

    async def go():
        async with mesh.MeshOrchestrator(config=lab.config_path) as m:
            await m.refresh()
            return m.nodes[0].version, sorted(m.nodes[0].models)

    assert run(go()) == ("0.6.1", ["m:1"])
    gets = [r for r in fake.requests if r["body"] is None]
    assert [r["path"] for r in gets] == ["/api/version", "/api/tags", "/api/ps"]
    assert len({r["conn"] for r in gets}) == 1          # one connection, one channel: pipelined
