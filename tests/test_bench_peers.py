"""``engine bench peers``: its client against a scripted server, its metrics against hand
counts, the floors' arithmetic against the model's own parameter counts, and one short
end-to-end run of this server (the transformers peer is left to the benchmark itself: it
needs a chat-templated model and about 20 s to start)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.bench.peers import goodput, same_answers, table
from engine.bench.peers_client import ChatPool, chat_body, closed_loop
from engine.bench.serve import Trace


async def _scripted_server(chunks_per_request: list[list[str]], with_done: bool, with_usage: bool,
                           close_after_reply: bool = False):
    """An HTTP/1.1 server streaming OpenAI chat chunks: request k gets chunks_per_request[k]."""
    served = []

    async def handle(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            body = json.loads(await reader.readexactly(length))
            served.append(body)
            pieces = chunks_per_request[len(served) - 1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            events = [{"choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
            events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
            if with_usage:
                events.append({"choices": [], "usage": {"completion_tokens": len(pieces) + 100}})
            datas = [f"data: {json.dumps(e)}\n\n".encode() for e in events]
            if with_done:
                datas.append(b"data: [DONE]\n\n")
            for data in datas:
                writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            if close_after_reply:        # a keep-alive timeout: the idle connection is closed
                writer.close()
                return

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], served


@pytest.mark.parametrize("with_done,with_usage", [(True, True), (False, False)])
def test_chat_client_reads_openai_streams_with_and_without_done(with_done, with_usage):
    chunks = [["Hel", "lo", " there"], ["a", "b"]]

    async def go():
        server, port, served = await _scripted_server(chunks, with_done, with_usage)
        async with server:
            pool = ChatPool(f"http://127.0.0.1:{port}")
            bodies = [chat_body("m", "p1", 3), chat_body("m", "p2", 2)]
            result = await closed_loop(pool, bodies, 1)
            await pool.close()
        return result, served

    result, served = asyncio.run(go())
    assert [b["messages"][0]["content"] for b in served] == ["p1", "p2"]
    assert served[0]["stream"] is True and served[0]["temperature"] == 0.0 and served[0]["max_tokens"] == 3
    assert result.texts == ["Hello there", "ab"]
    assert [t.error for t in result.traces] == [None, None]
    # the usage chunk's count when there is one (the script inflates it by 100), else the chunks
    assert [t.tokens for t in result.traces] == ([103, 102] if with_usage else [3, 2])
    assert [len(t.itl) for t in result.traces] == [2, 1]
    assert all(t.end >= t.last >= t.first >= t.start for t in result.traces)


def test_chat_client_resends_on_a_keep_alive_connection_the_server_closed():
    async def go():
        server, port, served = await _scripted_server([["x"], ["y"], ["z"]], True, False, close_after_reply=True)
        async with server:
            pool = ChatPool(f"http://127.0.0.1:{port}")
            result = await closed_loop(pool, [chat_body("m", f"p{i}", 1) for i in range(3)], 1)
            await pool.close()
        return result, served

    result, served = asyncio.run(go())
    assert [t.error for t in result.traces] == [None, None, None]
    assert result.texts == ["x", "y", "z"] and len(served) == 3


def test_goodput_counts_requests_within_both_slos():
    def trace(ttft, tpot, tokens=11, error=None):
        t = Trace(start=0.0, first=ttft, last=ttft + tpot * (tokens - 1), end=ttft + tpot * (tokens - 1), tokens=tokens)
        t.error = error
        return t

    traces = [trace(0.5, 0.1), trace(0.5, 0.3), trace(4.0, 0.1), trace(0.5, 0.1, error="x"), trace(1.0, 0.2)]
    # within TTFT 3 s and TPOT 250 ms: the first and the last
    assert goodput(traces, duration=2.0, ttft_ms=3000, tpot_ms=250) == pytest.approx(1.0)


def test_same_answers_and_table_from_a_report():
    def level(texts, **kind):
        stats = {"mean": 10.0, "median": 10.0, "p99": 20.0}
        return {**kind, "texts": texts, "output_throughput": 10.0, "request_throughput": 1.0, "goodput": 1.0,
                "ttft_ms": stats, "tpot_ms": stats, "itl_ms": stats, "e2e_ms": stats, "failed": 0}

    servers = {"coconut": {"levels": [level(["a", "b"], concurrency=1), level(["c"], rate=2.0)]},
               "transformers": {"levels": [level(["a", "x"], concurrency=1), level(["c"], rate=2.0)]}}
    shares = same_answers(servers)
    assert shares == {"transformers": pytest.approx(2 / 3)}
    text = table({"model": "m", "dtype": "float32", "max_tokens": 8, "servers": servers, "same_answers": shares})
    assert "1.00x output tok/s" in text and "c=1" in text and "2/s" in text and "67%" in text


def test_floors_count_the_models_own_weights(tiny_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.bench import floors

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama"), dtype=torch.float32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]   # the decoder's and the head
    macs = sum(m.in_features * m.out_features for m in linears)
    assert floors.matrix_floor(model, 4, repeats=1)["flops"] == 2 * 4 * macs
    # the bytes one step reads: every parameter but the embedding table, unless it is the tied head
    embedding = model.get_input_embeddings().weight
    tied = embedding.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    expected = sum(p.numel() * 4 for p in model.parameters()) - (0 if tied else embedding.numel() * 4)
    assert floors.weight_bytes(model) == expected
    measured = floors.measure(model, [1, 2])
    assert measured["memory_floor_ms"] > 0 and set(measured["batches"]) == {"1", "2"}
    ratios = floors.with_ratios(measured, {"2": {"step_ms": 2 * measured["batches"]["2"]["matrix_floor_ms"]}})
    assert ratios["batches"]["2"]["step_over_matrix_floor"] == pytest.approx(2.0)
    kernels = measured["batches"]["2"]["matrix_kernel_ms"]
    assert measured["batches"]["2"]["matrix_floor_ms"] == pytest.approx(min(kernels.values()))
    # the bandwidth is the fastest read measured, the engine's own matrix-vector product included
    from engine.runner import cpu_kernel

    bandwidth = measured["read_bandwidth"]
    assert bandwidth["bytes_per_s"] == max(v for k, v in bandwidth.items() if k != "bytes_per_s")
    # the products at 1 row read every weight: the memory floor is never above their time
    assert measured["memory_floor_ms"] <= measured["batches"]["1"]["matrix_floor_ms"] * (1 + 1e-9)
    assert ("engine_mv_bytes_per_s" in bandwidth) == ("engine" in kernels) == (cpu_kernel.unavailable_reason() is None)
    # a model the engine packed (engine.runner.packed_linear) counts the same weights
    from engine.runner.packed_linear import pack_linears

    before = (floors.weight_bytes(model), floors.matrix_floor(model, 4, repeats=1)["flops"])
    assert pack_linears(model.get_decoder()) > 0
    assert (floors.weight_bytes(model), floors.matrix_floor(model, 4, repeats=1)["flops"]) == before


def test_floors_run_under_the_engine_process_environment(tiny_checkpoint, monkeypatch):
    """The floors and the engine's step are timed in a child process that gets the engine
    process's variables (a value the user set wins) and the thread count asked for."""
    import argparse

    from engine.bench.peers import floors_report
    from engine.process_engine import engine_environment

    expected = engine_environment()
    for name in expected:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    expected["GOMP_SPINCOUNT"] = "7"
    # the coconut server compiles its step: so does the floors' engine
    args = argparse.Namespace(floor_threads=1, floor_batches="1,2", dtype="float32", args_coconut="--compile",
                              floor_turns=3)
    report = floors_report(Path(tiny_checkpoint("llama")), args)
    assert report["compiled_step"] is True
    assert report["environment"] == expected
    assert report["threads"] == 1 and set(report["batches"]) == {"1", "2"}
    # three turns of steps then floors; each turn's ratio pairs its own step and floor
    assert len(report["turns"]) == 3
    for batch, row in report["batches"].items():
        turns = [t["batches"][batch] for t in report["turns"]]
        for t in turns:
            assert t["engine_step_ms"] > 0
            assert t["step_over_floor"] == pytest.approx(t["engine_step_ms"] / t["floor_ms"])
        assert row["step_over_floor"] == pytest.approx(sorted(t["step_over_floor"] for t in turns)[1])
        assert row["engine_step_ms"] == pytest.approx(sorted(t["engine_step_ms"] for t in turns)[1])
    assert "turns: " in table({"model": "m", "dtype": "float32", "max_tokens": 8, "servers": {}, "floors": report})


