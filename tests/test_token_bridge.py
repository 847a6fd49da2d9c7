"""Across tokenizers (hpd/stages/token_bridge.py): the teacher's cached distributions carried into a student's
vocabulary, checked against float64 references computed here from the tokenizers' bytes, on real trained
tokenizers (byte-level BPE of two sizes, a SentencePiece-style one with byte fallback)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hpd.stages.losses import CachedTargets, distill_loss
from hpd.stages.token_bridge import SPECIAL, Bridge, vocabulary_bytes
from hpd.storage.cache_batch import ScoredSequence, grid_batch
from tests.tiny_llama import CORPUS, make_tokenizer

pytestmark = pytest.mark.unit

TEXTS = [
    "The capital of France is Paris.",
    "12 plus 30 is 42. Of course, what do you need?",
    "It is sunny and warm, café ☕ today.",
]


@pytest.fixture(scope="module")
def big():
    return make_tokenizer(400, split_digits=True)  # the teacher: longer words, digits one by one


@pytest.fixture(scope="module")
def small():
    # the student: fewer tokens, learned from other text, so it cuts some words where the teacher does not
    return make_tokenizer(300, corpus=[t[::-1] for t in CORPUS] + TEXTS * 10 + ["12 30 42"] * 40)


def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (Metaspace '▁', BPE with byte fallback: characters it lacks become <0xNN>
    pieces), trained on the same corpus without the byte alphabet, as Llama's and Mistral's are."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    core.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces])
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return tok


def teacher_row(tok, text: str, k: int, seed: int = 0, prompt_len: int = 3, pad_rows: int = 0):
    """The teacher's tokens of `text` (+ end of turn) after a `prompt_len`-token prompt, and a cache row for them
    from random full distributions (float64) over len(tok) + pad_rows ids, each giving its actual token some
    mass: (ids, row, full distributions [n, V])."""
    rng = np.random.default_rng(seed)
    response = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = [tok.bos_token_id] * prompt_len + response
    V = len(tok) + pad_rows
    full = rng.dirichlet(np.full(V, 0.05), size=len(response)) + 1e-9
    full[np.arange(len(response)), response] += 0.2
    full /= full.sum(-1, keepdims=True)
    logp = np.log(full)
    top = np.argsort(-logp, -1)[:, :k]
    row = ScoredSequence(
        seq_id=0,
        input_ids=np.array(ids),
        start=prompt_len - 1,
        topk_ids=top,
        topk_logprobs=np.take_along_axis(logp, top, -1).astype(np.float32),
        target_logprob=logp[np.arange(len(response)), response].astype(np.float32),
        tail_logmass=np.log1p(-np.take_along_axis(full, top, -1).sum(-1)).astype(np.float32),
    )
    return ids, row, full


def reference_phi(s_bytes: list[bytes], b: bytes) -> int:
    """The student token `b` begins with, by scanning the whole vocabulary (no dictionary): the exact one, else the
    longest prefix; specials by name only."""
    if b.startswith(SPECIAL):
        return next((i for i, x in enumerate(s_bytes) if x == b), -1)
    best, best_len = -1, 0
    for i, x in enumerate(s_bytes):
        if x and not x.startswith(SPECIAL) and b.startswith(x) and len(x) > best_len:
            best, best_len = i, len(x)
    return best


def projected(bridge: Bridge, ids, row, k):
    plen = row.start + 1
    a = bridge.align(ids[:plen], ids[plen:])
    batch = bridge.batch([row], [ids], [plen], [a], len(a.input_ids), k)
    return a, batch


def distribution(batch, g: int) -> tuple[dict, float]:
    lp = batch.topk_logprobs[0, g].double()
    ids = batch.topk_ids[0, g]
    d = {int(i): math.exp(float(p)) for i, p in zip(ids, lp) if p > -math.inf}
    return d, math.exp(float(batch.tail_logmass[0, g]))


def test_vocabulary_bytes_of_byte_level_and_sentencepiece_tokenizers(big):
    b = vocabulary_bytes(big)
    ids = big("café ☕ today", add_special_tokens=False)["input_ids"]
    assert b"".join(b[i] for i in ids) == "café ☕ today".encode()
    assert b[big.eos_token_id] == SPECIAL + b"<|im_end|>"
    sp = sentencepiece_tokenizer()
    s = vocabulary_bytes(sp)
    ids = sp("café ☕ today", add_special_tokens=False)["input_ids"]
    pieces = sp.convert_ids_to_tokens(ids)
    assert any(p.startswith("<0x") for p in pieces)  # ☕ is not in its vocabulary: byte-fallback pieces
    assert b"".join(s[i] for i in ids) == " café ☕ today".encode()  # with the dummy-prefix space


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_places_every_student_token_on_the_teachers_bytes(big, small, text):
    bridge = Bridge(big, small)
    t_ids = big(text, add_special_tokens=False)["input_ids"] + [big.eos_token_id]
    a = bridge.align([1, 2], t_ids)
    response = a.input_ids[a.prompt_len :]
    assert response[-1] == small.eos_token_id and a.prompt_len == 2
    assert len(response) > len(t_ids)  # the student's tokens are shorter: some start inside a teacher token
    t_bytes, s_bytes = vocabulary_bytes(big), vocabulary_bytes(small)
    t_start = np.cumsum([0] + [len(t_bytes[i]) for i in t_ids])
    s_start = np.cumsum([0] + [len(s_bytes[i]) for i in response])
    assert (a.first >= 0).all()  # every token of the response covered
    for j, s in enumerate(response):
        i, d, last = int(a.first[j]), int(a.offset[j]), int(a.last[j])
        assert t_start[i] + d == s_start[j] and t_start[i] <= s_start[j] < t_start[i + 1]
        assert t_start[last] < s_start[j + 1] <= t_start[last + 1]
    assert (a.offset > 0).any()  # a student token starting inside a teacher's
    assert (a.last > a.first).any() == any(c.isdigit() for c in text)  # and one spanning teacher digits


def test_identical_tokenizers_reproduce_the_cache_and_its_losses(big):
    """The cross-tokenizer path with the teacher's own tokenizer: the same targets as the cache's own batch, and
    every method's loss and gradient the same."""
    k = 24
    ids, row, _ = teacher_row(big, TEXTS[1], k)
    bridge = Bridge(big, big)
    a, crossed = projected(bridge, ids, row, k)
    assert a.input_ids == ids and (a.offset == 0).all()
    own = grid_batch([row], k, length=len(ids))
    for g in range(row.start, len(ids) - 1):
        d1, t1 = distribution(crossed, g)
        d2, t2 = distribution(own, g)
        assert d1.keys() == d2.keys() and all(d1[v] == pytest.approx(d2[v], rel=1e-6) for v in d1)
        assert t1 == pytest.approx(t2, rel=1e-5, abs=1e-9)
        assert float(crossed.target_logprob[0, g]) == pytest.approx(float(own.target_logprob[0, g]), abs=1e-6)
    labels = torch.tensor([ids])
    labels[0, : row.start + 1] = -100
    logits = torch.randn(1, len(ids), len(big), generator=torch.Generator().manual_seed(0))
    for method in ("fkl", "rkl", "jsd", "tvd", "akl", "hpd", "hpd_fkl", "hpd_fkl_expect"):
        grads, values = [], []
        for batch in (crossed, own):
            x = logits.clone().requires_grad_(True)
            torch.manual_seed(1)  # hpd's student samples
            loss, _ = distill_loss(method, x, labels, teacher=CachedTargets(batch))
            loss.backward()
            values.append(float(loss.detach()))
            grads.append(x.grad)
        assert values[0] == pytest.approx(values[1], rel=1e-5), method
        assert torch.allclose(grads[0], grads[1], atol=1e-6), method


