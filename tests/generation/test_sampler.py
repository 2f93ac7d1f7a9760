"""Sampler: every filter and penalty against a plain per-row reference, seeds, log-probs, bad params."""

from __future__ import annotations

import math

import pytest
import torch

from plm_engine.generation.sampler import Sampler, SamplingParams

V = 50


def ref_filter(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row, the textbook way: which tokens survive temperature, top-k, top-p, min-p (in that order)."""
    x = logits.double() / (p.temperature if p.temperature > 0 else 1.0)
    keep = [True] * len(x)
    order = sorted(range(len(x)), key=lambda i: -x[i].item())
    if p.top_k > 0:
        for i in order[p.top_k :]:
            keep[i] = False
    if p.top_p < 1:
        kept = [i for i in order if keep[i]]
        z = sum(math.exp(x[i].item()) for i in kept)
        mass = 0.0
        for i in kept:
            if mass >= p.top_p:
                keep[i] = False
            mass += math.exp(x[i].item()) / z
    if p.min_p > 0:
        kept = [i for i in order if keep[i]]
        z = sum(math.exp(x[i].item()) for i in kept)
        top = math.exp(x[kept[0]].item()) / z
        for i in kept:
            if math.exp(x[i].item()) / z < p.min_p * top:
                keep[i] = False
    return torch.tensor(keep)


def ref_penalties(logits, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    x = logits.clone().double()
    seen = set(prompt) | set(output)
    for t in seen:
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


FILTERS = [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=12, top_p=0.6, min_p=0.05),
    dict(temperature=1.0, top_k=1),
    dict(temperature=2.0, top_p=0.05),
]


@pytest.mark.parametrize("kw", FILTERS, ids=[",".join(f"{k}={v}" for k, v in kw.items()) for kw in FILTERS])
def test_filters_match_reference(kw):
    logits = torch.randn(6, V) * 3
    params = [SamplingParams(**kw)] * 6
    out = Sampler(V, 4).filter_logits(logits, params)
    for r in range(6):
        keep = ref_filter(logits[r], params[r])
        assert torch.equal(torch.isfinite(out[r]), keep), f"row {r}: kept {torch.isfinite(out[r]).nonzero()}"
        scaled = logits[r] / params[r].temperature
        torch.testing.assert_close(out[r][keep], scaled[keep])


def test_mixed_rows_each_get_their_own_filter():
    logits = torch.randn(len(FILTERS), V) * 3
    params = [SamplingParams(**kw) for kw in FILTERS]
    out = Sampler(V, 4).filter_logits(logits, params)
    for r, p in enumerate(params):
        assert torch.equal(torch.isfinite(out[r]), ref_filter(logits[r], p)), f"row {r} ({FILTERS[r]})"


def test_samples_follow_the_filtered_distribution():
    """The exponential race draws exactly from softmax(filtered logits): empirical frequencies agree."""
    torch.manual_seed(1)
    logits = torch.randn(V) * 1.5
    p = SamplingParams(temperature=0.8, top_k=6)
    n = 4000
    s = Sampler(V, 1)
    res = s.sample(logits.expand(n, V).contiguous(), [p] * n)
    counts = torch.bincount(torch.tensor(res.token_ids), minlength=V).double() / n
    probs = torch.softmax(s.filter_logits(logits[None], [p])[0].double(), -1)
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    assert (counts - probs).abs().max() < 0.03, (counts - probs).abs().max()


@pytest.mark.parametrize(
    "kw",
    [
        dict(repetition_penalty=1.5),
        dict(repetition_penalty=0.7),
        dict(presence_penalty=0.8, frequency_penalty=0.3),
        dict(repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=1.1),
    ],
)
def test_penalties_match_reference(kw):
    p = SamplingParams(temperature=0, **kw)
    s = Sampler(V, 3)
    prompt, output = [1, 2, 3, 3, 7], [7, 9, 9, 9, 11]
    slot = s.acquire_slot(prompt, output)
    logits = torch.randn(1, V) * 3
    got = s._apply_penalties(logits.clone(), [p], [slot])
    torch.testing.assert_close(got[0].double(), ref_penalties(logits[0], p, prompt, output))
    # Greedy picks the argmax of the penalized logits, and the sampled token is counted for the next step.
    tok = s.sample(logits, [p], [slot]).token_ids[0]
    assert tok == int(ref_penalties(logits[0], p, prompt, output).argmax())
    got2 = s._apply_penalties(logits.clone(), [p], [slot])
    torch.testing.assert_close(got2[0].double(), ref_penalties(logits[0], p, prompt, output + [tok]))


def test_penalty_slots_are_reset_on_reuse():
    s = Sampler(V, 1)
    p = SamplingParams(temperature=0, frequency_penalty=2.0)
    slot = s.acquire_slot([1], [5, 5, 5])
    s.release_slot(slot)
    slot = s.acquire_slot([2], [])
    logits = torch.randn(1, V)
    torch.testing.assert_close(s._apply_penalties(logits.clone(), [p], [slot]), logits)
    with pytest.raises(RuntimeError, match="slots"):
        s.acquire_slot([3], [])


def test_seeded_rows_do_not_depend_on_batch_neighbours():
    s = Sampler(V, 4)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    steps = [torch.randn(5, V) for _ in range(8)]
    alone, g = [], s.new_generator(1234)
    for lg in steps:
        alone.append(s.sample(lg[2:3], [p], generators=[g]).token_ids[0])
    mixed, g = [], s.new_generator(1234)
    others = [
        SamplingParams(temperature=0.5),
        SamplingParams(seed=7),
        SamplingParams(temperature=0),
        SamplingParams(top_k=3),
    ]
    gens = [None, s.new_generator(7), g, None, None]
    for lg in steps:
        ps = [others[0], others[1], p, others[2], others[3]]
        mixed.append(s.sample(lg, ps, generators=gens).token_ids[2])
    assert alone == mixed
    # and a different seed gives a different stream (8 draws from a flat-ish distribution)
    g2 = s.new_generator(99)
    other = [s.sample(lg[2:3], [p], generators=[g2]).token_ids[0] for lg in steps]
    assert other != alone


def test_greedy_rows_in_a_sampled_batch_take_the_argmax():
    logits = torch.randn(4, V)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.5),
        SamplingParams(temperature=0),
        SamplingParams(top_k=2),
    ]
    ids = Sampler(V, 1).sample(logits, params).token_ids
    assert ids[0] == int(logits[0].argmax()) and ids[2] == int(logits[2].argmax())
    assert ids[3] in logits[3].topk(2).indices.tolist()


def test_logprobs_are_the_raw_model_log_probs():
    logits = torch.randn(3, V) * 2
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.5, logprobs=0),
        SamplingParams(temperature=0),
    ]
    res = Sampler(V, 1).sample(logits, params)
    ref = torch.log_softmax(logits.double(), -1)
    lp = res.logprobs[0]
    assert lp["token_id"] == res.token_ids[0] == int(logits[0].argmax())
    assert abs(lp["logprob"] - ref[0, lp["token_id"]].item()) < 1e-5
    assert [t for t, _ in lp["top"]] == ref[0].topk(3).indices.tolist()
    assert all(abs(v - ref[0, t].item()) < 1e-5 for t, v in lp["top"])
    assert res.logprobs[1]["top"] == [] and abs(res.logprobs[1]["logprob"] - ref[1, res.token_ids[1]].item()) < 1e-5
    assert res.logprobs[2] is None


BAD = [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(seed=-1), "seed"),
    (dict(logprobs=-2), "logprobs"),
    (dict(n=2), "n must be 1"),
    (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m.split()[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_params_raise_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="\n\n").stop == ("\n\n",)