def test_turns_combine_into_medians_of_their_own_ratios():
    """Each figure of the combined floors is the median over the turns, and each ratio the
    median of the turns' ratios (not the ratio of the medians): a turn whose read rate
    dropped does not pair its floor with another turn's step."""
    from engine.bench.floors import combine

    def turn(floor, step, bandwidth):
        return {"threads": 2, "memory_floor_ms": floor, "read_bandwidth": {"bytes_per_s": bandwidth},
                "batches": {"1": {"matrix_floor_ms": floor, "engine_step_ms": step,
                                  "step_over_memory_floor": step / floor, "matrix_kernel_ms": {"engine": floor}}}}

    turns = [turn(10.0, 12.0, 5e10), turn(20.0, 22.0, 2.5e10), turn(12.0, 30.0, 4e10)]
    out = combine(turns)
    row = out["batches"]["1"]
    assert out["memory_floor_ms"] == 12.0 and row["engine_step_ms"] == 22.0
    assert out["read_bandwidth"]["bytes_per_s"] == 4e10 and row["matrix_kernel_ms"] == {"engine": 12.0}
    assert row["step_over_memory_floor"] == pytest.approx(1.2)     # turns 1.2, 1.1, 2.5; 22 / 12 would be 1.83
    assert out["threads"] == 2 and out["turns"] == turns