@pytest.mark.parametrize("text", TEXTS)
def test_projection_matches_a_float64_reference(big, small, text):
    """Each student position's target against the rule computed here in float64 from the full vocabularies' bytes:
    candidates carried by reference_phi, the teacher's own token to the student's (by the chain it spans), the rest
    to the tail; inside a teacher token, conditioned on the bytes already written."""
    k = 32
    ids, row, _ = teacher_row(big, text, k, seed=len(text))
    bridge = Bridge(big, small)
    a, batch = projected(bridge, ids, row, k)
    t_bytes, s_bytes = bridge.t_bytes, bridge.s_bytes
    plen = row.start + 1
    t_resp = ids[plen:]
    chains = 0
    for j in range(len(a.first)):
        i, d, last = int(a.first[j]), int(a.offset[j]), int(a.last[j])
        at, s_id = plen + i - 1 - row.start, a.input_ids[a.prompt_len + j]
        top, lp = row.topk_ids[at], row.topk_logprobs[at].astype(np.float64)
        t_i, prefix = t_resp[i], t_bytes[t_resp[i]][:d]
        p_t = math.exp(float(row.target_logprob[at]))
        chain = math.exp(float(np.sum(row.target_logprob[at + 1 : at + 1 + last - i], dtype=np.float64)))
        chains += last > i
        want: dict[int, float] = {s_id: p_t * chain}
        tail = math.exp(float(row.tail_logmass[at])) - (0 if t_i in top else p_t) + p_t * (1 - chain)
        consistent = p_t
        for w, x in zip(top, lp):
            if w == t_i or not t_bytes[w].startswith(prefix):
                continue
            consistent += math.exp(x)
            v = reference_phi(s_bytes, t_bytes[w][d:]) if t_bytes[w][d:] else -1
            if v < 0:
                tail += math.exp(x)
            else:
                want[v] = want.get(v, 0.0) + math.exp(x)
        z = consistent + math.exp(float(row.tail_logmass[at])) - (0 if t_i in top else p_t) if d else 1.0
        got, got_tail = distribution(batch, a.prompt_len + j - 1)
        assert got.keys() == want.keys()
        for v in want:
            assert got[v] == pytest.approx(want[v] / z, rel=1e-5)
        assert got_tail == pytest.approx(tail / z, rel=1e-4, abs=1e-7)
        assert sum(got.values()) + got_tail == pytest.approx(1.0, abs=1e-5)
        assert float(batch.target_logprob[0, a.prompt_len + j - 1]) == pytest.approx(math.log(want[s_id] / z), abs=1e-5)
    assert (chains > 0) == any(c.isdigit() for c in text)


