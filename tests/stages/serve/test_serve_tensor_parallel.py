"""Tensor-parallel serving (stages/serve/tensor_parallel.py) on CPU with gloo: TP=2 workers
give the TP=1 greedy and beam outputs through the continuous-batching engine, full precision
and INT4 alike, and a TP=2 Serve replica answers through the OpenAI API with TP=1's text."""

import threading

import openai
import pytest
import torch

from glm.checkpoint import load_inference_checkpoint, save_inference_checkpoint, verified_checkpoint
from glm.config import padded_vocab_size, preset
from glm.generation import GenerationConfig, SpanQuery
from glm.int_quant import QuantSpec
from glm.model import GLMModel
from glm.quantization import quantize_checkpoint
from stages.serve.engine import DecodeEngine, wait_for
from stages.serve.tensor_parallel import RemoteKVCache, start_tensor_parallel

from serve_testing import API_KEY, free_port

pytestmark = pytest.mark.integration

STYLES = {  # the 6B block style in fp32 with P-Tuning v2 prefixes; the 130B style quantized to INT4 (groups of 16 columns)
    "fp32": dict(pre_seq_len=4),
    "int4": dict(ffn_type="geglu", position_encoding="rope_1d", tie_word_embeddings=True),
}
PROMPTS = ["Hello", "话说天下大势，分久必合，合久必分。", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "The quick brown fox", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def checkpoints(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for kind, style in STYLES.items():
        torch.manual_seed(0)
        model = GLMModel(preset("tiny", vocab_size=padded_vocab_size(len(tokenizer)), **style)).eval()
        if model.prefix_encoder is not None:  # prefixes large enough to move every head's attention
            torch.nn.init.normal_(model.prefix_encoder.embedding.weight, std=1.0)
        out[kind] = save_inference_checkpoint(model, tokenizer, root / kind)
    quantize_checkpoint(out["int4"], root / "int4-q", QuantSpec(bits=4, group_size=16), progress=lambda _: None)
    out["int4"] = str(root / "int4-q")
    return out


def query(tokenizer, text: str) -> SpanQuery:
    ids = tokenizer.encode(text) + [tokenizer.special.gmask]
    return SpanQuery(ids, len(ids) - 1, True)


def run_all(engine, items):
    """Every (query, config) submitted at once (so rows join and leave the batch); final events in order."""
    results = [None] * len(items)

    def work(i, q, config):
        results[i] = wait_for(engine, q, config, timeout=300)

    threads = [threading.Thread(target=work, args=(i, q, c)) for i, (q, c) in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


@pytest.mark.parametrize("kind", STYLES)
def test_tp2_workers_give_the_tp1_outputs_through_the_engine(ray_instance, checkpoints, tokenizer, kind):
    import ray

    dense, _ = load_inference_checkpoint(checkpoints[kind])
    with verified_checkpoint(checkpoints[kind]) as (local, config, _, spec):
        model = start_tensor_parallel(local, config, 2)
    try:
        items = [(query(tokenizer, p), GenerationConfig(max_new_tokens=n)) for p, n in zip(PROMPTS, (12, 5, 20, 9, 16))]
        items.append((query(tokenizer, PROMPTS[0]), GenerationConfig(max_new_tokens=8, num_beams=3)))
        engines = [DecodeEngine(m, tokenizer, max_batch_size=3) for m in (dense, model)]
        try:
            expected, got = (run_all(engine, items) for engine in engines)
        finally:
            for engine in engines:
                engine.close()
        assert [e.error for e in got] == [None] * len(items)
        assert [e.tokens for e in got] == [e.tokens for e in expected]
        assert [e.text for e in got] == [e.text for e in expected]
        assert engines[1].stats["batch_rows"] > engines[1].stats["steps"]  # rows shared steps: caches merged
        whole = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
        assert max(ray.get([w.held_bytes.remote() for w in model.workers])) <= 0.6 * whole  # no rank holds it all
        model.flush()  # every cache the engine dropped is freed on the workers too
        assert ray.get([w.cache_ids.remote() for w in model.workers]) == [[], []]
    finally:
        model.close()


def test_an_error_on_every_rank_fails_one_call_and_a_lost_worker_breaks_the_group(ray_instance, checkpoints,
                                                                                 tokenizer):
    import ray

    with verified_checkpoint(checkpoints["fp32"]) as (local, config, _, spec):
        model = start_tensor_parallel(local, config, 2)
    try:
        ids = torch.tensor([tokenizer.encode("Hello")])
        pos = torch.arange(ids.shape[1])[None]
        with pytest.raises(KeyError):  # a cache no rank holds: every rank fails alike, before any collective
            model(ids, pos, past_key_values=RemoteKVCache(model, 10**6), use_cache=True)
        model.check()  # still in step
        assert model(ids, pos).logits.shape == (1, 1, config.vocab_size)
        ray.kill(model.workers[1])
        with pytest.raises(RuntimeError, match="out of step"):
            model(ids, pos)
        with pytest.raises(RuntimeError, match="out of step"):
            model.check()  # what the replica's health check calls: Serve replaces the replica
    finally:
        model.close()


def test_a_tp2_replica_answers_through_the_openai_api_with_tp1_text(ray_instance, checkpoints, tokenizer):
    from stages.serve import ServeConfig, deploy, shutdown
    from stages.serve.protocol import CompletionRequest

    dense, _ = load_inference_checkpoint(checkpoints["fp32"])
    engine = DecodeEngine(dense, tokenizer)
    body = {"model": "glm-tiny", "max_tokens": 16, "temperature": 0}
    try:
        expected = [wait_for(engine, query(tokenizer, p),
                             CompletionRequest(prompt=p, **body).generation_config(16, 0.95, 0.7, 0)).text
                    for p in PROMPTS[:3]]
    finally:
        engine.close()
    config = ServeConfig(checkpoint=checkpoints["fp32"], model_name="glm-tiny", port=free_port(), api_key=API_KEY,
                         tensor_parallel=2, max_batch_size=4, max_waiting=8, request_timeout_s=120)
    url = deploy(config, timeout_s=180)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        answer = client.completions.create(prompt=PROMPTS[:3], **body)
        assert [c.text for c in answer.choices] == expected
    finally:
        shutdown()


def test_a_checkpoint_the_workers_cannot_share_is_refused_before_deploying(checkpoints):
    from stages.serve import ServeConfig, deploy

    with pytest.raises(ValueError, match="tensor_parallel: .*num_heads 4 is not divisible by it"):
        deploy(ServeConfig(checkpoint=checkpoints["fp32"], tensor_parallel=3, port=free_port()))