def test_peers_end_to_end_on_this_server(tmp_path, gpt2_checkpoint):
    out = tmp_path / "peers.json"
    cmd = [sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main())", "bench", "peers", "--model",
           str(gpt2_checkpoint), "--servers", "coconut", "--concurrency", "2", "--rates", "20", "--requests", "3",
           "--max-tokens", "5", "--no-floors", "--port", "8793", "--args-coconut", "--max-batch-size 4",
           "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    levels = report["servers"]["coconut"]["levels"]
    assert [lv.get("concurrency", lv.get("rate")) for lv in levels] == [2.0, 20.0]
    for lv in levels:
        assert lv["completed"] == 3 and lv["failed"] == 0
        assert 3 <= lv["total_output_tokens"] <= 15     # 3 requests, at most max_tokens each
        assert lv["server_cpu_s_per_output_token"] > 0
    assert "c=2" in done.stdout and "20/s" in done.stdout


def test_a_chat_template_is_given_to_a_linked_copy_of_the_model(tmp_path):
    """A base model without a chat template (transformers serve refuses chat requests for
    it): the servers get a copy whose files link to the model's, and whose tokenizer config
    carries the template; the model's own directory is left as it was. The bundled Gemma-3
    template renders Gemma's turn format (written out by hand here)."""
    import jinja2

    from engine.bench.peers import bundled_chat_templates, with_chat_template

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gemma3_text"}')
    (model / "tokenizer_config.json").write_text('{"bos_token": "<bos>"}')
    assert "gemma3" in bundled_chat_templates()
    copy = with_chat_template(model, "gemma3", tmp_path / "copy")
    assert (copy / "config.json").is_symlink() and (copy / "config.json").resolve() == (model / "config.json")
    config = json.loads((copy / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<bos>"
    assert json.loads((model / "tokenizer_config.json").read_text()) == {"bos_token": "<bos>"}
    text = jinja2.Environment().from_string(config["chat_template"]).render(
        messages=[{"role": "user", "content": " Hi there "}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Again"}], add_generation_prompt=True, bos_token="<bos>")
    assert text == ("<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nAgain<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(ValueError, match="not a file nor a bundled template"):
        with_chat_template(model, "no-such-template", tmp_path / "other")