def test_a_sentencepiece_student_with_byte_fallback_and_another_end_of_turn(big):
    """Byte-fallback pieces inside a teacher token, the dummy-prefix space, and the end of turn by role:
    the teacher's <|im_end|> is the student's </s>."""
    sp = sentencepiece_tokenizer()
    bridge = Bridge(big, sp)
    k = 24
    ids, row, _ = teacher_row(big, TEXTS[2], k)
    a, batch = projected(bridge, ids, row, k)
    response = a.input_ids[a.prompt_len :]
    assert response[-1] == sp.eos_token_id
    assert any(p.startswith("<0x") for p in sp.convert_ids_to_tokens(response))
    assert (a.first >= 0).all()
    assert b"".join(bridge.s_bytes[i] for i in response[:-1]) == b" " + TEXTS[2].encode()  # the dummy prefix
    for j in range(len(response)):
        d, tail = distribution(batch, a.prompt_len + j - 1)
        assert sum(d.values()) + tail == pytest.approx(1.0, abs=1e-5)
    # the end of turn: the teacher's probability of its own end token, carried whole
    g = a.prompt_len + len(response) - 2
    assert float(batch.target_logprob[0, g]) == pytest.approx(float(row.target_logprob[-1]), abs=1e-6)


def test_padded_head_rows_and_unknown_specials_go_to_the_tail(big):
    """The same tokenizer with the teacher's head padded past its vocabulary (Qwen2.5's 151,936 rows against
    151,665 tokens): the padded rows' mass is tail, everything else as cached. A teacher special the student
    lacks (the student has no <|im_start|>) is tail too."""
    k = 48
    ids, row, full = teacher_row(big, TEXTS[0], k, pad_rows=40)
    a, batch = projected(Bridge(big, big), ids, row, k)
    for j in range(len(a.first)):
        g, at = a.prompt_len + j - 1, a.prompt_len + j - 1 - row.start
        d, tail = distribution(batch, g)
        padded = sum(math.exp(x) for w, x in zip(row.topk_ids[at], row.topk_logprobs[at]) if w >= len(big))
        assert all(v < len(big) for v in d)
        assert tail == pytest.approx(math.exp(float(row.tail_logmass[at])) + padded, rel=1e-5)
    student = make_tokenizer(400)
    student.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    bridge = Bridge(big, student)
    im_start = big.convert_tokens_to_ids("<|im_start|>")
    assert bridge.phi(bridge.t_bytes[im_start]) == student.convert_tokens_to_ids("<|im_start|>")
    assert Bridge(student, make_tokenizer(270)).phi(SPECIAL + b"<tool>") == -1


def test_a_stray_byte_in_the_teachers_reply_does_not_shift_the_rest(big, small):
    """A model can write a byte that is not UTF-8 on its own (half a character, cut off or not): the student gets
    its byte token there, and every token after it stays on the teacher's bytes."""
    bridge = Bridge(big, small)
    stray = bridge.t_bytes.index(b"\xe2")
    head = big("It is sunny", add_special_tokens=False)["input_ids"]
    tail = big(" and warm.", add_special_tokens=False)["input_ids"]
    a = bridge.align([1], head + [stray] + tail + [big.eos_token_id])
    response = a.input_ids[a.prompt_len :]
    assert bridge.s_bytes.index(b"\xe2") in response
    assert (a.first >= 0).all()
    assert a.first[-1] == len(head) + len(tail) + 1  # the end of turn on the teacher's end of turn


def test_an_ensemble_of_teachers_with_other_tokenizers_mixes_what_each_carries(big, small):
    """Two teachers of other tokenizers (byte-level BPE, SentencePiece with byte fallback) score the same text; each
    cache row is carried into the student's tokens by its own bridge, aligned to the same student tokens, then
    mixed: where both have a target, 0.7 / 0.3 of each carried distribution (ids both list: exactly that; the own
    token's log-prob: exactly log of the mixture; total mass 1); where only one has (the second teacher's text stops
    early), that teacher's distribution alone."""
    from hpd.stages.token_bridge import mixed_batch

    sp, k, text = sentencepiece_tokenizer(), 24, TEXTS[1]
    ids_a, row_a, _ = teacher_row(big, text, k, seed=1)
    cut = text[: text.index("Of")]  # the second teacher's text ends before the first's
    ids_b, row_b, _ = teacher_row(sp, cut, k, seed=2)
    ab, bb = Bridge(big, small), Bridge(sp, small)
    a = ab.align([1, 2], ids_a[row_a.start + 1 :])
    b = bb.align([1, 2], ids_b[row_b.start + 1 :], a.input_ids[a.prompt_len :])
    length = len(a.input_ids)
    pa = ab.batch([row_a], [ids_a], [row_a.start + 1], [a], length, k)
    pb = bb.batch([row_b], [ids_b], [row_b.start + 1], [b], length, k)
    mixed = mixed_batch([pa, pb], [0.7, 0.3], len(small), k)
    both, only_a = pa.mask & pb.mask, pa.mask & ~pb.mask
    assert both.sum() >= 5 and only_a.sum() >= 3 and torch.equal(mixed.mask, pa.mask | pb.mask)
    for g in both[0].nonzero()[:, 0].tolist():
        da, ta = distribution(pa, g)
        db, tb = distribution(pb, g)
        dm, tm = distribution(mixed, g)
        for v in set(da) & set(db) & set(dm):
            assert dm[v] == pytest.approx(0.7 * da[v] + 0.3 * db[v], rel=1e-5)
        assert sum(dm.values()) + tm == pytest.approx(1.0, abs=1e-5)
        want = math.log(0.7 * math.exp(float(pa.target_logprob[0, g])) + 0.3 * math.exp(float(pb.target_logprob[0, g])))
        assert float(mixed.target_logprob[0, g]) == pytest.approx(want, abs=1e-5)
    for g in only_a[0].nonzero()[:, 0].tolist():
        da, ta = distribution(pa, g)
        dm, tm = distribution(mixed, g)
        assert dm.keys() == da.keys() and all(dm[v] == pytest.approx(da[v], rel=1e-5) for v in da)
        assert tm == pytest.approx(ta, rel=1e-4, abs=1e-7)
        assert float(mixed.target_logprob[0, g]) == pytest.approx(float(pa.target_logprob[0, g]), abs=1e-6)


def test_an_ensemble_through_identical_bridges_is_the_same_tokenizer_mixture(big):
    """With every tokenizer the teachers' own, mixing after the bridges gives the cache mixture the same-tokenizer
    ensemble trains on (hpd/storage/merge.py, each row mixed directly)."""
    from hpd.stages.token_bridge import mixed_batch
    from hpd.storage.merge import mix_positions

    k = 16
    ids, row_a, _ = teacher_row(big, TEXTS[0], k, seed=3)
    _, row_b, _ = teacher_row(big, TEXTS[0], k, seed=4)
    bridge = Bridge(big, big)
    a = bridge.align(ids[: row_a.start + 1], ids[row_a.start + 1 :])
    parts = [bridge.batch([r], [ids], [r.start + 1], [a], len(ids), k) for r in (row_a, row_b)]
    mixed = mixed_batch(parts, [0.25, 0.75], len(big), k)
    n = len(row_a.target_logprob)
    ref = mix_positions(
        [(r.topk_ids, r.topk_logprobs, r.tail_logmass, r.target_logprob) for r in (row_a, row_b)],
        [0.25, 0.75],
        len(big),
        k,
    )
    g = slice(row_a.start, row_a.start + n)
    assert torch.equal(mixed.topk_ids[0, g], ref[0])
    assert torch.allclose(mixed.topk_logprobs[0, g], ref[1], atol=1e-5)
    assert torch.allclose(mixed.tail_logmass[0, g], ref[2], atol=1e-4)
    assert torch.allclose(mixed.target_logprob[0, g], ref[3], atol=1e-6)
